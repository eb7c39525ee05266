package e2e

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

// The machine account's token is revoked while avpd runs (every BWS call 401) and the operator
// writes a new one to access_token_file, which the README says changes the token without a
// restart. Uncached secrets get 503 and status says unauthorized meanwhile; once the file
// holds the new token, avpd logs in again with it and requests succeed, with no restart.
func TestBWSRevokedTokenReplacedInFile(t *testing.T) {
	e := newBWSEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	e.waitLog("bws: ready", 10*time.Second)
	if code, _ := e.curlOut("GET", "https://"+hostOpenAI+"/v1/models", "Authorization: Bearer "+phOpenAI); code != 200 {
		t.Fatalf("before the revocation: %d", code)
	}

	old := e.token
	e.fake.Revoke(old)
	tok2 := e.fake.NewToken()
	code, body := e.curlOut("GET", "https://"+hostOther+"/v1/models", "Authorization: Bearer "+phOther)
	if code != 503 || !strings.Contains(body, "secret_unavailable") {
		t.Fatalf("after the revocation, an uncached secret: %d %q, want 503", code, body)
	}
	deadline := time.Now().Add(10 * time.Second)
	for st := e.ctl("status"); !strings.Contains(st, "bws:            unauthorized"); st = e.ctl("status") {
		if time.Now().After(deadline) {
			t.Fatalf("10 s after the revocation, status does not say unauthorized:\n%s", st)
		}
		time.Sleep(250 * time.Millisecond)
	}

	writeFile(t, e.tokFile, []byte(tok2+"\n"), 0o600)
	written := time.Now()
	for {
		code, body = e.curlOut("GET", "https://"+hostOther+"/v1/models", "Authorization: Bearer "+phOther)
		if code == 200 {
			t.Logf("the new token was in use %v after it was written", time.Since(written).Round(100*time.Millisecond))
			break
		}
		if time.Since(written) > 15*time.Second {
			t.Fatalf("15 s after the new token was written, requests still get %d %q\navpctl status:\n%s\ndaemon log:\n%s",
				code, strings.TrimSpace(body), e.ctl("status"), e.avpdLog.String())
		}
		time.Sleep(500 * time.Millisecond)
	}
	if st := e.ctl("status"); !strings.Contains(st, "bws:            ready\n") {
		t.Fatalf("status with the new token:\n%s", st)
	}
	for _, tok := range []string{old, tok2} {
		e.token = tok
		e.assertNoLeak(t, realOpenAI, realOther)
	}
}

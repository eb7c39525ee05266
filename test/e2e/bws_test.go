package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bwsfake"
)

// The BWS backend end to end: the real avpd runs the real sdk-go (in its helper process)
// against bwsfake over HTTPS with its own CA, inside the test's namespace.

const (
	bwsTimeout      = 2 * time.Second
	bwsSyncInterval = 2 * time.Second
	rotatedOpenAI   = "sk-REAL-openai-ROTATED-9a8b7c6d5e4f3a2b1c0d9e8f7a6b"
)

// bwsEnv is an env whose avpd reads secrets from a fake BWS.
type bwsEnv struct {
	*env
	fake    *bwsfake.Server
	token   string
	tokFile string
	// outputs collects every text the test saw (curl bodies, avpctl output) for the final
	// leak check.
	outputs []string
}

func newBWSEnv(t *testing.T) *bwsEnv {
	t.Helper()
	e := &bwsEnv{env: newEnv(t), fake: bwsfake.New()}
	e.fake.Put("OPENAI", realOpenAI)
	e.fake.Put("OTHER", realOther)
	e.fake.Put("JIRA_EMAIL", jiraEmail)
	e.fake.Put("JIRA_TOKEN", jiraToken)
	tl, err := bwsfake.NewTLS()
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	inNetns(t, e.ns, func() {
		ln, err = net.Listen("tcp", "127.0.0.1:0")
	})
	if err != nil {
		t.Fatal(err)
	}
	e.fake.ServeTLS(ln, tl)
	t.Cleanup(e.fake.Close)
	ca := filepath.Join(e.private, "bws-ca.pem")
	writeFile(t, ca, tl.CAPEM, 0o644)

	e.token = e.fake.NewToken()
	e.tokFile = filepath.Join(e.private, "bws-token")
	writeFile(t, e.tokFile, []byte(e.token+"\n"), 0o600)
	api, idp := bwsfake.URLs(bwsfake.BaseURL("https", ln.Addr()))
	cfg := fmt.Sprintf(`version: 1
backend:
  type: bws
  bws:
    organization_id: %s
    access_token_file: %s
    api_url: %s
    identity_url: %s
    timeout: %s
cache: {ttl: 5m, sync_interval: %s}
proxy:
  listen: 127.0.0.1:14322
  upstream_ca_file: %s
audit: {path: %s}
secrets:
%s`, e.fake.OrgID, e.tokFile, api, idp, bwsTimeout, bwsSyncInterval, filepath.Join(e.private, "upstream-ca.pem"), e.audit, defaultBindings)
	writeFile(t, e.config, []byte(cfg), 0o600)

	// The SDK trusts SSL_CERT_FILE instead of the system roots, and (unlike Go) applies
	// proxy variables even to 127.0.0.1: clear them.
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !strings.Contains(strings.ToLower(k), "proxy") && k != "SSL_CERT_FILE" {
			e.avpdEnv = append(e.avpdEnv, kv)
		}
	}
	e.avpdEnv = append(e.avpdEnv, "SSL_CERT_FILE="+ca, "NO_PROXY=127.0.0.1,localhost")
	return e
}

func (e *bwsEnv) curlOut(method, url string, headers ...string) (int, string) {
	e.t.Helper()
	code, body, err := e.curl(agentUID, method, url, headers...)
	if err != nil {
		e.t.Fatalf("curl %s: %v", url, err)
	}
	e.outputs = append(e.outputs, body)
	return code, body
}

func (e *bwsEnv) ctl(args ...string) string {
	e.t.Helper()
	out := string(e.avpctl(args...))
	e.outputs = append(e.outputs, out)
	return out
}

// waitLog polls the daemon log for a substring.
func (e *bwsEnv) waitLog(want string, d time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(e.avpdLog.String(), want) {
		if time.Now().After(deadline) {
			e.t.Fatalf("no %q in the daemon log within %v:\n%s", want, d, e.avpdLog.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// assertNoLeak greps every output of the test for the token, its parts, any JWT and the
// real values (acceptance 5).
func (e *bwsEnv) assertNoLeak(t *testing.T, values ...string) {
	t.Helper()
	id, clientSecret, _, _ := bwsfake.ParseToken(e.token)
	_, key, _ := strings.Cut(e.token, ":")
	texts := map[string]string{
		"daemon log": e.avpdLog.String(),
		"audit log":  mustRead(t, e.audit),
		"status":     string(e.avpctl("status")) + string(e.avpctl("status", "--json")),
		"outputs":    strings.Join(e.outputs, "\n"),
	}
	needles := map[string]string{"access token": e.token, "client secret": clientSecret, "token key": key, "token id": id, "a JWT": "eyJ"}
	for i, v := range values {
		needles[fmt.Sprintf("secret value %d", i)] = v
	}
	for where, text := range texts {
		for what, n := range needles {
			if strings.Contains(text, n) {
				t.Errorf("%s contains %s", where, what)
			}
		}
	}
}

func TestBWSBackend(t *testing.T) {
	e := newBWSEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	e.waitLog("bws: ready", 10*time.Second)
	bearer := "Authorization: Bearer " + phOpenAI
	openaiURL := "https://" + hostOpenAI + "/v1/models"

	t.Run("1_injected_from_bws_over_https", func(t *testing.T) {
		code, body := e.curlOut("POST", "https://"+hostOpenAI+"/v1/chat/completions", bearer)
		if code != 200 || !strings.Contains(body, `"ok":true`) {
			t.Fatalf("curl: %d %q\n%s", code, body, e.avpdLog.String())
		}
		if got := e.upstream.last(t).Header.Get("Authorization"); got != "Bearer "+realOpenAI {
			t.Fatalf("upstream got Authorization %q, want the value from BWS", got)
		}
		e.waitAudit("decision", "inject", "secret", "OPENAI", "path", "/v1/chat/completions")
		if n := e.fake.Count(bwsfake.CountLogin); n != 1 {
			t.Fatalf("logins = %d, want 1", n)
		}
		if out := e.ctl("status"); !strings.Contains(out, "bws:            ready") || !strings.Contains(out, "bws missing:    MISSING") {
			t.Fatalf("status:\n%s", out)
		}
	})

	t.Run("4_64_concurrent_first_requests_1_login_1_fetch", func(t *testing.T) {
		before := len(e.upstream.requests())
		getsBefore := e.fake.Count(bwsfake.CountGet)
		// A slow BWS keeps the one fetch in flight while all 64 requests arrive.
		e.fake.SetLatency(500 * time.Millisecond)
		defer e.fake.SetLatency(0)
		args := []string{"-sS", "--http1.1", "--parallel", "--parallel-immediate", "--parallel-max", "64", "--max-time", "20",
			"-H", "Authorization: Bearer " + phOther}
		for i := range 64 {
			args = append(args, "-o", "/dev/null", "-w", "%{http_code}\n", fmt.Sprintf("https://%s/v1/item/%d", hostOther, i))
		}
		out, err := e.agent(agentUID, "curl", args...)
		if err != nil || strings.Count(out, "200\n") != 64 {
			t.Fatalf("64 parallel requests: %v\n%s", err, out)
		}
		reqs := e.upstream.requests()[before:]
		if len(reqs) != 64 {
			t.Fatalf("upstream got %d requests, want 64", len(reqs))
		}
		for _, r := range reqs {
			if r.Header.Get("Authorization") != "Bearer "+realOther {
				t.Fatalf("a request was not injected: %q", r.Header.Get("Authorization"))
			}
		}
		if l, g := e.fake.Count(bwsfake.CountLogin), e.fake.Count(bwsfake.CountGet)-getsBefore; l != 1 || g != 1 {
			t.Fatalf("64 concurrent first requests made %d login(s) and %d fetch(es) in total, want 1 and 1", l, g)
		}
	})

	t.Run("2_rotation_within_sync_interval", func(t *testing.T) {
		e.fake.Put("OPENAI", rotatedOpenAI)
		rotated := time.Now()
		for {
			code, _ := e.curlOut("GET", openaiURL, bearer)
			got := e.upstream.last(t).Header.Get("Authorization")
			if code == 200 && got == "Bearer "+rotatedOpenAI {
				break
			}
			if code != 200 || got != "Bearer "+realOpenAI {
				t.Fatalf("during rotation: %d %q", code, got)
			}
			if time.Since(rotated) > bwsSyncInterval+time.Second {
				t.Fatalf("the rotated value was not used within sync_interval (%v) + 1s", bwsSyncInterval)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("rotated value in use after %v (sync_interval %v)", time.Since(rotated).Round(time.Millisecond), bwsSyncInterval)
		e.waitLog("secret OPENAI changed in BWS; evicted from the cache", time.Second)
	})

	t.Run("cache_flush_cli", func(t *testing.T) {
		if out := e.ctl("cache", "flush", "OPENAI"); out != "flushed OPENAI: 1 cached value(s) wiped\n" {
			t.Fatalf("cache flush OPENAI: %q", out)
		}
		if out, err := e.avpctlErr("cache", "flush", "NOPE"); err == nil || !strings.Contains(string(out), `no secret "NOPE" in the config`) {
			t.Fatalf("cache flush NOPE: %v %q", err, out)
		}
		gets := e.fake.Count(bwsfake.CountGet)
		if code, _ := e.curlOut("GET", openaiURL, bearer); code != 200 {
			t.Fatalf("after flush: %d", code)
		}
		if n := e.fake.Count(bwsfake.CountGet) - gets; n != 1 {
			t.Fatalf("after a flush the next request made %d fetches, want 1", n)
		}
	})

	t.Run("3_bws_down_503_backend_error", func(t *testing.T) {
		e.ctl("cache", "flush", "OTHER")
		e.fake.SetAPIFault(bwsfake.Refuse)
		defer e.fake.SetAPIFault(bwsfake.OK)
		before := len(e.upstream.requests())
		code, body := e.curlOut("GET", "https://"+hostOther+"/v1/models", "Authorization: Bearer "+phOther)
		if code != 503 || !strings.Contains(body, "agent-vault-proxy: secret_unavailable") {
			t.Fatalf("BWS down: %d %q, want 503", code, body)
		}
		if n := len(e.upstream.requests()) - before; n != 0 {
			t.Fatalf("upstream got %d requests while BWS was down", n)
		}
		e.waitAudit("decision", "backend_error", "secret", "OTHER")
	})

	t.Run("3_hung_bws_503_within_timeout_cached_secret_still_injected", func(t *testing.T) {
		// OPENAI is cached since cache_flush_cli; OTHER is not.
		e.ctl("cache", "flush", "OTHER")
		e.fake.SetAPIFault(bwsfake.Hang)
		e.fake.SetIdentityFault(bwsfake.Hang)
		type result struct {
			code int
			took time.Duration
		}
		hung := make(chan result, 1)
		start := time.Now()
		go func() {
			code, _, _ := e.curl(agentUID, "GET", "https://"+hostOther+"/v1/models", "Authorization: Bearer "+phOther)
			hung <- result{code, time.Since(start)}
		}()
		time.Sleep(300 * time.Millisecond)
		for range 3 {
			t0 := time.Now()
			code, _ := e.curlOut("GET", openaiURL, bearer)
			if code != 200 || e.upstream.last(t).Header.Get("Authorization") != "Bearer "+rotatedOpenAI {
				t.Fatalf("a cached secret was not injected while BWS hangs: %d", code)
			}
			if d := time.Since(t0); d > time.Second {
				t.Fatalf("a cached request took %v while BWS hangs", d)
			}
		}
		r := <-hung
		if r.code != 503 || r.took > bwsTimeout+time.Second {
			t.Fatalf("hung BWS: %d after %v, want 503 within the %v timeout", r.code, r.took, bwsTimeout)
		}
		t.Logf("hung BWS answered 503 after %v (timeout %v)", r.took.Round(time.Millisecond), bwsTimeout)
		e.fake.SetAPIFault(bwsfake.OK)
		e.fake.SetIdentityFault(bwsfake.OK)
		deadline := time.Now().Add(20 * time.Second)
		for {
			code, _ := e.curlOut("GET", "https://"+hostOther+"/v1/models", "Authorization: Bearer "+phOther)
			if code == 200 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("BWS answers again but requests still fail:\n%s", e.avpdLog.String())
			}
			time.Sleep(250 * time.Millisecond)
		}
	})

	t.Run("5_no_token_or_secret_anywhere", func(t *testing.T) {
		e.assertNoLeak(t, realOpenAI, realOther, rotatedOpenAI, jiraToken)
	})
}

// A wrong token is a clear error at start and in status; avpd keeps serving and fails
// requests closed.
func TestBWSWrongToken(t *testing.T) {
	e := newBWSEnv(t)
	e.token = bwsfake.ForeignToken()
	writeFile(t, e.tokFile, []byte(e.token+"\n"), 0o600)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	e.waitLog("the identity server refused the login: the access token is wrong, expired or revoked", 10*time.Second)
	out := e.ctl("status")
	if !strings.Contains(out, "the access token is wrong, expired or revoked") {
		t.Fatalf("status does not say the token is wrong:\n%s", out)
	}
	code, body := e.curlOut("GET", "https://"+hostOpenAI+"/v1/models", "Authorization: Bearer "+phOpenAI)
	if code != 503 || !strings.Contains(body, "secret_unavailable") {
		t.Fatalf("with a wrong token: %d %q, want 503", code, body)
	}
	e.assertNoLeak(t, realOpenAI)
}

// The SDK aborts its process on an identity response without encrypted_payload. Only the
// helper dies: the listener keeps answering, and avpd recovers once BWS is sane.
func TestBWSMalformedIdentityDoesNotTakeDownTheListener(t *testing.T) {
	e := newBWSEnv(t)
	e.fake.SetIdentityFault(bwsfake.Malformed)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	e.waitLog("the SDK panicked", 10*time.Second)
	code, body := e.curlOut("GET", "https://"+hostOpenAI+"/v1/models", "Authorization: Bearer "+phOpenAI)
	if code != 503 || !strings.Contains(body, "secret_unavailable") {
		t.Fatalf("while the helper crashes: %d %q, want 503", code, body)
	}
	if out := e.ctl("status", "--json"); !strings.Contains(out, `"helper_crashes": `) || strings.Contains(out, `"helper_crashes": 0`) {
		t.Fatalf("status does not count the crash:\n%s", out)
	}
	e.fake.SetIdentityFault(bwsfake.OK)
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, _ := e.curlOut("GET", "https://"+hostOpenAI+"/v1/models", "Authorization: Bearer "+phOpenAI)
		if code == 200 && e.upstream.last(t).Header.Get("Authorization") == "Bearer "+realOpenAI {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after the identity server was fixed:\n%s", e.avpdLog.String())
		}
		time.Sleep(250 * time.Millisecond)
	}
	var st struct {
		PID int `json:"pid"`
	}
	json.Unmarshal(e.avpctl("status", "--json"), &st)
	if st.PID == 0 {
		t.Fatal("status unreadable after recovery")
	}
	e.assertNoLeak(t, realOpenAI)
}

// A token file that group or others can read stops the start, naming the file and the fix.
func TestBWSWorldReadableTokenRefusesToStart(t *testing.T) {
	e := newBWSEnv(t)
	writeFile(t, e.tokFile, []byte(e.token+"\n"), 0o644)
	cmd := exec.Command("ip", "netns", "exec", e.ns, filepath.Join(binDir, "avpd"), "serve",
		"--config", e.config, "--state-dir", e.state, "--runtime-dir", e.runtime)
	cmd.Env = e.avpdEnv
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("avpd kept running with a world-readable token file:\n%s", out)
	}
	if err == nil {
		t.Fatalf("avpd exited 0 with a world-readable token file:\n%s", out)
	}
	if !strings.Contains(string(out), e.tokFile) || !strings.Contains(string(out), "run: chmod 600 "+e.tokFile) {
		t.Fatalf("the refusal does not name the file and the chmod:\n%s", out)
	}
	if strings.Contains(string(out), e.token) {
		t.Fatal("the refusal quotes the token")
	}
	if n := e.fake.Count(bwsfake.CountLogin); n != 0 {
		t.Fatalf("avpd logged in %d time(s) with a token others can read", n)
	}
}

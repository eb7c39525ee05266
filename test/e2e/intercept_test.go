package e2e

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// One namespace and one avpd serve all the interception cases; each subtest names the
// acceptance criterion it proves.
func TestTransparentInterception(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	bearer := "Authorization: Bearer " + phOpenAI

	t.Run("1_curl_injected", func(t *testing.T) {
		code, body, err := e.curl(agentUID, "POST", "https://"+hostOpenAI+"/v1/chat/completions", bearer, "Content-Type: application/json")
		if err != nil || code != 200 {
			t.Fatalf("curl: %d %q %v", code, body, err)
		}
		if !strings.Contains(body, `"ok":true`) {
			t.Fatalf("agent did not get the upstream's response: %q", body)
		}
		got := e.upstream.last(t)
		if got.Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("upstream got Authorization %q, want the real key", got.Header.Get("Authorization"))
		}
		if got.SNI != hostOpenAI {
			t.Fatalf("upstream SNI %q", got.SNI)
		}
		ev := e.waitAudit("decision", "inject", "secret", "OPENAI", "method", "POST", "path", "/v1/chat/completions")
		if ev["uid"] != float64(agentUID) {
			t.Fatalf("audit uid = %v, want %d", ev["uid"], agentUID)
		}
	})

	t.Run("1_ipv6_injected", func(t *testing.T) {
		code, body, err := e.curl(agentUID, "GET", "https://"+hostV6+"/anything", bearer)
		if err != nil || code != 200 {
			t.Fatalf("curl over IPv6: %d %q %v", code, body, err)
		}
		got := e.upstream.last(t)
		if got.Header.Get("Authorization") != "Bearer "+realOpenAI || got.SNI != hostV6 {
			t.Fatalf("upstream got %q for %q", got.Header.Get("Authorization"), got.SNI)
		}
		e.waitAudit("decision", "inject", "sni", hostV6, "dst", "[::1]:443")
	})

	t.Run("2_python_urllib", func(t *testing.T) {
		script := filepath.Join(e.dir, "agent.py")
		writeFile(t, script, []byte(fmt.Sprintf(`import json, urllib.request
req = urllib.request.Request("https://%s/v1/models", headers={"Authorization": "Bearer %s"})
with urllib.request.urlopen(req, timeout=20) as r:
    print(r.status, r.read().decode())
`, hostOpenAI, phOpenAI)), 0o644)
		out, err := e.agent(agentUID, "python3", script)
		if err != nil || !strings.HasPrefix(out, "200 ") {
			t.Fatalf("python: %q %v", out, err)
		}
		got := e.upstream.last(t)
		if got.Header.Get("Authorization") != "Bearer "+realOpenAI || !strings.HasPrefix(got.Header.Get("User-Agent"), "Python-urllib") {
			t.Fatalf("upstream got %q from %q", got.Header.Get("Authorization"), got.Header.Get("User-Agent"))
		}
	})

	t.Run("2_node_fetch", func(t *testing.T) {
		if _, err := exec.LookPath("node"); err != nil {
			t.Fatal("node is not installed; .ci/run installs it")
		}
		script := filepath.Join(e.dir, "agent.mjs")
		writeFile(t, script, []byte(fmt.Sprintf(`const r = await fetch("https://%s/v1/models", {headers: {Authorization: "Bearer %s", "User-Agent": "node-agent"}});
console.log(r.status, await r.text());
`, hostOpenAI, phOpenAI)), 0o644)
		out, err := e.agent(agentUID, "node", script)
		if err != nil || !strings.HasPrefix(out, "200 ") {
			t.Fatalf("node: %q %v", out, err)
		}
		got := e.upstream.last(t)
		if got.Header.Get("Authorization") != "Bearer "+realOpenAI || got.Header.Get("User-Agent") != "node-agent" {
			t.Fatalf("upstream got %q from %q", got.Header.Get("Authorization"), got.Header.Get("User-Agent"))
		}
	})

	t.Run("2_curl_http2", func(t *testing.T) {
		out, err := e.agent(agentUID, "curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", "-H", bearer, "https://"+hostOpenAI+"/v1/h2")
		if err != nil || out != "2 200" {
			t.Fatalf("curl --http2: %q %v", out, err)
		}
		got := e.upstream.last(t)
		if got.Path != "/v1/h2" || got.Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("upstream got %q %q", got.Path, got.Header.Get("Authorization"))
		}
	})

	denials := []struct {
		name, method, url, reason, secret string
		header                            string
		extra                             string // one more header, or ""
	}{
		{"3_wrong_method_verbatim", "DELETE", "https://" + hostOpenAI + "/v1/files/1", "method_not_allowed", "OPENAI", bearer, ""},
		{"3_path_outside_glob_verbatim", "GET", "https://" + hostOpenAI + "/admin/keys", "path_not_allowed", "OPENAI", bearer, ""},
		{"3_host_bound_to_other_secret_verbatim", "GET", "https://" + hostOther + "/v1/models", "host_not_bound", "OPENAI", bearer, ""},
		{"3_dotdot_escape_verbatim", "GET", "https://" + hostOpenAI + "/v1/%2e%2e/admin", "path_unsafe", "OPENAI", bearer, ""},
		{"3_placeholder_in_other_header_verbatim", "GET", "https://" + hostOpenAI + "/v1/models", "placeholder_in_wrong_header", "OPENAI", "X-Other: " + phOpenAI, ""},
		{"3_method_override_verbatim", "GET", "https://" + hostOpenAI + "/v1/files/1", "method_override_not_allowed", "OPENAI", bearer, "X-HTTP-Method-Override: DELETE"},
		{"3_path_override_verbatim", "GET", "https://" + hostOpenAI + "/v1/models", "path_override_not_allowed", "OPENAI", bearer, "X-Original-URL: /admin/keys"},
		// Puma and Unicorn read X_HTTP_METHOD_OVERRIDE as X-HTTP-Method-Override.
		{"3_underscore_method_override_verbatim", "GET", "https://" + hostOpenAI + "/v1/files/1", "method_override_not_allowed", "OPENAI", bearer, "X_HTTP_METHOD_OVERRIDE: DELETE"},
		// PHP reads "[method" in a query as _method.
		{"3_php_query_method_override_verbatim", "GET", "https://" + hostOpenAI + "/v1/files/1?%5Bmethod=DELETE", "method_override_not_allowed", "OPENAI", bearer, ""},
	}
	for _, tc := range denials {
		t.Run(tc.name, func(t *testing.T) {
			before := len(e.upstream.requests())
			hdrs := []string{tc.header, "X-Case: " + tc.name}
			if tc.extra != "" {
				hdrs = append(hdrs, tc.extra)
			}
			code, _, err := e.curl(agentUID, tc.method, tc.url, hdrs...)
			if err != nil || code != 200 {
				t.Fatalf("curl: %d %v", code, err)
			}
			reqs := e.upstream.requests()
			if len(reqs) != before+1 {
				t.Fatalf("upstream got %d requests, want 1", len(reqs)-before)
			}
			got := reqs[len(reqs)-1]
			name, value, _ := strings.Cut(tc.header, ": ")
			if got.Header.Get(name) != value {
				t.Fatalf("upstream got %s %q, want the placeholder verbatim %q", name, got.Header.Get(name), value)
			}
			for _, vs := range got.Header {
				for _, v := range vs {
					if strings.Contains(v, realOpenAI) || strings.Contains(v, realOther) {
						t.Fatalf("a real secret reached the upstream on a denied request")
					}
				}
			}
			e.waitAudit("decision", "forward_verbatim", "reason", tc.reason, "secret", tc.secret)
		})
	}

	t.Run("I11_placeholder_in_query_and_body_not_replaced", func(t *testing.T) {
		code, _, err := e.curl(agentUID, "POST", "https://"+hostOpenAI+"/v1/chat?key="+phOpenAI, bearer, `-d{"key":"`+phOpenAI+`"}`)
		if err != nil || code != 200 {
			t.Fatalf("curl: %d %v", code, err)
		}
		got := e.upstream.last(t)
		if got.Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("the configured header was not injected")
		}
		if !strings.Contains(got.Path, "key="+phOpenAI) || got.Body != `{"key":"`+phOpenAI+`"}` {
			t.Fatalf("query %q / body %q changed: only the configured header may be", got.Path, got.Body)
		}
	})

	t.Run("3_body_method_override_refused", func(t *testing.T) {
		// Rails, Laravel and Symfony act on a _method in the body: a key bound to GET and POST
		// must not be usable to DELETE through one.
		for _, tc := range []struct {
			name string
			args []string
		}{
			{"form", []string{bearer, "-d_method=DELETE"}},
			{"json", []string{bearer, "Content-Type: application/json", `-d{"model":"m","\u005fmethod":"delete"}`}},
			{"multipart", []string{bearer, "-Fpurpose=batch", "-F_method=DELETE"}},
		} {
			before := len(e.upstream.requests())
			code, body, err := e.curl(agentUID, "POST", "https://"+hostOpenAI+"/v1/files/1", tc.args...)
			if err != nil || code != 403 || !strings.Contains(body, "agent-vault-proxy: method_override_not_allowed") {
				t.Fatalf("%s: got %d %q %v, want 403", tc.name, code, body, err)
			}
			if n := len(e.upstream.requests()) - before; n != 0 {
				t.Fatalf("%s: upstream got %d requests", tc.name, n)
			}
		}
		e.waitAudit("decision", "refuse", "reason", "method_override_not_allowed", "method", "POST")
		// The same POST without the override is injected.
		code, _, err := e.curl(agentUID, "POST", "https://"+hostOpenAI+"/v1/files/1", bearer, "-dpurpose=batch&method=DELETE")
		if err != nil || code != 200 {
			t.Fatalf("curl: %d %v", code, err)
		}
		if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+realOpenAI || got.Body != "purpose=batch&method=DELETE" {
			t.Fatalf("upstream got %q with body %q", got.Header.Get("Authorization"), got.Body)
		}
		// And as multipart, as curl -F (and the SDKs' file uploads) send it.
		code, _, err = e.curl(agentUID, "POST", "https://"+hostOpenAI+"/v1/files/1", bearer, "-Fpurpose=batch", "-Fmethod=DELETE")
		if err != nil || code != 200 {
			t.Fatalf("curl -F: %d %v", code, err)
		}
		if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+realOpenAI || !strings.Contains(got.Body, `name="purpose"`) {
			t.Fatalf("upstream got %q with body %q", got.Header.Get("Authorization"), got.Body)
		}
	})

	t.Run("4_host_mismatch_421", func(t *testing.T) {
		before := len(e.upstream.requests())
		code, body, err := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/models", bearer, "Host: "+hostOther)
		if err != nil || code != 421 || !strings.Contains(body, "agent-vault-proxy: host_mismatch") {
			t.Fatalf("got %d %q %v, want 421", code, body, err)
		}
		if n := len(e.upstream.requests()) - before; n != 0 {
			t.Fatalf("upstream got %d requests on a host mismatch", n)
		}
		e.waitAudit("decision", "host_mismatch", "status", "421")
	})

	t.Run("4_h2_authority_mismatch_421", func(t *testing.T) {
		// curl sends a custom Host as :authority over HTTP/2: the per-request check must see it
		// even though the connection's SNI was fine (HTTP/2 coalescing).
		before := len(e.upstream.requests())
		out, err := e.agent(agentUID, "curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", "-H", bearer, "-H", "Host: "+hostOther, "https://"+hostOpenAI+"/v1/models")
		if err != nil || out != "2 421" {
			t.Fatalf("h2 with a foreign :authority: %q %v", out, err)
		}
		if n := len(e.upstream.requests()) - before; n != 0 {
			t.Fatalf("upstream got %d requests", n)
		}
	})

	t.Run("5_unbound_host_passthrough", func(t *testing.T) {
		// Trust only the upstream's own CA: success proves the agent saw the real server
		// certificate, not one from avpd's CA.
		out, err := e.agent(agentUID, "curl", "-sS", "--cacert", filepath.Join(e.dir, "upstream-ca.pem"), "-w", "\n%{http_code}", "-H", bearer, "https://"+hostUnbound+"/v1/models")
		if err != nil || !strings.HasSuffix(out, "\n200") {
			t.Fatalf("passthrough: %q %v", out, err)
		}
		out, err = e.agent(agentUID, "sh", "-c", "curl -sS -v -o /dev/null --cacert "+filepath.Join(e.dir, "upstream-ca.pem")+" https://"+hostUnbound+"/ 2>&1 | grep -i issuer")
		if err != nil || !strings.Contains(out, "e2e upstream CA") {
			t.Fatalf("issuer seen by agent: %q %v", out, err)
		}
		got := e.upstream.last(t)
		if got.Header.Get("Authorization") != "" && got.Header.Get("Authorization") != "Bearer "+phOpenAI {
			t.Fatalf("unbound host got %q", got.Header.Get("Authorization"))
		}
		e.waitAudit("decision", "passthrough", "sni", hostUnbound)
	})

	t.Run("8_backend_failure_503", func(t *testing.T) {
		before := len(e.upstream.requests())
		code, body, err := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/models", "X-Api-Key: "+phMissing)
		if err != nil || code != 503 || !strings.Contains(body, "agent-vault-proxy: secret_unavailable") {
			t.Fatalf("got %d %q %v, want 503", code, body, err)
		}
		if n := len(e.upstream.requests()) - before; n != 0 {
			t.Fatalf("upstream got %d requests after a backend failure", n)
		}
		e.waitAudit("decision", "backend_error", "secret", "MISSING")
	})

	// Both of avpd's HTTP paths: its own HTTP/1.1 loop and net/http's HTTP/2.
	for _, proto := range []string{"--http1.1", "--http2"} {
		t.Run("9_sse_streams_"+strings.TrimPrefix(proto, "--"), func(t *testing.T) {
			cmd := e.agentCmd(agentUID, "curl", "-sS", "-N", proto, "--max-time", "20", "-H", bearer, "https://"+hostOpenAI+"/v1/stream")
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Wait()
			r := bufio.NewReader(stdout)
			line, err := readLine(r, 10*time.Second)
			if err != nil || line != "data: event 1\n" {
				t.Fatalf("first SSE line %q %v", line, err)
			}
			e.upstream.mu.Lock()
			sent := e.upstream.sseSent
			e.upstream.mu.Unlock()
			if sent != 1 {
				t.Fatalf("agent got the first event only after %d events were sent: the stream is buffered", sent)
			}
			if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+realOpenAI {
				t.Fatalf("stream request not injected")
			}
		})
	}

	t.Run("template_composes_basic_auth", func(t *testing.T) {
		code, body, err := e.curl(agentUID, "GET", "https://"+hostJira+"/rest/api/3/myself", "Authorization: Basic "+phJira)
		if err != nil || code != 200 {
			t.Fatalf("curl: %d %q %v", code, body, err)
		}
		want := "Basic " + base64.StdEncoding.EncodeToString([]byte(jiraEmail+":"+jiraToken))
		if got := e.upstream.last(t).Header.Get("Authorization"); got != want {
			t.Fatalf("upstream got %q, want %q", got, want)
		}
		e.waitAudit("decision", "inject", "secret", "JIRA", "sni", hostJira)
	})

	t.Run("inject_also_replaces_in_each_listed_header", func(t *testing.T) {
		// A client that sends the key in the other listed header (X-Api-Key here) gets it
		// replaced there; one that sends both gets both; an unlisted header gets nothing.
		code, body, err := e.curl(agentUID, "GET", "https://"+hostOther+"/v1/models", "X-Api-Key: "+phOther)
		if err != nil || code != 200 {
			t.Fatalf("curl: %d %q %v", code, body, err)
		}
		if got := e.upstream.last(t).Header.Get("X-Api-Key"); got != realOther {
			t.Fatalf("upstream X-Api-Key %q, want the real value", got)
		}
		code, body, err = e.curl(agentUID, "GET", "https://"+hostOther+"/v1/models", "X-Api-Key: "+phOther, "Authorization: Bearer "+phOther)
		if err != nil || code != 200 {
			t.Fatalf("curl: %d %q %v", code, body, err)
		}
		last := e.upstream.last(t)
		if last.Header.Get("X-Api-Key") != realOther || last.Header.Get("Authorization") != "Bearer "+realOther {
			t.Fatalf("upstream got X-Api-Key %q, Authorization %q", last.Header.Get("X-Api-Key"), last.Header.Get("Authorization"))
		}
		code, body, err = e.curl(agentUID, "GET", "https://"+hostOther+"/v1/models", "X-Key: "+phOther)
		if err != nil || code != 200 {
			t.Fatalf("curl: %d %q %v", code, body, err)
		}
		if got := e.upstream.last(t).Header.Get("X-Key"); got != phOther {
			t.Fatalf("an unlisted header was changed to %q", got)
		}
		e.waitAudit("decision", "forward_verbatim", "reason", "placeholder_in_wrong_header", "secret", "OTHER")
		// The operator sees it: status counts it by reason, and doctor warns.
		if st := string(e.avpctl("status")); !strings.Contains(st, "verbatim:       ") || !strings.Contains(st, "placeholder_in_wrong_header") {
			t.Fatalf("status does not count the misplaced placeholder:\n%s", st)
		} else if !strings.Contains(st, "file missing:   MISSING ") {
			t.Fatalf("status does not name the secret the secrets file has no value for:\n%s", st)
		}
		if c := doctorCheck(t, e, "placeholders"); c.Status != "warn" || !strings.Contains(c.Fix, "inject.also") {
			t.Fatalf("doctor's placeholders check: %+v", c)
		}
	})

	t.Run("uid_scoped_binding_uses_kernel_uid", func(t *testing.T) {
		e.avpctl("enroll-uid", strconv.Itoa(otherAgentUID))
		defer e.avpctl("unenroll-uid", strconv.Itoa(otherAgentUID))
		code, _, err := e.curl(otherAgentUID, "GET", "https://"+hostUIDOnly+"/x", "Authorization: Bearer "+phOther)
		if err != nil || code != 200 {
			t.Fatalf("curl as %d: %d %v", otherAgentUID, code, err)
		}
		if got := e.upstream.last(t).Header.Get("Authorization"); got != "Bearer "+phOther {
			t.Fatalf("uid %d not in uids got %q", otherAgentUID, got)
		}
		e.waitAudit("decision", "forward_verbatim", "reason", "uid_not_allowed", "uid", strconv.Itoa(otherAgentUID))
		code, _, err = e.curl(agentUID, "GET", "https://"+hostUIDOnly+"/x", "Authorization: Bearer "+phOther)
		if err != nil || code != 200 {
			t.Fatalf("curl as %d: %d %v", agentUID, code, err)
		}
		if got := e.upstream.last(t).Header.Get("Authorization"); got != "Bearer "+realOther {
			t.Fatalf("uid %d in uids was not injected: %q", agentUID, got)
		}
	})

	t.Run("I1_echoing_upstream_is_scrubbed", func(t *testing.T) {
		out, err := e.agent(agentUID, "curl", "-sS", "-i", "--compressed", "-H", bearer, "https://"+hostOpenAI+"/v1/echo")
		if err != nil {
			t.Fatalf("curl: %v", err)
		}
		if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("echo request was not injected")
		}
		if strings.Contains(out, realOpenAI) {
			t.Fatalf("the agent received the real secret from an echoing upstream:\n%s", out)
		}
		if !strings.Contains(out, `{"authorization":"Bearer `+phOpenAI+`"}`) || !strings.Contains(strings.ToLower(out), "x-echo-authorization: bearer "+strings.ToLower(phOpenAI)) {
			t.Fatalf("echo not scrubbed to the placeholder:\n%s", out)
		}
	})

	// (A trailer echo is tested with a Go HTTP/2 client in internal/intercept: curl does
	// not show trailers.)
	t.Run("I1_echo_in_103_and_gzip_is_scrubbed", func(t *testing.T) {
		for _, in := range []string{"early", "gzip"} {
			out, err := e.agent(agentUID, "curl", "-sS", "-i", "--http2", "--compressed", "-H", bearer, "https://"+hostOpenAI+"/v1/echo?in="+in)
			if err != nil {
				t.Fatalf("%s: curl: %v", in, err)
			}
			if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+realOpenAI {
				t.Fatalf("%s: the echo request was not injected", in)
			}
			if strings.Contains(out, realOpenAI) {
				t.Fatalf("%s: the agent received the real secret:\n%s", in, out)
			}
			if !strings.Contains(out, phOpenAI) {
				t.Fatalf("%s: no echo of the placeholder in what the agent got:\n%s", in, out)
			}
		}
	})

	t.Run("I1_echo_in_reason_phrase_and_ranges_is_scrubbed", func(t *testing.T) {
		for _, tc := range []struct {
			in   string
			args []string
		}{
			{"reason", []string{"--http1.1"}},
			// Asked for a slice inside the value: the answer is whole, scrubbed.
			{"range", []string{"-H", "Range: bytes=30-45"}},
		} {
			args := append([]string{"-sS", "-i"}, tc.args...)
			out, err := e.agent(agentUID, "curl", append(args, "-H", bearer, "https://"+hostOpenAI+"/v1/echo?in="+tc.in)...)
			if err != nil {
				t.Fatalf("%s: curl: %v", tc.in, err)
			}
			if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+realOpenAI {
				t.Fatalf("%s: the echo request was not injected", tc.in)
			}
			if strings.Contains(out, realOpenAI[5:21]) || !strings.Contains(out, phOpenAI) { // [5:21] is what bytes=30-45 would serve
				t.Fatalf("%s: want the placeholder and no part of the real value in:\n%s", tc.in, out)
			}
		}
	})

	t.Run("6_not_enrolled_not_redirected", func(t *testing.T) {
		// A UID that is not enrolled talks to the upstream directly: it must trust the
		// upstream's CA and the upstream sees its placeholder.
		out, err := e.agent(notEnrolled, "curl", "-sS", "--cacert", filepath.Join(e.dir, "upstream-ca.pem"), "-o", "/dev/null", "-w", "%{http_code}", "-H", bearer, "https://"+hostOpenAI+"/v1/models")
		if err != nil || out != "200" {
			t.Fatalf("not-enrolled curl: %q %v", out, err)
		}
		if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+phOpenAI {
			t.Fatalf("a not-enrolled uid got injection: %q", got.Header.Get("Authorization"))
		}
	})

	t.Run("7_agent_memory_never_holds_secret", func(t *testing.T) {
		script := filepath.Join(e.dir, "longlived.py")
		writeFile(t, script, []byte(fmt.Sprintf(`import sys, time, urllib.request
req = urllib.request.Request("https://%s/v1/models", headers={"Authorization": "Bearer %s"})
with urllib.request.urlopen(req, timeout=20) as r:
    body = r.read()
print("done", r.status, flush=True)
time.sleep(60)
`, hostOpenAI, phOpenAI)), 0o644)
		cmd := e.agentCmd(agentUID, "python3", script)
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		line, err := readLine(bufio.NewReader(stdout), 20*time.Second)
		if err != nil || line != "done 200\n" {
			t.Fatalf("agent: %q %v", line, err)
		}
		if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("request was not injected, so the memory check would prove nothing")
		}
		mem := readProcessMemory(t, cmd.Process.Pid)
		if !bytes.Contains(mem, []byte(phOpenAI)) {
			t.Fatalf("placeholder not found in %d bytes of agent memory: the scan is not reading the agent", len(mem))
		}
		if bytes.Contains(mem, []byte(realOpenAI)) {
			t.Fatalf("I1 violated: the real secret is in the agent's memory")
		}
	})

	t.Run("6_unenroll_stops_redirect", func(t *testing.T) {
		e.avpctl("unenroll-uid", strconv.Itoa(agentUID))
		defer e.avpctl("enroll-uid", strconv.Itoa(agentUID))
		out, err := e.agent(agentUID, "curl", "-sS", "--cacert", filepath.Join(e.dir, "upstream-ca.pem"), "-o", "/dev/null", "-w", "%{http_code}", "-H", bearer, "https://"+hostOpenAI+"/v1/models")
		if err != nil || out != "200" {
			t.Fatalf("after unenroll: %q %v", out, err)
		}
		if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+phOpenAI {
			t.Fatalf("after unenroll the request was still injected")
		}
		e.waitAudit("type", "unenroll", "uid", strconv.Itoa(agentUID))
		// A second unenroll changes nothing and says so, instead of claiming it unenrolled.
		if out := string(e.avpctl("unenroll-uid", strconv.Itoa(agentUID))); !strings.Contains(out, "was not enrolled") {
			t.Errorf("unenroll of a uid not enrolled said %q, want \"was not enrolled\"", out)
		}
		// Enrolling twice says so, and (uid_t)-1 is no user at all.
		e.avpctl("enroll-uid", strconv.Itoa(agentUID))
		if out := string(e.avpctl("enroll-uid", strconv.Itoa(agentUID))); !strings.Contains(out, "already enrolled") {
			t.Errorf("a second enroll of uid %d said %q, want \"already enrolled\"", agentUID, out)
		}
		if out, err := e.avpctlErr("enroll-uid", "4294967295"); err == nil || !strings.Contains(string(out), "(uid_t)-1") {
			t.Errorf("enroll-uid 4294967295: %v %q, want a refusal", err, out)
		}
	})

	t.Run("I12_not_enrolled_uid_reaching_avpd_is_spliced", func(t *testing.T) {
		// Conntrack can hand a non-enrolled user's connection to the redirect when it reuses
		// an entry; a second table does the same on purpose for uid 4243.
		rules := "table inet avp_e2e_extra {\n chain out {\n  type nat hook output priority -110;\n  meta skuid 4243 tcp dport 443 redirect to :14322\n }\n}\n"
		nft := exec.Command("ip", "netns", "exec", e.ns, "nft", "-f", "-")
		nft.Stdin = strings.NewReader(rules)
		if out, err := nft.CombinedOutput(); err != nil {
			t.Fatalf("nft: %v %s", err, out)
		}
		defer exec.Command("ip", "netns", "exec", e.ns, "nft", "delete", "table", "inet", "avp_e2e_extra").Run()
		out, err := e.agent(notEnrolled, "curl", "-sS", "--cacert", filepath.Join(e.dir, "upstream-ca.pem"), "-o", "/dev/null", "-w", "%{http_code}", "-H", bearer, "https://"+hostOpenAI+"/v1/models")
		if err != nil || out != "200" {
			t.Fatalf("curl as a not-enrolled uid through avpd: %q %v", out, err)
		}
		if got := e.upstream.last(t).Header.Get("Authorization"); got != "Bearer "+phOpenAI {
			t.Fatalf("a not-enrolled uid got injection: %q", got)
		}
		e.waitAudit("decision", "passthrough", "reason", "uid_not_enrolled", "uid", strconv.Itoa(notEnrolled))
	})

	t.Run("10_audit_complete_and_secret_free", func(t *testing.T) {
		log := mustRead(t, e.audit)
		for _, secret := range []string{realOpenAI, realOther, jiraToken} {
			if strings.Contains(log, secret) {
				t.Fatal("a real secret is in the audit log")
			}
			if strings.Contains(e.avpdLog.String(), secret) {
				t.Fatal("a real secret is in the daemon log")
			}
		}
		for _, ph := range []string{phOpenAI, phOther, phMissing} {
			if strings.Contains(log, ph) {
				t.Fatal("a placeholder (a header value) is in the audit log")
			}
		}
		for _, d := range []string{"inject", "forward_verbatim", "host_mismatch", "backend_error", "passthrough"} {
			if len(e.findAudit("decision", d)) == 0 {
				t.Errorf("no %s event in the audit log", d)
			}
		}
		for _, typ := range []string{"proxy_start", "enroll", "unenroll"} {
			if len(e.findAudit("type", typ)) == 0 {
				t.Errorf("no %s event in the audit log", typ)
			}
		}
		if regexp.MustCompile(`[?]`).MatchString(log) {
			t.Errorf("a query string reached the audit log")
		}
	})

	t.Run("status_shows_no_secret", func(t *testing.T) {
		out := string(e.avpctl("status", "--json"))
		if !strings.Contains(out, fmt.Sprint(agentUID)) || !strings.Contains(out, `"firewall_ok": true`) {
			t.Fatalf("status: %s", out)
		}
		for _, s := range []string{realOpenAI, realOther, phOpenAI} {
			if strings.Contains(out, s) {
				t.Fatal("status shows a secret or placeholder")
			}
		}
	})
}

// readProcessMemory reads every readable mapping of pid.
func readProcessMemory(t *testing.T, pid int) []byte {
	t.Helper()
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	var all []byte
	for _, line := range strings.Split(string(maps), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[1][0] != 'r' {
			continue
		}
		if len(f) >= 6 && f[5] == "[vvar]" {
			continue
		}
		var start, end uint64
		if _, err := fmt.Sscanf(f[0], "%x-%x", &start, &end); err != nil {
			continue
		}
		buf := make([]byte, end-start)
		n, _ := mem.ReadAt(buf, int64(start))
		all = append(all, buf[:n]...)
	}
	return all
}

package e2e

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestPythonHTTPClients runs the HTTP libraries most Python SDKs are built on (requests for
// many vendor SDKs, httpx for OpenAI's and Anthropic's), as the agent UID through the
// redirect, over HTTP/1.1 and HTTP/2: a JSON POST, a 3 MiB upload, a chunked (generator)
// upload and a streamed event response. Each request must reach the upstream injected, with
// its body intact, and the agent must never see the real key.
func TestPythonHTTPClients(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	for _, mod := range []string{"requests", "httpx", "h2"} {
		if _, err := e.agent(agentUID, "python3", "-c", "import "+mod); err != nil {
			t.Fatalf("python3 module %s is missing (.ci/run installs python3-requests, python3-httpx and python3-h2): %v", mod, err)
		}
	}
	script := filepath.Join(e.dir, "clients.py")
	writeFile(t, script, []byte(fmt.Sprintf(`import requests, httpx
base = "https://%s"
H = {"Authorization": "Bearer %s"}
big = bytes(range(256)) * (3 * 4096)  # 3 MiB

r = requests.post(base + "/v1/chat/completions", headers=H, json={"model": "m", "messages": []}, timeout=20)
print("requests json", r.status_code, r.json()["path"])
r = requests.post(base + "/v1/upload", headers=H, data=big, timeout=60)
print("requests upload", r.status_code, r.json()["got"])
r = requests.post(base + "/v1/upload", headers=H, data=(b"chunk%%d;" %% i for i in range(5)), timeout=20)
print("requests chunked", r.status_code, r.json()["got"])

for h2 in (False, True):
    with httpx.Client(http2=h2, timeout=60) as c:
        r = c.post(base + "/v1/chat/completions", headers=H, json={"model": "m"})
        print("httpx", r.http_version, "json", r.status_code, r.json()["path"])
        r = c.post(base + "/v1/upload", headers=H, content=big)
        print("httpx", r.http_version, "upload", r.status_code, r.json()["got"])
        r = c.post(base + "/v1/upload", headers=H, content=(b"chunk%%d;" %% i for i in range(5)))
        print("httpx", r.http_version, "chunked", r.status_code, r.json()["got"])
        with c.stream("GET", base + "/v1/stream", headers=H) as s:
            events = [l for l in s.iter_lines() if l.startswith("data:")]
        print("httpx", s.http_version, "stream", s.status_code, len(events))
`, hostOpenAI, phOpenAI)), 0o644)

	before := len(e.upstream.requests())
	out, err := e.agent(agentUID, "python3", script)
	if err != nil {
		t.Fatalf("python clients: %v\n%s", err, out)
	}
	if strings.Contains(out, realOpenAI) {
		t.Fatalf("the agent saw the real key:\n%s", out)
	}
	bigSum := sha256.New()
	for i := 0; i < 3*4096; i++ {
		for b := 0; b < 256; b++ {
			bigSum.Write([]byte{byte(b)})
		}
	}
	bigGot := fmt.Sprintf("%d bytes sha256 %x", 3<<20, bigSum.Sum(nil))
	chunks := "chunk0;chunk1;chunk2;chunk3;chunk4;"
	chunkedGot := fmt.Sprintf("%d bytes sha256 %x", len(chunks), sha256.Sum256([]byte(chunks)))
	want := []string{
		"requests json 200 /v1/chat/completions",
		"requests upload 200 " + bigGot,
		"requests chunked 200 " + chunkedGot,
	}
	for _, v := range []string{"HTTP/1.1", "HTTP/2"} {
		want = append(want,
			"httpx "+v+" json 200 /v1/chat/completions",
			"httpx "+v+" upload 200 "+bigGot,
			"httpx "+v+" chunked 200 "+chunkedGot,
			"httpx "+v+" stream 200 3")
	}
	got := strings.Split(strings.TrimSpace(out), "\n")
	if len(got) != len(want) {
		t.Fatalf("python clients printed:\n%s\nwant:\n%s", out, strings.Join(want, "\n"))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("line %d: %q, want %q", i+1, got[i], want[i])
		}
	}
	reqs := e.upstream.requests()[before:]
	if len(reqs) != 3+2*4 {
		t.Fatalf("upstream saw %d requests, want 11", len(reqs))
	}
	for _, r := range reqs {
		if r.Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Errorf("%s %s reached the upstream with Authorization %q, not the real key", r.Method, r.Path, r.Header.Get("Authorization"))
		}
	}
}

// TestEarlyAnswerToUpload: curl POSTs 64 MiB (with Expect: 100-continue over HTTP/1.1) to an
// upstream that reads 64 KiB of it and answers. Through avpd curl gets that answer, not a
// 502 for the body avpd could no longer send. Over HTTP/2 the server then resets the
// stream with NO_ERROR (RFC 9113 section 8.1), and curl 7.88 exits 92 although it has the
// 200, as it does straight to the upstream. The upstream itself is not a fair reference for
// HTTP/1.1: Go's server closes under the unread body, and curl straight to it sometimes
// loses the 200 (exit 55), where avpd lingers before it closes.
func TestEarlyAnswerToUpload(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	file := filepath.Join(e.dir, "upload.bin")
	writeFile(t, file, make([]byte, 64<<20), 0o644)
	upload := func(uid int, proto string) string {
		cmd := e.agentCmd(uid, "curl", "-sS", "--max-time", "25", proto, "-o", "/dev/null", "-w", "%{http_code}",
			"-H", "Authorization: Bearer "+phOpenAI, "-X", "POST", "-T", file, "https://"+hostOpenAI+"/v1/files")
		var out bytes.Buffer
		cmd.Stdout = &out
		err := cmd.Run()
		if ee := new(exec.ExitError); err != nil && !errors.As(err, &ee) {
			t.Fatalf("curl %s as %d: %v", proto, uid, err)
		}
		return fmt.Sprintf("%s exit %d", out.String(), cmd.ProcessState.ExitCode())
	}
	for _, tc := range []struct{ proto, want string }{{"--http1.1", "200 exit 0"}, {"--http2", "200 exit 92"}} {
		proto := tc.proto
		if via := upload(agentUID, proto); via != tc.want && via != "200 exit 0" {
			t.Fatalf("curl %s through avpd: %q, want the upstream's 200 (%q)", proto, via, tc.want)
		}
		if got := e.upstream.last(t); got.Path != "/v1/files" || got.Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("curl %s: upstream got %s %q, want the injected request", proto, got.Path, got.Header.Get("Authorization"))
		}
	}
}

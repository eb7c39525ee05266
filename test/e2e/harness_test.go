// Package e2e boots the real avpd and avpctl binaries inside throwaway network namespaces,
// with real nftables, a real TLS upstream and real agent processes (curl, Python, Node)
// running under unprivileged UIDs. Nothing here touches the host's own network namespace.
package e2e

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Built once for every test in the package.
var binDir string

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			fmt.Fprintln(os.Stderr, "e2e: CI is set but not running as root; these tests must run in CI")
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "e2e: SKIP: not root and CI unset; the end-to-end tests need root for network namespaces and nftables (run: sudo make test)")
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "avp-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755)
	binDir = dir
	if err := buildBinaries(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildBinaries builds avpd and avpctl once for every test, in parallel. avpd links the
// Bitwarden SDK (cgo, about a minute from a cold build cache); avpctl stays static.
// AVP_E2E_BIN names a directory with binaries already built (make build writes bin/), to
// skip this.
func buildBinaries(dir string) error {
	if pre := os.Getenv("AVP_E2E_BIN"); pre != "" {
		for _, c := range []string{"avpd", "avpctl"} {
			data, err := os.ReadFile(filepath.Join(pre, c))
			if err != nil {
				return fmt.Errorf("AVP_E2E_BIN: %w", err)
			}
			if err := os.WriteFile(filepath.Join(dir, c), data, 0o755); err != nil {
				return err
			}
		}
		return nil
	}
	cgo := map[string]string{"avpd": "CGO_ENABLED=1", "avpctl": "CGO_ENABLED=0"}
	errs := make(chan error, len(cgo))
	for c, env := range cgo {
		go func() {
			cmd := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "build", "-o", filepath.Join(dir, c), "../../cmd/"+c)
			cmd.Env = append(os.Environ(), env)
			out, err := cmd.CombinedOutput()
			if err != nil {
				err = fmt.Errorf("build %s: %v\n%s", c, err, out)
			}
			errs <- err
		}()
	}
	var first error
	for range cgo {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Agent UIDs. Numeric, with no passwd entry: the kernel needs nothing more.
const (
	agentUID    = 4242
	notEnrolled = 4243
)

// Names the fake upstream answers for, and the secrets of the test config.
const (
	hostOpenAI  = "api.openai.test"
	hostOther   = "api.other.test"
	hostUnbound = "unbound.test"
	hostV6      = "v6.openai.test"
	hostJira    = "acme.jira.test"
	hostUIDOnly = "uidonly.test"

	phOpenAI   = "sk-avp-PLACEHOLDER-openai-e2e-00000000000000"
	realOpenAI = "sk-REAL-openai-7f3a9c1d5e8b2f4a6c0d1e2f3a4b5c6d"
	phOther    = "sk-avp-PLACEHOLDER-other-e2e-000000000000000"
	realOther  = "sk-REAL-other-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
	phMissing  = "sk-avp-PLACEHOLDER-missing-e2e-0000000000000"
	phJira     = "avp-PLACEHOLDER-jira-e2e-000000000000000000"
	jiraEmail  = "ops@acme.test"
	jiraToken  = "ATATT-REAL-jira-9c8b7a6f5e4d3c2b1a0f"
	// A third enrolled UID that a uid-scoped binding does not list.
	otherAgentUID = 4244
)

// env is one namespace with an upstream, an avpd and the files an agent needs.
type env struct {
	t        *testing.T
	ns       string
	dir      string // world-readable: CA bundle and scripts for the agent
	private  string // root-only: config, state, secrets, audit
	runtime  string
	state    string
	upCA     *x509.Certificate
	upCAPEM  []byte
	bundle   string // upstream CA + avpd CA, for agents that must trust both
	upstream *upstream
	avpd     *exec.Cmd
	avpdLog  *syncBuffer
	avpdEnv  []string // when set, avpd's whole environment
	audit    string
	config   string
	secrets  string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t}
	e.ns = fmt.Sprintf("avpe2e-%d-%d", os.Getpid(), time.Now().UnixNano()%1e9)
	run(t, "ip", "netns", "add", e.ns)
	t.Cleanup(func() {
		exec.Command("ip", "netns", "del", e.ns).Run()
		os.RemoveAll(filepath.Join("/etc/netns", e.ns))
	})
	run(t, "ip", "-n", e.ns, "link", "set", "lo", "up")
	if err := os.MkdirAll(filepath.Join("/etc/netns", e.ns), 0o755); err != nil {
		t.Fatal(err)
	}
	hosts := fmt.Sprintf("127.0.0.1 localhost\n::1 localhost\n127.0.0.2 %s %s %s %s %s\n::1 %s\n", hostOpenAI, hostOther, hostUnbound, hostJira, hostUIDOnly, hostV6)
	if err := os.WriteFile(filepath.Join("/etc/netns", e.ns, "hosts"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}

	var err error
	e.dir, err = os.MkdirTemp("", "avp-e2e-pub-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(e.dir, 0o755)
	e.private, err = os.MkdirTemp("", "avp-e2e-priv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(e.dir); os.RemoveAll(e.private) })
	// Runtime and state directories sit in a world-traversable directory, as /run and
	// /var/lib do, so the tests exercise avpd's own permissions on them.
	e.runtime = filepath.Join(e.dir, "run")
	e.state = filepath.Join(e.dir, "state")
	e.audit = filepath.Join(e.private, "audit", "audit.jsonl")
	e.config = filepath.Join(e.private, "bindings.yaml")
	e.secrets = filepath.Join(e.private, "secrets.yaml")

	e.upstream = startUpstream(t, e.ns, e.private)
	e.upCA, e.upCAPEM = e.upstream.caCert, e.upstream.caPEM
	writeFile(t, filepath.Join(e.private, "upstream-ca.pem"), e.upCAPEM, 0o644)
	writeFile(t, e.secrets, []byte(fmt.Sprintf("OPENAI: %s\nOTHER: %s\nJIRA_EMAIL: %s\nJIRA_TOKEN: %s\n", realOpenAI, realOther, jiraEmail, jiraToken)), 0o600)
	e.writeConfig(defaultBindings)
	return e
}

const defaultBindings = `  OPENAI:
    placeholder: ` + phOpenAI + `
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings:
      - host: ` + hostOpenAI + `
        methods: [GET, POST]
        paths: ["/v1/**"]
      - host: ` + hostV6 + `
  OTHER:
    placeholder: ` + phOther + `
    inject: {header: Authorization, format: "Bearer {secret}", also: [{header: X-Api-Key}]}
    bindings:
      - host: ` + hostOther + `
      - host: ` + hostUIDOnly + `
        uids: [4242]
  JIRA:
    placeholder: ` + phJira + `
    inject:
      header: Authorization
      format: "Basic {secret}"
      template: "{{ (JIRA_EMAIL + ':' + JIRA_TOKEN) | b64encode }}"
      compose: [JIRA_EMAIL, JIRA_TOKEN]
    bindings:
      - host: ` + hostJira + `
        paths: ["/rest/api/3/**"]
  MISSING:
    placeholder: ` + phMissing + `
    inject: {header: X-Api-Key}
    bindings:
      - host: ` + hostOpenAI + `
`

func (e *env) writeConfig(secretsSection string) {
	cfg := fmt.Sprintf(`version: 1
backend:
  type: file
  file: {path: %s}
cache: {ttl: 5m}
proxy:
  listen: 127.0.0.1:14322
  upstream_ca_file: %s
audit: {path: %s}
secrets:
%s`, e.secrets, filepath.Join(e.private, "upstream-ca.pem"), e.audit, secretsSection)
	writeFile(e.t, e.config, []byte(cfg), 0o600)
}

// startAvpd runs the real daemon inside the namespace and waits for its admin socket.
func (e *env) startAvpd() {
	t := e.t
	t.Helper()
	e.avpdLog = &syncBuffer{}
	cmd := exec.Command("ip", "netns", "exec", e.ns, filepath.Join(binDir, "avpd"), "serve",
		"--config", e.config, "--state-dir", e.state, "--runtime-dir", e.runtime)
	cmd.Stdout, cmd.Stderr = e.avpdLog, e.avpdLog
	if e.avpdEnv != nil {
		cmd.Env = e.avpdEnv
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.avpd = cmd
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("avpd log:\n%s", e.avpdLog.String())
		}
	})
	sock := filepath.Join(e.runtime, "admin.sock")
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if cmd.ProcessState != nil || time.Now().After(deadline) {
			t.Fatalf("avpd did not start:\n%s", e.avpdLog.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The agent must trust the local CA for bound hosts and the upstream's own CA for
	// spliced ones, exactly as an operator would install both in the system store.
	caPEM := e.avpctl("ca", "cert")
	e.bundle = filepath.Join(e.dir, "ca-bundle.pem")
	writeFile(t, e.bundle, append(append([]byte{}, e.upCAPEM...), caPEM...), 0o644)
	writeFile(t, filepath.Join(e.dir, "upstream-ca.pem"), e.upCAPEM, 0o644)
}

func (e *env) avpctl(args ...string) []byte {
	e.t.Helper()
	out, err := e.avpctlErr(args...)
	if err != nil {
		e.t.Fatalf("avpctl %v: %v\n%s", args, err, out)
	}
	return out
}

func (e *env) avpctlErr(args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(binDir, "avpctl"), append([]string{"--runtime-dir", e.runtime}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

// agentCmd builds a command that runs in the namespace as uid, with an empty environment
// except PATH, HOME and the CA variables: no proxy variables, no code change.
func (e *env) agentCmd(uid int, name string, args ...string) *exec.Cmd {
	full := append([]string{"netns", "exec", e.ns, "setpriv",
		fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups", "--",
		name}, args...)
	cmd := exec.Command("ip", full...)
	cmd.Env = []string{
		"PATH=/usr/local/bin:/usr/bin:/bin",
		"HOME=/tmp",
		"SSL_CERT_FILE=" + e.bundle,
		"NODE_EXTRA_CA_CERTS=" + e.bundle,
		"REQUESTS_CA_BUNDLE=" + e.bundle, // requests reads its own variable
	}
	cmd.Dir = "/"
	return cmd
}

// agent runs a command as uid and returns its stdout; stderr is in the error.
func (e *env) agent(uid int, name string, args ...string) (string, error) {
	cmd := e.agentCmd(uid, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return out.String(), fmt.Errorf("%v: %s", err, errb.String())
		}
		return out.String(), nil
	case <-ctx.Done():
		cmd.Process.Kill()
		<-done
		return out.String(), fmt.Errorf("timed out: %s", errb.String())
	}
}

// curl makes one request as uid and returns the HTTP status and body. Each extra argument is
// a header, or "-d<body>" for a request body.
func (e *env) curl(uid int, method, url string, headers ...string) (int, string, error) {
	args := []string{"-sS", "--max-time", "20", "-X", method, "-o", "-", "-w", "\n%{http_code}"}
	for _, h := range headers {
		if body, ok := strings.CutPrefix(h, "-d"); ok {
			args = append(args, "--data-raw", body) // "-d<body>" sends a body
			continue
		}
		if field, ok := strings.CutPrefix(h, "-F"); ok {
			args = append(args, "--form-string", field) // "-Fname=value": a multipart field
			continue
		}
		args = append(args, "-H", h)
	}
	args = append(args, url)
	out, err := e.agent(uid, "curl", args...)
	if err != nil {
		return 0, out, err
	}
	i := strings.LastIndexByte(out, '\n')
	var code int
	fmt.Sscan(out[i+1:], &code)
	return code, out[:i], nil
}

// auditEvents reads the audit log.
func (e *env) auditEvents() []map[string]any {
	e.t.Helper()
	data, err := os.ReadFile(e.audit)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []map[string]any
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		var m map[string]any
		if err := json.Unmarshal(line, &m); err != nil {
			e.t.Fatalf("audit line %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

// findAudit returns the events matching every key=value given.
func (e *env) findAudit(kv ...string) []map[string]any {
	var out []map[string]any
	for _, ev := range e.auditEvents() {
		ok := true
		for i := 0; i+1 < len(kv); i += 2 {
			if fmt.Sprint(ev[kv[i]]) != kv[i+1] {
				ok = false
			}
		}
		if ok {
			out = append(out, ev)
		}
	}
	return out
}

// waitAudit polls for an event, for asynchronously audited decisions (passthrough).
func (e *env) waitAudit(kv ...string) map[string]any {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if evs := e.findAudit(kv...); len(evs) > 0 {
			return evs[len(evs)-1]
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.t.Fatalf("no audit event with %v in:\n%s", kv, mustRead(e.t, e.audit))
	return nil
}

// upstream is the fake API server: TLS with its own CA, answering for every test name on
// 127.0.0.2:443 and [::1]:443 inside the namespace. It never echoes a header back, so a
// secret the agent holds can only have come through the proxy.
type upstream struct {
	caCert *x509.Certificate
	caPEM  []byte
	mu     sync.Mutex
	reqs   []seenRequest
	// sseSent counts SSE events written so far.
	sseSent int
}

type seenRequest struct {
	Host, Method, Path, SNI string
	Header                  http.Header
	Proto                   string
	Body                    string
}

func (u *upstream) requests() []seenRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seenRequest(nil), u.reqs...)
}

func (u *upstream) last(t *testing.T) seenRequest {
	t.Helper()
	r := u.requests()
	if len(r) == 0 {
		t.Fatal("upstream received no request")
	}
	return r[len(r)-1]
}

func startUpstream(t *testing.T, ns, dir string) *upstream {
	u := &upstream{}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "e2e upstream CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	u.caCert, _ = x509.ParseCertificate(caDER)
	u.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "e2e upstream"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames:    []string{hostOpenAI, hostOther, hostUnbound, hostV6, hostJira, hostUIDOnly},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	leafDER, _ := x509.CreateCertificate(rand.Reader, leafTmpl, u.caCert, &leafKey.PublicKey, caKey)
	cert := tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: leafKey}

	mux := http.NewServeMux()
	mux.HandleFunc("/v1/stream", func(w http.ResponseWriter, r *http.Request) {
		u.record(r)
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		fl := w.(http.Flusher)
		for i := 1; i <= 3; i++ {
			u.mu.Lock()
			u.sseSent = i
			u.mu.Unlock()
			fmt.Fprintf(w, "data: event %d\n\n", i)
			fl.Flush()
			time.Sleep(200 * time.Millisecond)
		}
	})
	// An upstream that reflects the credential, like httpbin or an error page quoting it.
	// ?in=early and ?in=gzip echo it in a 103 before the answer and in a gzip body sent
	// although identity was asked for; ?in=reason in the status line's reason phrase;
	// ?in=range in a body served with Range support.
	mux.HandleFunc("/v1/echo", func(w http.ResponseWriter, r *http.Request) {
		u.record(r)
		auth := r.Header.Get("Authorization")
		body := fmt.Sprintf(`{"authorization":%q}`+"\n", auth)
		switch r.URL.Query().Get("in") {
		case "early":
			w.Header().Set("X-Echo-Early", auth)
			w.WriteHeader(http.StatusEarlyHints)
			w.Header().Del("X-Echo-Early")
		case "gzip":
			var b bytes.Buffer
			zw := gzip.NewWriter(&b)
			io.WriteString(zw, body)
			zw.Close()
			w.Header().Set("Content-Encoding", "gzip")
			w.Write(b.Bytes())
			return
		case "reason":
			// In the reason phrase of the status line.
			if c, bw, err := w.(http.Hijacker).Hijack(); err == nil {
				bw.WriteString("HTTP/1.1 401 Invalid key " + auth + "\r\nContent-Length: 0\r\n\r\n")
				bw.Flush()
				c.Close()
			}
			return
		case "range":
			// Served with Range support, as a file server or Apache would.
			http.ServeContent(w, r, "echo.json", time.Time{}, strings.NewReader(body))
			return
		}
		w.Header().Set("X-Echo-Authorization", auth)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		io.WriteString(w, body)
	})
	// An upstream that closes its connection after answering without saying so, as a server
	// whose keep-alive timer fired does: the next request on that connection fails.
	mux.HandleFunc("/v1/drop", func(w http.ResponseWriter, r *http.Request) {
		u.record(r)
		c, bw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		bw.WriteString("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"dropped\":1}")
		bw.Flush()
		c.Close()
	})
	// A protocol switch (as a WebSocket's): after the 101 the upstream echoes what it reads,
	// prefixed with the credential's presence, never its value.
	mux.HandleFunc("/v1/upgrade", func(w http.ResponseWriter, r *http.Request) {
		u.record(r)
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "want Upgrade: echo", http.StatusBadRequest)
			return
		}
		c, bw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		bw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		bw.Flush()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 64)
		n, _ := bw.Read(buf)
		fmt.Fprintf(c, "echo:%s", buf[:n])
	})
	// A broken upstream that quotes the credential in a malformed response head: the error
	// avpd logs must not carry the real value.
	mux.HandleFunc("/v1/garbled", func(w http.ResponseWriter, r *http.Request) {
		u.record(r)
		c, bw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		bw.WriteString("HTTP/1.1 200 OK\r\nEcho " + r.Header.Get("Authorization") + "\r\n\r\n")
		bw.Flush()
		c.Close()
	})
	// Reads a body of any size and records its length and digest instead of its bytes.
	mux.HandleFunc("/v1/upload", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		sum := fmt.Sprintf("%d bytes sha256 %x", n, h.Sum(nil))
		r.Body = io.NopCloser(strings.NewReader(sum))
		u.record(r)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"ok":true,"got":%q}`, sum)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		u.record(r)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"ok":true,"path":%q}`, r.URL.Path)
	})
	srv := &http.Server{Handler: mux, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}}
	var lns []net.Listener
	inNetns(t, ns, func() {
		for _, a := range []string{"127.0.0.2:443", "[::1]:443"} {
			ln, err := net.Listen("tcp", a)
			if err != nil {
				t.Fatalf("upstream listen %s: %v", a, err)
			}
			lns = append(lns, ln)
		}
	})
	for _, ln := range lns {
		go srv.Serve(tls.NewListener(ln, srv.TLSConfig))
	}
	t.Cleanup(func() { srv.Close() })
	return u
}

func (u *upstream) record(r *http.Request) {
	sni := ""
	if r.TLS != nil {
		sni = r.TLS.ServerName
	}
	body, _ := io.ReadAll(io.LimitReader(r.Body, 64<<10))
	u.mu.Lock()
	u.reqs = append(u.reqs, seenRequest{Host: r.Host, Method: r.Method, Path: r.URL.RequestURI(), SNI: sni, Header: r.Header.Clone(), Proto: r.Proto, Body: string(body)})
	u.mu.Unlock()
}

// inNetns runs fn on an OS thread switched into the named namespace. Sockets created in fn
// stay in that namespace after the thread switches back.
func inNetns(t *testing.T, ns string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			t.Errorf("open own netns: %v", err)
			return
		}
		defer orig.Close()
		target, err := os.Open(filepath.Join("/run/netns", ns))
		if err != nil {
			t.Errorf("open netns %s: %v", ns, err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			t.Errorf("setns %s: %v", ns, err)
			return
		}
		fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it dies with the goroutine instead of returning to
			// the pool in the wrong namespace.
			t.Errorf("setns back: %v", err)
			return
		}
		runtime.UnlockOSThread()
	}()
	<-done
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

func writeFile(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func mustRead(t *testing.T, p string) string {
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// readLine reads one line from r with a deadline.
func readLine(r *bufio.Reader, d time.Duration) (string, error) {
	type res struct {
		s   string
		err error
	}
	ch := make(chan res, 1)
	go func() { s, err := r.ReadString('\n'); ch <- res{s, err} }()
	select {
	case x := <-ch:
		return x.s, x.err
	case <-time.After(d):
		return "", fmt.Errorf("no line within %v", d)
	}
}

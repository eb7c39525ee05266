package e2e

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// journalProc is a running "avpd journal".
type journalProc struct {
	t    *testing.T
	cmd  *exec.Cmd
	log  *syncBuffer
	sock string
	done chan struct{}
}

// startJournal runs the real journal binary with a socket it binds itself and waits until it
// listens. extraEnv is added to its environment.
func startJournal(t *testing.T, dir string, extraEnv []string, args ...string) *journalProc {
	t.Helper()
	p := &journalProc{t: t, log: &syncBuffer{}, sock: filepath.Join(dir, "journal.sock"), done: make(chan struct{})}
	full := append([]string{"journal", "--log", filepath.Join(dir, "log", "audit.jsonl"), "--socket", p.sock, "--journald", "off"}, args...)
	p.cmd = exec.Command(filepath.Join(binDir, "avpd"), full...)
	p.cmd.Env = append(os.Environ(), extraEnv...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop(unix.SIGKILL)
		if t.Failed() {
			t.Logf("journal log:\n%s", p.log.String())
		}
	})
	waitOutput(t, p.log, p.done, "journal: ready on ", 10*time.Second)
	return p
}

// stop signals the journal (by its pid) and waits for it to exit.
func (p *journalProc) stop(sig unix.Signal) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// byteUpstream is a TLS server that records, per TCP connection, when its first byte arrived
// and how many bytes it read: it sees the wire, not just parsed requests.
type byteUpstream struct {
	caPEM    []byte
	mu       sync.Mutex
	firstAt  []time.Time
	total    atomic.Int64
	requests []*http.Request
}

type countingConn struct {
	net.Conn
	u     *byteUpstream
	first bool
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		if !c.first {
			c.first = true
			c.u.mu.Lock()
			c.u.firstAt = append(c.u.firstAt, time.Now())
			c.u.mu.Unlock()
		}
		c.u.total.Add(int64(n))
	}
	return n, err
}

type countingListener struct {
	net.Listener
	u *byteUpstream
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, u: l.u}, nil
}

func startByteUpstream(t *testing.T, ns, addr, name string) *byteUpstream {
	t.Helper()
	u := &byteUpstream{}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "e2e journal upstream CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	caCert, _ := x509.ParseCertificate(caDER)
	u.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames: []string{name}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	leafDER, _ := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, &leafKey.PublicKey, caKey)
	tlsCfg := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{leafDER}, PrivateKey: leafKey}}, NextProtos: []string{"h2", "http/1.1"}}
	srv := &http.Server{TLSConfig: tlsCfg, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.requests = append(u.requests, r.Clone(context.Background()))
		u.mu.Unlock()
		fmt.Fprint(w, `{"ok":true}`)
	})}
	var ln net.Listener
	inNetns(t, ns, func() {
		var err error
		if ln, err = net.Listen("tcp", addr); err != nil {
			t.Fatalf("listen %s: %v", addr, err)
		}
	})
	go srv.Serve(tls.NewListener(countingListener{ln, u}, tlsCfg))
	t.Cleanup(func() { srv.Close() })
	return u
}

func (u *byteUpstream) snapshot() (conns int, first []time.Time, reqs []*http.Request) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.firstAt), append([]time.Time(nil), u.firstAt...), append([]*http.Request(nil), u.requests...)
}

const hostI7 = "i7.openai.test"

var ackLine = regexp.MustCompile(`journal: test: acked seq (\d+)\.\.(\d+) at (\S+)`)

// ackTime finds, in the journal's own log, when it acknowledged seq.
func ackTime(t *testing.T, log string, seq uint64) time.Time {
	t.Helper()
	for _, m := range ackLine.FindAllStringSubmatch(log, -1) {
		a, _ := strconv.ParseUint(m[1], 10, 64)
		b, _ := strconv.ParseUint(m[2], 10, 64)
		if a <= seq && seq <= b {
			ts, err := time.Parse(time.RFC3339Nano, m[3])
			if err != nil {
				t.Fatal(err)
			}
			return ts
		}
	}
	t.Fatalf("no ack of seq %d in the journal log:\n%s", seq, log)
	return time.Time{}
}

// I7 end to end: with the journal delaying its acks by 1s, the upstream sees no byte of the
// injected request before the ack; with the journal stopped, requests that need injection
// get 503 audit_unavailable and the upstream sees nothing; when it is back, avpd reconnects.
func TestJournalAuditFirst(t *testing.T) {
	e := newEnv(t)
	// A fresh upstream name on its own address, so its first TCP byte can only come from
	// the injected request (no pooled connection exists yet).
	hostsPath := filepath.Join("/etc/netns", e.ns, "hosts")
	hosts, _ := os.ReadFile(hostsPath)
	writeFile(t, hostsPath, append(hosts, []byte("127.0.0.3 "+hostI7+"\n")...), 0o644)
	up := startByteUpstream(t, e.ns, "127.0.0.3:443", hostI7)
	writeFile(t, filepath.Join(e.private, "upstream-ca.pem"), append(append([]byte{}, e.upCAPEM...), up.caPEM...), 0o644)

	jdir := filepath.Join(e.private, "journal")
	os.MkdirAll(jdir, 0o700)
	j := startJournal(t, jdir, []string{"AVP_JOURNAL_TEST_ACK_DELAY=1s"})
	e.audit = filepath.Join(jdir, "log", "audit.jsonl")
	writeFile(t, e.config, []byte(fmt.Sprintf(`version: 1
backend:
  type: file
  file: {path: %s}
proxy:
  listen: 127.0.0.1:14322
  upstream_ca_file: %s
audit: {socket: %s, timeout: 3s}
secrets:
  OPENAI:
    placeholder: %s
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings:
      - host: %s
`, e.secrets, filepath.Join(e.private, "upstream-ca.pem"), j.sock, phOpenAI, hostI7)), 0o600)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	bearer := "Authorization: Bearer " + phOpenAI

	t.Run("upstream_sees_nothing_before_the_ack", func(t *testing.T) {
		start := time.Now()
		code, body, err := e.curl(agentUID, "POST", "https://"+hostI7+"/v1/chat?q=1", bearer)
		if err != nil || code != 200 {
			t.Fatalf("curl: %d %q %v", code, body, err)
		}
		if time.Since(start) < time.Second {
			t.Fatalf("the request took %v: it did not wait for the delayed ack", time.Since(start))
		}
		conns, first, reqs := up.snapshot()
		if conns != 1 || len(reqs) != 1 || reqs[0].Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("upstream: %d connections, %d requests", conns, len(reqs))
		}
		ev := e.waitAudit("decision", "inject", "path", "/v1/chat", "sni", hostI7)
		seq := uint64(ev["seq"].(float64))
		lineTS, err := time.Parse(time.RFC3339Nano, ev["ts"].(string))
		if err != nil {
			t.Fatal(err)
		}
		acked := ackTime(t, j.log.String(), seq)
		t.Logf("journal sequenced seq %d at %s, acked at %s; upstream's first byte at %s",
			seq, lineTS.Format(time.RFC3339Nano), acked.Format(time.RFC3339Nano), first[0].UTC().Format(time.RFC3339Nano))
		if !first[0].After(acked) {
			t.Fatalf("I7 violated: the upstream's first byte (%s) came before the journal's ack (%s)", first[0], acked)
		}
		if first[0].Sub(lineTS) < time.Second {
			t.Fatalf("the upstream's first byte came %v after the journal wrote the line; the ack delay is 1s", first[0].Sub(lineTS))
		}
	})

	t.Run("journal_stopped_503_and_nothing_upstream", func(t *testing.T) {
		j.stop(unix.SIGTERM)
		conns, _, reqs := up.snapshot()
		bytesBefore := up.total.Load()
		code, body, err := e.curl(agentUID, "POST", "https://"+hostI7+"/v1/chat", bearer)
		if err != nil || code != 503 || !strings.Contains(body, "agent-vault-proxy: audit_unavailable") {
			t.Fatalf("with the journal stopped: %d %q %v", code, body, err)
		}
		c2, _, r2 := up.snapshot()
		if c2 != conns || len(r2) != len(reqs) || up.total.Load() != bytesBefore {
			t.Fatalf("the upstream received something: %d→%d connections, %d→%d requests, %d→%d bytes",
				conns, c2, len(reqs), len(r2), bytesBefore, up.total.Load())
		}
	})

	t.Run("avpd_reconnects_when_the_journal_is_back", func(t *testing.T) {
		j2 := startJournal(t, jdir, nil)
		code, body, err := e.curl(agentUID, "POST", "https://"+hostI7+"/v1/again", bearer)
		if err != nil || code != 200 {
			t.Fatalf("after the journal restarted: %d %q %v", code, body, err)
		}
		e.waitAudit("decision", "inject", "path", "/v1/again")
		if n := len(e.findAudit("type", "journal_start")); n != 2 {
			t.Fatalf("%d journal_start events, want 2", n)
		}
		j2.stop(unix.SIGTERM)
		out, err := e.avpctlErr("audit", "verify", "--key", filepath.Join(jdir, "log", "journal.key"), e.audit)
		if err != nil || !bytes.Contains(out, []byte("ok: ")) {
			t.Fatalf("verify: %v\n%s", err, out)
		}
		if log := mustRead(t, e.audit); strings.Contains(log, realOpenAI) || strings.Contains(log, phOpenAI) || strings.Contains(log, "q=1") {
			t.Fatal("a secret, placeholder or query string is in the journal")
		}
	})
}

// Crash safety: 32 concurrent writers, the journal SIGKILLed mid-stream several times.
// After each restart every acknowledged event is in the log, once, in order; the chain
// verifies; a torn tail is reported and kept, not silently dropped.
func TestJournalCrashSafety(t *testing.T) {
	dir, err := os.MkdirTemp("", "avpcrash")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	args := []string{"--rotate-size", "256K"}
	j := startJournal(t, dir, nil, args...)
	live := filepath.Join(dir, "log", "audit.jsonl")
	key := filepath.Join(dir, "log", "journal.key")

	const writers = 32
	var mu sync.Mutex // guards acked
	acked := make([][]int, writers)
	// Writers hold gate for reading around each Record; the test takes it for writing to
	// hold them between a restart and its checks (the kill itself hits them mid-stream).
	var gate sync.RWMutex
	var stop atomic.Bool
	var wg sync.WaitGroup
	var failures atomic.Int64
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := audit.NewJournalClient(j.sock, time.Second)
			defer c.Close()
			for n := 0; !stop.Load(); n++ {
				ev := audit.Event{Type: audit.TypeDecision, Decision: audit.DecisionPassthrough, Reason: "sni_not_bound",
					SNI: fmt.Sprintf("w%02d.test", w), Path: fmt.Sprintf("/n/%d", n)}
				gate.RLock()
				err := c.Record(context.Background(), ev)
				if err == nil {
					mu.Lock()
					acked[w] = append(acked[w], n)
					mu.Unlock()
				}
				gate.RUnlock()
				if err != nil {
					failures.Add(1)
					time.Sleep(5 * time.Millisecond)
				}
			}
		}()
	}

	// check verifies the whole set with avpctl and that every acknowledged event is in it,
	// once and in its writer's order. It returns the journal_start lines and verify's output.
	check := func(when string) ([]audit.Line, []byte) {
		t.Helper()
		out, err := exec.Command(filepath.Join(binDir, "avpctl"), "audit", "verify", "--key", key, live).CombinedOutput()
		if err != nil || !bytes.Contains(out, []byte("ok: ")) {
			t.Fatalf("verify %s: %v\n%s", when, err, out)
		}
		set, err := audit.ExpandLogSet([]string{live})
		if err != nil {
			t.Fatal(err)
		}
		seen := make([]map[int]bool, writers)
		last := make([]int, writers)
		for w := range seen {
			seen[w], last[w] = map[int]bool{}, -1
		}
		var starts []audit.Line
		for _, p := range set {
			data, _ := os.ReadFile(p)
			for _, raw := range bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n")) {
				if len(raw) == 0 {
					continue
				}
				l, err := audit.ParseLine(raw, nil)
				if err != nil {
					t.Fatalf("%s: %s: %v", when, p, err)
				}
				if l.Type == audit.TypeJournalStart {
					starts = append(starts, *l)
					continue
				}
				var w, n int
				fmt.Sscanf(l.SNI, "w%02d.test", &w)
				fmt.Sscanf(l.Path, "/n/%d", &n)
				if n <= last[w] {
					t.Fatalf("%s: writer %d: event %d after %d: out of order or repeated", when, w, n, last[w])
				}
				last[w] = n
				seen[w][n] = true
			}
		}
		mu.Lock()
		defer mu.Unlock()
		for w := range acked {
			for _, n := range acked[w] {
				if !seen[w][n] {
					t.Fatalf("%s: writer %d: acknowledged event %d is not in the log", when, w, n)
				}
			}
		}
		return starts, out
	}

	const kills = 4
	torn := []byte(`{"v":1,"seq":999999,"ts":"2026-01-01T00:00:00Z","prev":"0000`)
	var tornOut []byte
	for k := 0; k < kills; k++ {
		time.Sleep(300 * time.Millisecond)
		j.stop(unix.SIGKILL) // mid-stream: 32 writers have events in flight
		gate.Lock()          // let the in-flight Records fail, hold new ones
		if k == 1 {
			// A crash in the middle of a write leaves part of a line: simulate one.
			f, err := os.OpenFile(live, os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.Write(torn)
			f.Close()
		}
		j = startJournal(t, dir, nil, args...)
		starts, out := check(fmt.Sprintf("after restart %d", k+1))
		if len(starts) != k+2 {
			t.Fatalf("after restart %d: %d journal_start events", k+1, len(starts))
		}
		if k == 1 {
			// This restart reported the torn write and kept its bytes.
			st := starts[k+1]
			if st.TornBytes < int64(len(torn)) || st.TornFile == "" || !strings.Contains(st.Detail, "WARNING: torn tail") {
				t.Fatalf("the restart after the torn write recorded %+v", st)
			}
			kept, err := os.ReadFile(st.TornFile)
			if err != nil || !bytes.HasSuffix(kept, torn) || int64(len(kept)) != st.TornBytes {
				t.Fatalf("torn bytes kept in %s: %q %v", st.TornFile, kept, err)
			}
			tornOut = out
		}
		gate.Unlock()
	}
	time.Sleep(300 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	j.stop(unix.SIGTERM)
	starts, out := check("at the end")
	mu.Lock()
	total := 0
	for w := range acked {
		total += len(acked[w])
	}
	mu.Unlock()
	t.Logf("%d events acknowledged, %d failed around the kills, %d kills; avpctl audit verify: %s", total, failures.Load(), kills, bytes.TrimSpace(out))
	if total < writers*10 {
		t.Fatalf("only %d events acknowledged", total)
	}
	if len(starts) != kills+1 {
		t.Fatalf("%d journal_start events, want %d", len(starts), kills+1)
	}
	if !bytes.Contains(tornOut, []byte("torn tail")) || !bytes.Contains(out, []byte("torn tail")) {
		t.Fatalf("avpctl audit verify does not mention the torn tail:\n%s", out)
	}
	if set, _ := audit.ExpandLogSet([]string{live}); len(set) < 2 {
		t.Fatalf("the log never rotated (%v): the test does not cover rotation", set)
	}
}

// Socket activation through systemd-socket-activate --seqpacket; SO_PEERCRED allows root
// and --allow-uid users and refuses everyone else.
func TestJournalSocketActivation(t *testing.T) {
	dir, err := os.MkdirTemp("", "avpssa")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755) // the test UIDs must reach the socket for SO_PEERCRED to decide
	sock := filepath.Join(dir, "journal.sock")
	log := filepath.Join(dir, "log", "audit.jsonl")
	var out syncBuffer
	cmd, done := startActivated(t, "", &out, "--seqpacket", "-l", sock, "--",
		filepath.Join(binDir, "avpd"), "journal", "--log", log, "--allow-uid", strconv.Itoa(otherAgentUID), "--journald", "off",
		"--socket", filepath.Join(dir, "unused.sock"))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no socket:\n%s", out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	os.Chmod(sock, 0o666)

	// Root: the first connection starts the journal, which takes the passed socket.
	c := audit.NewJournalClient(sock, 10*time.Second)
	defer c.Close()
	for i := 0; i < 3; i++ {
		if err := c.Record(context.Background(), audit.Event{Type: audit.TypeConfigLoaded, ConfigSHA256: "ab", Detail: fmt.Sprintf("root event %d", i)}); err != nil {
			t.Fatalf("root: %v\n%s", err, out.String())
		}
	}
	if !strings.Contains(out.String(), "ready on the socket from systemd") {
		t.Fatalf("the journal did not use the socket from systemd:\n%s", out.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "unused.sock")); err == nil {
		t.Fatal("the journal bound its own socket although systemd passed one")
	}

	client := filepath.Join(dir, "client.py")
	writeFile(t, client, []byte(`import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.settimeout(5)
s.send(json.dumps({"id": 1, "event": {"type": "proxy_stop", "detail": sys.argv[2]}}).encode())
try:
    print(s.recv(65536).decode() or "EOF")
except Exception as e:
    print("ERR", e)
`), 0o644)
	asUID := func(uid int, detail string) string {
		o, err := exec.Command("setpriv", fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups", "--",
			"/usr/bin/python3", client, sock, detail).CombinedOutput()
		if err != nil {
			t.Fatalf("client as uid %d: %v\n%s", uid, err, o)
		}
		return strings.TrimSpace(string(o))
	}
	if got := asUID(otherAgentUID, "allowed uid"); !strings.HasPrefix(got, `{"acks":[[1,`) {
		t.Fatalf("allowed uid %d got %q", otherAgentUID, got)
	}
	if got := asUID(notEnrolled, "refused uid"); !strings.Contains(got, fmt.Sprintf("uid %d may not write to the audit journal", notEnrolled)) {
		t.Fatalf("uid %d not on the allow list got %q", notEnrolled, got)
	}
	if !strings.Contains(out.String(), fmt.Sprintf("refused a connection from uid %d", notEnrolled)) {
		t.Fatalf("the refusal is not logged:\n%s", out.String())
	}
	cmd.Process.Signal(unix.SIGTERM)
	<-done
	logData := mustRead(t, log)
	if !strings.Contains(logData, "allowed uid") || strings.Contains(logData, "refused uid") || strings.Count(logData, "root event") != 3 {
		t.Fatalf("log:\n%s", logData)
	}
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(logData), "\n") {
		var m map[string]any
		json.Unmarshal([]byte(l), &m)
		lines = append(lines, m)
	}
	if lines[0]["type"] != "journal_start" || len(lines) != 5 {
		t.Fatalf("lines %v", lines)
	}
}

// TestJournalSocketGroup: a journal run by hand as its own user binds its socket mode 0660
// with that user's group, so avpd's user (avp) gets "permission denied" and every injection
// 503 audit_unavailable; the README gave no way to let it in. --socket-group gives the
// socket to avpd's group. Found by the operator review (rt1).
func TestJournalSocketGroup(t *testing.T) {
	dir := t.TempDir()
	const gid = 4343
	p := startJournal(t, dir, nil, "--socket-group", strconv.Itoa(gid))
	fi, err := os.Stat(p.sock)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Gid != gid || fi.Mode().Perm() != 0o660 {
		t.Fatalf("journal socket with --socket-group %d: gid %d, mode %04o; want gid %d, mode 0660", gid, st.Gid, fi.Mode().Perm(), gid)
	}
}

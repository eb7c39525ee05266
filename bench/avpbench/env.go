package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	_ "embed"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	apiHost     = "api.bench.test"
	nginxHost   = "nginx.bench.test"
	apiAddr     = "127.0.0.2"
	nginxAddr   = "127.0.0.3"
	placeholder = "sk-avp-PLACEHOLDER-bench-00000000000000000000"
	avpdPort    = 14322
	mitmPort    = 18080

	uidAvpd  = 4242 // enrolled in avpd
	uidPlain = 4243 // not redirected: direct and nginx
	uidMitm  = 4244 // redirected to mitmproxy by the bench's own nftables table
)

// realSecret is made fresh for every run; the upstream checks every request for it.
var realSecret = func() string {
	b := make([]byte, 16)
	rand.Read(b)
	return "sk-bench-REAL-" + hex.EncodeToString(b)
}()

//go:embed mitm_addon.py
var mitmAddon []byte

// env is the namespace and everything running in it.
type env struct {
	ns      string
	work    string // world-readable: binaries, CA bundle, logs the load UIDs write
	priv    string // root-only: config, secrets, avpd state, audit on the real disk
	tmpfs   string // root-only directory on tmpfs, for the audit-on-tmpfs phase
	repo    string
	avpdBin string
	ctlBin  string
	selfBin string

	up        *upstream
	upCAFile  string // the bench CA: signs the upstream's and nginx's certificates
	avpCAFile string
	mitmCA    string
	bundle    string

	avpd       *exec.Cmd
	avpdLog    *os.File
	journal    *exec.Cmd // nil when avpd has no journal command
	auditPath  string    // where avpd's audit lands (file writer or journal log)
	useJournal bool
	nginx      *exec.Cmd
	mitm       *exec.Cmd
	mitmAudit  string
	logf       func(string, ...any)
}

func (e *env) cleanup() {
	e.flushProfiles()
	for _, c := range []*exec.Cmd{e.mitm, e.nginx, e.avpd, e.journal} {
		stop(c)
	}
	if e.up != nil && e.up.srv != nil {
		e.up.srv.Close()
	}
	if e.ns != "" {
		exec.Command("ip", "netns", "del", e.ns).Run()
		os.RemoveAll(filepath.Join("/etc/netns", e.ns))
	}
	if e.tmpfs != "" {
		os.RemoveAll(e.tmpfs)
	}
}

// stop sends SIGTERM and waits a little, then kills.
func stop(c *exec.Cmd) {
	if c == nil || c.Process == nil || c.ProcessState != nil {
		return
	}
	c.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		c.Process.Kill()
		<-done
	}
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// setup builds the namespace, certificates, upstream and the three proxies.
func (e *env) setup(ctx context.Context) error {
	e.ns = fmt.Sprintf("avpbench-%d", os.Getpid())
	if err := run("ip", "netns", "add", e.ns); err != nil {
		return err
	}
	if err := run("ip", "-n", e.ns, "link", "set", "lo", "up"); err != nil {
		return err
	}
	// Namespace-local sysctls. The new-connection scenario leaves many TIME_WAIT sockets,
	// hence the wide port range. TIME_WAIT reuse is off: with it (Debian's default reuses on
	// loopback), a few of an enrolled UID's reconnects per thousand reached the upstream
	// without passing through the nftables redirect, to avpd's and mitmproxy's alike.
	for _, kv := range []string{"net.ipv4.tcp_tw_reuse=0", "net.ipv4.ip_local_port_range=10000 65000", "net.core.somaxconn=4096"} {
		if err := run("ip", "netns", "exec", e.ns, "sysctl", "-q", "-w", kv); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Join("/etc/netns", e.ns), 0o755); err != nil {
		return err
	}
	hosts := fmt.Sprintf("127.0.0.1 localhost\n%s %s\n%s %s\n", apiAddr, apiHost, nginxAddr, nginxHost)
	if err := os.WriteFile(filepath.Join("/etc/netns", e.ns, "hosts"), []byte(hosts), 0o644); err != nil {
		return err
	}
	for _, d := range []string{"logs", "h2load"} {
		if err := os.MkdirAll(filepath.Join(e.work, d), 0o755); err != nil {
			return err
		}
	}
	os.Chmod(filepath.Join(e.work, "h2load"), 0o1777)

	// One bench CA signs the upstream's and nginx's certificates.
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "avpbench CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	e.upCAFile = filepath.Join(e.work, "bench-ca.pem")
	if err := os.WriteFile(e.upCAFile, pemBlock("CERTIFICATE", caDER), 0o644); err != nil {
		return err
	}
	leaf := func(name string, serial int64) (tls.Certificate, []byte, []byte, error) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		t := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
		}
		der, err := x509.CreateCertificate(rand.Reader, t, caCert, &k.PublicKey, caKey)
		if err != nil {
			return tls.Certificate{}, nil, nil, err
		}
		kder, _ := x509.MarshalPKCS8PrivateKey(k)
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}, pemBlock("CERTIFICATE", der), pemBlock("PRIVATE KEY", kder), nil
	}
	upCert, _, _, err := leaf(apiHost, 2)
	if err != nil {
		return err
	}
	_, ngCert, ngKey, err := leaf(nginxHost, 3)
	if err != nil {
		return err
	}
	os.WriteFile(filepath.Join(e.priv, "nginx.pem"), ngCert, 0o600)
	os.WriteFile(filepath.Join(e.priv, "nginx-key.pem"), ngKey, 0o600)

	// The upstream listens on sockets created inside the namespace.
	var lns []net.Listener
	if err := inNetns(e.ns, func() error {
		ln, err := net.Listen("tcp", apiAddr+":443")
		if err != nil {
			return err
		}
		lns = append(lns, ln)
		return nil
	}); err != nil {
		return fmt.Errorf("upstream: %w", err)
	}
	e.up = &upstream{}
	e.up.serve(lns, upCert)

	if err := e.startAvpd(filepath.Join(e.priv, "audit")); err != nil {
		return err
	}
	if err := run(e.ctlBin, "--runtime-dir", filepath.Join(e.priv, "run"), "enroll-uid", fmt.Sprint(uidAvpd)); err != nil {
		return err
	}
	ca, err := exec.Command(e.ctlBin, "--runtime-dir", filepath.Join(e.priv, "run"), "ca", "cert").Output()
	if err != nil {
		return fmt.Errorf("avpctl ca cert: %w", err)
	}
	e.avpCAFile = filepath.Join(e.work, "avpd-ca.pem")
	os.WriteFile(e.avpCAFile, ca, 0o644)

	if err := e.startNginx(); err != nil {
		return err
	}
	if err := e.startMitm(filepath.Join(e.priv, "mitm-audit.jsonl")); err != nil {
		return err
	}
	bundle := []byte{}
	for _, f := range []string{e.upCAFile, e.avpCAFile, e.mitmCA} {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		bundle = append(bundle, b...)
	}
	e.bundle = filepath.Join(e.work, "bundle.pem")
	return os.WriteFile(e.bundle, bundle, 0o644)
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// startAvpd starts avpd (and the journal, when this avpd has one) with its audit in dir.
func (e *env) startAvpd(auditDir string) error {
	if err := os.MkdirAll(auditDir, 0o700); err != nil {
		return err
	}
	secrets := filepath.Join(e.priv, "secrets.yaml")
	if err := os.WriteFile(secrets, []byte("BENCH_KEY: "+realSecret+"\n"), 0o600); err != nil {
		return err
	}
	e.auditPath = filepath.Join(auditDir, "audit.jsonl")
	auditCfg := fmt.Sprintf("audit: {path: %s}", e.auditPath)
	if e.useJournal {
		sock := filepath.Join(auditDir, "journal.sock")
		os.Remove(sock)
		e.journal = exec.Command("ip", "netns", "exec", e.ns, e.avpdBin, "journal",
			"--log", e.auditPath, "--socket", sock, "--journald", "off")
		lf, _ := os.Create(filepath.Join(e.work, "logs", "journal-"+filepath.Base(filepath.Dir(auditDir))+"-"+filepath.Base(auditDir)+".log"))
		e.journal.Stdout, e.journal.Stderr = lf, lf
		e.journal.Env = os.Environ()
		if cpu := os.Getenv("AVPBENCH_AVPD_CPUPROFILE"); cpu != "" {
			e.journal.Env = append(e.journal.Env, "AVPD_CPUPROFILE="+cpu+".journal")
		}
		if extra := os.Getenv("AVPBENCH_JOURNAL_ENV"); extra != "" {
			e.journal.Env = append(e.journal.Env, strings.Fields(extra)...)
		}
		if err := e.journal.Start(); err != nil {
			return err
		}
		if err := waitFor(func() bool { _, err := os.Stat(sock); return err == nil }, 10*time.Second); err != nil {
			return fmt.Errorf("journal did not create %s (log in %s)", sock, lf.Name())
		}
		auditCfg = fmt.Sprintf("audit: {socket: %s, timeout: 5s}", sock)
	}
	cfg := fmt.Sprintf(`version: 1
backend:
  type: file
  file: {path: %s}
cache: {ttl: 5m}
proxy:
  listen: 127.0.0.1:%d
  upstream_ca_file: %s
  # The memory measurement holds 10,000 connections of one user; leave it room whatever the default.
  max_connections_per_uid: 20000
%s
secrets:
  BENCH_KEY:
    placeholder: %s
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings:
      - host: %s
        paths: ["/v1/**"]
`, secrets, avpdPort, e.upCAFile, auditCfg, placeholder, apiHost)
	cfgPath := filepath.Join(e.priv, "bindings.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	runtimeDir := filepath.Join(e.priv, "run")
	sock := filepath.Join(runtimeDir, "admin.sock")
	os.Remove(sock)
	lf, err := os.OpenFile(filepath.Join(e.work, "logs", "avpd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	e.avpdLog = lf
	e.avpd = exec.Command("ip", "netns", "exec", e.ns, e.avpdBin, "serve",
		"--config", cfgPath, "--state-dir", filepath.Join(e.priv, "state"), "--runtime-dir", runtimeDir)
	e.avpd.Stdout, e.avpd.Stderr = lf, lf
	e.avpd.Env = os.Environ()
	if cpu := os.Getenv("AVPBENCH_AVPD_CPUPROFILE"); cpu != "" {
		e.avpd.Env = append(e.avpd.Env, "AVPD_CPUPROFILE="+cpu)
	}
	// AVPBENCH_AVPD_ENV adds variables to avpd's environment (for experiments such as
	// GOMAXPROCS or GOGC); the report says when it was set.
	if extra := os.Getenv("AVPBENCH_AVPD_ENV"); extra != "" {
		e.avpd.Env = append(e.avpd.Env, strings.Fields(extra)...)
	}
	if err := e.avpd.Start(); err != nil {
		return err
	}
	if err := waitFor(func() bool { _, err := os.Stat(sock); return err == nil }, 15*time.Second); err != nil {
		return fmt.Errorf("avpd did not start; see %s", lf.Name())
	}
	return nil
}

// flushProfiles makes a benchprofile avpd (and journal) write their profiles.
func (e *env) flushProfiles() {
	if os.Getenv("AVPBENCH_AVPD_CPUPROFILE") == "" {
		return
	}
	for _, c := range []*exec.Cmd{e.avpd, e.journal} {
		if c != nil && c.Process != nil {
			c.Process.Signal(syscall.SIGUSR2)
		}
	}
	time.Sleep(time.Second)
}

func (e *env) restartAvpd(auditDir string) error {
	e.flushProfiles()
	stop(e.avpd)
	stop(e.journal)
	e.journal = nil
	return e.startAvpd(auditDir)
}

const nginxConf = `user www-data;
worker_processes 2;
pid {{P}}/nginx.pid;
error_log {{P}}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path {{P}}/tmp/body;
    proxy_temp_path {{P}}/tmp/proxy;
    fastcgi_temp_path {{P}}/tmp/fastcgi;
    uwsgi_temp_path {{P}}/tmp/uwsgi;
    scgi_temp_path {{P}}/tmp/scgi;
    client_max_body_size 16m;
    keepalive_requests 1000000;
    keepalive_timeout 300s;

    upstream api {
        server {{UPADDR}}:443;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen {{ADDR}}:443 ssl http2;
        server_name {{NAME}};
        ssl_certificate {{PRIV}}/nginx.pem;
        ssl_certificate_key {{PRIV}}/nginx-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host {{API}};
        proxy_set_header Authorization "Bearer {{REAL}}";
        proxy_ssl_server_name on;
        proxy_ssl_name {{API}};
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 2;
        proxy_ssl_trusted_certificate {{CA}};
        proxy_ssl_session_reuse on;
        proxy_request_buffering off;

        location / { proxy_pass https://api; }
        # Streams are passed on as they come, as avpd and mitmproxy do.
        location /v1/sse { proxy_pass https://api; proxy_buffering off; }
        location /v1/download { proxy_pass https://api; proxy_buffering off; }
    }
}
`

func (e *env) startNginx() error {
	p := filepath.Join(e.priv, "nginx")
	for _, d := range []string{"tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"} {
		if err := os.MkdirAll(filepath.Join(p, d), 0o700); err != nil {
			return err
		}
	}
	os.Chown(filepath.Join(p, "tmp"), 33, 33) // www-data writes its temp files there
	for _, d := range []string{"body", "proxy", "fastcgi", "uwsgi", "scgi"} {
		os.Chown(filepath.Join(p, "tmp", d), 33, 33)
	}
	os.Chmod(p, 0o711)
	os.Chmod(filepath.Join(p, "tmp"), 0o700)
	conf := strings.NewReplacer("{{P}}", p, "{{PRIV}}", e.priv, "{{ADDR}}", nginxAddr, "{{UPADDR}}", apiAddr,
		"{{NAME}}", nginxHost, "{{API}}", apiHost, "{{REAL}}", realSecret, "{{CA}}", e.upCAFile).Replace(nginxConf)
	confPath := filepath.Join(p, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		return err
	}
	lf, _ := os.Create(filepath.Join(e.work, "logs", "nginx.log"))
	e.nginx = exec.Command("ip", "netns", "exec", e.ns, "nginx", "-c", confPath, "-p", p, "-g", "daemon off;")
	e.nginx.Stdout, e.nginx.Stderr = lf, lf
	if err := e.nginx.Start(); err != nil {
		return err
	}
	return waitFor(func() bool { return len(children(e.nginx.Process.Pid)) >= 2 && e.portOpen(nginxAddr, 443) }, 10*time.Second)
}

func (e *env) startMitm(auditFile string) error {
	conf := filepath.Join(e.priv, "mitmproxy")
	os.MkdirAll(conf, 0o700)
	addon := filepath.Join(conf, "avpbench_addon.py")
	if err := os.WriteFile(addon, mitmAddon, 0o600); err != nil {
		return err
	}
	e.mitmAudit = auditFile
	lf, _ := os.OpenFile(filepath.Join(e.work, "logs", "mitmproxy.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	e.mitm = exec.Command("ip", "netns", "exec", e.ns, "mitmdump", "--mode", "transparent",
		"--listen-host", "127.0.0.1", "--listen-port", fmt.Sprint(mitmPort),
		"--set", "confdir="+conf,
		"--set", "ssl_verify_upstream_trusted_ca="+e.upCAFile,
		"--set", "stream_large_bodies=256k",
		"--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
		"-s", addon)
	e.mitm.Env = append(os.Environ(), "AVPBENCH_PLACEHOLDER="+placeholder, "AVPBENCH_REAL="+realSecret, "AVPBENCH_AUDIT="+auditFile)
	e.mitm.Stdout, e.mitm.Stderr = lf, lf
	if err := e.mitm.Start(); err != nil {
		return err
	}
	e.mitmCA = filepath.Join(e.work, "mitmproxy-ca.pem")
	if err := waitFor(func() bool { return e.portOpen("127.0.0.1", mitmPort) }, 30*time.Second); err != nil {
		return fmt.Errorf("mitmproxy did not start; see %s", lf.Name())
	}
	ca, err := os.ReadFile(filepath.Join(conf, "mitmproxy-ca-cert.pem"))
	if err != nil {
		return err
	}
	if err := os.WriteFile(e.mitmCA, ca, 0o644); err != nil {
		return err
	}
	// The same kind of redirect avpd installs, in the bench's own table, for the mitmproxy
	// UID only. It lives and dies with the namespace.
	rules := fmt.Sprintf(`table inet avpbench {
	chain out {
		type nat hook output priority -100; policy accept;
		meta skuid %d tcp dport 443 redirect to :%d
	}
}
`, uidMitm, mitmPort)
	rf := filepath.Join(e.priv, "mitm.nft")
	os.WriteFile(rf, []byte(rules), 0o600)
	if exec.Command("ip", "netns", "exec", e.ns, "nft", "list", "table", "inet", "avpbench").Run() == nil {
		return nil
	}
	return run("ip", "netns", "exec", e.ns, "nft", "-f", rf)
}

func (e *env) restartMitm(auditFile string) error {
	stop(e.mitm)
	return e.startMitm(auditFile)
}

// portOpen dials addr:port inside the namespace.
func (e *env) portOpen(addr string, port int) bool {
	ok := false
	inNetns(e.ns, func() error {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(addr, fmt.Sprint(port)), 200*time.Millisecond)
		if err == nil {
			c.Close()
			ok = true
		}
		return nil
	})
	return ok
}

func waitFor(cond func() bool, d time.Duration) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return errors.New("timed out")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// inNetns runs fn on an OS thread switched into the namespace; sockets made in fn stay there.
func inNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := os.Open(filepath.Join("/run/netns", ns))
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- err // the thread stays locked and dies with the goroutine
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// asUID builds a command that runs inside the namespace as uid with a minimal environment,
// as the e2e tests run agents.
// The client trusts ca only, so a connection that did not go through the target fails
// its TLS handshake instead of quietly reaching the upstream.
func (e *env) asUIDTrusting(uid int, ca, name string, args ...string) *exec.Cmd {
	cmd := e.asUID(uid, name, args...)
	for i, v := range cmd.Env {
		if strings.HasPrefix(v, "SSL_CERT_FILE=") {
			cmd.Env[i] = "SSL_CERT_FILE=" + ca
		}
	}
	return cmd
}

func (e *env) asUID(uid int, name string, args ...string) *exec.Cmd {
	full := append([]string{"netns", "exec", e.ns, "setpriv",
		fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups", "--", name}, args...)
	cmd := exec.Command("ip", full...)
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/tmp", "SSL_CERT_FILE=" + e.bundle}
	cmd.Dir = "/"
	return cmd
}

// children lists the direct children of pid.
func children(pid int) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, d := range ents {
		var p int
		if _, err := fmt.Sscan(d.Name(), &p); err != nil {
			continue
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/status", p))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "PPid:"); ok {
				var pp int
				fmt.Sscan(strings.TrimSpace(v), &pp)
				if pp == pid {
					out = append(out, p)
				}
				break
			}
		}
		f.Close()
	}
	return out
}

// Package daemon wires avpd's subsystems together: config, firewall, CA, store, audit,
// listeners and the admin socket, in the order that keeps every step fail-closed.
//
// It owns the lifecycle (start, reload, drain) and the admin commands; the work itself is
// done by the subsystem packages.
package daemon

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/admin"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/intercept"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/redirect"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bws"
)

// Options are avpd serve's flags.
type Options struct {
	ConfigPath string
	StateDir   string
	RuntimeDir string
	Logf       func(string, ...any)
}

// Daemon is a running avpd.
type Daemon struct {
	opts    Options
	logf    func(string, ...any)
	started time.Time

	mu        sync.Mutex // serializes reloads and guards cfg, cfgSHA and policy
	cfg       *config.Config
	cfgSHA    string
	policy    *inject.Policy
	fw        *redirect.Firewall
	ca        *intercept.CA
	cache     *store.Cache
	bws       *bws.Backend       // nil unless backend type bws
	file      *store.FileBackend // nil unless backend type file
	auditor   auditCloser
	srv       *intercept.Server
	listeners []net.Listener
	addrs     []netip.AddrPort
	admin     *admin.Server

	// enrollMu serializes enrollment changes and the firewall reconcile; enrolled is the
	// set the kernel must hold (persisted in the state directory).
	enrollMu sync.Mutex
	enrolled []uint32
	// enrolledSet is a snapshot of enrolled for the connection path.
	enrolledSet atomic.Pointer[map[uint32]bool]
	fwWatch     fwWatch
	// nSecrets is len(cfg.Secrets), for the status line, which must not wait on mu: a
	// reload holds it while in-flight requests finish, and the line goes out with the
	// watchdog's ping.
	nSecrets atomic.Int32
	// fwInstalled says start put the redirect in place (failClosed has nothing to do).
	fwInstalled bool
	// listenersDown counts listeners whose Serve returned while avpd was still serving.
	listenersDown atomic.Int32

	// fileMissing: the secrets file's missing names at its last check (checkFileNames).
	fileMissing atomic.Pointer[[]string]
	// auditHealth is what the auditor answered avpd (audithealth.go).
	auditHealth auditHealth
	// late holds enroll and unenroll events the audit log did not acknowledge
	// (latechanges.go).
	late lateChanges
}

// auditCloser is the audit sink the daemon owns: the in-process file writer today, the
// journal client when one is configured.
type auditCloser interface {
	audit.Auditor
	Close() error
}

// Run starts avpd and blocks until SIGTERM/SIGINT or ctx ends, then drains.
func Run(ctx context.Context, opts Options) error {
	// Taken before anything else: a SIGHUP's default action ends the process, and one sent
	// while avpd starts (a reload right after systemctl start) would kill it. Signals that
	// come during start wait in the channel, and serve acts on them.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	d, err := start(opts)
	if err != nil {
		return err
	}
	return d.serve(ctx, sigs)
}

func start(opts Options) (_ *Daemon, err error) {
	d := &Daemon{opts: opts, logf: opts.Logf, started: time.Now()}
	defer func() {
		// The redirect goes back first, before any cleanup that could fail, and also when
		// start panics: the panic goes on once the enrolled users are redirected.
		if v := recover(); v != nil {
			d.failClosed()
			panic(v)
		}
		if err != nil {
			d.failClosed()
			d.closeAll()
		}
	}()
	// No core dumps and no same-UID ptrace: the cache holds real secrets.
	if err := store.NoCoreDumps(); err != nil {
		return nil, err
	}
	cfg, sum, err := loadConfig(opts.ConfigPath)
	if err != nil {
		return nil, err
	}
	d.cfg, d.cfgSHA = cfg, sum
	d.nSecrets.Store(int32(len(cfg.Secrets)))
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory %s: %w", opts.StateDir, err)
	}
	if err := d.ownDir(opts.StateDir, "state directory"); err != nil {
		return nil, err
	}
	d.ca, err = intercept.LoadOrCreateCA(opts.StateDir)
	if err != nil {
		return nil, err
	}
	// An expired CA still lets avpd splice what it does not terminate; say so loudly,
	// since every terminated handshake will fail.
	switch end := d.ca.Certificate().NotAfter; {
	case !time.Now().Before(end):
		d.logf("WARNING: the local CA in %s expired on %s: agents reject every leaf it signs, so bound hosts fail; move ca.pem and ca-key.pem aside and restart avpd to create a new CA, then have agents trust it", opts.StateDir, end.UTC().Format(time.DateOnly))
	case time.Until(end) < 30*24*time.Hour:
		d.logf("WARNING: the local CA in %s expires on %s; before then, move ca.pem and ca-key.pem aside and restart avpd to create a new CA, and have agents trust it", opts.StateDir, end.UTC().Format(time.DateOnly))
	}
	if err := d.openBackend(cfg); err != nil {
		return nil, err
	}
	d.auditor, err = openAuditor(cfg)
	if err != nil {
		return nil, err
	}
	if fw, ok := d.auditor.(*audit.FileWriter); ok && fw.TornFile != "" {
		d.logf("audit log %s ended in a line a crash cut short (never acknowledged); moved it to %s", cfg.Audit.Path, fw.TornFile)
	}
	upstreamTLS, err := upstreamTLSConfig(cfg.Proxy.UpstreamCAFile)
	if err != nil {
		return nil, err
	}
	if err := d.listen(cfg.Proxy.Listen); err != nil {
		return nil, err
	}
	// Every Record (requests, lifecycle, enrollment) is noted for status and doctor.
	d.auditor = trackedAuditor{auditCloser: d.auditor, h: &d.auditHealth}
	d.policy = inject.NewPolicy(cfg)
	d.srv, err = intercept.NewServer(intercept.Options{
		Policy: d.policy, CA: d.ca, Secrets: d.cache, Auditor: d.auditor,
		Logf: d.logf, Listeners: d.addrs, UpstreamTLS: upstreamTLS, IsEnrolled: d.isEnrolled,
		MaxConnsPerUID: cfg.Proxy.MaxConnsPerUID,
	})
	if err != nil {
		return nil, err
	}
	// The firewall goes last among the kernel-facing steps: redirecting agents before the
	// listener is up would only refuse their connections.
	d.fw, err = redirect.New(d.addrs[0].Port())
	if err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	uids, err := loadEnrollment(opts.StateDir)
	if err != nil {
		return nil, err
	}
	uids, err = d.reconcileAtStart(uids)
	if err != nil {
		return nil, err
	}
	uids = slices.DeleteFunc(uids, func(u uint32) bool { return checkEnrollable(u) != nil })
	if err := d.fw.Install(uids); err != nil {
		if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
			return nil, fmt.Errorf("%w; avpd needs CAP_NET_ADMIN: run it as root or under systemd with AmbientCapabilities=CAP_NET_ADMIN", err)
		}
		return nil, err
	}
	d.fwInstalled = true
	if err := writeStateFile(opts.StateDir, redirectPortFile, []byte(strconv.Itoa(int(d.addrs[0].Port()))+"\n")); err != nil {
		d.logf("save %s in %s: %v (a start that fails before it listens redirects to the default port)", redirectPortFile, opts.StateDir, err)
	}
	d.setEnrolled(uids)
	d.fwWatch.ok(time.Now())
	if err := os.MkdirAll(opts.RuntimeDir, 0o755); err != nil {
		return nil, fmt.Errorf("create runtime directory %s: %w", opts.RuntimeDir, err)
	}
	if err := d.ownDir(opts.RuntimeDir, "runtime directory"); err != nil {
		return nil, err
	}
	d.admin, err = admin.Listen(filepath.Join(opts.RuntimeDir, admin.SocketName), d.handlers(), d.logf)
	if err != nil {
		return nil, err
	}
	return d, nil
}

// loadConfig reads and validates the bindings file, at start and at reload. A file that
// anyone but root or avpd's own user could change is refused: whoever writes it decides
// which hosts get the real secrets.
func loadConfig(path string) (*config.Config, string, error) {
	group := "root"
	if g, err := user.LookupGroupId(strconv.Itoa(os.Getegid())); err == nil {
		group = g.Name
	}
	data, err := config.ReadFile(path, group, os.Geteuid())
	if err != nil {
		return nil, "", err
	}
	cfg, err := config.Parse(path, data)
	if err != nil {
		return nil, "", fmt.Errorf("invalid config:\n%w", err)
	}
	sum := sha256.Sum256(data)
	return cfg, hex.EncodeToString(sum[:]), nil
}

// openAuditor opens the configured audit sink: the journal when audit.socket is set (it
// connects on first use, so a journal that starts later is picked up), else the in-process
// file writer.
func openAuditor(cfg *config.Config) (auditCloser, error) {
	if cfg.Audit.Socket != "" {
		return audit.NewJournalClient(cfg.Audit.Socket, cfg.Audit.AckTimeout()), nil
	}
	w, err := audit.OpenFile(cfg.Audit.Path)
	if err != nil {
		// Not w: a nil *FileWriter in the interface is not a nil interface, and closing it
		// panics.
		return nil, err
	}
	return w, nil
}

func upstreamTLSConfig(caFile string) (*tls.Config, error) {
	roots, err := x509.SystemCertPool()
	if err != nil || roots == nil {
		roots = x509.NewCertPool()
	}
	if err := AddUpstreamCAFile(roots, caFile); err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}, nil
}

// AddUpstreamCAFile adds proxy.upstream_ca_file's certificates to roots (none for ""), as
// avpd does at start; avpctl bindings check runs it too, so what passes there starts.
func AddUpstreamCAFile(roots *x509.CertPool, caFile string) error {
	if caFile == "" {
		return nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return fmt.Errorf("proxy.upstream_ca_file %s: %v; give a PEM file of extra roots avpd trusts upstream, or remove the key", caFile, err)
	}
	if !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("proxy.upstream_ca_file %s holds no PEM certificate; give a PEM file of extra roots avpd trusts upstream, or remove the key", caFile)
	}
	return nil
}

// listen takes the sockets systemd passed, or binds the configured address and the same port
// on [::1] so IPv6 connections have somewhere to go.
func (d *Daemon) listen(addr netip.AddrPort) error {
	passed, err := activation.Listeners()
	if err != nil {
		return fmt.Errorf("read systemd sockets: %w", err)
	}
	for _, ln := range passed {
		if ln == nil {
			continue
		}
		ap, err := netip.ParseAddrPort(ln.Addr().String())
		if err != nil {
			return fmt.Errorf("systemd passed a socket that is not TCP: %s", ln.Addr())
		}
		d.listeners = append(d.listeners, ln)
		d.addrs = append(d.addrs, ap)
	}
	if len(d.listeners) > 0 {
		d.logf("using %d socket(s) from systemd", len(d.listeners))
		return nil
	}
	// Plain TCP, not Go's default MPTCP where the kernel has it: SO_ORIGINAL_DST does not
	// work on an accepted MPTCP socket, so an agent whose client asks for MPTCP (curl
	// --mptcp) would be refused. Against a TCP listener its client falls back to TCP, as
	// it does against systemd's socket.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln4, err := lc.Listen(context.Background(), "tcp4", addr.String())
	if err != nil {
		return fmt.Errorf("listen on proxy.listen %s: %w", addr, err)
	}
	d.listeners = append(d.listeners, ln4)
	d.addrs = append(d.addrs, addr)
	v6 := netip.AddrPortFrom(netip.IPv6Loopback(), addr.Port())
	ln6, err := lc.Listen(context.Background(), "tcp6", v6.String())
	if err != nil {
		// Without [::1] redirected IPv6 connections are refused: closed, not open.
		d.logf("warning: listen on %s: %v; IPv6 connections of enrolled users will be refused", v6, err)
		return nil
	}
	d.listeners = append(d.listeners, ln6)
	d.addrs = append(d.addrs, v6)
	return nil
}

func (d *Daemon) serve(ctx context.Context, sigs <-chan os.Signal) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// READY=1 waits for this event's acknowledgement: by now the rules, the CA, the config
	// and the listeners are in place, and the ack proves the audit log or journal works.
	started := d.recordStart(true)
	var wg sync.WaitGroup
	for _, ln := range d.listeners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.srv.Serve(ctx, ln); err != nil {
				d.logf("%v", err)
			}
			d.listenerDone(ctx, ln)
		}()
	}
	wg.Add(1)
	go func() { defer wg.Done(); d.admin.Serve(ctx) }()
	wg.Add(1)
	go func() { defer wg.Done(); d.runBackend(ctx) }()
	wg.Add(1)
	go func() { defer wg.Done(); d.recordLateChanges(ctx) }()
	d.mainLoop(ctx, sigs, started)
	cancel()
	d.notify("STOPPING=1\nSTATUS=draining connections (up to 10s)")
	dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dcancel()
	d.srv.Shutdown(dctx)
	wg.Wait()
	if !d.flushLateChanges(dctx) {
		d.dropLateChanges()
	}
	d.audit(audit.Event{Type: audit.TypeProxyStop, Detail: "avpd stopped; redirect rules stay in place so enrolled users fail closed"})
	d.closeAll()
	return nil
}

func (d *Daemon) closeAll() {
	if d.admin != nil {
		d.admin.Close()
	}
	for _, ln := range d.listeners {
		ln.Close()
	}
	if d.fw != nil {
		d.fw.Close()
	}
	if d.auditor != nil {
		d.auditor.Close()
	}
	d.closeBackend()
}

// audit records a lifecycle event; a failure is logged, the event's subject already happened.
func (d *Daemon) audit(e audit.Event) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := d.auditor.Record(ctx, e); err != nil {
		d.logf("audit %s: %v", e.Type, err)
	}
}

// reload parses and validates the config fully, then swaps the policy atomically. An
// invalid file leaves the running config untouched.
func (d *Daemon) reload() error {
	d.notifyReloading()
	// READY=1 again whatever the outcome: a refused reload leaves the old config serving.
	defer d.notifyReady()
	d.mu.Lock()
	defer d.mu.Unlock()
	cfg, sum, err := loadConfig(d.opts.ConfigPath)
	if err != nil {
		d.audit(audit.Event{Type: audit.TypeConfigRejected, Detail: "config file failed validation; the running config is unchanged"})
		d.logf("reload refused, the running config is unchanged: %v", err)
		return err
	}
	var changed []string
	for _, c := range []struct {
		name string
		diff bool
	}{{"backend", cfg.Backend != d.cfg.Backend}, {"cache", cfg.Cache != d.cfg.Cache}, {"proxy", cfg.Proxy != d.cfg.Proxy}, {"audit", cfg.Audit != d.cfg.Audit}} {
		if c.diff {
			changed = append(changed, c.name)
		}
	}
	if len(changed) > 0 {
		what := strings.Join(changed, ", ")
		d.audit(audit.Event{Type: audit.TypeConfigRejected, Detail: "backend, cache, proxy and audit sections change only on restart"})
		d.logf("reload refused, the running config is unchanged: the %s section changed, which takes a restart", what)
		return fmt.Errorf("the %s section changed, and backend, cache, proxy and audit change only on restart: nothing was reloaded (secrets included); restart avpd (systemctl restart avpd.service) to apply the file", what)
	}
	// The secrets file is checked as at start: a reload that flushed the cache and then
	// found the file unreadable (its mode loosened, its YAML broken) would fail every request.
	if err := d.checkFileNames(cfg); err != nil {
		d.audit(audit.Event{Type: audit.TypeConfigRejected, Detail: "secrets file failed its check; the running config is unchanged"})
		d.logf("reload refused, the running config is unchanged: %v", err)
		return err
	}
	d.policy = inject.NewPolicy(cfg)
	d.srv.SetPolicy(d.policy)
	d.cfg, d.cfgSHA = cfg, sum
	d.nSecrets.Store(int32(len(cfg.Secrets)))
	d.cache.Flush("")
	d.audit(audit.Event{Type: audit.TypeConfigLoaded, ConfigSHA256: sum, Detail: "config reloaded"})
	d.logf("config reloaded (sha256 %s)", sum)
	return nil
}

func (d *Daemon) caFingerprint() string {
	sum := sha256.Sum256(d.ca.Certificate().Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// checkEnrollable refuses UIDs whose redirect would loop or lock out the host: the daemon's
// own user (its upstream connections would come back to itself) and root.
func checkEnrollable(uid uint32) error {
	if int(uid) == os.Geteuid() {
		return fmt.Errorf("uid %d is avpd's own user and can never be enrolled: its upstream connections would be redirected back to itself", uid)
	}
	if uid == 0 {
		return errors.New("root cannot be enrolled: root can remove the rules, so enrolling it protects nothing")
	}
	if uid == math.MaxUint32 {
		return errors.New("uid 4294967295 is (uid_t)-1, which the kernel uses for \"no user\"; no process runs as it")
	}
	return nil
}

// resolveUID accepts a user name or a number.
func resolveUID(s string) (uint32, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return uint32(n), nil
	}
	u, err := user.Lookup(s)
	if err != nil {
		return 0, fmt.Errorf("no user %q; give a user name from /etc/passwd or a numeric UID", s)
	}
	n, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("user %q has a non-numeric uid %q", s, u.Uid)
	}
	return uint32(n), nil
}

const enrollmentFile = "enrolled.json"

type enrollment struct {
	UIDs []uint32 `json:"uids"`
}

func loadEnrollment(dir string) ([]uint32, error) {
	p := filepath.Join(dir, enrollmentFile)
	data, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err == nil {
		if terr := trustedStateFile(p); terr != nil {
			return nil, fmt.Errorf("enrollment %s is not avpd's: %w; check who changed it, then chown root %s && chmod 600 %s", p, terr, p, p)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("read enrollment %s: %w", p, err)
	}
	var e enrollment
	if err := json.Unmarshal(data, &e); err != nil {
		return nil, fmt.Errorf("parse enrollment %s: %w; fix or remove the file and enroll again", p, err)
	}
	return e.UIDs, nil
}

// saveEnrollment writes atomically: a crash leaves the old or the new list, never half.
func saveEnrollment(dir string, uids []uint32) error {
	data, _ := json.Marshal(enrollment{UIDs: uids})
	if err := writeStateFile(dir, enrollmentFile, append(data, '\n')); err != nil {
		return fmt.Errorf("save enrollment: %w", err)
	}
	return nil
}

// ownDir makes sure nobody but avpd (or root) can write dir: whoever can replaces the
// files in it, such as enrolled.json (which users are redirected) or the admin socket
// avpctl talks to. A directory avpd owns that group or others may write (a mkdir under
// umask 000) loses those bits, and says so; one another user owns, or that avpd may not
// fix, refuses the start.
func (d *Daemon) ownDir(dir, what string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("%s %s: %w", what, dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s %s is not a directory", what, dir)
	}
	owner := ownerOf(fi)
	if !avpdOwner(owner) {
		return fmt.Errorf("%s %s is owned by uid %d, who could replace what avpd keeps in it; run: chown %d %s (or give avpd a directory of its own)", what, dir, owner, os.Geteuid(), dir)
	}
	perm := fi.Mode().Perm()
	if perm&0o022 == 0 {
		return nil
	}
	if fi.Mode()&os.ModeSticky != 0 {
		// /tmp and the like: shared on purpose, and never avpd's to change.
		return fmt.Errorf("%s %s is a shared directory (mode %v) others can write; give avpd a directory of its own", what, dir, fi.Mode())
	}
	if owner == os.Geteuid() {
		// Keeps setgid: only the write bits of group and others go.
		mode := fi.Mode() & (os.ModePerm | os.ModeSetgid) &^ 0o022
		if err := os.Chmod(dir, mode); err == nil {
			d.logf("%s %s had mode %04o, writable by others; made it %04o", what, dir, perm, mode.Perm())
			return nil
		}
	}
	return fmt.Errorf("%s %s has mode %04o: group and others must not write it; run: chmod go-w %s", what, dir, perm, dir)
}

// avpdOwner reports whether uid may own avpd's state and runtime files: root or the user
// avpd runs as. Not the production install's avp when root runs avpd by hand: root's
// avpd would write root-owned files there that the service, as avp, then cannot read; it
// refuses with the chown to make instead.
func avpdOwner(uid int) bool {
	return uid == 0 || uid == os.Geteuid()
}

// ownerOf is fi's owner, or -1 where the platform does not say.
func ownerOf(fi os.FileInfo) int {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid)
	}
	return -1
}

// trustedStateFile reports whether path (in the state directory) may be believed: it and
// its directory belong to root or to avpd's user, and no one else can write them. A file
// another user placed or could replace is not read.
func trustedStateFile(path string) error {
	for i, p := range []string{filepath.Dir(path), path} {
		// The directory may be a link (a state directory moved to another disk); the file
		// itself may not: a link could point anywhere.
		stat := os.Stat
		if i == 1 {
			stat = os.Lstat
		}
		fi, err := stat(p)
		if err != nil {
			return err
		}
		if owner := ownerOf(fi); !avpdOwner(owner) {
			return fmt.Errorf("%s is owned by uid %d, not by root or avpd's user", p, owner)
		}
		if fi.Mode().Perm()&0o022 != 0 || fi.Mode()&os.ModeSymlink != 0 {
			return fmt.Errorf("%s can be written by others (mode %v)", p, fi.Mode())
		}
	}
	return nil
}

// reconcileAtStart compares the enrollment file with the set the kernel still holds (avpd
// restarted; the table outlives it). Without the file (a state directory restored without
// it, a wrong --state-dir), the kernel's users are kept and the file written: dropping them
// would send their HTTPS straight out. With it, the file wins, and every user it drops or
// adds is logged and audited, as the reconcile does while avpd runs.
func (d *Daemon) reconcileAtStart(uids []uint32) ([]uint32, error) {
	kernel, err := d.fw.Enrolled()
	if err != nil {
		return uids, nil // no table yet (first start, or after a boot)
	}
	if _, err := os.Stat(filepath.Join(d.opts.StateDir, enrollmentFile)); errors.Is(err, os.ErrNotExist) {
		if len(kernel) == 0 {
			return uids, nil
		}
		if err := saveEnrollment(d.opts.StateDir, kernel); err != nil {
			return nil, err
		}
		d.logf("no %s in %s: kept the %d uid(s) the kernel still redirects (%v) and wrote the file", enrollmentFile, d.opts.StateDir, len(kernel), kernel)
		return kernel, nil
	}
	for _, u := range kernel {
		if !slices.Contains(uids, u) {
			d.logf("uid %d was redirected by the kernel but is not in %s: no longer redirected", u, enrollmentFile)
			d.audit(audit.Event{Type: audit.TypeUnenroll, UID: audit.Int64(int64(u)), Detail: "at start: not in " + enrollmentFile})
		}
	}
	for _, u := range uids {
		if !slices.Contains(kernel, u) {
			d.logf("uid %d is in %s but was not redirected by the kernel: redirected again", u, enrollmentFile)
		}
	}
	return uids, nil
}

// redirectPortFile holds the port the redirect last pointed at, for a start that fails
// before it knows its listener (failClosed).
const redirectPortFile = "redirect-port"

func loadRedirectPort(dir string) (uint16, bool) {
	p := filepath.Join(dir, redirectPortFile)
	if trustedStateFile(p) != nil {
		return 0, false
	}
	data, err := os.ReadFile(p)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 16)
	return uint16(n), err == nil && n != 0
}

// writeStateFile replaces dir/name with data atomically (a temporary file, fsync, rename,
// fsync of the directory): a crash leaves the old or the new content, never half.
func writeStateFile(dir, name string, data []byte) error {
	tmp, err := os.CreateTemp(dir, "."+name+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, name)); err != nil {
		return err
	}
	if dh, err := os.Open(dir); err == nil {
		dh.Sync()
		dh.Close()
	}
	return nil
}

// failClosed runs when avpd fails to start before its redirect is in place (an invalid
// config at boot, an unreadable secrets file): the enrolled users' HTTPS is redirected all
// the same, to the port avpd last listened on (or the default), where nothing answers
// until avpd does. Without it their traffic would go straight out for as long as avpd keeps
// failing (the kernel forgets the table at boot). Best effort: the start's own error is
// what is reported.
func (d *Daemon) failClosed() {
	if d.fwInstalled {
		return
	}
	// Only from a state directory avpd can believe (loadEnrollment checks the file and its
	// directory): one another user owns would let that user choose whose HTTPS is
	// redirected, and where to.
	uids, err := loadEnrollment(d.opts.StateDir)
	if err != nil {
		d.logf("start failed; the redirect is not put back from %s: %v", d.opts.StateDir, err)
		return
	}
	if len(uids) == 0 {
		return
	}
	uids = slices.DeleteFunc(uids, func(u uint32) bool { return checkEnrollable(u) != nil })
	port, ok := loadRedirectPort(d.opts.StateDir)
	if !ok {
		port = netip.MustParseAddrPort(config.DefaultListen).Port()
	}
	fw, err := redirect.New(port)
	if err != nil {
		d.logf("start failed, and the redirect could not be put back either: %v", err)
		return
	}
	defer fw.Close()
	if err := fw.Install(uids); err != nil {
		d.logf("start failed, and the redirect could not be put back either: %v", err)
		return
	}
	d.logf("start failed; the %d enrolled user(s) stay redirected to port %d, where nothing answers until avpd starts: their HTTPS fails instead of going out directly", len(uids), port)
}

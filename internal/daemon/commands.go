package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/admin"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/intercept"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bws"
)

// Status is what `avpctl status` shows. It holds no secret value and no placeholder.
type Status struct {
	Version       string          `json:"version"`
	PID           int             `json:"pid"`
	StartedAt     time.Time       `json:"started_at"`
	Listeners     []string        `json:"listeners"`
	Config        string          `json:"config"`
	ConfigSHA256  string          `json:"config_sha256"`
	Backend       string          `json:"backend"`
	Secrets       []string        `json:"secrets"`
	CachedSecrets int             `json:"cached_secrets"`
	Enrolled      []uint32        `json:"enrolled_uids"`
	FirewallOK    bool            `json:"firewall_ok"`
	CAFingerprint string          `json:"ca_fingerprint"`
	AuditPath     string          `json:"audit_path"`
	Stats         intercept.Stats `json:"stats"`
	// The state directory and what the every-second firewall check found (reconcile.go).
	OpsStatus
	// What avpd's own audit sink answered it (audithealth.go).
	AuditStatus
	// Cache, Memory and BWS are filled in by backendStatus (backend.go).
	Cache  store.CacheStats     `json:"cache"`
	Memory store.ProcessHygiene `json:"memory"`
	BWS    *bws.Health          `json:"bws,omitempty"`
	// FileMissing are the names the file backend's secrets file had no value for when it
	// was last checked (at start or reload).
	FileMissing []string `json:"file_missing,omitempty"`
}

// Version is set at build time.
var Version = "dev"

func (d *Daemon) handlers() map[string]admin.Handler {
	return map[string]admin.Handler{
		"enroll-uid":   d.cmdEnroll,
		"unenroll-uid": d.cmdUnenroll,
		"status":       d.cmdStatus,
		"ca-cert":      d.cmdCACert,
		"reload":       d.cmdReload,
		"explain":      d.cmdExplain,
		"cache-flush":  d.cmdCacheFlush,
	}
}

func oneArg(args []string, usage string) (string, error) {
	if len(args) != 1 || args[0] == "" {
		return "", fmt.Errorf("usage: %s", usage)
	}
	return args[0], nil
}

func (d *Daemon) cmdEnroll(ctx context.Context, peer uint32, args []string) (any, error) {
	a, err := oneArg(args, "avpctl enroll-uid USER|UID")
	if err != nil {
		return nil, err
	}
	uid, err := resolveUID(a)
	if err != nil {
		return nil, err
	}
	if err := checkEnrollable(uid); err != nil {
		return nil, err
	}
	already, pc, err := d.enroll(uid, audit.Event{Type: audit.TypeEnroll, UID: audit.Int64(int64(uid)), Detail: fmt.Sprintf("enrolled by uid %d", peer)})
	if err != nil {
		return nil, err
	}
	// Recorded outside enrollMu, which the firewall check takes every second.
	aerr := d.settleChange(pc)
	return withAudit(map[string]any{"uid": uid, "enrolled": true, "was_enrolled": already}, aerr), nil
}

// enroll adds uid to the state file, the proxy's snapshot and the kernel's set, and puts
// its event in line (under enrollMu, so events keep the order of the changes).
func (d *Daemon) enroll(uid uint32, e audit.Event) (bool, *pendingChange, error) {
	d.enrollMu.Lock()
	defer d.enrollMu.Unlock()
	uids, err := loadEnrollment(d.opts.StateDir)
	if err != nil {
		return false, nil, err
	}
	already := slices.Contains(uids, uid)
	if !already {
		uids = append(uids, uid)
		slices.Sort(uids)
	}
	// Persist first: a crash after the kernel change but before the file would drop the
	// enrollment at the next start, which opens a bypass.
	if err := saveEnrollment(d.opts.StateDir, uids); err != nil {
		return false, nil, err
	}
	d.setEnrolled(uids)
	if err := d.fw.Enroll(uid); err != nil {
		return false, nil, fmt.Errorf("enroll uid %d: %w", uid, err)
	}
	d.logf("enrolled uid %d", uid)
	return already, d.late.reserve(e), nil
}

// withAudit adds to an enrollment reply whether the audit log recorded the change: the
// change stands either way, and avpctl says when it is not recorded yet.
func withAudit(reply map[string]any, err error) map[string]any {
	reply["audit_recorded"] = err == nil
	if err != nil {
		reply["audit_error"] = err.Error()
	}
	return reply
}

func (d *Daemon) cmdUnenroll(ctx context.Context, peer uint32, args []string) (any, error) {
	a, err := oneArg(args, "avpctl unenroll-uid USER|UID")
	if err != nil {
		return nil, err
	}
	uid, err := resolveUID(a)
	if err != nil {
		return nil, err
	}
	was, pc, err := d.unenroll(uid, audit.Event{Type: audit.TypeUnenroll, UID: audit.Int64(int64(uid)), Detail: fmt.Sprintf("unenrolled by uid %d", peer)})
	// Requests on connections accepted before now go verbatim (the proxy checks each one);
	// this waits out those already decided, so nothing is injected for uid once this
	// returns. Outside enrollMu: the firewall check, which takes it every second on the
	// main loop, must not wait for in-flight requests.
	d.srv.Revoke()
	if err != nil {
		return nil, err
	}
	if !was {
		// Removed from the kernel's set all the same, in case state and kernel disagreed.
		d.logf("unenroll uid %d: it was not enrolled", uid)
		return map[string]any{"uid": uid, "enrolled": false, "was_enrolled": false}, nil
	}
	d.logf("unenrolled uid %d", uid)
	aerr := d.settleChange(pc)
	return withAudit(map[string]any{"uid": uid, "enrolled": false, "was_enrolled": true}, aerr), nil
}

// unenroll takes uid out of the kernel's set, the proxy's snapshot and the state file, and
// reports whether it was enrolled; if it was, its event e is put in line (under enrollMu).
func (d *Daemon) unenroll(uid uint32, e audit.Event) (bool, *pendingChange, error) {
	d.enrollMu.Lock()
	defer d.enrollMu.Unlock()
	uids, err := loadEnrollment(d.opts.StateDir)
	if err != nil {
		return false, nil, err
	}
	was := slices.Contains(uids, uid)
	uids = slices.DeleteFunc(uids, func(u uint32) bool { return u == uid })
	// Kernel first here: the UID stops being redirected only once the set says so.
	if err := d.fw.Unenroll(uid); err != nil {
		return false, nil, fmt.Errorf("unenroll uid %d: %w", uid, err)
	}
	d.setEnrolled(uids)
	if err := saveEnrollment(d.opts.StateDir, uids); err != nil {
		return false, nil, err
	}
	if !was {
		return false, nil, nil
	}
	return true, d.late.reserve(e), nil
}

func (d *Daemon) cmdStatus(ctx context.Context, _ uint32, _ []string) (any, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := Status{
		Version: Version, PID: osGetpid(), StartedAt: d.started.UTC(), Config: d.opts.ConfigPath,
		ConfigSHA256: d.cfgSHA, Backend: d.cfg.Backend.Type, CachedSecrets: d.cache.Len(),
		CAFingerprint: d.caFingerprint(), AuditPath: auditWhere(d.cfg.Audit), Stats: d.srv.Stats(),
	}
	for _, a := range d.addrs {
		st.Listeners = append(st.Listeners, a.String())
	}
	for _, s := range d.cfg.Secrets {
		st.Secrets = append(st.Secrets, s.Name)
	}
	st.OpsStatus = d.opsStatus()
	st.AuditStatus = d.auditHealth.status()
	st.AuditStatus.Pending = d.late.pending()
	uids, err := d.fw.Enrolled()
	if err != nil {
		return nil, fmt.Errorf("read enrolled uids from nftables: %w", err)
	}
	st.Enrolled = uids
	ok, err := d.fw.Healthy()
	st.FirewallOK = ok && err == nil
	d.backendStatus(&st)
	return st, nil
}

func (d *Daemon) cmdCACert(context.Context, uint32, []string) (any, error) {
	return map[string]string{"pem": string(d.ca.CertPEM())}, nil
}

func (d *Daemon) cmdReload(context.Context, uint32, []string) (any, error) {
	if err := d.reload(); err != nil {
		return nil, errors.New("reload refused, the running config is unchanged:\n" + err.Error())
	}
	return map[string]string{"config_sha256": d.cfgSHA}, nil
}

func osGetpid() int { return os.Getpid() }

// cmdExplain runs the live policy on a described request: args are uid, method, URL and
// headers.
func (d *Daemon) cmdExplain(_ context.Context, _ uint32, args []string) (any, error) {
	if len(args) < 3 {
		return nil, errors.New("usage: avpctl explain [--uid U] METHOD URL [-H 'Header: value']")
	}
	uid, err := strconv.ParseInt(args[0], 10, 64)
	if err != nil {
		return nil, fmt.Errorf("uid %q is not a number", args[0])
	}
	f, r, err := inject.ExplainInput(uid, args[1], args[2], args[3:])
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	p := d.policy
	d.mu.Unlock()
	return map[string]string{"text": p.Explain(f, r)}, nil
}

// auditWhere says where decisions go: the in-process log file or the journal's socket.
func auditWhere(a config.Audit) string {
	if a.Socket != "" {
		return "journal at " + a.Socket
	}
	return a.Path
}

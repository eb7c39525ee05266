package daemon

import (
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// reconcileEvery is how often the serving loop checks that the kernel still enforces avpd's
// table and enrolled set. Another tool's "nft flush ruleset" or "nft delete table" removes
// the redirect silently, and every connection of an enrolled user then bypasses avpd; with a
// check every second and a restore that takes milliseconds, the table is back within 2 s.
const reconcileEvery = time.Second

// fwWatch is what the reconciler learned, for status, STATUS= and the watchdog.
type fwWatch struct {
	mu       sync.Mutex
	checked  time.Time // last check that reached the kernel and ended with the rules in place
	restores uint64
	last     time.Time // last restore
	lastWhy  string
	err      string // the last check's or restore's error, "" when it succeeded
	errSince time.Time
}

// OpsStatus is the operational part of Status: where avpd keeps its state (for avpctl
// doctor's permission checks) and what the every-second firewall check found.
// FirewallRestores counts the times avpd found its table or enrolled set missing or altered
// (another tool's "nft flush ruleset") and restored it; the last one's time and reason
// follow. FirewallError is the current error of the check, if any.
type OpsStatus struct {
	StateDir               string     `json:"state_dir"`
	FirewallRestores       uint64     `json:"firewall_restores"`
	FirewallLastRestored   *time.Time `json:"firewall_last_restored,omitempty"`
	FirewallLastRestoreWhy string     `json:"firewall_last_restore_reason,omitempty"`
	FirewallError          string     `json:"firewall_error,omitempty"`
}

func (d *Daemon) opsStatus() OpsStatus {
	s := d.fwWatch.snapshot()
	out := OpsStatus{StateDir: d.opts.StateDir, FirewallRestores: s.restores, FirewallError: s.err}
	if !s.last.IsZero() {
		last := s.last.UTC()
		out.FirewallLastRestored, out.FirewallLastRestoreWhy = &last, s.lastWhy
	}
	return out
}

type fwSnapshot struct {
	checked  time.Time
	restores uint64
	last     time.Time
	lastWhy  string
	err      string
}

func (w *fwWatch) snapshot() fwSnapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	return fwSnapshot{checked: w.checked, restores: w.restores, last: w.last, lastWhy: w.lastWhy, err: w.err}
}

// healthy says whether the rules were verified (or restored) recently enough to vouch for
// them: within two check periods, or within maxAge when that is longer.
func (w *fwWatch) healthy(now time.Time, maxAge time.Duration) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err == "" && !w.checked.IsZero() && now.Sub(w.checked) <= max(maxAge, 2*reconcileEvery)
}

func (w *fwWatch) ok(now time.Time) {
	w.mu.Lock()
	w.checked, w.err = now, ""
	w.mu.Unlock()
}

// failed records an error and says whether it is new (worth a log line): the first failure,
// then one line a minute while it lasts.
func (w *fwWatch) failed(now time.Time, err error) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == "" || now.Sub(w.errSince) >= time.Minute {
		w.err, w.errSince = err.Error(), now
		return true
	}
	w.err = err.Error()
	return false
}

func (w *fwWatch) restored(now time.Time, why string) {
	w.mu.Lock()
	w.restores++
	w.last, w.lastWhy = now, why
	w.checked, w.err = now, ""
	w.mu.Unlock()
}

// reconcile compares the kernel's table and enrolled set with what avpd installed and puts
// them back when they differ. The enrolled UIDs avpd persisted are the truth: a UID another
// tool added to the set by hand is removed again, one it removed is added back. The restore
// is Install's single atomic batch, and it is audited as rules_restored.
func (d *Daemon) reconcile() {
	now := time.Now()
	why, n, err := d.reconcileOnce()
	if err != nil {
		if d.fwWatch.failed(now, err) {
			d.logf("firewall check: %v; enrolled users may bypass avpd until it succeeds", err)
		}
		return
	}
	if why == "" {
		d.fwWatch.ok(now)
		return
	}
	d.fwWatch.restored(now, why)
	detail := fmt.Sprintf("%s; restored table inet agent_vault_proxy with %d enrolled uid(s)", why, n)
	d.logf("firewall: %s", detail)
	d.audit(audit.Event{Type: audit.TypeRulesRestored, Detail: detail})
}

// reconcileOnce returns why it restored the rules ("" when nothing was needed) and how many
// UIDs the restored set holds.
func (d *Daemon) reconcileOnce() (why string, n int, err error) {
	d.enrollMu.Lock()
	defer d.enrollMu.Unlock()
	want := d.enrolled
	ok, err := d.fw.Healthy()
	if err != nil {
		return "", 0, err
	}
	if !ok {
		why = "the nftables table, a chain or a rule was missing or changed (another tool flushed or edited the ruleset)"
	} else {
		got, err := d.fw.Enrolled()
		if err != nil {
			return "", 0, err
		}
		if slices.Equal(got, want) {
			return "", 0, nil
		}
		why = fmt.Sprintf("the enrolled set held uids %v instead of %v (another tool edited it)", got, want)
	}
	if err := d.fw.Install(want); err != nil {
		return "", 0, fmt.Errorf("restore: %w", err)
	}
	return why, len(want), nil
}

// setEnrolled records the UIDs the kernel should enforce; callers hold enrollMu.
func (d *Daemon) setEnrolled(uids []uint32) {
	uids = slices.DeleteFunc(slices.Clone(uids), func(u uint32) bool { return checkEnrollable(u) != nil })
	slices.Sort(uids)
	d.enrolled = slices.Compact(uids)
	set := make(map[uint32]bool, len(d.enrolled))
	for _, u := range d.enrolled {
		set[u] = true
	}
	d.enrolledSet.Store(&set)
}

// isEnrolled answers the proxy's per-connection question without taking enrollMu.
func (d *Daemon) isEnrolled(uid uint32) bool {
	set := d.enrolledSet.Load()
	return set != nil && (*set)[uid]
}

package daemon

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// recordStart records proxy_start and, once the audit log or journal acknowledged it, tells
// systemd avpd is ready. It returns whether that happened; until it does, the serving loop
// calls it again every second (first=false), and systemd's TimeoutStartSec bounds the wait.
func (d *Daemon) recordStart(first bool) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d.mu.Lock()
	sha, nSecrets := d.cfgSHA, len(d.cfg.Secrets)
	d.mu.Unlock()
	err := d.auditor.Record(ctx, audit.Event{Type: audit.TypeProxyStart, ConfigSHA256: sha, Detail: "avpd started"})
	if err != nil {
		if first {
			d.logf("audit proxy_start: %v; not ready until the audit log or journal acknowledges it (injections get 503 audit_unavailable meanwhile)", err)
		}
		d.notify("STATUS=waiting for the audit log or journal to acknowledge proxy_start")
		return false
	}
	d.auditHealth.setReady()
	d.logf("avpd ready: listening on %v, %d secret(s), CA %s", d.addrs, nSecrets, d.caFingerprint())
	d.notifyReady()
	return true
}

// mainLoop is the serving loop: signals, the firewall reconcile every second, STATUS=
// updates, and watchdog pings at half of WatchdogSec, sent only while the firewall rules
// are verified and every listener serves. A hung or failing check therefore ends in a
// restart by systemd rather than in a daemon that looks alive while agents bypass it.
func (d *Daemon) mainLoop(ctx context.Context, sigs <-chan os.Signal, started bool) {
	tick := time.NewTicker(reconcileEvery)
	defer tick.Stop()
	var wdC <-chan time.Time
	wdEvery := watchdogInterval()
	if wdEvery > 0 {
		wd := time.NewTicker(wdEvery)
		defer wd.Stop()
		wdC = wd.C
	}
	var ticks int
	lastStatus := ""
	unhealthyLogged := false
	for {
		select {
		case <-ctx.Done():
			return
		case s := <-sigs:
			if s == syscall.SIGHUP {
				// In its own goroutine: a reload waits for in-flight injections, and the
				// watchdog and the firewall check must not wait with it.
				go func() {
					if err := d.reload(); err != nil {
						d.logf("reload: %v", err)
					}
				}()
				continue
			}
			d.logf("received %v; draining", s)
			return
		case <-tick.C:
			d.reconcile()
			if !started {
				started = d.recordStart(false)
				continue
			}
			if ticks++; ticks%5 == 0 {
				if line := d.statusLine(); line != lastStatus {
					d.notify("STATUS=" + line)
					lastStatus = line
				}
			}
		case <-wdC:
			if why := d.unhealthy(2 * wdEvery); why != "" {
				if !unhealthyLogged {
					d.logf("not pinging the watchdog: %s", why)
					unhealthyLogged = true
				}
				continue
			}
			unhealthyLogged = false
			d.notify(sddaemon.SdNotifyWatchdog)
		}
	}
}

// unhealthy returns why avpd should not vouch for itself to the watchdog, or "".
func (d *Daemon) unhealthy(maxAge time.Duration) string {
	if n := d.listenersDown.Load(); n > 0 {
		return fmt.Sprintf("%d listener(s) stopped serving", n)
	}
	if !d.fwWatch.healthy(time.Now(), maxAge) {
		w := d.fwWatch.snapshot()
		if w.err != "" {
			return "the firewall check fails: " + w.err
		}
		return "the firewall rules were not verified recently"
	}
	return ""
}

// listenerDone is called when a listener's Serve returns; before shutdown that is a failure.
func (d *Daemon) listenerDone(ctx context.Context, ln net.Listener) {
	if ctx.Err() == nil {
		d.listenersDown.Add(1)
		d.logf("listener %s stopped serving", ln.Addr())
	}
}

// notify sends one sd_notify message when avpd runs under systemd (NOTIFY_SOCKET is set)
// and does nothing otherwise. NOTIFY_SOCKET is never unset (unsetEnvironment=false): later
// watchdog pings and status updates need it.
func (d *Daemon) notify(state string) {
	if _, err := sddaemon.SdNotify(false, state); err != nil {
		d.logf("sd_notify: %v", err)
	}
}

// notifyReady tells systemd that avpd serves, with the current status line.
func (d *Daemon) notifyReady() {
	d.notify(sddaemon.SdNotifyReady + "\nSTATUS=" + d.statusLine())
}

// notifyReloading marks the start of a reload. MONOTONIC_USEC lets systemd (Type=notify-reload,
// systemd 253 and later) match the READY=1 that ends it; older versions ignore it.
func (d *Daemon) notifyReloading() {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	d.notify(fmt.Sprintf("%s\nMONOTONIC_USEC=%d\nSTATUS=reloading %s", sddaemon.SdNotifyReloading,
		ts.Nano()/1000, d.opts.ConfigPath))
}

// statusLine is the one-line STATUS= summary that systemctl status shows: counts only, never
// a secret, a placeholder or a host an agent asked for.
func (d *Daemon) statusLine() string {
	// No lock: a reload (mu) and an unenroll (enrollMu) may wait for in-flight requests, and
	// this line goes out with the watchdog's ping.
	nSecrets := int(d.nSecrets.Load())
	nUIDs := 0
	if set := d.enrolledSet.Load(); set != nil {
		nUIDs = len(*set)
	}
	s := d.srv.Stats()
	w := d.fwWatch.snapshot()
	var b strings.Builder
	fmt.Fprintf(&b, "%d secret(s), %d enrolled uid(s); %d request(s): %d injected, %d verbatim, %d refused, %d backend error(s), %d audit error(s)",
		nSecrets, nUIDs, s.Requests, s.Injected, s.Verbatim, s.Refused, s.BackendErrors, s.AuditErrors)
	switch {
	case w.err != "":
		fmt.Fprintf(&b, "; FIREWALL CHECK FAILING: %s", w.err)
	case w.restores > 0:
		fmt.Fprintf(&b, "; firewall restored %d time(s), last %s", w.restores, w.last.UTC().Format(time.RFC3339))
	}
	return b.String()
}

// watchdogInterval is how often the serving loop pings systemd's watchdog: half of
// WatchdogSec, or 0 when systemd does not watch avpd.
func watchdogInterval() time.Duration {
	iv, err := sddaemon.SdWatchdogEnabled(false)
	if err != nil || iv <= 0 {
		return 0
	}
	return iv / 2
}

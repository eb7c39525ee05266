package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/admin"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/daemon"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/redirect"
)

const doctorUsage = "doctor [--uid USER] [--host NAME] [--config FILE] [--state-dir DIR] [--daemon-user USER] [--json]"

// Check results. Only "fail" makes doctor exit 1; "warn" names something worth fixing
// that does not open a bypass or stop injection.
const (
	statusOK   = "ok"
	statusFail = "fail"
	statusWarn = "warn"
	statusSkip = "skip"
)

// check is one line of the report. Fix is a command or a sentence that repairs it.
type check struct {
	Name   string `json:"name"`
	Status string `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

type doctorReport struct {
	OK     bool    `json:"ok"`
	Checks []check `json:"checks"`
}

type doctor struct {
	g          globals
	uidArg     string
	host       string
	configFlag string
	stateFlag  string
	userFlag   string
	root       bool

	checks    []check
	st        *daemon.Status
	cfg       *config.Config
	ca        *x509.Certificate
	daemonUID int    // avpd's UID, -1 when unknown
	daemonUsr string // its name, for fixes
	kernelSet []uint32
	kernelOK  bool
}

func (d *doctor) add(name, status, detail, fix string) {
	d.checks = append(d.checks, check{Name: name, Status: status, Detail: detail, Fix: fix})
}

// runDoctor checks everything avpd needs and prints a fix for each failure. Exit 0 when no
// check failed, 1 when one did, 2 on a usage error.
func runDoctor(g globals, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("avpctl doctor", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	d := &doctor{g: g, daemonUID: -1, root: os.Geteuid() == 0}
	fs.StringVar(&d.uidArg, "uid", "", "")
	fs.StringVar(&d.host, "host", "", "")
	fs.StringVar(&d.configFlag, "config", "", "")
	fs.StringVar(&d.stateFlag, "state-dir", "", "")
	fs.StringVar(&d.userFlag, "daemon-user", "", "")
	asJSON := fs.Bool("json", false, "")
	probe := fs.String("probe", "", "") // internal: the TLS probe, run as the agent's UID
	if err := fs.Parse(args); err != nil || fs.NArg() != 0 {
		return usageErr(stderr, doctorUsage)
	}
	if *probe != "" {
		return runProbe(*probe, stdout)
	}

	d.checkKernel()
	d.checkDaemon()
	d.checkConfig()
	d.checkSecretFiles()
	d.checkListeners()
	d.checkFirewall()
	d.checkEnrolled()
	d.checkState()
	d.checkCA()
	d.checkCATrust()
	d.checkAudit()
	d.checkAuditPathUnderSystemd()
	d.checkPlaceholders()
	d.checkConnLimit()
	if d.uidArg != "" {
		d.checkAgent()
	}

	rep := doctorReport{OK: true, Checks: d.checks}
	for _, c := range d.checks {
		if c.Status == statusFail {
			rep.OK = false
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(rep)
	} else {
		printReport(stdout, rep)
	}
	if !rep.OK {
		return 1
	}
	return 0
}

func printReport(w io.Writer, rep doctorReport) {
	width := 0
	for _, c := range rep.Checks {
		width = max(width, len(c.Name))
	}
	for _, c := range rep.Checks {
		fmt.Fprintf(w, "%-4s  %-*s  %s\n", strings.ToUpper(c.Status), width, c.Name, c.Detail)
		if c.Fix != "" && c.Status != statusOK {
			fmt.Fprintf(w, "      %*s  fix: %s\n", width, "", c.Fix)
		}
	}
	fails, warns := 0, 0
	for _, c := range rep.Checks {
		switch c.Status {
		case statusFail:
			fails++
		case statusWarn:
			warns++
		}
	}
	if rep.OK {
		fmt.Fprintf(w, "all checks passed (%d warning(s))\n", warns)
	} else {
		fmt.Fprintf(w, "%d check(s) failed, %d warning(s)\n", fails, warns)
	}
}

// checkKernel: inet-family NAT needs Linux 5.2, and the redirect needs conntrack, whose
// sysctls appear in the current network namespace once it is loaded.
func (d *doctor) checkKernel() {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		d.add("kernel", statusFail, "uname: "+err.Error(), "")
		return
	}
	rel := unix.ByteSliceToString(u.Release[:])
	var major, minor int
	fmt.Sscanf(rel, "%d.%d", &major, &minor)
	if major < 5 || major == 5 && minor < 2 {
		d.add("kernel", statusFail, "Linux "+rel+": nftables NAT in the inet family needs 5.2 or later", "upgrade the kernel to 5.2 or later")
	} else {
		d.add("kernel", statusOK, "Linux "+rel, "")
	}
	if _, err := os.Stat("/proc/sys/net/netfilter/nf_conntrack_max"); err != nil {
		d.add("conntrack", statusFail, "connection tracking is not available in this network namespace; the redirect and SO_ORIGINAL_DST need it",
			"modprobe nf_conntrack nf_nat (a kernel built with CONFIG_NF_CONNTRACK and CONFIG_NF_NAT)")
		return
	}
	d.add("conntrack", statusOK, "nf_conntrack is loaded", "")
}

// checkDaemon asks avpd for its status; most later checks use the answer.
func (d *doctor) checkDaemon() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var st daemon.Status
	sock := filepath.Join(d.g.runtimeDir, admin.SocketName)
	if err := admin.Call(ctx, sock, "status", nil, &st); err != nil {
		fix := "systemctl start avpd.socket avpd.service, then journalctl -u avpd for why it stopped"
		if strings.Contains(err.Error(), "permission denied") {
			fix = "run avpctl doctor as root or as a member of group " + admin.GroupName
		}
		d.add("avpd", statusFail, "avpd does not answer: "+err.Error(), fix)
		return
	}
	d.st = &st
	d.daemonUID, d.daemonUsr = processUID(st.PID)
	d.add("avpd", statusOK, fmt.Sprintf("avpd %s answers (pid %d, user %s, up since %s)", st.Version, st.PID, d.daemonUsr, st.StartedAt.Format(time.RFC3339)), "")
}

// processUID returns the effective UID of pid and its user name. It reads /proc/PID/status:
// the owner of /proc/PID itself is root for a non-dumpable process, which avpd is.
func processUID(pid int) (int, string) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1, "?"
	}
	uid := -1
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "Uid:" {
			uid, _ = strconv.Atoi(f[2])
		}
	}
	if uid < 0 {
		return -1, "?"
	}
	name := strconv.Itoa(uid)
	if u, err := user.LookupId(name); err == nil {
		name = u.Username
	}
	return uid, name
}

// daemonOwner is who should own avpd's private files: its running user, else --daemon-user,
// else avp when that user exists, else root.
func (d *doctor) daemonOwner() (int, string) {
	if d.daemonUID >= 0 {
		return d.daemonUID, d.daemonUsr
	}
	if d.userFlag != "" {
		if uid, _, err := lookupAgent(d.userFlag); err == nil {
			return int(uid), d.userFlag
		}
	}
	if u, err := user.Lookup(daemonUser); err == nil {
		n, _ := strconv.Atoi(u.Uid)
		return n, daemonUser
	}
	return 0, "root"
}

func (d *doctor) configPath() string {
	switch {
	case d.configFlag != "":
		return d.configFlag
	case d.st != nil && d.st.Config != "":
		return d.st.Config
	}
	return defaultConfig
}

func (d *doctor) checkConfig() {
	path := d.configPath()
	cfg, err := config.Load(path)
	if errors.Is(err, os.ErrPermission) {
		// Not the file's fault: this user may not read it (avp-admin members may ask avpd,
		// but the config is root's and avp's).
		detail := fmt.Sprintf("not checked: uid %d may not read %s", os.Geteuid(), path)
		if d.st != nil {
			detail += fmt.Sprintf("; avpd runs with it (sha256 %s)", d.st.ConfigSHA256)
		}
		status := statusSkip
		if d.root {
			status = statusFail // root denied: a mandatory access control or a FUSE mount
		}
		d.add("config", status, detail, "run avpctl doctor as root (sudo avpctl doctor) to check the config, the secret files, the state directory and the CA key")
	} else if err != nil {
		first, _, _ := strings.Cut(err.Error(), "\n")
		d.add("config", statusFail, "invalid: "+first, "avpctl bindings check "+path+" lists every error with its fix; then avpctl reload")
	} else {
		d.cfg = cfg
		n := 0
		for _, s := range cfg.Secrets {
			n += len(s.Bindings)
		}
		d.add("config", statusOK, fmt.Sprintf("%s is valid (%d secret(s), %d binding(s))", path, len(cfg.Secrets), n), "")
	}
	fi, err := os.Stat(path)
	if err != nil {
		return
	}
	owner := fi.Sys().(*syscall.Stat_t).Uid
	uid, name := d.daemonOwner()
	switch {
	case fi.Mode().Perm()&0o022 != 0:
		d.add("config-permissions", statusFail, fmt.Sprintf("%s has mode %04o: others can change which hosts get secrets", path, fi.Mode().Perm()),
			fmt.Sprintf("chown root:%s %s && chmod 640 %s", groupFor(name), path, path))
	case owner != 0 && int(owner) != uid:
		d.add("config-permissions", statusFail, fmt.Sprintf("%s is owned by uid %d, neither root nor avpd's user", path, owner),
			fmt.Sprintf("chown root:%s %s && chmod 640 %s", groupFor(name), path, path))
	default:
		d.add("config-permissions", statusOK, fmt.Sprintf("%s: mode %04o, owner uid %d", path, fi.Mode().Perm(), owner), "")
	}
}

// groupFor is the group avpd reads its config through: its user's primary group.
func groupFor(userName string) string {
	if u, err := user.Lookup(userName); err == nil {
		if g, err := user.LookupGroupId(u.Gid); err == nil {
			return g.Name
		}
	}
	return userName
}

// checkSecretFiles: the file backend's secrets and the BWS access token must be readable
// by avpd's user and nobody else.
func (d *doctor) checkSecretFiles() {
	if d.cfg == nil {
		d.add("secret-files", statusSkip, "no valid config to read the backend from", "")
		return
	}
	var files []string
	switch d.cfg.Backend.Type {
	case "file":
		files = append(files, d.cfg.Backend.File.Path)
	case "bws":
		files = append(files, d.cfg.Backend.BWS.AccessTokenFile)
	}
	uid, name := d.daemonOwner()
	for _, p := range files {
		fi, err := os.Stat(p)
		switch {
		case err != nil:
			d.add("secret-files", statusFail, err.Error(), "create it, then: chown "+name+" "+p+" && chmod 600 "+p)
			continue
		case !fi.Mode().IsRegular():
			d.add("secret-files", statusFail, p+" is not a regular file", "replace it with a regular file owned by "+name+", mode 600")
			continue
		}
		owner := int(fi.Sys().(*syscall.Stat_t).Uid)
		switch {
		case fi.Mode().Perm()&0o077 != 0:
			d.add("secret-files", statusFail, fmt.Sprintf("%s has mode %04o: group or others can read real secrets", p, fi.Mode().Perm()),
				fmt.Sprintf("chown %s %s && chmod 600 %s", name, p, p))
		case owner != uid && !(owner == 0 && uid == 0):
			d.add("secret-files", statusFail, fmt.Sprintf("%s is owned by uid %d; avpd runs as %s (uid %d) and must own it", p, owner, name, uid),
				fmt.Sprintf("chown %s %s && chmod 600 %s", name, p, p))
		default:
			d.add("secret-files", statusOK, fmt.Sprintf("%s: mode %04o, owned by %s", p, fi.Mode().Perm(), name), "")
		}
	}
}

func (d *doctor) listenAddrs() []string {
	if d.st != nil && len(d.st.Listeners) > 0 {
		return d.st.Listeners
	}
	if d.cfg != nil {
		l := d.cfg.Proxy.Listen
		return []string{l.String(), netip.AddrPortFrom(netip.IPv6Loopback(), l.Port()).String()}
	}
	return nil
}

// checkListeners connects to each listener. With socket activation this also wakes avpd.
func (d *doctor) checkListeners() {
	addrs := d.listenAddrs()
	if len(addrs) == 0 {
		d.add("listener", statusSkip, "neither avpd nor the config names a listener", "")
		return
	}
	var bad []string
	for _, a := range addrs {
		c, err := net.DialTimeout("tcp", a, 3*time.Second)
		if err != nil {
			bad = append(bad, err.Error())
			continue
		}
		c.Close()
	}
	if len(bad) > 0 {
		d.add("listener", statusFail, "not reachable: "+strings.Join(bad, "; "),
			"systemctl status avpd.socket avpd.service; proxy.listen in the config must match ListenStream= in avpd.socket")
		return
	}
	d.add("listener", statusOK, "accepting on "+strings.Join(addrs, ", "), "")
}

// checkFirewall reads the table from the kernel (root only); without root it reports what
// avpd says.
func (d *doctor) checkFirewall() {
	fix := "avpd restores its table within 2 s while it runs: start it (systemctl start avpd), or load " +
		"/usr/local/share/doc/agent-vault-proxy/agent-vault-proxy.nft by hand; then find the tool that removed it"
	if !d.root {
		switch {
		case d.st == nil:
			d.add("firewall", statusSkip, "needs root (or a running avpd) to read table inet "+redirect.TableName, "")
		case !d.st.FirewallOK:
			d.add("firewall", statusFail, "avpd reports table inet "+redirect.TableName+" missing or incomplete", fix)
		default:
			d.add("firewall", statusOK, "avpd reports table inet "+redirect.TableName+" in place", "")
		}
		return
	}
	fw, err := redirect.New(14322) // the port only matters for Install, which doctor never calls
	if err != nil {
		d.add("firewall", statusFail, "open nftables: "+err.Error(), "run doctor as root on Linux 5.2 or later")
		return
	}
	defer fw.Close()
	ok, err := fw.Healthy()
	if err != nil {
		d.add("firewall", statusFail, err.Error(), fix)
		return
	}
	if !ok {
		detail := "table inet " + redirect.TableName + " is missing or incomplete: enrolled users' HTTPS is not redirected"
		if d.st != nil && d.st.FirewallError != "" {
			detail += "; avpd's check fails: " + d.st.FirewallError
		}
		d.add("firewall", statusFail, detail, fix)
		return
	}
	d.kernelOK = true
	d.kernelSet, _ = fw.Enrolled()
	detail := fmt.Sprintf("table inet %s in place, %d uid(s) in set %s", redirect.TableName, len(d.kernelSet), redirect.SetName)
	if d.st != nil && d.st.FirewallRestores > 0 {
		last := ""
		if d.st.FirewallLastRestored != nil {
			last = " (last " + d.st.FirewallLastRestored.Format(time.RFC3339) + ": " + d.st.FirewallLastRestoreWhy + ")"
		}
		d.add("firewall", statusWarn, fmt.Sprintf("%s; avpd had to restore it %d time(s)%s", detail, d.st.FirewallRestores, last),
			"find the tool that flushes or edits the ruleset (a firewall service reloading with flush ruleset, say) and make it leave table inet "+redirect.TableName+" alone")
		return
	}
	d.add("firewall", statusOK, detail, "")
}

func (d *doctor) enrolledSet() ([]uint32, bool) {
	if d.kernelOK {
		return d.kernelSet, true
	}
	if d.st != nil {
		return d.st.Enrolled, true
	}
	return nil, false
}

// checkEnrolled: every enrolled UID should be a real user, and someone should be enrolled.
func (d *doctor) checkEnrolled() {
	set, known := d.enrolledSet()
	if !known {
		d.add("enrolled", statusSkip, "neither the kernel nor avpd could be asked", "")
		return
	}
	if len(set) == 0 {
		d.add("enrolled", statusWarn, "no user is enrolled: avpd intercepts nothing", "avpctl enroll-uid USER")
		return
	}
	var missing []string
	for _, u := range set {
		if _, err := user.LookupId(strconv.Itoa(int(u))); err != nil {
			missing = append(missing, strconv.Itoa(int(u)))
		}
	}
	if len(missing) > 0 {
		d.add("enrolled", statusWarn, fmt.Sprintf("enrolled uid(s) %s have no user in the passwd database", strings.Join(missing, ", ")),
			"create the user, or avpctl unenroll-uid "+missing[0])
		return
	}
	d.add("enrolled", statusOK, fmt.Sprintf("%d enrolled uid(s): %s", len(set), joinUIDs(set)), "")
	for _, u := range set {
		if msg, fix, bad := subordinateWarning(u); msg != "" {
			status := statusWarn
			if bad {
				status = statusFail
			}
			d.add("subordinate ids", status, msg, fix)
		}
	}
}

// checkState: the state directory is avpd's alone (who can write it can replace the
// enrollment or the CA), and the enrollment file parses (avpd refuses to start otherwise,
// which doctor would only see as "avpd does not answer").
func (d *doctor) checkState() {
	dir := d.stateDir()
	fi, err := os.Stat(dir)
	if err != nil {
		if d.st == nil {
			d.add("state", statusSkip, "no state directory "+dir+": avpd has not run", "")
		} else {
			d.add("state", statusFail, err.Error(), "start avpd with --state-dir pointing at its state directory")
		}
		return
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		d.add("state", statusFail, fmt.Sprintf("state directory %s has mode %04o: others can replace the enrollment or the CA in it", dir, perm), "chmod go-w "+dir)
		return
	}
	if d.checkStateOwner(dir, fi) {
		return
	}
	p := filepath.Join(dir, "enrolled.json")
	data, err := os.ReadFile(p)
	switch {
	case errors.Is(err, os.ErrNotExist):
		d.add("state", statusOK, "state directory "+dir+" is avpd's alone; nobody enrolled yet", "")
		return
	case errors.Is(err, os.ErrPermission):
		d.add("state", statusSkip, p+" not readable by this user", "run avpctl doctor as root")
		return
	case err != nil:
		d.add("state", statusFail, err.Error(), "")
		return
	}
	var e struct {
		UIDs []uint32 `json:"uids"`
	}
	if err := json.Unmarshal(data, &e); err != nil {
		d.add("state", statusFail, fmt.Sprintf("%s is damaged (%v): avpd refuses to start with it", p, err), "restore it from a backup, or remove it and enroll the users again (avpctl enroll-uid); while avpd is down the redirect stays in place")
		return
	}
	d.add("state", statusOK, fmt.Sprintf("state directory %s is avpd's alone; %s lists %d uid(s)", dir, "enrolled.json", len(e.UIDs)), "")
}

// checkStateOwner: avpd's user must be able to use the state directory and read every file
// in it. An avpd run by hand as root leaves root's files there (mode 0600), and the service,
// as avp, then cannot start, nor put the redirect back for the enrolled users. It reports
// whether it added a failure.
func (d *doctor) checkStateOwner(dir string, dirInfo os.FileInfo) bool {
	uid, name := d.daemonOwner()
	if uid == 0 {
		return false
	}
	gid := -1
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		gid, _ = strconv.Atoi(u.Gid)
	}
	fix := fmt.Sprintf("chown -R %s:%s %s (under the production install: systemd-tmpfiles --create agent-vault-proxy.conf); then systemctl restart avpd",
		name, groupFor(name), dir)
	var bad []string
	if owner := dirInfo.Sys().(*syscall.Stat_t).Uid; int(owner) != uid {
		bad = append(bad, fmt.Sprintf("the directory itself (uid %d: avpd cannot write its enrollment there)", owner))
	}
	entries, err := os.ReadDir(dir)
	if err != nil && len(bad) == 0 {
		return false // not root: the checks below say what they can
	}
	for _, e := range entries {
		fi, err := os.Lstat(filepath.Join(dir, e.Name()))
		if err != nil || fi.Mode()&os.ModeSymlink != 0 {
			continue
		}
		if !readableBy(fi, uid, gid) {
			bad = append(bad, fmt.Sprintf("%s (uid %d, mode %04o)", e.Name(), fi.Sys().(*syscall.Stat_t).Uid, fi.Mode().Perm()))
		}
	}
	if len(bad) == 0 {
		return false
	}
	d.add("state", statusFail, fmt.Sprintf("avpd's user %s (uid %d) cannot use %s in %s: avpd fails to start, and cannot put the redirect back for the enrolled users (their HTTPS goes out directly after a reboot)",
		name, uid, strings.Join(bad, ", "), dir), fix)
	return true
}

// readableBy says whether uid (primary group gid, -1 when unknown) may read fi by its mode.
func readableBy(fi os.FileInfo, uid, gid int) bool {
	st := fi.Sys().(*syscall.Stat_t)
	perm := fi.Mode().Perm()
	need := os.FileMode(0o4)
	if fi.IsDir() {
		need = 0o5
	}
	switch {
	case int(st.Uid) == uid:
		return perm>>6&need == need
	case gid >= 0 && int(st.Gid) == gid:
		return perm>>3&need == need
	}
	return perm&need == need
}

func (d *doctor) stateDir() string {
	switch {
	case d.stateFlag != "":
		return d.stateFlag
	case d.st != nil && d.st.StateDir != "":
		return d.st.StateDir
	}
	return "/var/lib/agent-vault-proxy"
}

// checkCA: the CA certificate parses and is the one avpd serves, and its key is private to
// avpd's user.
func (d *doctor) checkCA() {
	dir := d.stateDir()
	certPath, keyPath := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	data, err := os.ReadFile(certPath)
	if err != nil && d.st != nil {
		// Not root: ask avpd instead.
		data, err = fetchCA(d.g)
	}
	if err != nil {
		d.add("ca", statusFail, "CA certificate: "+err.Error(), "start avpd once: it creates its CA in "+dir)
		return
	}
	cert, err := parseCA(data)
	if err != nil {
		d.add("ca", statusFail, certPath+": "+err.Error(), "move "+dir+"/ca.pem and ca-key.pem aside and restart avpd to create a new CA (then avpctl ca install)")
		return
	}
	d.ca = cert
	fp := fingerprint(cert)
	if d.st != nil && d.st.CAFingerprint != fp {
		d.add("ca", statusFail, fmt.Sprintf("%s is %s but avpd serves %s", certPath, fp, d.st.CAFingerprint), "pass doctor the --state-dir avpd runs with")
		return
	}
	renew := "move " + dir + "/ca.pem and ca-key.pem aside and restart avpd to create a new CA (then avpctl ca install)"
	if !time.Now().Before(cert.NotAfter) {
		d.add("ca", statusFail, fmt.Sprintf("CA %s expired on %s: agents reject every leaf it signs", fp, cert.NotAfter.Format(time.DateOnly)), renew)
	} else if time.Until(cert.NotAfter) < 30*24*time.Hour {
		d.add("ca", statusWarn, fmt.Sprintf("CA %s expires %s", fp, cert.NotAfter.Format(time.DateOnly)), renew)
	}
	fi, err := os.Stat(keyPath)
	if err != nil {
		if d.root {
			d.add("ca", statusFail, "CA key: "+err.Error(), "restore "+keyPath+" from backup, or move ca.pem aside and restart avpd for a new CA")
		} else {
			d.add("ca", statusSkip, "CA key: needs root to inspect "+keyPath, "")
		}
		return
	}
	uid, name := d.daemonOwner()
	owner := int(fi.Sys().(*syscall.Stat_t).Uid)
	if fi.Mode().Perm() != 0o600 || owner != uid {
		d.add("ca", statusFail, fmt.Sprintf("CA key %s has mode %04o and owner uid %d: only avpd's user (%s) may read it", keyPath, fi.Mode().Perm(), owner, name),
			fmt.Sprintf("chown %s %s && chmod 600 %s", name, keyPath, keyPath))
		return
	}
	d.add("ca", statusOK, fmt.Sprintf("CA %s, key %s mode 0600 owned by %s", fp, keyPath, name), "")
}

// checkCATrust: agents trust avpd's CA through the system store (Go's view of it, which is
// the same bundle OpenSSL and curl read).
func (d *doctor) checkCATrust() {
	if d.ca == nil {
		d.add("ca-trust", statusSkip, "no CA to look for", "")
		return
	}
	pool, err := x509.SystemCertPool()
	if err == nil {
		_, err = d.ca.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	}
	if err != nil {
		d.add("ca-trust", statusFail, "avpd's CA "+fingerprint(d.ca)+" is not trusted by the system store: agents will reject its certificates",
			"avpctl ca install (and, for Node or Python requests, avpctl ca env)")
		return
	}
	d.add("ca-trust", statusOK, "the system store trusts avpd's CA", "")
}

// checkAudit: failures to record decisions make every injection fail closed. With a
// journal configured, its socket must accept a connection (which also wakes a
// socket-activated journal).
func (d *doctor) checkAudit() {
	if d.cfg != nil && d.cfg.Audit.Socket != "" {
		sock := d.cfg.Audit.Socket
		c, err := net.DialTimeout("unixpacket", sock, 3*time.Second)
		if err != nil {
			fix := "systemctl start avp-journal.socket avp-journal.service, then journalctl -u avp-journal"
			if errors.Is(err, syscall.EACCES) {
				fix = "run avpctl doctor as root (the journal's socket is avpd's user's alone)"
			}
			d.add("journal", statusFail, "the audit journal does not answer at "+sock+": "+err.Error()+"; every injection gets 503 audit_unavailable", fix)
		} else {
			c.Close()
			d.add("journal", statusOK, fmt.Sprintf("the audit journal's socket %s accepts connections from uid %d (avpd's own connection: the audit line)", sock, os.Geteuid()), "")
		}
	}
	if d.st == nil {
		d.add("audit", statusSkip, "avpd does not answer", "")
		return
	}
	where := d.st.AuditPath
	if d.cfg != nil && d.cfg.Audit.Socket != "" {
		where = "journal at " + d.cfg.Audit.Socket
	}
	// What avpd's own connection answered: doctor's probe above runs as this user (root,
	// usually), which may reach a socket avpd's user may not, or a journal that accepts
	// and never acknowledges.
	a := d.st.AuditStatus
	if !a.Ready || a.Error != "" {
		detail := "avpd's audit log (" + where + ") "
		if !a.Ready {
			detail += "never acknowledged proxy_start: avpd is not ready"
		} else {
			detail += "fails"
			if a.FailingSince != nil {
				detail += " since " + a.FailingSince.Format(time.RFC3339)
			}
		}
		if a.Error != "" {
			detail += " (" + a.Error + ")"
		}
		detail += "; every injection gets 503 audit_unavailable"
		d.add("audit", statusFail, detail, d.auditFix(a.Error))
		return
	}
	if n := d.st.Stats.AuditErrors; n > 0 {
		d.add("audit", statusWarn, fmt.Sprintf("%d request(s) failed because the audit log did not acknowledge them (%s); it answers again now", n, where),
			"check the audit log's disk and, with a journal, systemctl status avp-journal.socket avp-journal.service")
		return
	}
	if a.Pending > 0 {
		d.add("audit", statusWarn, fmt.Sprintf("%d enroll/unenroll event(s) wait to be recorded in the audit log (%s)", a.Pending, where), "journalctl -u avpd says why they were not acknowledged")
		return
	}
	d.add("audit", statusOK, "avpd's audit log acknowledges its events; no audit failures since avpd started ("+where+")", "")
}

// auditFix says how to repair avpd's own connection to its audit log, from its error.
func (d *doctor) auditFix(errText string) string {
	_, user := d.daemonOwner()
	if d.cfg == nil || d.cfg.Audit.Socket == "" {
		path := d.st.AuditPath
		return "avpd (user " + user + ") must be able to append to " + path + " and fsync it: check the disk and that " + user + " may write it; under systemd use audit.socket, since ProtectSystem=strict makes /var/log read-only for avpd"
	}
	sock := d.cfg.Audit.Socket
	switch {
	case strings.Contains(errText, "permission denied"):
		return fmt.Sprintf("avpd's user %s may not connect to %s: under systemd avp-journal.socket gives it to %s (SocketUser=avp); a journal run by hand binds it mode 0660 for its own user, so give its group to %s: avpd journal --socket-group %s, or chgrp %s %s (then restart avpd, or wait: it retries every second)",
			user, sock, user, user, groupFor(user), groupFor(user), sock)
	case strings.Contains(errText, "no such file") || strings.Contains(errText, "connection refused"):
		return "systemctl start avp-journal.socket avp-journal.service (or start avpd journal), then journalctl -u avp-journal"
	case strings.Contains(errText, "refused the event") || strings.Contains(errText, "journal says"):
		return "the journal refuses avpd's events: journalctl -u avp-journal names why (a uid not allowed: avpd journal --allow-uid " + user + ")"
	}
	return "the journal takes avpd's events but does not acknowledge them: systemctl status avp-journal.service and journalctl -u avp-journal (a full or failing disk, a hung journal); systemctl restart avp-journal.service"
}

// unitDirs are where avpd.service is looked for (systemd's unit search path for
// installed units).
var unitDirs = []string{"/etc/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"}

// checkAuditPathUnderSystemd: avpd.service has ProtectSystem=strict, under which avp may
// write only its StateDirectory and RuntimeDirectory; an in-process audit.path elsewhere (the
// example config's /var/log/agent-vault-proxy) cannot be opened, and avpd does not start.
func (d *doctor) checkAuditPathUnderSystemd() {
	if d.cfg == nil || d.cfg.Audit.Socket != "" || d.cfg.Audit.Path == "" {
		return
	}
	unit := ""
	for _, dir := range unitDirs {
		if _, err := os.Stat(filepath.Join(dir, "avpd.service")); err == nil {
			unit = filepath.Join(dir, "avpd.service")
			break
		}
	}
	if unit == "" {
		return
	}
	path := filepath.Clean(d.cfg.Audit.Path)
	for _, w := range []string{"/var/lib/agent-vault-proxy/", "/run/agent-vault-proxy/"} {
		if strings.HasPrefix(path, w) {
			return
		}
	}
	d.add("audit-path", statusWarn,
		fmt.Sprintf("%s is installed, and audit.path %s is outside what it lets avpd write (ProtectSystem=strict): avpd started by systemd cannot open its audit log and does not start", unit, path),
		"send the audit to the journal: audit: {socket: /run/avp-journal/journal.sock} in the config, systemctl enable --now avp-journal.socket, then systemctl restart avpd")
}

// checkPlaceholders: a placeholder that arrived where the config does not replace it (another
// header, or another shape) usually means the agent's client sends its key differently than
// bindings.yaml expects, as Anthropic's SDK 1.x does (Authorization: Bearer, not x-api-key).
func (d *doctor) checkPlaceholders() {
	if d.st == nil {
		d.add("placeholders", statusSkip, "avpd does not answer", "")
		return
	}
	v := d.st.Stats.VerbatimByReason
	wrong, shape, url := v[inject.ReasonWrongHeader], v[inject.ReasonFormatMismatch], v[inject.ReasonPlaceholderInURL]
	if wrong+shape+url == 0 {
		d.add("placeholders", statusOK, "every placeholder since avpd started arrived in a header and shape the config replaces", "")
		return
	}
	if url > 0 {
		d.add("placeholders", statusWarn,
			fmt.Sprintf("%d request(s) carried a placeholder in the URL (%s), where avpd never injects; they went upstream with the placeholder", url, inject.ReasonPlaceholderInURL),
			"configure the agent's client to send the key in a header instead of the query (Google's APIs take x-goog-api-key) and list that header under inject or inject.also; avpctl audit tail --decision forward_verbatim names the secret and host")
		if wrong+shape == 0 {
			return
		}
	}
	d.add("placeholders", statusWarn,
		fmt.Sprintf("%d request(s) carried a placeholder where the config does not replace it (%s %d, %s %d); they went upstream with the placeholder",
			wrong+shape, inject.ReasonWrongHeader, wrong, inject.ReasonFormatMismatch, shape),
		"avpctl audit tail --decision forward_verbatim names the secret and host; list the header and format the client sends under inject.also (README, Configuration)")
}

// checkConnLimit: connections reset at proxy.max_connections_per_uid mean an agent kept that
// many open at once, which is a leak or a flood more often than a need.
func (d *doctor) checkConnLimit() {
	if d.st == nil {
		d.add("connection-limit", statusSkip, "avpd does not answer", "")
		return
	}
	n := d.st.Stats.OverUIDLimit
	if n == 0 {
		d.add("connection-limit", statusOK, "no connection was reset at proxy.max_connections_per_uid since avpd started", "")
		return
	}
	d.add("connection-limit", statusWarn,
		fmt.Sprintf("%d connection(s) were reset because their user already had proxy.max_connections_per_uid open", n),
		"avpd's log names the user (journalctl -u avpd | grep 'open connections'); an agent that holds that many is usually leaking them; if it needs them, raise the limit in bindings.yaml and restart avpd")
}

// checkAgent: the UID is enrolled, and as that UID a TLS handshake to a bound host comes
// back with avpd's certificate and verifies against the system store.
func (d *doctor) checkAgent() {
	uid, gid, err := lookupAgent(d.uidArg)
	if err != nil {
		d.add("agent", statusFail, err.Error(), "give --uid a user name from /etc/passwd or a numeric UID")
		return
	}
	if set, known := d.enrolledSet(); known {
		if !slices.Contains(set, uid) {
			d.add("agent-enrolled", statusFail, fmt.Sprintf("uid %d is not enrolled: its HTTPS goes straight to the internet with the placeholder", uid),
				"avpctl enroll-uid "+d.uidArg)
		} else {
			d.add("agent-enrolled", statusOK, fmt.Sprintf("uid %d is enrolled", uid), "")
		}
	}
	if !d.root {
		d.add("agent-tls", statusSkip, "needs root to run the probe as uid "+strconv.Itoa(int(uid)), "")
		return
	}
	host := d.host
	if host == "" && d.cfg != nil {
		// The first bound host in the file, as the operator reads it (Secrets is sorted by
		// name), without a wildcard.
		line := 0
		for _, s := range d.cfg.Secrets {
			for _, b := range s.Bindings {
				if !strings.HasPrefix(b.Host, "*.") && (host == "" || s.Pos.Line < line) {
					host, line = b.Host, s.Pos.Line
					break
				}
			}
		}
	}
	if host == "" {
		d.add("agent-tls", statusSkip, "no bound host without a wildcard to try; give --host NAME", "")
		return
	}
	res, err := runProbeAs(uid, gid, host)
	if err != nil {
		d.add("agent-tls", statusFail, "probe: "+err.Error(), "")
		return
	}
	name := fmt.Sprintf("TLS to %s:443 as uid %d", host, uid)
	if d.host == "" {
		name += " (the first bound host in the config; --host NAME tries another)"
	}
	if res.DialError != "" {
		fix := "systemctl status avpd.socket avpd.service"
		if strings.Contains(res.DialError, "no such host") || strings.Contains(res.DialError, "lookup") {
			fix = "the agent cannot resolve " + host + ": check DNS for that user, or give --host"
		}
		d.add("agent-tls", statusFail, name+": "+res.DialError, fix)
		return
	}
	leaf, err := x509.ParseCertificate(res.Leaf)
	if err != nil {
		d.add("agent-tls", statusFail, name+": unparsable certificate: "+err.Error(), "")
		return
	}
	if d.ca == nil || leaf.CheckSignatureFrom(d.ca) != nil {
		d.add("agent-tls", statusFail, fmt.Sprintf("%s: not intercepted; %s answered with its own certificate (issuer %q)", name, host, leaf.Issuer.CommonName),
			"avpctl enroll-uid "+d.uidArg+", and check the firewall line above")
		return
	}
	if res.VerifyError != "" {
		d.add("agent-tls", statusFail, name+": avpd's certificate does not verify with the system store: "+res.VerifyError,
			"avpctl ca install (and avpctl ca env for runtimes with their own roots)")
		return
	}
	d.add("agent-tls", statusOK, name+": redirected to avpd, certificate verifies with the system store", "")
}

// lookupAgent resolves a user name or number to a UID and its primary GID (the UID itself
// for a number without a passwd entry).
func lookupAgent(s string) (uint32, uint32, error) {
	var u *user.User
	var err error
	if _, nerr := strconv.ParseUint(s, 10, 32); nerr == nil {
		u, err = user.LookupId(s)
		if err != nil {
			n, _ := strconv.ParseUint(s, 10, 32)
			return uint32(n), uint32(n), nil
		}
	} else if u, err = user.Lookup(s); err != nil {
		return 0, 0, fmt.Errorf("no user %q", s)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return uint32(uid), uint32(gid), nil
}

// probeResult is what the probe, running as the agent's UID, saw.
type probeResult struct {
	DialError   string `json:"dial_error,omitempty"`
	Leaf        []byte `json:"leaf,omitempty"`
	VerifyError string `json:"verify_error,omitempty"`
}

// runProbeAs runs this binary's probe as uid:gid with no supplementary groups and an empty
// environment, so it sees the system store exactly as a fresh agent process would.
func runProbeAs(uid, gid uint32, host string) (*probeResult, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe, "doctor", "--probe", host)
	cmd.Env = []string{}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}}}
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return nil, fmt.Errorf("%v: %s", err, ee.Stderr)
		}
		return nil, err
	}
	var res probeResult
	if err := json.Unmarshal(out, &res); err != nil {
		return nil, fmt.Errorf("probe output %q: %w", out, err)
	}
	return &res, nil
}

// runProbe dials host:443, completes a TLS handshake without trusting anything yet, and
// reports the leaf and whether it verifies for host against the system store.
func runProbe(host string, stdout io.Writer) int {
	var res probeResult
	defer func() { json.NewEncoder(stdout).Encode(res) }()
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(dialer, "tcp", net.JoinHostPort(host, "443"), &tls.Config{
		ServerName: host, InsecureSkipVerify: true, // verified below, against the system store
	})
	if err != nil {
		res.DialError = err.Error()
		return 0
	}
	defer conn.Close()
	certs := conn.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		res.DialError = "the server sent no certificate"
		return 0
	}
	res.Leaf = certs[0].Raw
	roots, err := x509.SystemCertPool()
	if err != nil {
		res.VerifyError = "no system store: " + err.Error()
		return 0
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{DNSName: host, Roots: roots, Intermediates: inter}); err != nil {
		res.VerifyError = err.Error()
	}
	return 0
}

// firewallWatchLine adds to status's firewall line what avpd's every-second check restored.
func firewallWatchLine(st daemon.Status) string {
	var s string
	if st.FirewallRestores > 0 {
		s = fmt.Sprintf("; restored %d time(s)", st.FirewallRestores)
		if st.FirewallLastRestored != nil {
			s += ", last " + st.FirewallLastRestored.Format(time.RFC3339) + ": " + st.FirewallLastRestoreWhy
		}
	}
	if st.FirewallError != "" {
		s += "; CHECK FAILING: " + st.FirewallError
	}
	return s
}

package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/admin"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/daemon"
)

// call sends one command to the running avpd.
func call(g globals, cmd string, args []string, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return admin.Call(ctx, filepath.Join(g.runtimeDir, admin.SocketName), cmd, args, out)
}

func runEnroll(g globals, args []string, stdout, stderr io.Writer) int {
	return enrollment(g, "enroll-uid", "enrolled", args, stdout, stderr)
}

// privilegedGroups are the groups of agent-vault-proxy's own users (sysusers.d): a member
// of avp-admin may use the admin socket (and unenroll itself), avp is avpd's group, which
// reads the config, and avp-audit the journal's.
var privilegedGroups = []string{"avp-admin", "avp", "avp-audit"}

// userGroups looks up the user named by arg (a name or a UID) and the names of its groups,
// the primary one first; a test replaces it.
var userGroups = func(arg string) (name string, primary string, groups []string, err error) {
	u, err := user.Lookup(arg)
	if err != nil {
		if u, err = user.LookupId(arg); err != nil {
			return "", "", nil, err
		}
	}
	gids, err := u.GroupIds()
	if err != nil {
		return "", "", nil, err
	}
	for _, gid := range gids {
		if g, err := user.LookupGroupId(gid); err == nil {
			groups = append(groups, g.Name)
			if gid == u.Gid {
				primary = g.Name
			}
		}
	}
	return u.Username, primary, groups, nil
}

// checkNotPrivileged refuses to enroll a member of privilegedGroups: an agent in avp-admin
// could unenroll itself and send its HTTPS past avpd. A user this host does not know (a
// bare UID) has no groups to check.
func checkNotPrivileged(arg string) error {
	name, primary, groups, err := userGroups(arg)
	if err != nil {
		return nil
	}
	for _, g := range groups {
		if !slices.Contains(privilegedGroups, g) {
			continue
		}
		fix := fmt.Sprintf("gpasswd -d %s %s", name, g)
		if g == primary {
			fix = fmt.Sprintf("usermod -g <another group> %s", name)
		}
		return fmt.Errorf("user %s is a member of group %s, and an agent's user must be in none of %s: "+
			"avp-admin may use avpctl's live commands (it could unenroll itself and send its HTTPS past avpd), "+
			"avp and avp-audit are avpd's and the audit journal's own; run: %s, then enroll it again",
			name, g, strings.Join(privilegedGroups, ", "), fix)
	}
	return nil
}

func runUnenroll(g globals, args []string, stdout, stderr io.Writer) int {
	return enrollment(g, "unenroll-uid", "unenrolled", args, stdout, stderr)
}

func enrollment(g globals, cmd, verb string, args []string, stdout, stderr io.Writer) int {
	if len(args) != 1 {
		return usageErr(stderr, cmd+" USER|UID")
	}
	if cmd == "enroll-uid" {
		if err := checkNotPrivileged(args[0]); err != nil {
			return fail(stderr, err)
		}
	}
	var out struct {
		UID           uint32 `json:"uid"`
		WasEnrolled   *bool  `json:"was_enrolled"`
		AuditRecorded *bool  `json:"audit_recorded"`
		AuditError    string `json:"audit_error"`
	}
	if err := call(g, cmd, args, &out); err != nil {
		return fail(stderr, err)
	}
	switch {
	case cmd == "unenroll-uid" && out.WasEnrolled != nil && !*out.WasEnrolled:
		fmt.Fprintf(stdout, "uid %d was not enrolled; nothing changed\n", out.UID)
		return 0
	case cmd == "enroll-uid" && out.WasEnrolled != nil && *out.WasEnrolled:
		fmt.Fprintf(stdout, "uid %d was already enrolled (its redirect is checked in place)\n", out.UID)
	default:
		fmt.Fprintf(stdout, "%s uid %d\n", verb, out.UID)
	}
	if cmd == "enroll-uid" {
		if msg, fix, _ := subordinateWarning(out.UID); msg != "" {
			fmt.Fprintf(stderr, "warning: %s\n  fix: %s\n", msg, fix)
		}
	}
	if out.AuditRecorded != nil && !*out.AuditRecorded {
		// Exit 3: done, but not in the audit log yet.
		fmt.Fprintf(stderr, "warning: %s uid %d took effect but is not recorded in the audit log yet (%s); avpd records it, marked late, once the log answers again\n  fix: avpctl doctor names what is wrong with the audit log\n",
			verb, out.UID, out.AuditError)
		return 3
	}
	return 0
}

func runStatus(g globals, args []string, stdout, stderr io.Writer) int {
	asJSON := len(args) == 1 && args[0] == "--json"
	if len(args) > 1 || len(args) == 1 && !asJSON {
		return usageErr(stderr, "status [--json]")
	}
	var st daemon.Status
	if err := call(g, "status", nil, &st); err != nil {
		return fail(stderr, err)
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(st)
		return 0
	}
	printStatus(stdout, st)
	return 0
}

func runReload(g globals, args []string, stdout, stderr io.Writer) int {
	if len(args) != 0 {
		return usageErr(stderr, "reload")
	}
	var out struct {
		SHA string `json:"config_sha256"`
	}
	if err := call(g, "reload", nil, &out); err != nil {
		return fail(stderr, err)
	}
	fmt.Fprintf(stdout, "reloaded config sha256 %s\n", out.SHA)
	return 0
}

func printStatus(w io.Writer, st daemon.Status) {
	fw := "ok"
	if !st.FirewallOK {
		fw = "MISSING OR INCOMPLETE (avpd restores it within 2 s; if this persists, run avpctl doctor)"
	}
	fw += firewallWatchLine(st)
	fmt.Fprintf(w, "avpd %s (pid %d) up since %s\n", st.Version, st.PID, st.StartedAt.Format(time.RFC3339))
	fmt.Fprintf(w, "listeners:      %s\n", strings.Join(st.Listeners, ", "))
	fmt.Fprintf(w, "firewall:       %s\n", fw)
	fmt.Fprintf(w, "enrolled uids:  %s\n", joinUIDs(st.Enrolled))
	fmt.Fprintf(w, "config:         %s (sha256 %s)\n", st.Config, st.ConfigSHA256)
	fmt.Fprintf(w, "backend:        %s, %d secret(s) cached\n", st.Backend, st.CachedSecrets)
	printBackendStatus(w, st)
	fmt.Fprintf(w, "secrets:        %s\n", strings.Join(st.Secrets, ", "))
	fmt.Fprintf(w, "audit log:      %s%s\n", st.AuditPath, auditStateLine(st))
	fmt.Fprintf(w, "CA:             %s\n", st.CAFingerprint)
	s := st.Stats
	fmt.Fprintf(w, "connections:    %d (passthrough %d, terminated %d, rejected %d", s.Connections, s.Passthrough, s.Terminated, s.Rejected)
	if s.OverUIDLimit > 0 {
		fmt.Fprintf(w, ", %d of them over proxy.max_connections_per_uid", s.OverUIDLimit)
	}
	if s.Direct > 0 {
		fmt.Fprintf(w, "; %d made to the listener directly, such as avpctl doctor's probe", s.Direct)
	}
	fmt.Fprintln(w, ")")
	fmt.Fprintf(w, "requests:       %d (injected %d, verbatim %d, refused %d, backend errors %d, audit errors %d)\n",
		s.Requests, s.Injected, s.Verbatim, s.Refused, s.BackendErrors, s.AuditErrors)
	if len(s.VerbatimByReason) > 0 {
		fmt.Fprintf(w, "verbatim:       %s\n", byReason(s.VerbatimByReason))
	}
	if len(s.RefusedByReason) > 0 {
		fmt.Fprintf(w, "refused:        %s\n", byReason(s.RefusedByReason))
	}
	if s.LateDropped > 0 {
		fmt.Fprintf(w, "audit:          %d audit_unavailable refusal(s) could not be queued for the log (queue full)\n", s.LateDropped)
	}
}

// byReason lists counts by reason, the largest first.
func byReason(m map[string]uint64) string {
	reasons := slices.Collect(maps.Keys(m))
	slices.SortFunc(reasons, func(a, b string) int {
		if c := cmp.Compare(m[b], m[a]); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	parts := make([]string, len(reasons))
	for i, r := range reasons {
		parts[i] = fmt.Sprintf("%s %d", r, m[r])
	}
	return strings.Join(parts, ", ")
}

func joinUIDs(u []uint32) string {
	if len(u) == 0 {
		return "none"
	}
	parts := make([]string, len(u))
	for i, x := range u {
		parts[i] = fmt.Sprint(x)
	}
	return strings.Join(parts, ", ")
}

// auditStateLine adds to status's audit line what avpd's own audit sink answered it.
func auditStateLine(st daemon.Status) string {
	var s string
	switch {
	case !st.Ready:
		s = "; NOT READY: proxy_start was never acknowledged, every injection gets 503 audit_unavailable"
		if st.Error != "" {
			s += " (" + st.Error + ")"
		}
		s += "; run avpctl doctor"
	case st.Error != "":
		s = "; FAILING"
		if st.FailingSince != nil {
			s += " since " + st.FailingSince.Format(time.RFC3339)
		}
		s += ": " + st.Error + "; injections get 503 audit_unavailable; run avpctl doctor"
	}
	if st.Pending > 0 {
		s += fmt.Sprintf("; %d enroll/unenroll event(s) waiting to be recorded", st.Pending)
	}
	return s
}

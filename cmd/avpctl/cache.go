package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/daemon"
)

// runCache is "avpctl cache flush [NAME]": wipe one cached value, or all of them, so the
// next request fetches from the backend (after a manual rotation, for example).
func runCache(g globals, args []string, stdout, stderr io.Writer) int {
	if len(args) < 1 || args[0] != "flush" || len(args) > 2 {
		return usageErr(stderr, "cache flush [NAME]")
	}
	var out struct {
		Secret  string `json:"secret"`
		Flushed int    `json:"flushed"`
	}
	if err := call(g, "cache-flush", args[1:], &out); err != nil {
		return fail(stderr, err)
	}
	what := "every secret"
	if out.Secret != "" {
		what = out.Secret
	}
	fmt.Fprintf(stdout, "flushed %s: %d cached value(s) wiped\n", what, out.Flushed)
	return 0
}

// printBackendStatus is the part of status about where values come from and how they are
// kept in memory.
func printBackendStatus(w io.Writer, st daemon.Status) {
	c := st.Cache
	lock := "off"
	switch {
	case c.LockMemory && c.Unlocked > 0:
		lock = fmt.Sprintf("%d locked, %d NOT locked in RAM: %s", c.Locked, c.Unlocked, c.LockError)
	case c.LockMemory:
		lock = fmt.Sprintf("%d value(s) locked in RAM (%d bytes; RLIMIT_MEMLOCK %d)", c.Locked, c.LockedBytes, st.Memory.MemlockLimit)
	}
	fmt.Fprintf(w, "cache memory:   %s\n", lock)
	dump := "off (not dumpable, RLIMIT_CORE 0)"
	if st.Memory.Dumpable || st.Memory.CoreLimit != 0 {
		dump = fmt.Sprintf("ON: dumpable %v, RLIMIT_CORE %d", st.Memory.Dumpable, st.Memory.CoreLimit)
	}
	fmt.Fprintf(w, "core dumps:     %s\n", dump)
	if len(st.FileMissing) > 0 {
		fmt.Fprintf(w, "file missing:   %s (no value in the secrets file at the last start or reload; requests for them get 503)\n", strings.Join(st.FileMissing, ", "))
	}
	b := st.BWS
	if b == nil {
		return
	}
	state := b.State
	if b.Error != "" {
		state += ": " + b.Error
	}
	fmt.Fprintf(w, "bws:            %s\n", state)
	fmt.Fprintf(w, "bws server:     %s (identity %s), organization %s\n", b.APIURL, b.IdentityURL, b.OrganizationID)
	if len(b.Missing) > 0 {
		fmt.Fprintf(w, "bws missing:    %s (no such secret, or the machine account cannot read it)\n", strings.Join(b.Missing, ", "))
	}
	sync := "never"
	if !b.LastSync.IsZero() {
		sync = b.LastSync.Format(time.RFC3339)
	}
	if b.LastSyncError != "" {
		sync += " (last attempt failed: " + b.LastSyncError + ")"
	}
	fmt.Fprintf(w, "bws last sync:  %s, %d eviction(s)\n", sync, b.Evictions)
	fmt.Fprintf(w, "bws helper:     %d start(s), %d crash(es), %d kill(s), %d login(s), %d call(s) in flight of %d\n",
		b.HelperStarts, b.HelperCrashes, b.HelperKills, b.Logins, b.InFlight, b.MaxInFlight)
}

// Command avpctl is the operator's tool for avpd: live commands talk to the daemon over its
// admin socket; offline commands work on files.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// globals are the flags before the command.
type globals struct {
	runtimeDir string
}

// command is one avpctl subcommand. run gets the arguments after the command name and
// returns the exit code: 0 success, 1 the command failed, 2 usage error.
type command struct {
	// synopsis is the argument summary, e.g. "USER|UID".
	synopsis string
	summary  string
	run      func(g globals, args []string, stdout, stderr io.Writer) int
}

// details of the commands whose forms and flags the one-line synopsis cannot hold.
var commandDetails = map[string]string{
	"ca": `Forms:
  ca cert                      print avpd's CA certificate (PEM), from the running avpd
  ca install [--cert FILE]     add it (or FILE) to the system trust store and rebuild the bundle
  ca uninstall                 take it out again and rebuild the bundle (this can take a minute)
  ca env [--format shell|systemd|environment.d] [--ca FILE] [--bundle FILE]
                               print the variables for runtimes that ignore the system store
                               (Node, Python requests, ...); --ca FILE and --bundle FILE name the
                               CA and the bundle to point at (default: found in the system store)`,
	"doctor": `Flags:
  --uid USER          also check that this user is enrolled and its HTTPS reaches avpd
                      (a TLS probe run as that user; needs root)
  --host NAME         the host that probe tries (default: the first bound host in the config)
  --config FILE       the bindings file (default /etc/agent-vault-proxy/bindings.yaml)
  --state-dir DIR     avpd's state directory, for the offline checks
  --daemon-user USER  the user avpd runs as, for the permission checks
  --json              one JSON object instead of lines
Exit 0 when no check failed, 1 when one did.`,
	"audit": `Forms:
  audit verify [--key FILE] [--partial] [PATH...]
      check the journal's log set (default: the audit.path of
      /etc/agent-vault-proxy/bindings.yaml when it sets one, else
      /var/log/agent-vault-proxy/audit.jsonl, with its rotated files): seq, chain, schema,
      and with --key every MAC. A set that does not
      start at seq 1 is broken (the journal deletes no file) unless --partial says that
      the earlier files were left out on purpose. Exit 0 intact, 1 broken (the first bad
      line is named), 2 not verified (the in-process log, which has no chain, or a file
      that cannot be read).
  audit tail [-f] [-n N] [--secret NAME] [--decision D] [--json] [PATH]
      the last N (default 10) events, filtered by secret and decision (inject,
      forward_verbatim, refuse, passthrough, backend_error, host_mismatch, ...);
      -f follows the log across rotation. The default log is verify's.`,
	"bindings": `Forms:
  bindings check [FILE]    validate a bindings file (default /etc/agent-vault-proxy/bindings.yaml):
                           every error with file:line:column and a fix; exit 0 ok, 1 errors
  bindings diff OLD NEW    what NEW allows that OLD did not, per secret; exit 0 no change
                           or narrower, 3 when access widens, 1 on an error`,
}

// commands lists every subcommand. Each lives in its own file.
func commands() map[string]command {
	return map[string]command{
		"audit":        {"verify [--key FILE] [--partial] [PATH...] | tail [-f] [PATH]", "check the audit log's chain, seq and MACs (exit 1: broken), or show its events; tail also takes -n N, --secret NAME, --decision D, --json", runAudit},
		"enroll-uid":   {"USER|UID", "redirect this user's outbound HTTPS through avpd (exit 3: done, but the audit log has not recorded it yet)", runEnroll},
		"unenroll-uid": {"USER|UID", "stop redirecting this user (exit 3: done, but the audit log has not recorded it yet)", runUnenroll},
		"status":       {"[--json]", "listeners, enrolled UIDs, secret names (never values), counters", runStatus},
		"ca":           {"cert | install | uninstall | env [--format F]", "print avpd's CA, add it to (or remove it from) the system trust store, or print the variables for runtimes that ignore the store", runCA},
		"doctor":       {"[--uid USER] [--host NAME] [--config FILE] [--state-dir DIR] [--daemon-user USER] [--json]", "check the kernel, firewall, daemon, config, permissions and CA trust; print a fix for each failure (exit 1)", runDoctor},
		"reload":       {"", "re-read the bindings file; an invalid file changes nothing", runReload},
		"bindings":     {"check [FILE] | diff OLD NEW", "validate a bindings file offline, or show what a change widens (exit 3)", runBindings},
		"explain":      {"[--uid U] [--config FILE] METHOD URL [-H 'H: v']...", "show the decision for a request and why (with --config offline, else from the running avpd's live config)", runExplain},
		"cache":        {"flush [NAME]", "wipe cached secret values (one secret, with a composed one's parts, or all) so the next request fetches anew", runCache},
	}
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "usage: avpctl [--runtime-dir DIR] COMMAND [ARGS]\n\nCommands:\n")
	cmds := commands()
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		c := cmds[n]
		fmt.Fprintf(w, "  %-28s %s\n", strings.TrimSpace(n+" "+c.synopsis), c.summary)
	}
	fmt.Fprintf(w, "\nGlobal flags:\n  --runtime-dir DIR            where avpd's admin socket lives (default /run/agent-vault-proxy)\n")
	fmt.Fprintf(w, "\nExit codes: 0 success, 1 the command failed, 2 usage error, 3 done but not yet in the\naudit log (enroll-uid, unenroll-uid) or access widens (bindings diff).\n")
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("avpctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var g globals
	fs.StringVar(&g.runtimeDir, "runtime-dir", "/run/agent-vault-proxy", "")
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			usage(stdout)
			return 0
		}
		fmt.Fprintf(stderr, "avpctl: %v\n\n", err)
		usage(stderr)
		return 2
	}
	rest := fs.Args()
	if len(rest) == 0 {
		usage(stderr)
		return 2
	}
	if rest[0] == "help" {
		usage(stdout)
		return 0
	}
	c, ok := commands()[rest[0]]
	if !ok {
		fmt.Fprintf(stderr, "avpctl: unknown command %q\n\n", rest[0])
		usage(stderr)
		return 2
	}
	for _, a := range rest[1:] {
		if a == "-h" || a == "--help" {
			fmt.Fprintf(stdout, "usage: avpctl [--runtime-dir DIR] %s\n\n%s\n", strings.TrimSpace(rest[0]+" "+c.synopsis), c.summary)
			if d := commandDetails[rest[0]]; d != "" {
				fmt.Fprintf(stdout, "\n%s\n", d)
			}
			return 0
		}
	}
	return c.run(g, rest[1:], stdout, stderr)
}

func fail(w io.Writer, err error) int {
	fmt.Fprintf(w, "avpctl: %v\n", err)
	return 1
}

func usageErr(w io.Writer, line string) int {
	fmt.Fprintf(w, "usage: avpctl %s\n", line)
	return 2
}

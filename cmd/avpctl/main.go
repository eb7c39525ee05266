// Command avpctl is the operator's tool for a running avpd, over its admin socket.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/admin"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/daemon"
)

const usage = `usage: avpctl [--runtime-dir DIR] COMMAND [ARGS]

Commands:
  enroll-uid USER|UID     redirect this user's outbound HTTPS through avpd
  unenroll-uid USER|UID   stop redirecting this user
  status [--json]         show listeners, enrolled UIDs, secrets (names only) and counters
  ca cert                 print the local CA certificate (PEM) that agents must trust
  reload                  re-read the bindings file; an invalid file changes nothing

Global flags:
  --runtime-dir DIR       where avpd's admin socket lives (default /run/agent-vault-proxy)

Exit codes: 0 success, 1 the command failed, 2 usage error.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("avpctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	runtimeDir := fs.String("runtime-dir", "/run/agent-vault-proxy", "")
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			fmt.Fprint(stdout, usage)
			return 0
		}
		fmt.Fprintf(stderr, "avpctl: %v\n\n%s", err, usage)
		return 2
	}
	rest := fs.Args()
	if len(rest) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	if rest[0] == "help" || hasHelp(rest[1:]) {
		fmt.Fprint(stdout, commandHelp(rest[0]))
		return 0
	}
	sock := filepath.Join(*runtimeDir, admin.SocketName)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd, args := rest[0], rest[1:]
	switch cmd {
	case "enroll-uid", "unenroll-uid":
		if len(args) != 1 {
			fmt.Fprintf(stderr, "usage: avpctl %s USER|UID\n", cmd)
			return 2
		}
		var out struct {
			UID uint32 `json:"uid"`
		}
		if err := admin.Call(ctx, sock, cmd, args, &out); err != nil {
			return fail(stderr, err)
		}
		verb := "enrolled"
		if cmd == "unenroll-uid" {
			verb = "unenrolled"
		}
		fmt.Fprintf(stdout, "%s uid %d\n", verb, out.UID)
		return 0
	case "status":
		asJSON := len(args) == 1 && args[0] == "--json"
		if len(args) > 1 || len(args) == 1 && !asJSON {
			fmt.Fprintln(stderr, "usage: avpctl status [--json]")
			return 2
		}
		var st daemon.Status
		if err := admin.Call(ctx, sock, "status", nil, &st); err != nil {
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
	case "ca":
		if len(args) != 1 || args[0] != "cert" {
			fmt.Fprintln(stderr, "usage: avpctl ca cert")
			return 2
		}
		var out struct {
			PEM string `json:"pem"`
		}
		if err := admin.Call(ctx, sock, "ca-cert", nil, &out); err != nil {
			return fail(stderr, err)
		}
		fmt.Fprint(stdout, out.PEM)
		return 0
	case "reload":
		if len(args) != 0 {
			fmt.Fprintln(stderr, "usage: avpctl reload")
			return 2
		}
		var out struct {
			SHA string `json:"config_sha256"`
		}
		if err := admin.Call(ctx, sock, "reload", nil, &out); err != nil {
			return fail(stderr, err)
		}
		fmt.Fprintf(stdout, "reloaded config sha256 %s\n", out.SHA)
		return 0
	}
	fmt.Fprintf(stderr, "avpctl: unknown command %q\n\n%s", cmd, usage)
	return 2
}

func hasHelp(args []string) bool {
	for _, a := range args {
		if a == "-h" || a == "--help" {
			return true
		}
	}
	return false
}

func commandHelp(cmd string) string {
	for _, line := range strings.Split(usage, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), cmd+" ") {
			return "usage: avpctl [--runtime-dir DIR] " + strings.TrimSpace(line) + "\n"
		}
	}
	return usage
}

func fail(w io.Writer, err error) int {
	fmt.Fprintf(w, "avpctl: %v\n", err)
	return 1
}

func printStatus(w io.Writer, st daemon.Status) {
	fw := "ok"
	if !st.FirewallOK {
		fw = "MISSING OR INCOMPLETE (enrolled users may bypass or be cut off; restart avpd)"
	}
	fmt.Fprintf(w, "avpd %s (pid %d) up since %s\n", st.Version, st.PID, st.StartedAt.Format(time.RFC3339))
	fmt.Fprintf(w, "listeners:      %s\n", strings.Join(st.Listeners, ", "))
	fmt.Fprintf(w, "firewall:       %s\n", fw)
	fmt.Fprintf(w, "enrolled uids:  %s\n", joinUIDs(st.Enrolled))
	fmt.Fprintf(w, "config:         %s (sha256 %s)\n", st.Config, st.ConfigSHA256)
	fmt.Fprintf(w, "backend:        %s, %d secret(s) cached\n", st.Backend, st.CachedSecrets)
	fmt.Fprintf(w, "secrets:        %s\n", strings.Join(st.Secrets, ", "))
	fmt.Fprintf(w, "audit log:      %s\n", st.AuditPath)
	fmt.Fprintf(w, "CA:             %s\n", st.CAFingerprint)
	s := st.Stats
	fmt.Fprintf(w, "connections:    %d (passthrough %d, terminated %d, rejected %d)\n", s.Connections, s.Passthrough, s.Terminated, s.Rejected)
	fmt.Fprintf(w, "requests:       %d (injected %d, verbatim %d, refused %d, backend errors %d, audit errors %d)\n",
		s.Requests, s.Injected, s.Verbatim, s.Refused, s.BackendErrors, s.AuditErrors)
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

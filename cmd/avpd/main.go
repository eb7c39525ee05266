// Command avpd is the agent-vault-proxy daemon: it redirects enrolled users' HTTPS to itself
// and injects real secrets in place of placeholders for bound hosts.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/daemon"
)

const usage = `usage: avpd COMMAND [flags]

Commands:
  serve     run the proxy (redirect, intercept, inject)
  journal   run the audit journal (hash-chained, group-committed log on a seqpacket socket)
  version   print the version

Run "avpd COMMAND --help" for a command's flags.
`

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "serve" || os.Args[1] == "journal") {
		// SIGHUP (reload, reopen) must never end the daemon, but its handler is installed
		// only once the command has parsed its flags. Ignored until then: nothing is loaded
		// yet that a reload would reload.
		signal.Ignore(syscall.SIGHUP)
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	case "version", "--version":
		fmt.Fprintln(stdout, "avpd", daemon.Version)
		return 0
	case "bws-helper":
		return bwsHelper(args[1:], stdout, stderr)
	case "serve":
		return serve(args[1:], stdout, stderr)
	case "journal":
		return journalCmd(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "avpd: unknown command %q\n\n%s", args[0], usage)
	return 2
}

func serve(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("avpd serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg := fs.String("config", "/etc/agent-vault-proxy/bindings.yaml", "`PATH` of the bindings file")
	state := fs.String("state-dir", "/var/lib/agent-vault-proxy", "state `DIR`: the CA and the enrollment")
	runtime := fs.String("runtime-dir", "/run/agent-vault-proxy", "runtime `DIR`: the admin socket")
	usage := func(w io.Writer) {
		fs.SetOutput(w)
		fmt.Fprintf(w, "usage: avpd serve [--config PATH] [--state-dir DIR] [--runtime-dir DIR]\n\n"+
			"Runs the proxy: installs the nftables redirect for enrolled UIDs, listens on proxy.listen\n"+
			"(or the sockets systemd passes), and injects secrets for bound hosts.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	// flag would print the usage itself (to stderr) before returning ErrHelp: printed
	// below instead, once, to the right stream.
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			usage(stdout)
			return 0
		}
		usage(stderr) // after flag's own line naming the bad flag
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "avpd serve: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	logger := log.New(stderr, "avpd: ", log.LstdFlags|log.Lmsgprefix)
	err := daemon.Run(context.Background(), daemon.Options{
		ConfigPath: *cfg, StateDir: *state, RuntimeDir: *runtime, Logf: logger.Printf,
	})
	if err != nil {
		fmt.Fprintf(stderr, "avpd: %v\n", err)
		return 1
	}
	return 0
}

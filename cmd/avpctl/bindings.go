package main

import (
	"flag"
	"fmt"
	"io"
	"os/user"
	"strconv"
	"strings"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

const defaultConfig = "/etc/agent-vault-proxy/bindings.yaml"

func runBindings(g globals, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		return usageErr(stderr, "bindings check [FILE] | bindings diff OLD NEW")
	}
	switch args[0] {
	case "check":
		if len(args) > 2 {
			return usageErr(stderr, "bindings check [FILE]")
		}
		path := defaultConfig
		if len(args) == 2 {
			path = args[1]
		}
		cfg, err := config.Load(path)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		n := 0
		for _, s := range cfg.Secrets {
			n += len(s.Bindings)
		}
		fmt.Fprintf(stdout, "%s: ok (%d secrets, %d bindings)\n", path, len(cfg.Secrets), n)
		return 0
	case "diff":
		if len(args) != 3 {
			return usageErr(stderr, "bindings diff OLD NEW")
		}
		old, err := config.Load(args[1])
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		nw, err := config.Load(args[2])
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		changes := config.Diff(old, nw)
		fmt.Fprint(stdout, config.FormatDiff(changes))
		if config.Widens(changes) {
			fmt.Fprintln(stdout, "\nresult: access WIDENS (exit 3)")
			return 3
		}
		return 0
	}
	return usageErr(stderr, "bindings check [FILE] | bindings diff OLD NEW")
}

type headerFlags []string

func (h *headerFlags) String() string     { return strings.Join(*h, ", ") }
func (h *headerFlags) Set(v string) error { *h = append(*h, v); return nil }

func runExplain(g globals, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("avpctl explain", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	uidArg := fs.String("uid", "", "")
	cfgPath := fs.String("config", "", "")
	var headers headerFlags
	fs.Var(&headers, "H", "")
	// Flags may follow the positional METHOD URL, as with curl.
	var pos []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			fmt.Fprintf(stderr, "avpctl explain: %v\n", err)
			return usageErr(stderr, "explain [--uid U] [--config FILE] METHOD URL [-H 'Header: value']...")
		}
		args = fs.Args()
		if len(args) > 0 {
			pos = append(pos, args[0])
			args = args[1:]
		}
	}
	if len(pos) != 2 {
		return usageErr(stderr, "explain [--uid U] [--config FILE] METHOD URL [-H 'Header: value']...")
	}
	uid, err := explainUID(*uidArg)
	if err != nil {
		return fail(stderr, err)
	}
	if *cfgPath == "" {
		req := append([]string{fmt.Sprint(uid), pos[0], pos[1]}, headers...)
		var out struct {
			Text string `json:"text"`
		}
		if err := call(g, "explain", req, &out); err != nil {
			return fail(stderr, err)
		}
		fmt.Fprint(stdout, out.Text)
		return 0
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	f, r, err := inject.ExplainInput(uid, pos[0], pos[1], headers)
	if err != nil {
		return fail(stderr, err)
	}
	fmt.Fprint(stdout, inject.NewPolicy(cfg).Explain(f, r))
	return 0
}

// explainUID reads --uid: a user name or a number, as enroll-uid and doctor take it; -1
// (no user) when it is not given.
func explainUID(s string) (int64, error) {
	if s == "" {
		return -1, nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return n, nil
	}
	u, err := user.Lookup(s)
	if err != nil {
		return 0, fmt.Errorf("--uid %q: no such user; give a user name from /etc/passwd or a numeric UID", s)
	}
	return strconv.ParseInt(u.Uid, 10, 64)
}

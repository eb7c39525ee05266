package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/user"
	"strconv"
	"strings"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
)

const defaultConfig = "/etc/agent-vault-proxy/bindings.yaml"

// daemonUser is the system user the production install runs avpd as (sysusers.d).
const daemonUser = "avp"

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
		// As avpd reads it: refused when anyone but root or avpd's user could change it.
		uid, group := daemonIdentity()
		data, err := config.ReadFile(path, group, uid...)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		cfg, err := config.Parse(path, data)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if err := checkBackendFiles(cfg, stderr); err != nil {
			fmt.Fprintf(stderr, "%s: %v\n", path, err)
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

// daemonIdentity is the user the files avpd reads may belong to besides root (none when
// this host has no avp user: avpd then runs as root) and the group avpd reads its config
// through, for the fixes avpctl prints.
func daemonIdentity() (owners []int, group string) {
	group = "root"
	u, err := user.Lookup(daemonUser)
	if err != nil {
		return nil, group
	}
	if id, err := strconv.Atoi(u.Uid); err == nil {
		owners = append(owners, id)
	}
	if g, err := user.LookupGroupId(u.Gid); err == nil {
		group = g.Name
	}
	return owners, group
}

// checkBackendFiles checks the files the backend reads as avpd checks them when it starts
// (mode, owner, and for the file backend its YAML), so that what passes here starts. The
// owner may be root or avpd's system user. A file this user may not
// read is left unchecked, with a warning; names the config fetches that the secrets file
// lacks are a warning too (avpd starts, and those requests get 503).
func checkBackendFiles(cfg *config.Config, warn io.Writer) error {
	// avpd runs as root (by hand) or as avp (the production install), and refuses a file
	// owned by anyone else; the user running this is not one of them unless it is root.
	owners, _ := daemonIdentity()
	unreadable := func(path string, err error) bool {
		if errors.Is(err, fs.ErrPermission) {
			fmt.Fprintf(warn, "warning: %s not checked: uid %d may not read it (run as root to check it)\n", path, os.Geteuid())
			return true
		}
		return false
	}
	switch cfg.Backend.Type {
	case "file":
		path := cfg.Backend.File.Path
		have, err := store.SecretsFileNames(path, owners...)
		if unreadable(path, err) {
			return nil
		}
		if err != nil {
			return err
		}
		if missing := cfg.MissingNames(have); len(missing) > 0 {
			fmt.Fprintf(warn, "warning: secrets file %s has no value for %s: requests that inject them will get 503 secret_unavailable; add a line NAME: value for each\n", path, strings.Join(missing, ", "))
		}
	case "bws":
		path := cfg.Backend.BWS.AccessTokenFile
		f, err := os.Open(path)
		if unreadable(path, err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("open BWS access token file: %w", err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return fmt.Errorf("stat BWS access token file %s: %w", path, err)
		}
		if err := store.CheckPrivateOwners(fi, path, "BWS access token file", owners...); err != nil {
			return err
		}
		if fi.Size() == 0 {
			return fmt.Errorf("BWS access token file %s is empty; paste the machine account's access token into it", path)
		}
	}
	return nil
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

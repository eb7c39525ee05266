package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/daemon"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bws"
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
			fmt.Fprintln(stderr, err) // it names the file that fails
			return 1
		}
		if err := daemon.AddUpstreamCAFile(x509.NewCertPool(), cfg.Proxy.UpstreamCAFile); err != nil {
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
// (mode, owner, and for the file backend its YAML; for bws the token's shape), so that what
// passes here starts. The owner may be root or avpd's system user. A file this user may not
// read is left unchecked, with a warning; names the config fetches that the secrets file
// lacks are a warning too (avpd starts, and those requests get 503), and so are values
// avpd would refuse to inject. A value equal to its placeholder is an error.
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
			return config.SecretsFileError(path, owners, err)
		}
		if missing := cfg.MissingNames(have); len(missing) > 0 {
			fmt.Fprintf(warn, "warning: secrets file %s has no value for %s: requests that inject them will get 503 secret_unavailable; add a line NAME: value for each\n", path, strings.Join(missing, ", "))
		}
		return checkValues(cfg, path, have, warn)
	case "bws":
		path := cfg.Backend.BWS.AccessTokenFile
		f, err := os.Open(path)
		if unreadable(path, err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("BWS access token file %s: %v", path, pathErr(err))
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return fmt.Errorf("BWS access token file %s: %v", path, pathErr(err))
		}
		if err := store.CheckPrivateOwners(fi, path, "BWS access token file", owners...); err != nil {
			return err
		}
		if fi.Size() == 0 {
			return fmt.Errorf("BWS access token file %s is empty; paste the machine account's access token into it", path)
		}
		// The token's size and shape, by avpd's own check (bws.New reads the file and
		// starts nothing), on a copy this user owns: avpd's user may own the file.
		return withPrivateCopy(f, path, func(copyPath string) error {
			w := cfg.Backend.BWS
			_, err := bws.New(bws.Options{
				OrganizationID: w.OrganizationID, AccessTokenFile: copyPath,
				APIURL: w.APIURL, IdentityURL: w.IdentityURL, StateFile: w.StateFile,
				Timeout: w.Timeout, SyncInterval: cfg.Cache.SyncInterval, Helper: []string{"unused"},
			})
			return err
		})
	}
	return nil
}

// pathErr is err without the *fs.PathError's repetition of the path the caller names.
func pathErr(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// checkValues computes each secret's value from the secrets file at path as a request
// would (inject.CheckValue) and warns, naming the secret, about those avpd would refuse to
// inject; a value that is its placeholder is an error. Values are read by avpd's own
// file backend, from a copy this user owns, and wiped.
func checkValues(cfg *config.Config, path string, have []string, warn io.Writer) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return withPrivateCopy(f, path, func(copyPath string) error {
		fb, err := store.NewFileBackend(copyPath)
		if err != nil {
			return err
		}
		var bad []string
		for _, s := range cfg.Secrets {
			vals := map[string][]byte{}
			for _, n := range s.FetchNames() {
				if !slices.Contains(have, n) {
					continue
				}
				v, err := fb.Fetch(context.Background(), n)
				if err != nil {
					return err
				}
				vals[n] = v
				if bytes.Contains(v, []byte(s.Placeholder)) {
					bad = append(bad, s.Name)
				}
			}
			if len(vals) == len(s.FetchNames()) && !slices.Contains(bad, s.Name) {
				if err := inject.CheckValue(s, vals); err != nil {
					fix := "write the value exactly as the API issued it"
					var short *inject.ShortValueError
					if errors.As(err, &short) {
						fix = "if the value in the file is longer, put it in quotes: YAML reads a leading & * ! as an anchor, alias or tag, and \" #\" as a comment"
					}
					fmt.Fprintf(warn, "warning: secrets file %s: %v; every request that injects it gets 503: %s\n", path, err, fix)
				}
			}
			for _, v := range vals {
				store.Wipe(v)
			}
		}
		if len(bad) > 0 {
			return fmt.Errorf("secrets file %s: the value of %s holds its own placeholder: the real key was pasted as the placeholder, "+
				"so agents hold it; give each a new placeholder in the bindings file and rotate the key", path, strings.Join(bad, ", "))
		}
		return nil
	})
}

// withPrivateCopy runs check on a copy of f's content in memory (a memfd, mode 0600, owned
// by this user) named by a /proc/self/fd path: avpd's own readers (the file backend, the
// BWS token check) refuse a file another user owns, and as root avpctl checks files that
// avpd's user owns. The error names path, not the copy; the copy is wiped.
func withPrivateCopy(f *os.File, path string, check func(copyPath string) error) error {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	data, err := io.ReadAll(io.LimitReader(f, 1<<20+1))
	defer store.Wipe(data)
	if err != nil {
		return fmt.Errorf("read %s: %v", path, pathErr(err))
	}
	fd, err := unix.MemfdCreate("avpctl-check", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("check %s: memfd_create: %w", path, err)
	}
	m := os.NewFile(uintptr(fd), "memfd")
	defer func() { m.Truncate(0); m.Close() }()
	if err := m.Chmod(0o600); err != nil {
		return fmt.Errorf("check %s: %w", path, err)
	}
	if _, err := m.Write(data); err != nil {
		return fmt.Errorf("check %s: %w", path, err)
	}
	copyPath := fmt.Sprintf("/proc/self/fd/%d", fd)
	if err := check(copyPath); err != nil {
		return errors.New(strings.ReplaceAll(err.Error(), copyPath, path))
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

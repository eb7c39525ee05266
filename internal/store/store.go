// Package store owns where real secret values come from and how long they are kept.
//
// Values live in []byte that the cache owns and overwrites on eviction; callers get their
// own copy and wipe it when done. Nothing here logs a value, and errors name secrets, never
// their contents.
package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"gopkg.in/yaml.v3"
)

// ErrNotFound means the backend has no secret of that name.
var ErrNotFound = errors.New("secret not found")

// SecretsBackend fetches one secret's current value. The returned slice belongs to the
// caller.
type SecretsBackend interface {
	Fetch(ctx context.Context, name string) ([]byte, error)
}

// Wipe overwrites b so a secret does not linger in memory after use.
func Wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}

// FileBackend reads a YAML map of name to value from a file only its owner can read. It
// rereads the file on every fetch (behind the cache), so editing the file rotates a secret
// within the cache TTL.
type FileBackend struct {
	path string
	// owners are the users besides root the file may belong to; none means the process's
	// own effective user (the daemon's).
	owners []int
	mu     sync.Mutex
}

var _ SecretsBackend = (*FileBackend)(nil)

// NewFileBackend checks the file once at start so a misconfiguration stops the daemon
// with a message that says what to run.
func NewFileBackend(path string) (*FileBackend, error) {
	f := &FileBackend{path: path}
	m, err := f.load()
	if err != nil {
		return nil, err
	}
	for _, v := range m {
		Wipe(v)
	}
	return f, nil
}

// CheckPrivate refuses a file that anyone but its owner can read or write, or that another
// unprivileged user owns. what names the file's role in the message.
func CheckPrivate(fi os.FileInfo, path, what string) error {
	return CheckPrivateOwners(fi, path, what, os.Geteuid())
}

// CheckPrivateOwners is CheckPrivate for a file that may belong to root or to one of
// owners: avpctl checks, as root, a file the daemon reads as its own user.
func CheckPrivateOwners(fi os.FileInfo, path, what string, owners ...int) error {
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s %s is not a regular file", what, path)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("%s %s has mode %04o: group and others must not read it; run: chmod 600 %s", what, path, fi.Mode().Perm(), path)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		if st.Uid != 0 && !slices.Contains(owners, int(st.Uid)) {
			ids := make([]string, len(owners))
			for i, o := range owners {
				ids[i] = strconv.Itoa(o)
			}
			who := "root"
			if len(ids) > 0 {
				who = "root or by the daemon's user (uid " + strings.Join(ids, " or ") + ")"
			}
			return fmt.Errorf("%s %s is owned by uid %d; it must be owned by %s; run: chown root %s", what, path, st.Uid, who, path)
		}
	}
	return nil
}

func (f *FileBackend) load() (map[string][]byte, error) {
	fh, err := os.Open(f.path)
	if err != nil {
		return nil, fmt.Errorf("open secrets file %s: %w", f.path, err)
	}
	defer fh.Close()
	fi, err := fh.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat secrets file %s: %w", f.path, err)
	}
	owners := f.owners
	if len(owners) == 0 {
		owners = []int{os.Geteuid()}
	}
	if err := CheckPrivateOwners(fi, f.path, "secrets file", owners...); err != nil {
		return nil, err
	}
	if fi.Size() > 1<<20 {
		return nil, fmt.Errorf("secrets file %s is larger than 1 MiB", f.path)
	}
	data := make([]byte, fi.Size()+1)
	n, _ := fh.Read(data)
	data = data[:n]
	defer Wipe(data)
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		// yaml errors quote at most a line number, never the document's values.
		return nil, fmt.Errorf("parse secrets file %s: not a YAML map of NAME: value (line numbers only; values are never shown)", f.path)
	}
	out := map[string][]byte{}
	if len(root.Content) == 0 {
		return out, nil
	}
	doc := root.Content[0]
	if doc.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("parse secrets file %s:%d: must be a map of NAME: value", f.path, doc.Line)
	}
	for i := 0; i+1 < len(doc.Content); i += 2 {
		k, v := doc.Content[i], doc.Content[i+1]
		if v.Kind != yaml.ScalarNode {
			wipeAll(out)
			return nil, fmt.Errorf("parse secrets file %s:%d: value of %q must be a string", f.path, v.Line, k.Value)
		}
		if _, dup := out[k.Value]; dup {
			// The last would win silently: which value is meant is the operator's call.
			wipeAll(out)
			return nil, fmt.Errorf("parse secrets file %s:%d: %s is given twice; keep one", f.path, k.Line, k.Value)
		}
		out[k.Value] = []byte(v.Value)
	}
	return out, nil
}

func wipeAll(m map[string][]byte) {
	for _, v := range m {
		Wipe(v)
	}
}

// Check reads the file as a fetch would (its mode, its owner, its YAML) and returns the
// names it holds, values wiped: a reload checks it as a start does.
func (f *FileBackend) Check() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, err := f.load()
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(m))
	for k, v := range m {
		names = append(names, k)
		Wipe(v)
	}
	return names, nil
}

// SecretsFileNames reads a secrets file as the daemon would (its mode, its owner, which may
// be root or one of owners, its YAML) and returns the names it holds: avpctl bindings check
// refuses what avpd would refuse to start with.
func SecretsFileNames(path string, owners ...int) ([]string, error) {
	return (&FileBackend{path: path, owners: owners}).Check()
}

// Fetch returns a copy of the named value.
func (f *FileBackend) Fetch(ctx context.Context, name string) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	m, err := f.load()
	if err != nil {
		return nil, err
	}
	var out []byte
	for k, v := range m {
		if k == name {
			out = v
		} else {
			Wipe(v)
		}
	}
	if out == nil {
		return nil, fmt.Errorf("fetch %s from %s: %w", name, f.path, ErrNotFound)
	}
	return out, nil
}

// Package config owns the bindings.yaml schema: parsing, validation and defaults.
//
// Every error names file:line:column and says what to write instead, because the operator
// reading it is deciding whether a key may leave the building. The package never logs and never
// holds a secret value: only names and placeholders.
package config

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net/netip"
	"net/url"
	"os"
	"os/user"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/template"

	"golang.org/x/net/publicsuffix"
	"gopkg.in/yaml.v3"
)

// Defaults for fields the operator may omit.
const (
	DefaultListen   = "127.0.0.1:14322"
	DefaultCacheTTL = 5 * time.Minute
	DefaultHeader   = "Authorization"
	DefaultFormat   = "{secret}"
	DefaultAuditLog = "/var/log/agent-vault-proxy/audit.jsonl"
	// DefaultMaxConnsPerUID is far above what an API client keeps open (a pool of tens of
	// connections), and above the 10,000 idle connections avpd's memory budget is measured
	// with, yet bounds one user's share: about 36 KB each when idle (under 600 MB), and a
	// request head of at most 64 KiB each while one waits for its body (about 1 GiB).
	DefaultMaxConnsPerUID = 16384
	// MinPlaceholderLen keeps placeholders long enough that they never occur by accident in
	// ordinary header values.
	MinPlaceholderLen = 24
)

// Defaults of the bws backend and of the cache's BWS-related knobs.
const (
	// DefaultSyncInterval is how often the bws backend asks what changed, so a rotated
	// secret is used within seconds; the TTL stays the upper bound.
	DefaultSyncInterval = 30 * time.Second
	DefaultMaxEntries   = 1024
	// The BWS US cloud. The EU cloud is https://api.bitwarden.eu and
	// https://identity.bitwarden.eu.
	DefaultBWSAPIURL      = "https://api.bitwarden.com"
	DefaultBWSIdentityURL = "https://identity.bitwarden.com"
	DefaultBWSTimeout     = 10 * time.Second
)

// Config is one fully validated bindings file.
type Config struct {
	Version int
	Backend Backend
	Cache   Cache
	Proxy   Proxy
	Audit   Audit
	// Secrets in name order, so decisions and listings are deterministic.
	Secrets []*Secret
}

// Backend says where real secret values come from.
type Backend struct {
	// Type is "file" (a root-only YAML map of name to value, for trying the daemon and for
	// tests) or "bws" (Bitwarden Secrets Manager).
	Type string
	File FileBackend
	BWS  BWSBackend
}

// BWSBackend is a Bitwarden Secrets Manager organization read by a machine account. A
// secret's name in bindings.yaml is its key in BWS.
type BWSBackend struct {
	// OrganizationID is the organization's UUID; names are looked up among its secrets.
	OrganizationID string
	// AccessTokenFile holds the machine account's access token and nothing else. avpd
	// refuses to start if group or others can read it.
	AccessTokenFile string
	// APIURL and IdentityURL default to the US cloud and are always passed to the SDK
	// explicitly (left unset, the SDK silently uses the US cloud).
	APIURL      string
	IdentityURL string
	// StateFile, optional, lets the SDK reuse its login across restarts of its helper.
	StateFile string
	// Timeout bounds every fetch from BWS, login included; a hung BWS fails the request
	// with 503 after it.
	Timeout time.Duration
}

// FileBackend is a YAML map of secret name to value in a file that only its owner can read.
type FileBackend struct {
	Path string
}

// Cache bounds how long a fetched secret is reused.
type Cache struct {
	// TTL is the upper bound on how long a rotated secret can still be injected (I8).
	TTL time.Duration
	// SyncInterval is how often the bws backend polls for changed secrets and evicts them.
	SyncInterval time.Duration
	// MaxEntries bounds the number of cached values.
	MaxEntries int
}

// Proxy configures the listener and the upstream side.
type Proxy struct {
	// Listen is the IPv4 loopback address the redirect points at; avpd also listens on the
	// same port on [::1] so IPv6 connections are redirected too.
	Listen netip.AddrPort
	// UpstreamCAFile adds PEM roots to the system roots for verifying upstreams.
	UpstreamCAFile string
	// MaxConnsPerUID bounds the connections one user has open through avpd at a time, so
	// one agent cannot exhaust the memory and descriptors every other agent's requests
	// need; a connection over it is reset.
	MaxConnsPerUID int
}

// Audit configures where decisions are recorded before any modified byte goes upstream.
type Audit struct {
	// Path is the log avpd writes itself (append + fsync per decision), used only when
	// Socket is empty.
	Path string
	// Socket is the audit journal's SOCK_SEQPACKET socket ("avpd journal"); when set, avpd
	// records every event there and Path is not used.
	Socket string
	// Timeout is how long avpd waits for the journal's ack before failing the request with
	// 503 audit_unavailable; 0 means DefaultAuditTimeout. See AckTimeout.
	Timeout time.Duration
}

// DefaultAuditTimeout is audit.timeout when the file does not set it.
const DefaultAuditTimeout = 2 * time.Second

// AckTimeout is Timeout with its default applied.
func (a Audit) AckTimeout() time.Duration {
	if a.Timeout <= 0 {
		return DefaultAuditTimeout
	}
	return a.Timeout
}

// Secret is one real credential, the placeholder agents use for it, and where it may go.
type Secret struct {
	Name        string
	Placeholder string
	// Header is the only header the placeholder is replaced in (I11), canonical form.
	Header string
	// Format is the shape of the header value with {secret} where the key stands, for
	// example "Bearer {secret}". Only the placeholder bytes are ever replaced.
	Format string
	// Template, when set, computes the value that stands for {secret} from the Compose
	// secrets (for example Basic auth from an e-mail and a token); otherwise the value is
	// the backend secret named Name.
	Template *template.Template
	Compose  []string
	// Also lists further headers the placeholder may arrive in (a client library that
	// sends the key as "Authorization: Bearer" where the API documents X-Api-Key, say),
	// each with its own format, or further formats for a header already listed. The
	// placeholder is replaced in every one of them that holds it, when the value has one
	// of that header's formats; anywhere else it is never replaced.
	Also     []InjectAs
	Bindings []Binding
	// Pos is where the secret is declared, for explanations.
	Pos Pos
}

// Binding allows a secret to be injected into requests to one host pattern.
type Binding struct {
	// Host is an exact lowercase name or "*.domain" matching exactly one more label.
	Host string
	// Methods are upper-case; nil means any method.
	Methods []string
	// Paths are globs on the normalized path ("*" within a segment, "**" across segments);
	// nil means any path.
	Paths []string
	// UIDs, when non-nil, limits the binding to connections from these users (resolved from
	// names at load time).
	UIDs []uint32
	Pos  Pos
}

// FetchNames are the backend secrets a secret's value is made from.
func (s *Secret) FetchNames() []string {
	if s.Template != nil {
		return s.Compose
	}
	return []string{s.Name}
}

// MissingNames lists, sorted, the backend names the config fetches that have does not hold:
// what a secrets file lacks.
func (c *Config) MissingNames(have []string) []string {
	var missing []string
	for _, s := range c.Secrets {
		for _, n := range s.FetchNames() {
			if !slices.Contains(have, n) && !slices.Contains(missing, n) {
				missing = append(missing, n)
			}
		}
	}
	slices.Sort(missing)
	return missing
}

// Pos is a position in the bindings file.
type Pos struct {
	File         string
	Line, Column int
}

func (p Pos) String() string { return fmt.Sprintf("%s:%d:%d", p.File, p.Line, p.Column) }

// Load reads and validates path. The error lists every problem found, one per line. It
// does not check who may change the file (a diff or an explanation reads any copy); avpd
// and avpctl bindings check read the file it runs with through ReadFile.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, openError(path, err)
	}
	return Parse(path, data)
}

// ReadFile reads the bindings file avpd runs with, refusing one that anyone but root or
// one of owners could change: whoever can write it decides which hosts get the real
// secrets. group is avpd's group, which may read the file (root:avp 0640), for the fix.
func ReadFile(path, group string, owners ...int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, openError(path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, openError(path, err)
	}
	if err := CheckPermissions(fi, path, group, owners...); err != nil {
		return nil, err
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, openError(path, err)
	}
	return data, nil
}

// CheckPermissions refuses a bindings file that is not a regular file, that group or
// others may write, or that a user other than root or one of owners owns; the error names
// the file and the chown and chmod that fix it.
func CheckPermissions(fi os.FileInfo, path, group string, owners ...int) error {
	fix := fmt.Sprintf("run: chown root:%s %s && chmod 640 %s", group, path, path)
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("bindings file %s is not a regular file", path)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("bindings file %s has mode %04o: group and others must not write it, since it decides which hosts get the real secrets; %s", path, fi.Mode().Perm(), fix)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 && !slices.Contains(owners, int(st.Uid)) {
		who := "root"
		for _, o := range owners {
			if o != 0 {
				who += fmt.Sprintf(" or avpd's user (uid %d)", o)
			}
		}
		return fmt.Errorf("bindings file %s is owned by uid %d: only %s may own it, since it decides which hosts get the real secrets; %s", path, st.Uid, who, fix)
	}
	return nil
}

// openError says what went wrong opening the bindings file, naming it once; it wraps the
// cause, so errors.Is(err, fs.ErrPermission) still tells an unreadable file.
func openError(path string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("bindings file %s: %w; create it (bindings.example.yaml is a start) or give the path of yours", path, err)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("bindings file %s: %w; run as root (or as avpd's user)", path, err)
	}
	return fmt.Errorf("bindings file %s: %w", path, err)
}

// Parse validates data as the bindings file named file.
func Parse(file string, data []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, &Error{Problems: []string{syntaxError(file, data, err)}}
	}
	d := &decoder{file: file}
	cfg := d.config(&root)
	if len(d.errs) > 0 {
		// In the order of the file, as an operator fixes them.
		slices.SortStableFunc(d.errs, func(a, b string) int { return cmpPos(file, a, b) })
		return nil, &Error{Problems: d.errs}
	}
	return cfg, nil
}

// cmpPos orders two problems "FILE:LINE:COL: ..." by line and column; one without a
// position of file sorts last.
func cmpPos(file, a, b string) int {
	pos := func(s string) (int, int) {
		rest, ok := strings.CutPrefix(s, file+":")
		if !ok {
			return math.MaxInt, 0
		}
		ls, rest, _ := strings.Cut(rest, ":")
		cs, _, _ := strings.Cut(rest, ":")
		l, err1 := strconv.Atoi(ls)
		c, err2 := strconv.Atoi(cs)
		if err1 != nil || err2 != nil {
			return math.MaxInt, 0
		}
		return l, c
	}
	al, ac := pos(a)
	bl, bc := pos(b)
	if al != bl {
		return cmp.Compare(al, bl)
	}
	return cmp.Compare(ac, bc)
}

// Error carries every problem found in a file; each names its position and the fix.
type Error struct {
	Problems []string
}

func (e *Error) Error() string { return strings.Join(e.Problems, "\n") }

// syntaxError puts yaml.v3's "yaml: line N: msg" into the file:line:column form. A tab in
// the indentation, YAML's most common trap, is named with its own fix, and so is a line
// indented to no column of the block it is in.
func syntaxError(file string, data []byte, err error) string {
	line, msg := syntaxLine(data, err)
	lines := strings.Split(string(data), "\n")
	if line >= 1 && line <= len(lines) {
		l := lines[line-1]
		indent := l[:len(l)-len(strings.TrimLeft(l, " \t"))]
		if strings.Contains(indent, "\t") {
			return fmt.Sprintf("%s:%d:%d: a tab in the indentation; YAML indents with spaces only: replace the tab with spaces", file, line, strings.IndexByte(indent, '\t')+1)
		}
		if misindented(msg) {
			return fmt.Sprintf("%s:%d:%d: this line's indentation matches no key above it (%s); keys of one mapping start in the same column, in a list item the column after \"- \"", file, line, len(indent)+1, msg)
		}
	}
	return fmt.Sprintf("%s:%d:1: %s; fix the YAML syntax", file, line, msg)
}

// misindented reports whether yaml's message is one of the block-structure errors a line
// indented one space too few or too many gives.
func misindented(msg string) bool {
	return msg == "did not find expected '-' indicator" || msg == "did not find expected key"
}

// SyntaxLine is the line of data that yaml's syntax error err is about, counted from 1.
// For a mis-indented line yaml.v3 names the line where the enclosing block starts, often
// lines above the mistake; the line is then found as the first whose prefix of the file
// gives the same error. Nothing of data is returned: a secrets file's syntax error is
// located with it too.
func SyntaxLine(data []byte, err error) int {
	line, _ := syntaxLine(data, err)
	return line
}

// SecretsFileError rewords the file backend's error about the secrets file at path for the
// operator: the path once (the store wraps os's error, which names it again), a fix for a
// missing file, and the line of a YAML syntax error, never its text. The store names no
// line: when the file's mode and owner pass for owners (else the store's error says what to
// chmod) and its YAML does not, the line is found here.
func SecretsFileError(path string, owners []int, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("secrets file %s: %v; create it, chmod 600, with a line NAME: value for each secret", path, pe.Err)
		}
		return fmt.Errorf("secrets file %s: %v", path, pe.Err)
	}
	f, oerr := os.Open(path)
	if oerr != nil {
		return err
	}
	defer f.Close()
	if fi, serr := f.Stat(); serr != nil || store.CheckPrivateOwners(fi, path, "secrets file", owners...) != nil || fi.Size() > 1<<20 {
		return err
	}
	data, rerr := io.ReadAll(f)
	defer store.Wipe(data)
	if rerr == nil {
		if serr := SecretsSyntaxError(path, data); serr != nil {
			return serr
		}
	}
	return err
}

// SecretsSyntaxError says where a secrets file (a YAML map of NAME: value) whose data does
// not parse goes wrong: path:line and a fix, never the line's text (yaml.v3 quotes an
// unknown alias, which may be part of a value). It is nil when data parses.
func SecretsSyntaxError(path string, data []byte) error {
	var root yaml.Node
	err := yaml.Unmarshal(data, &root)
	if err == nil {
		return nil
	}
	return fmt.Errorf("secrets file %s:%d: not a YAML map of NAME: value (the line's text is not shown); "+
		"put a value in quotes when it holds \": \" or \" #\" or starts with one of & * ! | > ' \" { [ %% @ `, and close every quote", path, SyntaxLine(data, err))
}

func syntaxLine(data []byte, err error) (int, string) {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	line := 1
	if n, _ := fmt.Sscanf(msg, "line %d:", &line); n == 1 {
		msg = strings.TrimSpace(msg[strings.IndexByte(msg, ':')+1:])
	}
	lines := strings.SplitAfter(string(data), "\n")
	if strings.Contains(msg, "end of stream") && len(lines) <= 1000 {
		// A quote never closed: yaml names the line after the last. The first prefix that
		// does not parse ends at the line the quote opens on.
		for n := 1; n <= len(lines); n++ {
			var root yaml.Node
			if yaml.Unmarshal([]byte(strings.Join(lines[:n], "")), &root) != nil {
				return n, msg
			}
		}
	}
	if !misindented(msg) {
		return line, msg
	}
	if len(lines) > 1000 {
		return line, msg // a bindings file is far shorter; not worth the quadratic search
	}
	for n := line; n <= len(lines); n++ {
		var root yaml.Node
		perr := yaml.Unmarshal([]byte(strings.Join(lines[:n], "")), &root)
		if perr != nil && strings.HasSuffix(perr.Error(), ": "+msg) {
			return n, msg
		}
	}
	return line, msg
}

type decoder struct {
	file string
	errs []string
}

func (d *decoder) pos(n *yaml.Node) Pos { return Pos{File: d.file, Line: n.Line, Column: n.Column} }

func (d *decoder) errf(n *yaml.Node, format string, args ...any) {
	d.errs = append(d.errs, d.pos(n).String()+": "+fmt.Sprintf(format, args...))
}

// fields walks a mapping node, calling the handler for each known key and reporting unknown
// and duplicate keys with the list of keys that are allowed there.
func (d *decoder) fields(n *yaml.Node, what string, handlers map[string]func(*yaml.Node)) map[string]bool {
	seen := map[string]bool{}
	if n.Kind != yaml.MappingNode {
		d.errf(n, "%s must be a mapping of key: value", what)
		return seen
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		h, ok := handlers[k.Value]
		if !ok {
			d.errf(k, "unknown key %q in %s; allowed keys are %s", k.Value, what, keyList(handlers))
			continue
		}
		if seen[k.Value] {
			d.errf(k, "key %q appears twice in %s; keep one", k.Value, what)
			continue
		}
		seen[k.Value] = true
		h(v)
	}
	return seen
}

func keyList(m map[string]func(*yaml.Node)) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return strings.Join(keys, ", ")
}

func (d *decoder) str(n *yaml.Node, what string, dst *string) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		d.errf(n, "%s must be a string", what)
		return
	}
	*dst = n.Value
}

func (d *decoder) strList(n *yaml.Node, what string) []string {
	if n.Kind != yaml.SequenceNode {
		example := "[GET, POST]"
		switch {
		case strings.HasSuffix(what, ".paths"):
			example = `["/v1/**"]`
		case strings.HasSuffix(what, ".compose"):
			example = "[USER, PASSWORD]"
		}
		if n.Kind == yaml.ScalarNode && n.Value != "" {
			example = fmt.Sprintf("[%s]", n.Value) // what was given, as a list
			if strings.HasSuffix(what, ".paths") {
				example = fmt.Sprintf("[%q]", n.Value)
			}
		}
		d.errf(n, "%s must be a list, for example %s", what, example)
		return nil
	}
	out := make([]string, 0, len(n.Content))
	for _, c := range n.Content {
		var s string
		d.str(c, what+" entry", &s)
		out = append(out, s)
	}
	return out
}

func (d *decoder) config(root *yaml.Node) *Config {
	cfg := &Config{
		Cache: Cache{TTL: DefaultCacheTTL, SyncInterval: DefaultSyncInterval, MaxEntries: DefaultMaxEntries},
		Proxy: Proxy{Listen: netip.MustParseAddrPort(DefaultListen), MaxConnsPerUID: DefaultMaxConnsPerUID},
		Audit: Audit{Path: DefaultAuditLog},
	}
	if root.Kind != yaml.DocumentNode || len(root.Content) == 0 {
		d.errs = append(d.errs, d.file+":1:1: the file is empty; start it with \"version: 1\" and a secrets: section")
		return cfg
	}
	doc := root.Content[0]
	var secretsNode *yaml.Node
	seen := d.fields(doc, "the top level", map[string]func(*yaml.Node){
		"version": func(n *yaml.Node) {
			if n.Kind != yaml.ScalarNode || n.Value != "1" {
				d.errf(n, "unsupported version %q; write \"version: 1\"", n.Value)
				return
			}
			cfg.Version = 1
		},
		"backend": func(n *yaml.Node) { d.backend(n, &cfg.Backend) },
		"cache":   func(n *yaml.Node) { d.cache(n, &cfg.Cache) },
		"proxy":   func(n *yaml.Node) { d.proxy(n, &cfg.Proxy) },
		"audit":   func(n *yaml.Node) { d.audit(n, &cfg.Audit) },
		"secrets": func(n *yaml.Node) { secretsNode = n; cfg.Secrets = d.secrets(n) },
	})
	if doc.Kind != yaml.MappingNode {
		return cfg
	}
	if !seen["version"] {
		d.errf(doc, "missing \"version: 1\" at the top of the file")
	}
	if !seen["backend"] {
		d.errf(doc, "missing backend: section; add \"backend: {type: file, file: {path: /etc/agent-vault-proxy/secrets.yaml}}\"")
	}
	if !seen["secrets"] {
		d.errf(doc, "missing secrets: section; declare at least one secret with a placeholder and bindings")
	}
	if secretsNode != nil {
		d.placeholdersDistinct(cfg.Secrets)
		d.composeLeaves(cfg.Secrets)
	}
	return cfg
}

func (d *decoder) backend(n *yaml.Node, b *Backend) {
	var typeNode, fileNode, bwsNode *yaml.Node
	d.fields(n, "backend", map[string]func(*yaml.Node){
		"type": func(v *yaml.Node) { typeNode = v; d.str(v, "backend.type", &b.Type) },
		"file": func(v *yaml.Node) {
			fileNode = v
			d.fields(v, "backend.file", map[string]func(*yaml.Node){
				"path": func(p *yaml.Node) { d.str(p, "backend.file.path", &b.File.Path) },
			})
		},
		"bws": func(v *yaml.Node) { bwsNode = v; d.bws(v, &b.BWS) },
	})
	if n.Kind != yaml.MappingNode {
		return
	}
	switch {
	case typeNode == nil:
		d.errf(n, "backend.type is missing; write \"type: file\"")
	case b.Type == "file":
		if fileNode == nil || b.File.Path == "" {
			d.errf(n, "backend type file needs \"file: {path: /etc/agent-vault-proxy/secrets.yaml}\"")
		} else if !strings.HasPrefix(b.File.Path, "/") {
			d.errf(fileNode, "backend.file.path must be an absolute path, got %q", b.File.Path)
		}
	case b.Type == "bws":
		if bwsNode == nil {
			d.errf(n, "backend type bws needs \"bws: {organization_id: <UUID>, access_token_file: /etc/agent-vault-proxy/bws-token}\"")
		}
		if fileNode != nil {
			d.errf(fileNode, "backend.file is only used with \"type: file\"; remove it")
		}
	default:
		d.errf(typeNode, "unknown backend type %q; write \"file\" or \"bws\"", b.Type)
	}
	if b.Type == "file" && bwsNode != nil {
		d.errf(bwsNode, "backend.bws is only used with \"type: bws\"; remove it or change the type")
	}
}

// bws reads backend.bws, applying the defaults first so an absent key means the US cloud.
func (d *decoder) bws(n *yaml.Node, w *BWSBackend) {
	w.APIURL, w.IdentityURL, w.Timeout = DefaultBWSAPIURL, DefaultBWSIdentityURL, DefaultBWSTimeout
	abs := func(v *yaml.Node, what string, dst *string) {
		d.str(v, what, dst)
		if v.Kind == yaml.ScalarNode && !strings.HasPrefix(*dst, "/") {
			d.errf(v, "%s must be an absolute path, got %q", what, *dst)
		}
	}
	seen := d.fields(n, "backend.bws", map[string]func(*yaml.Node){
		"organization_id": func(v *yaml.Node) {
			d.str(v, "backend.bws.organization_id", &w.OrganizationID)
			if v.Kind == yaml.ScalarNode && !isUUID(w.OrganizationID) {
				d.errf(v, "backend.bws.organization_id %q is not a UUID; copy the organization's id from the Bitwarden web app (Secrets Manager, the URL after /sm/)", w.OrganizationID)
			}
		},
		"access_token_file": func(v *yaml.Node) { abs(v, "backend.bws.access_token_file", &w.AccessTokenFile) },
		"state_file":        func(v *yaml.Node) { abs(v, "backend.bws.state_file", &w.StateFile) },
		"api_url":           func(v *yaml.Node) { d.bwsURL(v, "backend.bws.api_url", DefaultBWSAPIURL, &w.APIURL) },
		"identity_url":      func(v *yaml.Node) { d.bwsURL(v, "backend.bws.identity_url", DefaultBWSIdentityURL, &w.IdentityURL) },
		"timeout": func(v *yaml.Node) {
			dur, err := time.ParseDuration(v.Value)
			if v.Kind != yaml.ScalarNode || err != nil || dur < 100*time.Millisecond || dur > 5*time.Minute {
				d.errf(v, "backend.bws.timeout %q is not a duration between 100ms and 5m; write for example \"timeout: 10s\"", v.Value)
				return
			}
			w.Timeout = dur
		},
	})
	if n.Kind != yaml.MappingNode {
		return
	}
	if !seen["organization_id"] {
		d.errf(n, "backend.bws.organization_id is missing; add \"organization_id: <the organization's UUID>\"")
	}
	if !seen["access_token_file"] {
		d.errf(n, "backend.bws.access_token_file is missing; add \"access_token_file: /etc/agent-vault-proxy/bws-token\" (a file with only the token, chmod 600)")
	}
	if w.StateFile != "" && w.StateFile == w.AccessTokenFile {
		d.errf(n, "backend.bws.state_file must not be the access token file; the SDK overwrites it")
	}
}

// bwsURL accepts an https URL without path suffix slashes, query or credentials; http only
// to a loopback address, where the token does not cross a network.
func (d *decoder) bwsURL(v *yaml.Node, what, example string, dst *string) {
	var s string
	d.str(v, what, &s)
	if v.Kind != yaml.ScalarNode {
		return
	}
	u, err := url.Parse(s)
	switch {
	case err != nil || u.Host == "" || u.Opaque != "" || (u.Scheme != "https" && u.Scheme != "http"):
		d.errf(v, "%s %q is not an https URL; write for example %q", what, s, example)
	case u.User != nil || u.RawQuery != "" || u.Fragment != "":
		d.errf(v, "%s %q must not carry credentials, a query or a fragment; write for example %q", what, s, example)
	case u.Scheme == "http" && !loopbackHost(u.Hostname()):
		d.errf(v, "%s %q uses http: the access token would cross the network in clear; use https", what, s)
	default:
		// The SDK appends "/connect/token" and the like literally.
		*dst = strings.TrimRight(s, "/")
	}
}

func loopbackHost(h string) bool {
	if h == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.IsLoopback()
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}

func (d *decoder) cache(n *yaml.Node, c *Cache) {
	d.fields(n, "cache", map[string]func(*yaml.Node){
		"ttl": func(v *yaml.Node) {
			dur, err := time.ParseDuration(v.Value)
			if v.Kind != yaml.ScalarNode || err != nil || dur < time.Second || dur > 24*time.Hour {
				d.errf(v, "cache.ttl %q is not a duration between 1s and 24h; write for example \"ttl: 5m\"", v.Value)
				return
			}
			c.TTL = dur
		},
		"sync_interval": func(v *yaml.Node) {
			dur, err := time.ParseDuration(v.Value)
			if v.Kind != yaml.ScalarNode || err != nil || dur < time.Second || dur > 24*time.Hour {
				d.errf(v, "cache.sync_interval %q is not a duration between 1s and 24h; write for example \"sync_interval: 30s\"", v.Value)
				return
			}
			c.SyncInterval = dur
		},
		"max_entries": func(v *yaml.Node) {
			n, err := strconv.Atoi(v.Value)
			if v.Kind != yaml.ScalarNode || err != nil || n < 1 || n > 1000000 {
				d.errf(v, "cache.max_entries %q is not a number between 1 and 1000000; write for example \"max_entries: 1024\"", v.Value)
				return
			}
			c.MaxEntries = n
		},
	})
}

func (d *decoder) proxy(n *yaml.Node, p *Proxy) {
	d.fields(n, "proxy", map[string]func(*yaml.Node){
		"listen": func(v *yaml.Node) {
			ap, err := netip.ParseAddrPort(v.Value)
			if v.Kind != yaml.ScalarNode || err != nil || !ap.Addr().Is4() || !ap.Addr().IsLoopback() || ap.Port() == 0 || ap.Port() == 443 {
				d.errf(v, "proxy.listen %q must be an IPv4 loopback address with a port other than 443, for example \"127.0.0.1:14322\"", v.Value)
				return
			}
			p.Listen = ap
		},
		"upstream_ca_file": func(v *yaml.Node) {
			d.str(v, "proxy.upstream_ca_file", &p.UpstreamCAFile)
			if p.UpstreamCAFile != "" && !strings.HasPrefix(p.UpstreamCAFile, "/") {
				d.errf(v, "proxy.upstream_ca_file must be an absolute path, got %q", p.UpstreamCAFile)
			}
		},
		"max_connections_per_uid": func(v *yaml.Node) {
			n, err := strconv.Atoi(v.Value)
			if v.Kind != yaml.ScalarNode || err != nil || n < 1 || n > 1000000 {
				d.errf(v, "proxy.max_connections_per_uid %q is not a number between 1 and 1000000; write for example \"max_connections_per_uid: %d\"", v.Value, DefaultMaxConnsPerUID)
				return
			}
			p.MaxConnsPerUID = n
		},
	})
}

func (d *decoder) audit(n *yaml.Node, a *Audit) {
	var pathNode *yaml.Node
	seen := d.fields(n, "audit", map[string]func(*yaml.Node){
		"path": func(v *yaml.Node) {
			pathNode = v
			d.str(v, "audit.path", &a.Path)
			if !strings.HasPrefix(a.Path, "/") {
				d.errf(v, "audit.path must be an absolute path, got %q", a.Path)
			}
		},
		"socket": func(v *yaml.Node) {
			d.str(v, "audit.socket", &a.Socket)
			if !strings.HasPrefix(a.Socket, "/") {
				d.errf(v, "audit.socket must be the absolute path of the journal's socket, for example \"socket: /run/avp-journal/journal.sock\", got %q", a.Socket)
			}
		},
		"timeout": func(v *yaml.Node) {
			dur, err := time.ParseDuration(v.Value)
			if v.Kind != yaml.ScalarNode || err != nil || dur < 10*time.Millisecond || dur > time.Minute {
				d.errf(v, "audit.timeout %q is not a duration between 10ms and 1m; write for example \"timeout: 2s\"", v.Value)
				return
			}
			a.Timeout = dur
		},
	})
	if seen["socket"] && pathNode != nil {
		d.errf(pathNode, "audit.path and audit.socket exclude each other: with socket the journal (avpd journal --log) decides where events are written; remove path")
	}
	if seen["timeout"] && !seen["socket"] {
		d.errf(n, "audit.timeout applies only to the journal; add \"socket: /run/avp-journal/journal.sock\" or remove timeout")
	}
	if seen["socket"] {
		a.Path = ""
	}
}

func (d *decoder) secrets(n *yaml.Node) []*Secret {
	if n.Kind != yaml.MappingNode {
		d.errf(n, "secrets must be a mapping of NAME: {placeholder, inject, bindings}")
		return nil
	}
	var out []*Secret
	names := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if !validSecretName(k.Value) {
			d.errf(k, "secret name %q must be 1-128 characters of letters, digits, '_', '-' or '.'", k.Value)
			continue
		}
		if names[k.Value] {
			d.errf(k, "secret %q is declared twice; keep one", k.Value)
			continue
		}
		names[k.Value] = true
		out = append(out, d.secret(k, v))
	}
	if len(out) == 0 && len(d.errs) == 0 {
		d.errf(n, "secrets is empty; declare at least one secret")
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func validSecretName(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.') {
			return false
		}
	}
	return true
}

func (d *decoder) secret(k, n *yaml.Node) *Secret {
	s := &Secret{Name: k.Value, Header: DefaultHeader, Format: DefaultFormat, Pos: d.pos(k)}
	what := "secret " + k.Value
	var phNode *yaml.Node
	seen := d.fields(n, what, map[string]func(*yaml.Node){
		"placeholder": func(v *yaml.Node) { phNode = v; d.str(v, what+".placeholder", &s.Placeholder) },
		"inject":      func(v *yaml.Node) { d.inject(v, what, s) },
		"bindings":    func(v *yaml.Node) { s.Bindings = d.bindings(v, what) },
	})
	if n.Kind != yaml.MappingNode {
		return s
	}
	if !seen["placeholder"] {
		d.errf(n, "%s has no placeholder; add \"placeholder: <at least %d printable characters>\"", what, MinPlaceholderLen)
	} else if phNode != nil {
		d.checkPlaceholder(phNode, what, s.Placeholder)
	}
	if !seen["bindings"] {
		d.errf(n, "%s has no bindings; add \"bindings: [{host: api.example.com}]\"", what)
	}
	return s
}

func (d *decoder) checkPlaceholder(n *yaml.Node, what, p string) {
	if len(p) < MinPlaceholderLen {
		d.errf(n, "%s.placeholder is %d characters; use at least %d so it never occurs by accident", what, len(p), MinPlaceholderLen)
	}
	for i := 0; i < len(p); i++ {
		if p[i] <= ' ' || p[i] > '~' {
			d.errf(n, "%s.placeholder must be printable ASCII without spaces", what)
			return
		}
	}
}

func (d *decoder) placeholdersDistinct(secrets []*Secret) {
	for i, a := range secrets {
		for _, b := range secrets[i+1:] {
			if a.Placeholder == "" || b.Placeholder == "" {
				continue
			}
			if strings.Contains(a.Placeholder, b.Placeholder) || strings.Contains(b.Placeholder, a.Placeholder) {
				d.errs = append(d.errs, fmt.Sprintf("%s: placeholders of secrets %s and %s are equal or one contains the other; make each unique", b.Pos, a.Name, b.Name))
			}
		}
	}
}

// composeLeaves enforces "no nesting": a template may only read leaf secrets, never another
// secret that is itself composed.
func (d *decoder) composeLeaves(secrets []*Secret) {
	composed := map[string]bool{}
	for _, s := range secrets {
		if s.Template != nil {
			composed[s.Name] = true
		}
	}
	for _, s := range secrets {
		for _, c := range s.Compose {
			if composed[c] {
				d.errs = append(d.errs, fmt.Sprintf("%s: secret %s composes %s, which is itself a template; compose only leaf secrets from the backend", s.Pos, s.Name, c))
			}
		}
	}
}

// InjectAs is one header a secret's placeholder is replaced in, and the shape of its value.
type InjectAs struct {
	Header string // canonical form
	Format string // with {secret} exactly once
}

// Target is the i-th header and format the placeholder is replaced in: 0 is the inject
// header, then Also; there are len(Also)+1.
func (s *Secret) Target(i int) InjectAs {
	if i == 0 {
		return InjectAs{s.Header, s.Format}
	}
	return s.Also[i-1]
}

// Targets are all of them, in that order.
func (s *Secret) Targets() []InjectAs {
	return append([]InjectAs{s.Target(0)}, s.Also...)
}

// injectHeader reads and checks one header name an inject section names.
func (d *decoder) injectHeader(v *yaml.Node, what string, dst *string) {
	d.str(v, what, dst)
	if !validHeaderName(*dst) {
		d.errf(v, "%s %q is not a valid HTTP header name", what, *dst)
	}
	switch strings.ToLower(*dst) {
	case "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "proxy-authorization", "proxy-authenticate", "proxy-connection", "keep-alive":
		d.errf(v, "%s %q is a hop-by-hop or framing header; inject into Authorization or an API key header", what, *dst)
	}
}

// injectFormat reads and checks one format an inject section gives.
func (d *decoder) injectFormat(v *yaml.Node, what string, dst *string) {
	d.str(v, what, dst)
	if strings.Count(*dst, "{secret}") != 1 {
		d.errf(v, "%s must contain {secret} exactly once, for example \"Bearer {secret}\"", what)
	}
	for i := 0; i < len(*dst); i++ {
		if (*dst)[i] < ' ' || (*dst)[i] > '~' {
			d.errf(v, "%s must be printable ASCII", what)
			break
		}
	}
}

// also reads inject.also: a list of {header, format} the placeholder may arrive in too.
func (d *decoder) also(n *yaml.Node, what string, s *Secret) {
	if n.Kind != yaml.SequenceNode {
		d.errf(n, "%s.inject.also must be a list of {header, format}, for example [{header: Authorization, format: \"Bearer {secret}\"}]", what)
		return
	}
	for i, item := range n.Content {
		w := fmt.Sprintf("%s.inject.also[%d]", what, i)
		a := InjectAs{Format: DefaultFormat}
		var headerNode *yaml.Node
		seen := d.fields(item, w, map[string]func(*yaml.Node){
			"header": func(v *yaml.Node) { headerNode = v; d.injectHeader(v, w+".header", &a.Header) },
			"format": func(v *yaml.Node) { d.injectFormat(v, w+".format", &a.Format) },
		})
		if item.Kind != yaml.MappingNode {
			continue
		}
		if !seen["header"] {
			d.errf(item, "%s has no header; add \"header: Authorization\" or the header your client sends", w)
			continue
		}
		a.Header = canonicalHeader(a.Header)
		// A header may come back with another format (GitHub clients send "token" or
		// "Bearer"); the same pair twice is a mistake.
		for _, t := range s.Targets() {
			if t == a {
				d.errf(headerNode, "%s repeats header %q with format %q; list each pair once", w, a.Header, a.Format)
			}
		}
		s.Also = append(s.Also, a)
	}
}

func (d *decoder) inject(n *yaml.Node, what string, s *Secret) {
	var tmplNode, composeNode, alsoNode *yaml.Node
	var tmplSrc string
	d.fields(n, what+".inject", map[string]func(*yaml.Node){
		"header":   func(v *yaml.Node) { d.injectHeader(v, what+".inject.header", &s.Header) },
		"format":   func(v *yaml.Node) { d.injectFormat(v, what+".inject.format", &s.Format) },
		"also":     func(v *yaml.Node) { alsoNode = v },
		"template": func(v *yaml.Node) { tmplNode = v; d.str(v, what+".inject.template", &tmplSrc) },
		"compose": func(v *yaml.Node) {
			composeNode = v
			s.Compose = d.strList(v, what+".inject.compose")
		},
	})
	switch {
	case tmplNode != nil && composeNode == nil:
		d.errf(tmplNode, "%s.inject.template needs \"compose: [NAME, ...]\" listing the 1-4 secrets it reads", what)
	case tmplNode == nil && composeNode != nil:
		d.errf(composeNode, "%s.inject.compose needs a template that uses the names, for example template: \"{{ (A + ':' + B) | b64encode }}\"", what)
	case tmplNode != nil:
		d.compose(composeNode, tmplNode, what, tmplSrc, s)
	}
	s.Header = canonicalHeader(s.Header)
	if alsoNode != nil {
		// After the inject header is known, so a repeat of it is caught.
		d.also(alsoNode, what, s)
	}
}

func (d *decoder) compose(composeNode, tmplNode *yaml.Node, what, src string, s *Secret) {
	if len(s.Compose) < 1 || len(s.Compose) > 4 {
		d.errf(composeNode, "%s.inject.compose lists %d secrets; list 1 to 4", what, len(s.Compose))
		return
	}
	seen := map[string]bool{}
	for i, c := range s.Compose {
		if !validSecretName(c) || seen[c] {
			d.errf(composeNode.Content[i], "%s.inject.compose entry %q must be a distinct secret name of letters, digits, '_', '-' or '.'", what, c)
			return
		}
		seen[c] = true
	}
	t, err := template.Parse(src, s.Compose)
	if err != nil {
		col := tmplNode.Column
		if te, ok := err.(*template.Error); ok {
			col += te.Column - 1
			if tmplNode.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) != 0 {
				col++ // the opening quote
			}
		}
		d.errs = append(d.errs, fmt.Sprintf("%s:%d:%d: %s.inject.template: %v", d.file, tmplNode.Line, col, what, err))
		return
	}
	s.Template = t
}

func validHeaderName(h string) bool {
	if h == "" {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// canonicalHeader mirrors net/textproto.CanonicalMIMEHeaderKey without importing net/http here.
func canonicalHeader(h string) string {
	b := []byte(strings.ToLower(h))
	upper := true
	for i, c := range b {
		if upper && c >= 'a' && c <= 'z' {
			b[i] = c - 'a' + 'A'
		}
		upper = c == '-'
	}
	return string(b)
}

func (d *decoder) bindings(n *yaml.Node, what string) []Binding {
	if n.Kind != yaml.SequenceNode || len(n.Content) == 0 {
		d.errf(n, "%s.bindings must be a non-empty list of {host, methods, paths}", what)
		return nil
	}
	var out []Binding
	for i, bn := range n.Content {
		b := Binding{Pos: d.pos(bn)}
		bwhat := fmt.Sprintf("%s.bindings[%d]", what, i)
		var hostNode *yaml.Node
		seen := d.fields(bn, bwhat, map[string]func(*yaml.Node){
			"host": func(v *yaml.Node) { hostNode = v; d.str(v, bwhat+".host", &b.Host) },
			"methods": func(v *yaml.Node) {
				b.Methods = d.strList(v, bwhat+".methods")
				if v.Kind == yaml.SequenceNode && len(b.Methods) == 0 {
					d.errf(v, "%s.methods is empty; list methods such as [GET, POST], or remove the key to allow any method", bwhat)
				}
				for j, m := range b.Methods {
					if !validMethod(m) {
						d.errf(v.Content[j], "%s.methods entry %q must be an upper-case HTTP method such as GET or POST; remove the key to allow any method", bwhat, m)
					} else if slices.Contains(b.Methods[:j], m) {
						d.errf(v.Content[j], "%s.methods lists %s twice; keep one", bwhat, m)
					}
				}
			},
			"uids": func(v *yaml.Node) { b.UIDs = d.uids(v, bwhat) },
			"paths": func(v *yaml.Node) {
				b.Paths = d.strList(v, bwhat+".paths")
				if v.Kind == yaml.SequenceNode && len(b.Paths) == 0 {
					d.errf(v, "%s.paths is empty; list globs such as [\"/v1/**\"], or remove the key to allow any path", bwhat)
				}
				for j, p := range b.Paths {
					if err := ValidatePathGlob(p); err != nil {
						d.errf(v.Content[j], "%s.paths entry %q: %v", bwhat, p, err)
					}
				}
			},
		})
		if bn.Kind != yaml.MappingNode {
			continue
		}
		if !seen["host"] {
			d.errf(bn, "%s has no host; add \"host: api.example.com\"", bwhat)
		} else if hostNode != nil {
			if err := ValidateHostPattern(b.Host); err != nil {
				d.errf(hostNode, "%s.host %q: %v", bwhat, b.Host, err)
			}
		}
		out = append(out, b)
	}
	return out
}

// uids resolves user names and numbers at load time, so a binding never depends on the
// passwd file changing under a running daemon.
func (d *decoder) uids(n *yaml.Node, what string) []uint32 {
	if n.Kind != yaml.SequenceNode || len(n.Content) == 0 {
		d.errf(n, "%s.uids must be a non-empty list of user names or numbers, or absent for any user", what)
		return nil
	}
	out := []uint32{}
	for _, c := range n.Content {
		if c.Kind != yaml.ScalarNode {
			d.errf(c, "%s.uids entries must be user names or numbers", what)
			continue
		}
		if v, err := strconv.ParseUint(c.Value, 10, 32); err == nil {
			out = append(out, uint32(v))
			continue
		}
		u, err := user.Lookup(c.Value)
		if err != nil {
			d.errf(c, "%s.uids: no user %q on this host; create it or write its numeric UID", what, c.Value)
			continue
		}
		v, err := strconv.ParseUint(u.Uid, 10, 32)
		if err != nil {
			d.errf(c, "%s.uids: user %q has no numeric UID", what, c.Value)
			continue
		}
		out = append(out, uint32(v))
	}
	for j, u := range out {
		if u == 0 || u == math.MaxUint32 {
			// avpd refuses to enroll these, so a binding for them never matches.
			d.errf(n, "%s.uids lists uid %d, which can never be enrolled (root, or (uid_t)-1), so it would never get this secret; remove it", what, u)
			out = out[:j]
			break
		}
	}
	return out
}

func validMethod(m string) bool {
	if m == "" || m == "*" || len(m) > 32 {
		return false
	}
	for i := 0; i < len(m); i++ {
		if m[i] < 'A' || m[i] > 'Z' {
			return false
		}
	}
	return m != "CONNECT"
}

// ValidateHostPattern accepts a lowercase DNS name or "*.domain" with at least two labels
// after the wildcard, so a wildcard can never cover a whole top-level domain.
func ValidateHostPattern(h string) error {
	if rest, ok := strings.CutPrefix(h, "https://"); ok || strings.HasPrefix(h, "http://") {
		if !ok {
			rest = strings.TrimPrefix(h, "http://")
		}
		host, _, _ := strings.Cut(rest, "/")
		host, _, _ = strings.Cut(host, ":")
		return fmt.Errorf("a host is a name, not a URL: write %q (paths go under paths:)", strings.ToLower(host))
	}
	if host, port, ok := strings.Cut(h, ":"); ok && !strings.Contains(port, ":") {
		return fmt.Errorf("a host takes no port (avpd intercepts port 443 only): write %q", strings.ToLower(host))
	}
	name := h
	if strings.HasPrefix(h, "*.") {
		name = h[2:]
		if strings.Count(name, ".") < 1 {
			return fmt.Errorf("a wildcard must sit above a registrable domain, for example \"*.example.com\"")
		}
		if suffix, _ := publicsuffix.PublicSuffix(name); suffix == name {
			return fmt.Errorf("%q is a public suffix; a wildcard there would cover other people's domains, bind \"*.yourdomain.%s\" instead", name, name)
		}
	}
	if strings.Contains(name, "*") {
		return fmt.Errorf("only a leading \"*.\" wildcard is allowed, for example \"*.example.com\"")
	}
	if strings.HasSuffix(name, ".") {
		return fmt.Errorf("remove the trailing dot")
	}
	if name != strings.ToLower(name) {
		return fmt.Errorf("write the host in lowercase: %q", strings.ToLower(h)) // the wildcard kept
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return fmt.Errorf("IP literals never get injection (there is no name to verify); bind a DNS name")
	}
	if len(name) == 0 || len(name) > 253 {
		return fmt.Errorf("not a DNS name")
	}
	for _, label := range strings.Split(name, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("label %q is not a valid DNS label", label)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("character %q is not allowed in a host name", c)
			}
		}
	}
	return nil
}

// ValidatePathGlob accepts globs that start with "/" and use "*" within a segment or "**"
// as a whole segment.
func ValidatePathGlob(p string) error {
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("paths must start with \"/\", for example \"/v1/**\"")
	}
	if strings.ContainsAny(p, "?#%\\") {
		return fmt.Errorf("write the decoded path without query, fragment, percent-escapes or backslashes")
	}
	for _, seg := range strings.Split(p[1:], "/") {
		if strings.Contains(seg, "**") && seg != "**" {
			return fmt.Errorf("\"**\" must be a whole segment, as in \"/v1/**\"")
		}
		if seg == "." || seg == ".." {
			return fmt.Errorf("dot segments are not allowed in a glob")
		}
	}
	return nil
}

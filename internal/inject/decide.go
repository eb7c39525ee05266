// Package inject owns the decision: which placeholder, if any, may be replaced by its real
// secret in one HTTP request, and how the replacement is spliced in.
//
// It is pure: facts and a request in, a decision out. It never performs I/O, never fetches
// a secret and never logs, so every rule here can be table-tested and explained.
package inject

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
)

// Action is what the proxy does with a request.
type Action int

const (
	// ForwardVerbatim sends the request upstream unchanged, placeholders and all (I5).
	ForwardVerbatim Action = iota
	// Inject replaces the listed placeholders with real secrets.
	Inject
	// Refuse answers the agent with Status and sends nothing upstream.
	Refuse
)

func (a Action) String() string {
	switch a {
	case Inject:
		return "inject"
	case Refuse:
		return "refuse"
	default:
		return "forward_verbatim"
	}
}

// Reasons, stable strings that appear in audit events and refusals.
const (
	ReasonAllowed          = "binding_matched"
	ReasonNoPlaceholder    = "no_placeholder"
	ReasonHostMismatch     = "host_mismatch"
	ReasonHostNotBound     = "host_not_bound"
	ReasonMethodNotAllowed = "method_not_allowed"
	ReasonUIDNotAllowed    = "uid_not_allowed"
	ReasonPathNotAllowed   = "path_not_allowed"
	ReasonPathUnsafe       = "path_unsafe"
	ReasonFormatMismatch   = "format_mismatch"
	ReasonWrongHeader      = "placeholder_in_wrong_header"
	// ReasonPlaceholderInURL: the placeholder is in the query or path (?key=..., as
	// Google's REST APIs take a key), where avpd never injects.
	ReasonPlaceholderInURL    = "placeholder_in_url"
	ReasonMultiplePlaceholder = "multiple_placeholders_in_header"
	ReasonRepeatedHeader      = "repeated_inject_header"
	ReasonMethodOverride      = "method_override_not_allowed"
	// ReasonBodyNotCheckable: the body could not be read for a method override at all
	// (inject.UncheckableBody), and the bindings allow only some methods.
	ReasonBodyNotCheckable = "body_not_checkable"
	ReasonPathOverride     = "path_override_not_allowed"
)

// Facts are what the proxy knows about the connection, independent of any request on it.
type Facts struct {
	// UID of the agent process, or -1 when it could not be determined.
	UID int64
	// SNI is the server name from the ClientHello, lowercase without a trailing dot.
	SNI     string
	OrigDst netip.AddrPort
}

// Request is the part of an HTTP request the decision reads.
type Request struct {
	Method string
	// Authority is the Host header (HTTP/1.1) or :authority (HTTP/2).
	Authority string
	// RawPath is the request-target path as sent, still escaped, without the query.
	RawPath  string
	RawQuery string
	Header   http.Header
	// BodyMethods are the method overrides a BodyScanner found in the body, for
	// AllowsBodyOverride; the decision itself is made before the body is read.
	BodyMethods []string
}

// Injection is one placeholder to replace.
type Injection struct {
	Secret  *config.Secret
	Binding int
}

// Denial is a placeholder that was found but is forwarded verbatim, and why.
type Denial struct {
	Secret *config.Secret
	Reason string
}

// Decision is the outcome for one request.
type Decision struct {
	Action Action
	// Status is the HTTP status for Refuse.
	Status int
	// Reason is the request-level reason: for Inject ReasonAllowed, for ForwardVerbatim the
	// first denial's reason or ReasonNoPlaceholder, for Refuse why it was refused.
	Reason     string
	Injections []Injection
	Denials    []Denial
	// Path is the normalized path, or "" when it could not be normalized safely.
	Path string
}

// Policy is an immutable, validated view of the secrets and their bindings.
type Policy struct {
	secrets []*config.Secret
}

// NewPolicy builds a policy from a validated config. The config must not change afterwards.
func NewPolicy(cfg *config.Config) *Policy {
	return &Policy{secrets: cfg.Secrets}
}

// Secrets returns the secrets in name order.
func (p *Policy) Secrets() []*config.Secret { return p.secrets }

// Bound reports whether any binding covers host, which decides whether a connection is
// terminated (bound) or spliced through untouched.
func (p *Policy) Bound(host string) bool {
	host = NormalizeHost(host)
	if host == "" {
		return false
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return false // I3: an IP literal never gets injection
	}
	for _, s := range p.secrets {
		for _, b := range s.Bindings {
			if MatchHost(b.Host, host) {
				return true
			}
		}
	}
	return false
}

// Decide is the whole policy for one request.
func (p *Policy) Decide(f Facts, r Request) Decision {
	sni := NormalizeHost(f.SNI)
	host := NormalizeHost(r.Authority)
	// I3: the request must be for the name the TLS connection was verified for, on every
	// request, because HTTP/2 coalescing can carry several hosts on one connection.
	if sni == "" || host != sni {
		return Decision{Action: Refuse, Status: http.StatusMisdirectedRequest, Reason: ReasonHostMismatch}
	}
	normPath, pathOK := NormalizePath(r.RawPath)
	d := Decision{Action: ForwardVerbatim, Reason: ReasonNoPlaceholder}
	if pathOK {
		d.Path = normPath
	}

	var over *overrides // read once, for the first secret whose placeholder is held
	for _, s := range p.secrets {
		held, formatOK := false, true
		for i := 0; i <= len(s.Also); i++ {
			h := s.Target(i).Header
			if firstTarget(s, h) != i {
				continue // a further format of a header already looked at
			}
			holding := 0
			var value string
			vals := r.Header.Values(h)
			for _, v := range vals {
				if strings.Contains(v, s.Placeholder) {
					holding++
					value = v
				}
			}
			if holding == 0 {
				continue
			}
			if len(vals) > 1 {
				// Two copies of the header could be joined or picked differently upstream,
				// whether or not both hold the placeholder.
				return Decision{Action: Refuse, Status: http.StatusBadRequest, Reason: ReasonRepeatedHeader, Path: d.Path}
			}
			for _, other := range p.secrets {
				if other != s && strings.Contains(value, other.Placeholder) {
					return Decision{Action: Refuse, Status: http.StatusBadRequest, Reason: ReasonMultiplePlaceholder, Path: d.Path}
				}
			}
			held = true
			// Every header that holds the placeholder must have one of its shapes; one that
			// does not fails the whole secret, so nothing is replaced in a shape the agent
			// chose.
			formatOK = formatOK && matchesAnyFormat(s, h, value)
		}
		if !held {
			if reason := p.placeholderElsewhere(s, r); reason != "" {
				d.Denials = append(d.Denials, Denial{Secret: s, Reason: reason})
			}
			continue
		}
		if over == nil {
			over = readOverrides(r)
		}
		bi, reason := matchBindings(s, f.UID, host, r.Method, over, normPath, pathOK)
		if reason == ReasonAllowed && !formatOK {
			reason = ReasonFormatMismatch
		}
		if reason != ReasonAllowed {
			d.Denials = append(d.Denials, Denial{Secret: s, Reason: reason})
			continue
		}
		d.Injections = append(d.Injections, Injection{Secret: s, Binding: bi})
	}
	switch {
	case len(d.Injections) > 0:
		d.Action, d.Reason = Inject, ReasonAllowed
	case len(d.Denials) > 0:
		d.Reason = d.Denials[0].Reason
	}
	return d
}

// BodyOverrideMatters reports whether a method override in the body could change an
// injecting decision: some injection's binding lists the methods it allows. (A binding that
// allows any method still matches with any override, and no binding before it matches
// more with one.)
func (d *Decision) BodyOverrideMatters() bool {
	if d.Action != Inject {
		return false
	}
	for _, in := range d.Injections {
		if in.Secret.Bindings[in.Binding].Methods != nil {
			return true
		}
	}
	return false
}

// AllowsBodyOverride reports whether every secret the injecting decision d for r injects
// still has a binding that allows the request when r.BodyMethods are overrides too, as if
// they had been in a header: that binding must allow them all. It reads only the request
// line and the override headers of r, which the injection does not change.
func (p *Policy) AllowsBodyOverride(f Facts, r Request, d *Decision) bool {
	host := NormalizeHost(r.Authority)
	normPath, pathOK := NormalizePath(r.RawPath)
	over := readOverrides(r)
	for _, in := range d.Injections {
		if _, reason := matchBindings(in.Secret, f.UID, host, r.Method, over, normPath, pathOK); reason != ReasonAllowed {
			return false
		}
	}
	return true
}

// placeholderElsewhere reports a placeholder outside its configured header, so the audit
// shows an agent trying to move a key somewhere it was not configured to go (I11).
func (p *Policy) placeholderElsewhere(s *config.Secret, r Request) string {
	if strings.Contains(r.RawQuery, s.Placeholder) || strings.Contains(r.RawPath, s.Placeholder) {
		return ReasonPlaceholderInURL
	}
	for k, vs := range r.Header {
		if isTarget(s, k) {
			continue
		}
		for _, v := range vs {
			if strings.Contains(v, s.Placeholder) {
				return ReasonWrongHeader
			}
		}
	}
	return ""
}

// firstTarget is the index of header's first target in s, or -1.
func firstTarget(s *config.Secret, header string) int {
	for i := 0; i <= len(s.Also); i++ {
		if s.Target(i).Header == header {
			return i
		}
	}
	return -1
}

func isTarget(s *config.Secret, header string) bool { return firstTarget(s, header) >= 0 }

// matchesAnyFormat reports whether value has one of the formats s lists for header.
func matchesAnyFormat(s *config.Secret, header, value string) bool {
	for i := 0; i <= len(s.Also); i++ {
		if t := s.Target(i); t.Header == header && matchesFormat(t.Format, s.Placeholder, value) {
			return true
		}
	}
	return false
}

// methodOverrideHeaders are the headers through which common server frameworks (Rails,
// Laravel, Symfony, Express's method-override, Google's APIs) let a request name another
// method than its own; pathOverrideHeaders do the same for the path (IIS's URL Rewrite,
// older Symfony and Zend). Upstreams behind such a layer act on the override, so a
// binding must allow it as well as the request line.
var (
	methodOverrideHeaders = [...]string{"X-Http-Method-Override", "X-Http-Method", "X-Method-Override"}
	pathOverrideHeaders   = [...]string{"X-Original-Url", "X-Rewrite-Url"}
)

// overrides are the methods and paths a request asks the upstream to use instead of its
// own. A binding must allow each of them too, or a GET-only key could be used to DELETE,
// or a key limited to /user to reach /admin, on a server that honours the override.
type overrides struct {
	methods    []string // upper-cased, as frameworks compare them
	paths      []string // normalized
	unsafePath bool     // a path override that cannot be normalized safely
}

// none is readOverrides' answer for a request without any (most of them), so the common
// case does not allocate.
var none = &overrides{}

// readOverrides reads the override headers (each item of a comma-separated method list),
// any _method query parameter (a query naming a method that cannot be parsed counts as a
// method no binding allows), and the path overrides, which may be a path or an absolute
// URL. A _method in the body is checked as the body goes upstream (BodyScanner,
// AllowsBodyOverride).
func readOverrides(r Request) *overrides {
	var methods, paths []string
	methods = append(methods, r.BodyMethods...)
	unsafePath := false
	methodValues := func(vs []string) {
		for _, v := range vs {
			for item := range strings.SplitSeq(v, ",") {
				if item = strings.TrimSpace(item); item != "" {
					methods = append(methods, strings.ToUpper(item))
				}
			}
		}
	}
	queryMethods := func(q string) {
		if q == "" || strings.IndexByte(q, '%') < 0 && !strings.Contains(strings.ToLower(q), "method") {
			return
		}
		// Read as a form body is (formScan): PHP and Spring decode the query's names as
		// they do a form's, so "?.method=", "?+_method=" and "?_m%65thod=" name _method.
		var f formScans
		found := func(m string) { methods = append(methods, m) }
		f.scan([]byte(q), found)
		f.end(found)
	}
	pathValues := func(vs []string) {
		for _, v := range vs {
			if _, q, ok := strings.Cut(v, "?"); ok {
				// Zend Framework takes the query of X-Original-URL as the request's own.
				q, _, _ = strings.Cut(q, "#")
				queryMethods(q)
			}
			p, ok := overridePath(v)
			if !ok {
				unsafePath = true
				continue
			}
			paths = append(paths, p)
		}
	}
	for _, h := range methodOverrideHeaders {
		methodValues(r.Header[h])
	}
	queryMethods(r.RawQuery)
	for _, h := range pathOverrideHeaders {
		pathValues(r.Header[h])
	}
	for k, vs := range r.Header {
		// A name with '_' for '-' is the same header to a server that makes names CGI
		// variables (Puma, Unicorn): X_HTTP_METHOD_OVERRIDE reaches Rack as
		// HTTP_X_HTTP_METHOD_OVERRIDE.
		if strings.IndexByte(k, '_') < 0 {
			continue
		}
		switch n := http.CanonicalHeaderKey(strings.ReplaceAll(k, "_", "-")); n {
		case methodOverrideHeaders[0], methodOverrideHeaders[1], methodOverrideHeaders[2]:
			methodValues(vs)
		case pathOverrideHeaders[0], pathOverrideHeaders[1]:
			pathValues(vs)
		}
	}
	if methods == nil && paths == nil && !unsafePath {
		return none
	}
	return &overrides{methods: methods, paths: paths, unsafePath: unsafePath}
}

// overridePath is the normalized path of a path override: a path, or an absolute URL's
// path, without its query or fragment.
func overridePath(v string) (string, bool) {
	v = strings.TrimSpace(v)
	lower := strings.ToLower(v)
	if strings.HasPrefix(lower, "https://") || strings.HasPrefix(lower, "http://") || strings.HasPrefix(v, "//") {
		rest := v[strings.Index(v, "//")+2:]
		i := strings.IndexAny(rest, "/?#")
		if i < 0 || rest[i] != '/' {
			return "/", true
		}
		v = rest[i:]
	}
	if i := strings.IndexAny(v, "?#"); i >= 0 {
		v = v[:i]
	}
	return NormalizePath(v)
}

// methodsAllowedBy reports whether binding b allows every method override.
func (o *overrides) methodsAllowedBy(b *config.Binding) bool {
	for _, m := range o.methods {
		if !matchMethod(b.Methods, m) {
			return false
		}
	}
	return true
}

func (o *overrides) pathsAllowedBy(b *config.Binding) bool {
	if o.unsafePath {
		return false // even an any-path binding, as for the request's own path
	}
	if b.Paths == nil {
		return true
	}
	for _, p := range o.paths {
		if !matchAnyPath(b.Paths, p) {
			return false
		}
	}
	return true
}

// matchBindings returns the first binding that allows the request, or the most specific
// reason none did: host, then method (its own, then any override), then path (its own,
// then any override).
func matchBindings(s *config.Secret, uid int64, host, method string, o *overrides, path string, pathOK bool) (int, string) {
	reason := ReasonHostNotBound
	for i := range s.Bindings {
		b := &s.Bindings[i]
		if !MatchHost(b.Host, host) {
			continue
		}
		if !matchUID(b.UIDs, uid) {
			if reason == ReasonHostNotBound {
				reason = ReasonUIDNotAllowed
			}
			continue
		}
		if !matchMethod(b.Methods, method) {
			if reason == ReasonHostNotBound || reason == ReasonUIDNotAllowed {
				reason = ReasonMethodNotAllowed
			}
			continue
		}
		if !o.methodsAllowedBy(b) {
			if reason == ReasonHostNotBound || reason == ReasonUIDNotAllowed || reason == ReasonMethodNotAllowed {
				reason = ReasonMethodOverride
			}
			continue
		}
		if b.Paths != nil {
			if !pathOK {
				reason = ReasonPathUnsafe
				continue
			}
			if !matchAnyPath(b.Paths, path) {
				if reason != ReasonPathUnsafe {
					reason = ReasonPathNotAllowed
				}
				continue
			}
		} else if !pathOK {
			// Even an any-path binding refuses a path we cannot read the way the upstream will.
			reason = ReasonPathUnsafe
			continue
		}
		if !o.pathsAllowedBy(b) {
			if reason != ReasonPathUnsafe && reason != ReasonPathNotAllowed {
				reason = ReasonPathOverride
			}
			continue
		}
		return i, ReasonAllowed
	}
	return -1, reason
}

// matchUID: a binding with uids applies only to those users; an unknown caller (-1) never
// matches a restricted binding.
func matchUID(uids []uint32, uid int64) bool {
	if uids == nil {
		return true
	}
	for _, u := range uids {
		if int64(u) == uid {
			return true
		}
	}
	return false
}

func matchMethod(methods []string, m string) bool {
	if methods == nil {
		return true
	}
	for _, x := range methods {
		if x == m { // methods are case-sensitive (RFC 9110 §9.1); "get" is not GET
			return true
		}
	}
	return false
}

func matchAnyPath(globs []string, path string) bool {
	for _, g := range globs {
		if MatchPath(g, path) {
			return true
		}
	}
	return false
}

// NormalizeHost lowercases a host or authority and removes the port and one trailing dot.
// It returns "" for something that is not a host.
func NormalizeHost(h string) string {
	if h == "" {
		return ""
	}
	// A port must be digits: anything else is not a Host a client writes, and an upstream
	// (or Go's Request.Write, which then sends an empty Host) may read it otherwise.
	port := func(p string) bool {
		if p == "" {
			return false
		}
		for i := 0; i < len(p); i++ {
			if p[i] < '0' || p[i] > '9' {
				return false
			}
		}
		return true
	}
	if strings.HasPrefix(h, "[") {
		end := strings.IndexByte(h, ']')
		if end < 0 {
			return ""
		}
		if rest := h[end+1:]; rest != "" && (rest[0] != ':' || !port(rest[1:])) {
			return ""
		}
		// Brackets hold an IPv6 address and nothing else (RFC 3986 IP-literal): a name in
		// them is read as another host by some servers and as this one by others.
		if a, err := netip.ParseAddr(h[1:end]); err != nil || !a.Is6() || a.Zone() != "" {
			return ""
		}
		h = h[1:end]
	} else if i := strings.LastIndexByte(h, ':'); i >= 0 {
		if strings.IndexByte(h[:i], ':') >= 0 {
			// A bare IPv6 literal without brackets; keep as is.
		} else if !port(h[i+1:]) {
			return ""
		} else {
			h = h[:i]
		}
	}
	h = strings.TrimSuffix(strings.ToLower(h), ".")
	if strings.ContainsAny(h, "/@ \t\\%") {
		return ""
	}
	return h
}

// MatchHost reports whether a lowercase pattern ("api.example.com" or "*.example.com")
// covers a normalized host. A wildcard matches exactly one label, never the apex.
func MatchHost(pattern, host string) bool {
	if rest, ok := strings.CutPrefix(pattern, "*."); ok {
		label, parent, found := strings.Cut(host, ".")
		return found && label != "" && parent == rest
	}
	return pattern == host
}

// matchesFormat checks that the header value has the configured shape around the
// placeholder, so only the placeholder bytes are ever replaced and the agent cannot choose
// where the secret lands inside a value. The scheme prefix compares case-insensitively
// because auth schemes are case-insensitive (RFC 9110 §11.1).
func matchesFormat(format, placeholder, value string) bool {
	prefix, suffix, _ := strings.Cut(format, "{secret}")
	value = strings.Trim(value, " \t")
	if len(value) != len(prefix)+len(placeholder)+len(suffix) {
		return false
	}
	return strings.EqualFold(value[:len(prefix)], prefix) &&
		value[len(prefix):len(prefix)+len(placeholder)] == placeholder &&
		value[len(prefix)+len(placeholder):] == suffix
}

// MinValueLen is the shortest value avpd injects: a shorter one could not be told from
// ordinary text when responses are scrubbed for an echo of it, so such a request gets 503
// secret_too_short (the proxy's minScrubLen is this number).
const MinValueLen = 8

// CheckValue computes s's value from vals as a request would and says why avpd would refuse
// to inject it: a byte that cannot go in a header, a template that fails, or a value
// shorter than MinValueLen. The error names the secret, never the value.
func CheckValue(s *config.Secret, vals map[string][]byte) error {
	v, err := Value(s, vals)
	defer clear(v)
	switch {
	case err != nil:
		return err
	case len(v) < MinValueLen:
		return &ShortValueError{Secret: s.Name, Len: len(v)}
	}
	return nil
}

// ShortValueError is CheckValue's error for a value shorter than MinValueLen.
type ShortValueError struct {
	Secret string
	Len    int
}

func (e *ShortValueError) Error() string {
	if e.Len == 0 {
		return fmt.Sprintf("the value of %s is empty", e.Secret)
	}
	return fmt.Sprintf("the value of %s is %d bytes, shorter than %d: too short to scrub from a response that echoes it, so it is never injected", e.Secret, e.Len, MinValueLen)
}

// Value computes what replaces the placeholder: the fetched secret itself, or the rendered
// template over the compose secrets. vals maps each of s.FetchNames() to its value. The
// caller wipes the result.
func Value(s *config.Secret, vals map[string][]byte) ([]byte, error) {
	v, inputs, err := ValueInputs(s, vals)
	for _, in := range inputs {
		clear(in)
	}
	return v, err
}

// ValueInputs is Value that also returns, for a template, copies of what went into its
// encoding filters (b64encode, urlencode), which an upstream may quote decoded and so are
// scrubbed too. The caller wipes them.
func ValueInputs(s *config.Secret, vals map[string][]byte) ([]byte, [][]byte, error) {
	if s.Template != nil {
		return s.Template.RenderInputs(vals)
	}
	v, ok := vals[s.Name]
	if !ok {
		return nil, nil, fmt.Errorf("value of %s is missing", s.Name)
	}
	pv, err := PlainValue(s, v)
	return pv, nil, err
}

// PlainValue is Value for a secret without a template, whose fetched value is v: a copy of
// v, once it is known to fit in a header. It spares the caller Value's map.
func PlainValue(s *config.Secret, v []byte) ([]byte, error) {
	for _, c := range v {
		// A control byte would let a stored value split the header (CR LF) upstream.
		if c < ' ' && c != '\t' || c == 0x7f {
			return nil, fmt.Errorf("value of %s holds a control character and cannot go in a header", s.Name)
		}
		// A byte past ASCII, as a rendered template refuses it: servers read it as Latin-1
		// or UTF-8 and may echo it re-encoded ("Ã©", "\u00e9"), a form the scrubber,
		// which matches byte by byte, would not know.
		if c > '~' {
			return nil, fmt.Errorf("value of %s holds a byte that is not ASCII and cannot go in a header", s.Name)
		}
	}
	return append([]byte(nil), v...), nil
}

// Apply replaces the placeholder of inj's secret with value in each of its headers that
// holds it. Decide has already checked each such header holds exactly one value in the
// configured shape, so nothing but the placeholder bytes changes.
func Apply(h http.Header, s *config.Secret, value []byte) {
	for i := 0; i <= len(s.Also); i++ {
		if t := s.Target(i); firstTarget(s, t.Header) == i {
			apply(h[t.Header], s.Placeholder, value)
		}
	}
}

func apply(vs []string, placeholder string, value []byte) {
	for i, v := range vs {
		v = strings.Trim(v, " \t")
		if j := strings.Index(v, placeholder); j >= 0 {
			// This string is the one copy of the secret that net/http needs; it lives only as
			// long as the outgoing request.
			vs[i] = v[:j] + string(value) + v[j+len(placeholder):]
		}
	}
}

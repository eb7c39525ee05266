// Package template is the sandboxed expression language that composes a header value from
// one to four secrets, for example HTTP Basic auth from an e-mail and an API token:
//
//	{{ (JIRA_EMAIL + ":" + JIRA_TOKEN) | b64encode }}
//
// The grammar has nothing but names declared in compose, string literals, "+", four filters
// and two functions, so there is nothing to escape to: no attribute access, no indexing, no
// calls other than the two hmac functions, no loops, no environment, no files.
//
//	template := ( text | "{{" expr "}}" )*
//	expr     := term ( "+" term )*
//	term     := primary ( "|" filter )*
//	primary  := NAME | STRING | "(" expr ")" | func "(" expr "," expr ")"
//	filter   := "b64encode" | "b64decode" | "urlencode" | "sha256"
//	func     := "hmac_sha256" | "hmac_sha512"
//	STRING   := '"' ( any byte but '"' and '\' | '\"' | '\\' )* '"'   (also with single quotes)
//
// sha256 and the hmac functions yield lowercase hex. Rendering never panics; a value that
// would not be a safe header value (control characters, CR, LF, NUL, non-ASCII) is an error.
package template

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"strings"
)

// MaxSource is the longest template accepted.
const MaxSource = 4096

// maxDepth bounds nesting so a hostile template cannot exhaust the stack.
const maxDepth = 16

// maxOutput bounds a rendered value (header values beyond this are refused upstream anyway).
const maxOutput = 8192

// Template is a parsed, validated template.
type Template struct {
	src   string
	parts []node
	names []string
}

// Names returns the compose names the template reads, in first-use order.
func (t *Template) Names() []string { return t.names }

// String returns the source.
func (t *Template) String() string { return t.src }

// Error is a parse error at a 1-based column of the source.
type Error struct {
	Column int
	Msg    string
}

func (e *Error) Error() string { return fmt.Sprintf("column %d: %s", e.Column, e.Msg) }

type node interface {
	eval(e *env) ([]byte, error)
}

// env is what a render reads (the compose values) and keeps (copies of what went into an
// encoding filter, which an echo of the value may quote decoded).
type env struct {
	vals   map[string][]byte
	inputs [][]byte
}

type text []byte
type name string
type concat []node
type filter struct {
	name string
	arg  node
}
type call struct {
	name     string
	key, msg node
}

func (t text) eval(*env) ([]byte, error) { return append([]byte(nil), t...), nil }

func (n name) eval(e *env) ([]byte, error) {
	v, ok := e.vals[string(n)]
	if !ok {
		return nil, fmt.Errorf("value of %s is missing", string(n))
	}
	return append([]byte(nil), v...), nil
}

func (c concat) eval(e *env) ([]byte, error) {
	var out []byte
	for _, n := range c {
		v, err := n.eval(e)
		if err != nil {
			return nil, err
		}
		out = append(out, v...)
		wipe(v)
		if len(out) > maxOutput {
			return nil, errors.New("rendered value too long")
		}
	}
	return out, nil
}

func (f filter) eval(e *env) ([]byte, error) {
	v, err := f.arg.eval(e)
	if err != nil {
		return nil, err
	}
	defer wipe(v)
	switch f.name {
	case "b64encode", "urlencode":
		// The upstream may decode the credential and quote it ("ops:Tr0ub4d" of a Basic
		// header): what was encoded is scrubbed too.
		e.inputs = append(e.inputs, append([]byte(nil), v...))
		if f.name == "urlencode" {
			return queryEscape(v), nil
		}
		out := make([]byte, base64.StdEncoding.EncodedLen(len(v)))
		base64.StdEncoding.Encode(out, v)
		return out, nil
	case "b64decode":
		out := make([]byte, base64.StdEncoding.DecodedLen(len(v)))
		n, err := base64.StdEncoding.Decode(out, v)
		if err != nil {
			wipe(out) // what was decoded before the error
			// The error would quote an offset into a secret; say only what failed.
			return nil, errors.New("b64decode: input is not valid base64")
		}
		return out[:n], nil
	case "sha256":
		sum := sha256.Sum256(v)
		return hexBytes(sum[:]), nil
	}
	return nil, fmt.Errorf("unknown filter %s", f.name)
}

// queryEscape is url.QueryEscape into a []byte of the caller's: QueryEscape takes and
// returns strings, copies of the secret that could never be wiped.
func queryEscape(v []byte) []byte {
	const hexDigits = "0123456789ABCDEF"
	out := make([]byte, 0, 3*len(v))
	for _, c := range v {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_', c == '.', c == '~':
			out = append(out, c)
		case c == ' ':
			out = append(out, '+')
		default:
			out = append(out, '%', hexDigits[c>>4], hexDigits[c&15])
		}
	}
	return out
}

// hexBytes is b in lower-case hex, as a []byte (hex.EncodeToString would make a string).
func hexBytes(b []byte) []byte {
	out := make([]byte, hex.EncodedLen(len(b)))
	hex.Encode(out, b)
	return out
}

func (c call) eval(e *env) ([]byte, error) {
	k, err := c.key.eval(e)
	if err != nil {
		return nil, err
	}
	defer wipe(k)
	m, err := c.msg.eval(e)
	if err != nil {
		return nil, err
	}
	defer wipe(m)
	var h func() hash.Hash
	switch c.name {
	case "hmac_sha256":
		h = sha256.New
	case "hmac_sha512":
		h = sha512.New
	default:
		return nil, fmt.Errorf("unknown function %s", c.name)
	}
	mac := hmac.New(h, k)
	mac.Write(m)
	return hexBytes(mac.Sum(nil)), nil
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}

var filters = map[string]bool{"b64encode": true, "b64decode": true, "urlencode": true, "sha256": true}
var funcs = map[string]bool{"hmac_sha256": true, "hmac_sha512": true}

// Parse parses src; allowed is the compose list, the only names the template may read.
func Parse(src string, allowed []string) (*Template, error) {
	if len(src) > MaxSource {
		return nil, &Error{Column: MaxSource + 1, Msg: fmt.Sprintf("template is longer than %d bytes", MaxSource)}
	}
	for i := 0; i < len(src); i++ {
		if src[i] < ' ' && src[i] != '\t' || src[i] > '~' {
			return nil, &Error{Column: i + 1, Msg: "only printable ASCII is allowed in a template"}
		}
	}
	p := &parser{src: src, allowed: map[string]bool{}}
	for _, a := range allowed {
		p.allowed[a] = true
	}
	t := &Template{src: src}
	for p.pos < len(src) {
		open := strings.Index(src[p.pos:], "{{")
		closeAt := strings.Index(src[p.pos:], "}}")
		if closeAt >= 0 && (open < 0 || closeAt < open) {
			return nil, p.errAt(p.pos+closeAt, "\"}}\" without a matching \"{{\"")
		}
		if open < 0 {
			t.parts = append(t.parts, text(src[p.pos:]))
			break
		}
		if open > 0 {
			t.parts = append(t.parts, text(src[p.pos:p.pos+open]))
		}
		p.pos += open + 2
		e, err := p.expr(0)
		if err != nil {
			return nil, err
		}
		p.space()
		if !strings.HasPrefix(src[p.pos:], "}}") {
			return nil, p.errAt(p.pos, "expected \"}}\", \"+\" or \"|\"")
		}
		p.pos += 2
		t.parts = append(t.parts, e)
	}
	if len(p.used) == 0 {
		return nil, &Error{Column: 1, Msg: "the template reads no secret; use {{ NAME }} with a name from compose"}
	}
	t.names = p.used
	return t, nil
}

// Render evaluates the template with the compose values. The caller wipes the result.
func (t *Template) Render(vals map[string][]byte) ([]byte, error) {
	out, inputs, err := t.RenderInputs(vals)
	for _, in := range inputs {
		wipe(in)
	}
	return out, err
}

// RenderInputs is Render that also returns copies of what went into b64encode and
// urlencode, which the caller scrubs from responses as it does the result, and wipes.
func (t *Template) RenderInputs(vals map[string][]byte) (out []byte, inputs [][]byte, err error) {
	e := &env{vals: vals}
	defer func() {
		// Rendering is written not to panic; this is the last line of defence, and it never
		// lets a panic message (which could quote a value) escape.
		if r := recover(); r != nil {
			wipe(out)
			for _, in := range e.inputs {
				wipe(in)
			}
			out, inputs, err = nil, nil, errors.New("template render failed")
		}
	}()
	out, err = concat(t.parts).eval(e)
	if err == nil {
		for _, c := range out {
			if c < ' ' && c != '\t' || c > '~' {
				wipe(out)
				out, err = nil, errors.New("rendered value holds a byte that is not allowed in a header value")
				break
			}
		}
	}
	if err != nil {
		for _, in := range e.inputs {
			wipe(in)
		}
		return nil, nil, err
	}
	return out, e.inputs, nil
}

type parser struct {
	src     string
	pos     int
	allowed map[string]bool
	used    []string
}

func (p *parser) errAt(pos int, format string, args ...any) error {
	return &Error{Column: pos + 1, Msg: fmt.Sprintf(format, args...)}
}

func (p *parser) space() {
	for p.pos < len(p.src) && (p.src[p.pos] == ' ' || p.src[p.pos] == '\t') {
		p.pos++
	}
}

func (p *parser) peek(s string) bool {
	p.space()
	return strings.HasPrefix(p.src[p.pos:], s)
}

func (p *parser) expr(depth int) (node, error) {
	if depth > maxDepth {
		return nil, p.errAt(p.pos, "expression nested more than %d deep", maxDepth)
	}
	first, err := p.term(depth)
	if err != nil {
		return nil, err
	}
	parts := concat{first}
	for p.peek("+") {
		p.pos++
		t, err := p.term(depth)
		if err != nil {
			return nil, err
		}
		parts = append(parts, t)
	}
	if len(parts) == 1 {
		return first, nil
	}
	return parts, nil
}

func (p *parser) term(depth int) (node, error) {
	n, err := p.primary(depth)
	if err != nil {
		return nil, err
	}
	for p.peek("|") && !p.peek("||") {
		p.pos++
		p.space()
		start := p.pos
		id := p.ident()
		if !filters[id] {
			if id == "" {
				return nil, p.errAt(start, "expected a filter after \"|\": b64encode, b64decode, urlencode or sha256")
			}
			return nil, p.errAt(start, "unknown filter %q; the filters are b64encode, b64decode, urlencode and sha256", id)
		}
		n = filter{name: id, arg: n}
	}
	return n, nil
}

func (p *parser) ident() string {
	start := p.pos
	for p.pos < len(p.src) {
		c := p.src[p.pos]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || p.pos > start && c >= '0' && c <= '9' {
			p.pos++
			continue
		}
		break
	}
	return p.src[start:p.pos]
}

func (p *parser) primary(depth int) (node, error) {
	p.space()
	if p.pos >= len(p.src) {
		return nil, p.errAt(p.pos, "unexpected end of template; expected a name, a string or \"(\"")
	}
	start := p.pos
	switch c := p.src[p.pos]; {
	case c == '"' || c == '\'':
		return p.str(c)
	case c == '(':
		p.pos++
		e, err := p.expr(depth + 1)
		if err != nil {
			return nil, err
		}
		if !p.peek(")") {
			return nil, p.errAt(p.pos, "expected \")\"")
		}
		p.pos++
		return e, nil
	}
	id := p.ident()
	if id == "" {
		return nil, p.errAt(start, "unexpected %q; expected a name from compose, a string or \"(\"", p.src[start])
	}
	if funcs[id] {
		if !p.peek("(") {
			return nil, p.errAt(p.pos, "%s needs arguments: %s(key, message)", id, id)
		}
		p.pos++
		k, err := p.expr(depth + 1)
		if err != nil {
			return nil, err
		}
		if !p.peek(",") {
			return nil, p.errAt(p.pos, "expected \",\" between the key and the message of %s", id)
		}
		p.pos++
		m, err := p.expr(depth + 1)
		if err != nil {
			return nil, err
		}
		if !p.peek(")") {
			return nil, p.errAt(p.pos, "expected \")\" after the message of %s", id)
		}
		p.pos++
		return call{name: id, key: k, msg: m}, nil
	}
	if filters[id] {
		return nil, p.errAt(start, "%s is a filter; write VALUE | %s", id, id)
	}
	if !p.allowed[id] {
		return nil, p.errAt(start, "%q is not in compose; a template can only read the secrets listed in compose", id)
	}
	if p.pos < len(p.src) && (p.src[p.pos] == '.' || p.src[p.pos] == '[' || p.src[p.pos] == '(') {
		return nil, p.errAt(p.pos, "%q is not allowed after a name: there are no attributes, indexes or calls", p.src[p.pos])
	}
	seen := false
	for _, u := range p.used {
		seen = seen || u == id
	}
	if !seen {
		p.used = append(p.used, id)
	}
	return name(id), nil
}

func (p *parser) str(q byte) (node, error) {
	start := p.pos
	p.pos++
	var b []byte
	for p.pos < len(p.src) {
		c := p.src[p.pos]
		switch {
		case c == q:
			p.pos++
			return text(b), nil
		case c == '\\':
			if p.pos+1 >= len(p.src) || (p.src[p.pos+1] != q && p.src[p.pos+1] != '\\') {
				return nil, p.errAt(p.pos, "only \\%c and \\\\ are escapes in a string", q)
			}
			b = append(b, p.src[p.pos+1])
			p.pos += 2
		default:
			b = append(b, c)
			p.pos++
		}
	}
	return nil, p.errAt(start, "string is not closed")
}

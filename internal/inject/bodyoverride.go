package inject

import (
	"bytes"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"strings"
	"sync"
	"unicode/utf8"
)

// Server frameworks read a method override from the request body too, not only from the
// headers and the query readOverrides sees:
//   - Rack (Rails, Sinatra) takes _method from a form body: urlencoded, multipart, or a POST
//     with no Content-Type at all;
//   - PHP (Laravel, Symfony) from $_POST, whose names it reads with leading spaces dropped
//     and '.' and ' ' turned into '_';
//   - Laravel from a JSON body's top-level keys as well, and Express's method-override from
//     whatever its body parser made of the body.
//
// The body is not there when the request is decided, so a BodyScanner reads it as it goes
// upstream and reports each _method it finds. It reads more generously than any one of
// them (names compared without case, ';' as a separator, any multipart type), because a
// name it misses is an override a binding never allowed.

// UnparsableBodyOverride stands for what a body names when the scanner finds a _method it
// cannot read as one method (an array, a number, an over-long value), or multipart it
// cannot parse; no binding that lists methods allows it.
const UnparsableBodyOverride = "(unreadable body override)"

// UncheckableBody stands for a body the scanner cannot read at all: compressed, two
// Content-Types, a charset other than UTF-8, or a form some servers read as JSON. It names
// no override, but could: no binding that lists methods allows it, and the refusal says
// which it was (ReasonBodyNotCheckable).
const UncheckableBody = "(body that cannot be checked)"

const (
	maxOverrideName  = 64 // a longer name cannot be _method once normalized
	maxOverrideValue = 32 // a longer value is no method a binding lists
)

type bodyMode int

const (
	bodyForm bodyMode = iota + 1
	bodyJSON
	bodyMultipart
	bodyUnreadable
)

// BodyScanner finds the _method overrides in a request body fed to it with Write. Each is
// passed to report (upper-cased, or UnparsableBodyOverride); report returns false to stop
// the scan, and Write and Close then return ErrBodyOverride.
type BodyScanner struct {
	mode     bodyMode
	report   func(method string) bool
	stopped  bool
	reported bool // an unreadable body was reported, once

	form formScans
	json jsonScan
	mp   *multipartScan
}

// ErrBodyOverride is what Write and Close return once report refused a method.
var ErrBodyOverride = errors.New("the request body names a method override the bindings do not allow")

// NewBodyScanner returns a scanner for a body with header h, or nil when its content type is
// none a framework reads an override from (an octet stream, plain text).
func NewBodyScanner(h http.Header, report func(method string) bool) *BodyScanner {
	mode, boundary := bodyModeOf(h)
	if mode == 0 {
		return nil
	}
	s := &BodyScanner{mode: mode, report: report}
	if mode == bodyMultipart {
		s.mp = newMultipartScan(boundary)
	}
	return s
}

// BodyMayOverride reports whether a body with header h is one NewBodyScanner reads.
func BodyMayOverride(h http.Header) bool {
	mode, _ := bodyModeOf(h)
	return mode != 0
}

// bodyModeOf is how a body with header h is read for overrides, and a multipart body's
// boundary; 0 when it is not read.
func bodyModeOf(h http.Header) (bodyMode, string) {
	for _, ce := range h.Values("Content-Encoding") {
		for item := range strings.SplitSeq(ce, ",") {
			if item = strings.TrimSpace(item); item != "" && !strings.EqualFold(item, "identity") {
				// A server may decode it before it parses the form; the scanner cannot.
				return bodyUnreadable, ""
			}
		}
	}
	cts := h.Values("Content-Type")
	if len(cts) > 1 {
		// Two types could be picked differently upstream.
		return bodyUnreadable, ""
	}
	ct := ""
	if len(cts) == 1 {
		ct = cts[0]
	}
	// Leniently: what comes before the first ';' or ',' (Rack), or space (PHP; a tab too).
	mt := strings.ToLower(strings.TrimSpace(ct))
	if i := strings.IndexAny(mt, ";, \t"); i >= 0 {
		mt = strings.TrimSpace(mt[:i])
	}
	// Laravel reads a body as JSON (and its _method with it) when the whole Content-Type
	// contains "/json" or "+json", parameters and all (isJson, in createFromBase).
	laravelJSON := strings.Contains(strings.ToLower(ct), "/json") || strings.Contains(strings.ToLower(ct), "+json")
	switch {
	case laravelJSON && !strings.Contains(mt, "json") && (mt == "" || mt == "application/x-www-form-urlencoded" || strings.HasPrefix(mt, "multipart/")):
		// A form to PHP and JSON to Laravel: two readings, one scan.
		return bodyUnreadable, ""
	case mt == "" || mt == "application/x-www-form-urlencoded":
		return bodyForm, ""
	case strings.HasPrefix(mt, "multipart/"):
		_, params, err := mime.ParseMediaType(ct)
		if err != nil || params["boundary"] == "" || strings.Count(strings.ToLower(ct), "boundary") != 1 {
			// PHP takes the boundary from the first "boundary" anywhere in the header, Rack
			// from the last; with another one there, they may split the body differently.
			return bodyUnreadable, ""
		}
		return bodyMultipart, params["boundary"]
	case strings.Contains(mt, "json") || laravelJSON:
		if !utf8Charset(ct) {
			// Express's JSON parser decodes any utf-* charset (UTF-16, UTF-32, UTF-7)
			// before method-override reads the body; the scanner reads UTF-8's bytes only.
			return bodyUnreadable, ""
		}
		return bodyJSON, ""
	}
	return 0, ""
}

// utf8Charset reports whether content type ct names no charset other than UTF-8 (or its
// subset ASCII). Its parameters are read leniently: any parameter whose name starts with
// "charset" (charset*=, a second charset) must name UTF-8, or the body counts as another
// encoding.
func utf8Charset(ct string) bool {
	_, params, ok := strings.Cut(ct, ";")
	if !ok {
		return true
	}
	for p := range strings.SplitSeq(params, ";") {
		name, value, _ := strings.Cut(p, "=")
		name = strings.ToLower(strings.TrimSpace(name))
		if !strings.HasPrefix(name, "charset") {
			continue
		}
		value = strings.Trim(strings.TrimSpace(value), `"`)
		if name != "charset" {
			return false
		}
		switch strings.ToLower(strings.TrimSpace(value)) {
		case "utf-8", "utf8", "us-ascii":
		default:
			return false
		}
	}
	return true
}

// Write scans the next bytes of the body.
func (s *BodyScanner) Write(p []byte) (int, error) {
	if s.stopped {
		return 0, ErrBodyOverride
	}
	switch s.mode {
	case bodyUnreadable:
		s.unreadable()
	case bodyForm:
		s.form.scan(p, s.found)
	case bodyJSON:
		s.json.scan(p, s.found)
	case bodyMultipart:
		if !s.mp.write(p) {
			s.found(UnparsableBodyOverride)
		}
		for _, m := range s.mp.take() {
			s.found(m)
		}
	}
	if s.stopped {
		return 0, ErrBodyOverride
	}
	return len(p), nil
}

// Close ends the body: an override its last bytes complete is reported now.
func (s *BodyScanner) Close() error {
	if !s.stopped {
		switch s.mode {
		case bodyUnreadable:
			s.unreadable()
		case bodyForm:
			s.form.end(s.found)
		case bodyJSON:
			s.json.end(s.found)
		case bodyMultipart:
			ok, methods := s.mp.close()
			for _, m := range methods {
				s.found(m)
			}
			if !ok {
				s.found(UnparsableBodyOverride)
			}
		}
	}
	if s.stopped {
		return ErrBodyOverride
	}
	return nil
}

// Settled reports that nothing more in the body can be an override (a JSON body that is
// not one object): the rest need not be scanned, nor its end held back. An interactive
// stream (gRPC or Connect with a JSON codec) would wait forever for a held-back end.
func (s *BodyScanner) Settled() bool {
	return s.mode == bodyJSON && s.json.settled && !s.stopped
}

// BodyMaySettle reports whether a body with header h can be settled (see Settled) by its
// first bytes: whether it is read as JSON.
func BodyMaySettle(h http.Header) bool {
	mode, _ := bodyModeOf(h)
	return mode == bodyJSON
}

// BodySettledBy reports whether a JSON body that starts with prefix is settled by those
// bytes alone (BodyMaySettle says which bodies are JSON).
func BodySettledBy(prefix []byte) bool {
	_, settled := jsonStart(prefix)
	return settled
}

// Abort ends a scan whose body will not be read to its end.
func (s *BodyScanner) Abort() {
	if s.mp != nil {
		s.mp.abort()
	}
}

func (s *BodyScanner) unreadable() {
	if !s.reported {
		s.reported = true
		s.found(UncheckableBody)
	}
}

func (s *BodyScanner) found(m string) {
	if !s.stopped && !s.report(m) {
		s.stopped = true
		s.Abort()
	}
}

// isOverrideName reports whether a decoded form, JSON or multipart name is _method as
// some framework reads it: PHP drops leading spaces and turns '.' and ' ' into '_'. A
// name that goes on with '[' is an array of them, which no framework takes as a method
// but which is reported (as unparsable) rather than guessed at.
func isOverrideName(name []byte) (match, array bool) {
	name = bytes.TrimLeft(name, " ")
	const want = "_method"
	if len(name) < len(want) {
		return false, false
	}
	for i := 0; i < len(want); i++ {
		c := name[i]
		if c == '.' || c == ' ' || i == 0 && c == '[' && bytes.IndexByte(name, ']') < 0 {
			// PHP makes '.' and ' ' '_', and an unmatched '[' too ("[method" is _method).
			c = '_'
		}
		if c|0x20 != want[i]|0x20 {
			return false, false
		}
	}
	switch {
	case len(name) == len(want):
		return true, false
	case name[len(want)] == 0:
		// PHP ends a name at its first NUL ("_method%00x" is _method to it).
		return true, false
	case name[len(want)] == '[':
		return true, true
	}
	return false, false
}

// overrideValue is the method a decoded value names, upper-cased as frameworks compare it,
// or "" for an empty one (which no framework acts on).
func overrideValue(v []byte, overflow bool) string {
	if overflow {
		return UnparsableBodyOverride
	}
	t := strings.TrimSpace(string(v))
	if !utf8.ValidString(t) {
		return UnparsableBodyOverride
	}
	return strings.ToUpper(t)
}

// formScans reads a form both ways servers split it: on '&' and ';' (older Rack), and on '&'
// alone (PHP, whose names and values keep a ';'). The second reports only pairs that held a
// ';', so a pair read alike both ways is reported once: ".method\x00;=DELETE" is no
// _method to the first and _method=DELETE to PHP.
type formScans struct {
	rack formScan
	php  formScan
}

func (f *formScans) scan(p []byte, found func(string)) {
	f.php.phpOnly = true
	f.rack.scan(p, found)
	f.php.scan(p, found)
}

func (f *formScans) end(found func(string)) {
	f.php.phpOnly = true
	f.rack.end(found)
	f.php.end(found)
}

// formScan reads application/x-www-form-urlencoded: name=value pairs split by '&' (and ';',
// which older Rack split on too, unless phpOnly), '+' and %XX decoded.
type formScan struct {
	// phpOnly splits on '&' alone and reports only a pair that held a ';' (sawSemi).
	phpOnly, sawSemi bool
	inValue          bool
	name, value      []byte
	valueOver        bool
	pct              int // 0, or 1-2 after '%' and that many hex digits
	pctHi            byte
	pctRaw           [2]byte
	nameStarted      bool // a byte other than a leading space was seen
	matchedArray     bool
	matched          bool
}

func (f *formScan) scan(p []byte, found func(string)) {
	for i := 0; i < len(p); i++ {
		if f.inValue && !f.matched {
			// A value nobody reads: skip to the next separator.
			k := indexEither(p[i:], '&', ';')
			if f.phpOnly {
				k = bytes.IndexByte(p[i:], '&')
			}
			if k < 0 {
				return
			}
			i += k
			f.pct = 0
		}
		c := p[i]
		if c == ';' && f.phpOnly {
			f.sawSemi = true
		}
		switch {
		case c == '&' || c == ';' && !f.phpOnly:
			f.flushPct()
			f.endPair(found)
		case c == '=' && !f.inValue:
			f.flushPct()
			f.inValue = true
			// A name over maxOverrideName keeps its first bytes, all isOverrideName reads
			// of a name that is not exactly _method.
			f.matched, f.matchedArray = isOverrideName(f.name)
		case f.pct == 0 && c == '%':
			f.pct = 1
		case f.pct == 1:
			if h, ok := unhex(c); ok {
				f.pctHi, f.pctRaw[0], f.pct = h, c, 2
			} else {
				f.pct = 0
				f.add('%')
				f.add(c)
			}
		case f.pct == 2:
			f.pct = 0
			if h, ok := unhex(c); ok {
				f.add(f.pctHi<<4 | h)
			} else {
				f.add('%')
				f.add(f.pctRaw[0])
				f.add(c)
			}
		case c == '+':
			f.add(' ')
		default:
			f.add(c)
		}
	}
}

// flushPct writes out an incomplete %-escape as the literal bytes it was.
func (f *formScan) flushPct() {
	switch f.pct {
	case 1:
		f.add('%')
	case 2:
		f.add('%')
		f.add(f.pctRaw[0])
	}
	f.pct = 0
}

func (f *formScan) add(c byte) {
	if !f.inValue {
		if !f.nameStarted && c == ' ' {
			return // PHP drops leading spaces, however many
		}
		f.nameStarted = true
		if len(f.name) < maxOverrideName {
			f.name = append(f.name, c)
		}
		return
	}
	if !f.matched {
		return
	}
	if len(f.value) < maxOverrideValue {
		f.value = append(f.value, c)
	} else {
		f.valueOver = true
	}
}

func (f *formScan) endPair(found func(string)) {
	if !f.inValue {
		// A name without '=': Rack and PHP read it as an empty value, which overrides nothing,
		// but "_method[]" is still an array.
		f.matched, f.matchedArray = isOverrideName(f.name)
		if !f.matchedArray {
			f.matched = false
		}
	}
	switch {
	case f.phpOnly && !f.sawSemi:
		// Read alike on '&' and ';': the other scan has reported it.
	case f.matched && f.matchedArray:
		found(UnparsableBodyOverride)
	case f.matched:
		if m := overrideValue(f.value, f.valueOver); m != "" {
			found(m)
		}
	}
	*f = formScan{name: f.name[:0], value: f.value[:0], phpOnly: f.phpOnly}
}

func (f *formScan) end(found func(string)) {
	f.flushPct()
	f.endPair(found)
}

// indexEither is the index of the first a or b in p, or -1: two IndexByte calls, which are
// vectorized, where a loop over the bytes of a long prompt is not.
func indexEither(p []byte, a, b byte) int {
	k := bytes.IndexByte(p, a)
	if k < 0 {
		k = len(p)
	}
	if j := bytes.IndexByte(p[:k], b); j >= 0 {
		return j
	}
	if k == len(p) {
		return -1
	}
	return k
}

// jsonScan reads the keys of top-level JSON objects (Laravel reads _method from those) and
// skips everything else; it is lenient, and never fails: a body no JSON parser accepts
// overrides nothing there.
type jsonScan struct {
	depth     int
	topObject bool // the value at depth 1 is an object
	expectKey bool // the next string at depth 1 is a key
	inString  bool
	isKey     bool // the string being read is a top-level key
	isValue   bool // the string being read is a matched key's value
	esc       int  // 0; 1 after '\\'; 2-5 reading \u's hex digits
	u         rune
	buf       []byte
	over      bool
	// afterKey is set from a matched key until its value starts.
	afterKey bool
	// started is set at the first byte other than white space (or a UTF-8 BOM's); settled
	// when that byte is not '{'.
	started, settled bool
}

// jsonStart reports how a JSON body's first bytes p decide it: decided once a byte other
// than white space or a BOM's is there, and settled when that byte is not '{'. Laravel's
// json_decode and Express's body parser read one value from the whole body: one that is
// not an object has no _method key, and an enveloped stream (gRPC or Connect with a JSON
// codec, whose frames start with a flag byte) no JSON at all.
func jsonStart(p []byte) (decided, settled bool) {
	for _, c := range p {
		switch c {
		case ' ', '\t', '\r', '\n', 0xEF, 0xBB, 0xBF:
			continue
		}
		return true, c != '{'
	}
	return false, false
}

func (j *jsonScan) scan(p []byte, found func(string)) {
	if !j.started {
		decided, settled := jsonStart(p)
		if !decided {
			return
		}
		j.started, j.settled = true, settled
	}
	if j.settled {
		return
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		if j.inString {
			if !j.isKey && !j.isValue && j.esc == 0 {
				// Most of a body is string contents nobody reads (a prompt): skip to the
				// next quote or backslash.
				k := indexEither(p[i:], '"', '\\')
				if k < 0 {
					return
				}
				i += k
				c = p[i]
			}
			j.stringByte(c, found)
			continue
		}
		if j.afterKey {
			switch c {
			case ' ', '\t', '\r', '\n', ':':
				continue
			case '"':
				j.afterKey = false
				j.startString(false, true)
				continue
			default:
				// A number, object, array, true, false or null: not a method.
				j.afterKey = false
				found(UnparsableBodyOverride)
			}
		}
		switch c {
		case '"':
			j.startString(j.depth == 1 && j.topObject && j.expectKey, false)
		case '{', '[':
			j.depth++
			if j.depth == 1 {
				j.topObject = c == '{'
				j.expectKey = j.topObject
			}
		case '}', ']':
			if j.depth > 0 {
				j.depth--
			}
		case ',':
			if j.depth == 1 && j.topObject {
				j.expectKey = true
			}
		case ':':
			if j.depth == 1 {
				j.expectKey = false
			}
		}
	}
}

func (j *jsonScan) startString(key, value bool) {
	j.inString, j.isKey, j.isValue = true, key, value
	j.esc, j.buf, j.over = 0, j.buf[:0], false
	if key {
		j.expectKey = false
	}
}

func (j *jsonScan) stringByte(c byte, found func(string)) {
	switch {
	case j.esc == 1:
		j.esc = 0
		switch c {
		case 'u':
			j.esc, j.u = 2, 0
		case 'b':
			j.add('\b')
		case 'f':
			j.add('\f')
		case 'n':
			j.add('\n')
		case 'r':
			j.add('\r')
		case 't':
			j.add('\t')
		default:
			j.add(c) // \" \\ \/ and anything a lenient parser keeps as is
		}
	case j.esc >= 2:
		h, ok := unhex(c)
		if !ok {
			j.esc = 0
			j.add(c)
			return
		}
		j.u = j.u<<4 | rune(h)
		if j.esc++; j.esc == 6 {
			j.esc = 0
			var b [utf8.UTFMax]byte
			n := utf8.EncodeRune(b[:], j.u)
			for _, x := range b[:n] {
				j.add(x)
			}
		}
	case c == '\\':
		j.esc = 1
	case c == '"':
		j.inString = false
		switch {
		case j.isKey:
			match, array := false, false
			if !j.over {
				match, array = isOverrideName(j.buf)
			}
			// PHP's json_decode keeps the key as it is ("_method[]" is just a key), so only
			// an exact name counts here.
			if match && !array {
				j.afterKey = true
			}
		case j.isValue:
			if m := overrideValue(j.buf, j.over); m != "" {
				found(m)
			}
		}
	default:
		j.add(c)
	}
}

func (j *jsonScan) add(c byte) {
	if !j.isKey && !j.isValue {
		return
	}
	limit := maxOverrideName
	if j.isValue {
		limit = maxOverrideValue
	}
	if len(j.buf) < limit {
		j.buf = append(j.buf, c)
	} else {
		j.over = true
	}
}

func (j *jsonScan) end(found func(string)) {
	if j.afterKey || (j.inString && j.isValue) {
		// The body ended inside a matched key's value.
		found(UnparsableBodyOverride)
	}
}

// multipartScan parses a multipart body with mime/multipart in a goroutine of its own, fed
// through a pipe, and collects the values of parts named _method. The parser is strict: a
// body it cannot parse is unreadable, which fails the scan rather than risk a parser
// upstream that reads it differently. Its findings may come a little after the bytes that
// hold them were written: close waits for all of them, and the caller holds back the
// body's end until then.
type multipartScan struct {
	pw   *io.PipeWriter
	done chan struct{}
	// delims counts "--boundary" in the raw body, as fed.
	delims delimCounter

	mu      sync.Mutex
	methods []string // found and not yet taken
	count   int
	parts   int  // parts mime/multipart read
	ok      bool // set before done is closed
}

// delimCounter counts the occurrences of pat in a stream fed to it in pieces.
type delimCounter struct {
	pat   []byte
	tail  []byte // the last len(pat)-1 bytes fed
	joint []byte // scratch: the tail and the start of the next piece
	n     int
}

func (d *delimCounter) feed(p []byte) {
	k := len(d.pat) - 1
	if len(d.tail) > 0 {
		// Occurrences that start in the tail and end in p.
		d.joint = append(append(d.joint[:0], d.tail...), p[:min(len(p), k)]...)
		for i := range d.tail {
			if bytes.HasPrefix(d.joint[i:], d.pat) {
				d.n++
			}
		}
	}
	for i := 0; ; {
		j := bytes.Index(p[i:], d.pat)
		if j < 0 {
			break
		}
		d.n++
		i += j + 1
	}
	if len(p) >= k {
		d.tail = append(d.tail[:0], p[len(p)-k:]...)
	} else {
		d.tail = append(d.tail, p...)
		d.tail = d.tail[len(d.tail)-min(len(d.tail), k):]
	}
}

// maxMultipartOverrides bounds what one body can make the scanner hold; past it the body is
// unreadable.
const maxMultipartOverrides = 8

func newMultipartScan(boundary string) *multipartScan {
	pr, pw := io.Pipe()
	m := &multipartScan{pw: pw, done: make(chan struct{}), delims: delimCounter{pat: []byte("--" + boundary)}}
	go func() {
		defer close(m.done)
		parts, ok := parseMultipart(multipart.NewReader(pr, boundary), m.add)
		m.mu.Lock()
		m.parts, m.ok = parts, ok
		m.mu.Unlock()
		// What is left unread (an epilogue, or the rest after an error) is drained, so the
		// writer never blocks.
		io.Copy(io.Discard, pr)
	}()
	return m
}

func (m *multipartScan) add(v string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.count++
	switch {
	case m.count <= maxMultipartOverrides:
		m.methods = append(m.methods, v)
	case m.count == maxMultipartOverrides+1:
		m.methods = append(m.methods, UnparsableBodyOverride)
	}
}

// parseMultipart reads every part and passes on the _method values; it returns how many
// parts it read, and false when the body is not well-formed multipart.
func parseMultipart(r *multipart.Reader, found func(string)) (int, bool) {
	for parts := 0; ; parts++ {
		p, err := r.NextRawPart()
		if err == io.EOF {
			return parts, true
		}
		if err != nil {
			return parts, false
		}
		matched, array, readable := false, false, true
		for _, cd := range p.Header.Values("Content-Disposition") {
			for _, n := range rackNames(cd) {
				if m, a := isOverrideName([]byte(n)); m {
					matched, array = true, array || a
				}
			}
			_, params, err := mime.ParseMediaType(cd)
			if err != nil {
				// Read leniently: a name this parser cannot read may still be _method to
				// another one.
				if strings.Contains(strings.ToLower(cd), "method") {
					readable = false
				}
				continue
			}
			if m, a := isOverrideName([]byte(params["name"])); m {
				matched, array = true, array || a
			}
		}
		switch {
		case !readable || (matched && array):
			found(UnparsableBodyOverride)
		case matched:
			v, err := io.ReadAll(io.LimitReader(p, maxOverrideValue+1))
			if err != nil {
				return parts, false
			}
			found(overrideValue(v, len(v) > maxOverrideValue))
		}
		if _, err := io.Copy(io.Discard, p); err != nil {
			return parts, false
		}
	}
}

// rackNames returns every name Rack's multipart parser could read from a
// Content-Disposition value: it takes what follows a "; name=" (the last one, found with a
// regular expression, even inside another parameter's quoted value) as a quoted string or a
// token. Each one is returned, so the last is among them whichever Rack picks.
func rackNames(cd string) []string {
	var out []string
	lower := strings.ToLower(cd)
	for i := 0; ; {
		j := strings.Index(lower[i:], "name=")
		if j < 0 {
			return out
		}
		at := i + j
		i = at + len("name=")
		k := at - 1
		for k >= 0 && (lower[k] == ' ' || lower[k] == '\t') {
			k--
		}
		if k < 0 || lower[k] != ';' {
			continue // "filename=", or a name= Rack's expression does not take
		}
		v := cd[i:]
		if strings.HasPrefix(v, `"`) {
			end := 1
			for end < len(v) && (v[end] != '"' || v[end-1] == '\\') {
				end++
			}
			out = append(out, v[1:end])
			continue
		}
		end := strings.IndexAny(v, " \t()<>,;:\\\"/[]?=")
		if end < 0 {
			end = len(v)
		}
		out = append(out, v[:end])
	}
}

// write feeds p to the parser; false when it can no longer be fed.
func (m *multipartScan) write(p []byte) bool {
	m.delims.feed(p)
	_, err := m.pw.Write(p)
	return err == nil
}

// take returns the values found since the last take.
func (m *multipartScan) take() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.methods
	m.methods = nil
	return v
}

// close ends the body and waits for the parser's verdict. A well-formed body holds
// "--boundary" once per delimiter: once before each part and once to close. One more
// anywhere (in a part, before the first, after the last) is where another parser may see a
// part mime/multipart did not: PHP ends a part at "\n--boundary" even in a CRLF body, and
// reads on after the closing delimiter.
func (m *multipartScan) close() (ok bool, methods []string) {
	m.pw.Close()
	<-m.done
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ok && m.delims.n == m.parts+1, m.methods
}

// abort stops the parser; its goroutine ends once it sees the pipe closed.
func (m *multipartScan) abort() {
	m.pw.CloseWithError(ErrBodyOverride)
}

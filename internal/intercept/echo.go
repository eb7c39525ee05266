package intercept

import "bytes"

// An upstream that echoes the credential inside a document writes it the way that document
// escapes it: a JSON string, a URL, an HTML or XML page. Encoders disagree on which bytes
// they escape and how: PHP writes '/' as "\/", .NET's System.Text.Json '+' as "\u002B", Go's
// html/template '+' as "&#43;", mustache.js '=' as "&#x3D;", Symfony mixes "\/" with
// "\u0026". A list of whole forms misses the mixtures, so a value with such bytes is matched
// byte by byte instead: each of its bytes other than letters, digits and "-_.~" (which no
// encoder in use escapes) may be written
//   - as itself;
//   - as JSON or JavaScript escape it: "\c", "\uXXXX", "\xXX", and "\n" "\r" "\t" "\b" "\f"
//     for those controls;
//   - percent-encoded, "%XX", and a space as '+';
//   - as an HTML or XML character reference: "&#N;", "&#xH;", or a named one ("&amp;",
//     "&sol;", "&equals;" ...);
// hex digits and the 'x' in either case, with any mixture along the value. A typical API key
// has no such byte and is matched as it is, at the cost of one search.

// plainByte reports whether c is matched only as itself.
func plainByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '_' || c == '.' || c == '~'
}

// escapable reports whether a real value is matched with escapes: it holds a byte that an
// echo could escape.
func escapable(v []byte) bool {
	for _, c := range v {
		if !plainByte(c) {
			return true
		}
	}
	return false
}

// namedRefs are HTML's named character references of the ASCII bytes encoders escape.
var namedRefs = map[string]byte{
	"excl": '!', "quot": '"', "QUOT": '"', "num": '#', "dollar": '$', "percnt": '%',
	"amp": '&', "AMP": '&', "apos": '\'', "lpar": '(', "rpar": ')', "ast": '*', "midast": '*',
	"plus": '+', "comma": ',', "period": '.', "sol": '/', "colon": ':', "semi": ';',
	"lt": '<', "LT": '<', "equals": '=', "gt": '>', "GT": '>', "quest": '?', "commat": '@',
	"lsqb": '[', "lbrack": '[', "bsol": '\\', "rsqb": ']', "rbrack": ']', "Hat": '^',
	"lowbar": '_', "UnderBar": '_', "grave": '`', "DiacriticalGrave": '`', "lcub": '{',
	"lbrace": '{', "verbar": '|', "vert": '|', "VerticalLine": '|', "rcub": '}', "rbrace": '}',
	"Tab": '\t', "NewLine": '\n',
}

const maxRefName = len("DiacriticalGrave")

// maxRefDigits bounds a numeric reference's digits, leading zeros included; maxEscape is
// the longest escape of one byte matched ("&DiacriticalGrave;").
const (
	maxRefDigits = 8
	maxEscape    = max(len("&#x;")+maxRefDigits, len("&;")+maxRefName)
)

func hexVal(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// hexAt reads n hex digits at d; partial when d ends before them, all read so far valid.
func hexAt(d []byte, n int) (v int, ok, partial bool) {
	for k := range n {
		if k >= len(d) {
			return 0, false, true
		}
		h, good := hexVal(d[k])
		if !good {
			return 0, false, false
		}
		v = v<<4 | int(h)
	}
	return v, true, false
}

// escapedAt looks at d for byte c: lit is whether d starts with c itself, n the length of an
// escape of c that d starts with (0 for none), and partial whether d ends inside what could
// still be one.
func escapedAt(d []byte, c byte) (lit bool, n int, partial bool) {
	if len(d) == 0 {
		return false, 0, true
	}
	lit = d[0] == c
	switch d[0] {
	case '+':
		if c == ' ' {
			return lit, 1, false
		}
	case '%':
		v, ok, part := hexAt(d[1:], 2)
		if ok && v == int(c) {
			return lit, 3, false
		}
		return lit, 0, part
	case '\\':
		if len(d) < 2 {
			return lit, 0, true
		}
		switch d[1] {
		case 'u':
			v, ok, part := hexAt(d[2:], 4)
			if ok && v == int(c) {
				return lit, 6, false
			}
			return lit, 0, part
		case 'x':
			v, ok, part := hexAt(d[2:], 2)
			if ok && v == int(c) {
				return lit, 4, false
			}
			return lit, 0, part
		case 'n', 'r', 't', 'b', 'f':
			if c == jsonControl(d[1]) {
				return lit, 2, false
			}
		default:
			if d[1] == c && !plainByte(c) {
				return lit, 2, false // "\/", "\"", "\\", JavaScript's "\'" or "\="
			}
		}
	case '&':
		n, part := refAt(d, c)
		return lit, n, part
	}
	return lit, 0, false
}

// jsonControl is the control byte JSON's escape "\\"+e writes.
func jsonControl(e byte) byte {
	switch e {
	case 'n':
		return '\n'
	case 'r':
		return '\r'
	case 't':
		return '\t'
	case 'b':
		return '\b'
	}
	return '\f'
}

// refAt is the length of the character reference of c that d starts with ("&#43;",
// "&#x2B;", "&plus;"), or 0; partial when d ends inside what could still be one.
func refAt(d []byte, c byte) (int, bool) {
	if len(d) < 2 {
		return 0, true
	}
	if d[1] != '#' {
		// A named reference: letters, then ';'.
		for k := 1; k < len(d) && k <= maxRefName+1; k++ {
			switch b := d[k]; {
			case b == ';':
				if k > 1 && namedRefs[string(d[1:k])] == c {
					return k + 1, false
				}
				return 0, false
			case 'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z':
			default:
				return 0, false
			}
		}
		// d ends inside the name: partial if it could still become one of c's.
		for name, b := range namedRefs {
			if b == c && len(d)-1 <= len(name) && name[:len(d)-1] == string(d[1:]) {
				return 0, true
			}
		}
		return 0, false
	}
	start, base := 2, 10
	if len(d) > 2 && (d[2] == 'x' || d[2] == 'X') {
		start, base = 3, 16
	}
	v := 0
	for k := start; k < len(d); k++ {
		if d[k] == ';' {
			if k > start && v == int(c) {
				return k + 1, false
			}
			return 0, false
		}
		h, ok := hexVal(d[k])
		if !ok || int(h) >= base || k-start >= maxRefDigits {
			return 0, false
		}
		v = v*base + int(h)
	}
	return 0, true
}

// matchEscaped returns the end of v written at d, each byte as itself or escaped, or -1;
// partial reports that d ended where v could still be going on.
func matchEscaped(d []byte, v []byte) (end int, partial bool) {
	m := escMatch{d: d, v: v}
	return m.from(0, 0)
}

// escMatch matches one value at one place. A byte that is both itself and the start of its
// own escape ('%' as "%25", '&' as "&amp;", '\\' as "\\\\") is tried both ways; the escape
// tries that failed are remembered, so a value with many such bytes costs at most the
// product of the two lengths, not two to the power of their count.
type escMatch struct {
	d, v   []byte
	failed map[[2]int]bool // (i, j) tried and failed: whether it was partial
}

func (m *escMatch) from(i, j int) (end int, partial bool) {
	d, v := m.d, m.v
	for ; j < len(v); j++ {
		if i >= len(d) {
			return -1, true
		}
		c := v[j]
		if plainByte(c) {
			if d[i] != c {
				return -1, partial
			}
			i++
			continue
		}
		lit, n, part := escapedAt(d[i:], c)
		partial = partial || part
		switch {
		case lit && n > 0:
			key := [2]int{i + n, j + 1}
			if p, seen := m.failed[key]; seen {
				partial = partial || p
			} else if e, p := m.from(i+n, j+1); e >= 0 {
				return e, false
			} else {
				if m.failed == nil {
					m.failed = map[[2]int]bool{}
				}
				m.failed[key] = p
				partial = partial || p
			}
			i++ // the literal reading
		case n > 0:
			i += n
		case lit:
			i++
		default:
			return -1, partial
		}
	}
	return i, false
}

// startsEscaped reports whether a match of v could start at d[0]: its first byte, or an
// escape of it.
func startsEscaped(d []byte, v []byte) bool {
	switch d[0] {
	case v[0]:
		return true
	case '%', '\\', '&', '+':
		return !plainByte(v[0])
	}
	return false
}

// nextEscaped finds the first match of v in d: start and end, or -1.
func nextEscaped(d []byte, v []byte) (start, end int) {
	if plainByte(v[0]) {
		// Letters and digits are never escaped: look for the plain run v starts with.
		k := 1
		for k < len(v) && plainByte(v[k]) {
			k++
		}
		anchor := v[:k]
		for at := 0; ; {
			i := bytes.Index(d[at:], anchor)
			if i < 0 {
				return -1, -1
			}
			i += at
			if e, _ := matchEscaped(d[i:], v); e >= 0 {
				return i, i + e
			}
			at = i + 1
		}
	}
	for i := range d {
		if startsEscaped(d[i:], v) {
			if e, _ := matchEscaped(d[i:], v); e >= 0 {
				return i, i + e
			}
		}
	}
	return -1, -1
}

// replaceEscaped replaces every match of r's value, escaped or not, with its placeholder;
// b itself comes back when there is none.
func replaceEscaped(b []byte, r replacement) ([]byte, bool) {
	s, e := nextEscaped(b, r.from)
	if s < 0 {
		return b, false
	}
	out := make([]byte, 0, len(b))
	for s >= 0 {
		out = append(append(out, b[:s]...), r.to...)
		b = b[e:]
		s, e = nextEscaped(b, r.from)
	}
	return append(out, b...), true
}

// partialEscaped is the length of the longest suffix of d that could begin an escaped
// match of v (a proper one: a whole match would have been replaced).
func partialEscaped(d []byte, v []byte) int {
	for s := max(0, len(d)-len(v)*maxEscape); s < len(d); s++ {
		if !startsEscaped(d[s:], v) {
			continue
		}
		if e, p := matchEscaped(d[s:], v); e < 0 && p {
			return len(d) - s
		}
	}
	return 0
}

package inject

import "strings"

// NormalizePath turns the escaped request-target path into the path an upstream will most
// plausibly serve, for matching against binding globs (I4). The rule:
//
//  1. The path must start with "/" (so "*" and absolute forms never match).
//  2. Percent-escapes of unreserved characters (A-Z a-z 0-9 - . _ ~) are decoded; other
//     escapes are kept with upper-case hex digits.
//  3. A segment that holds an encoded "/" (%2F), "\" (%5C), NUL (%00) or a literal "\"
//     makes the path unsafe: servers disagree on whether those separate segments.
//  4. A segment that is "." or "..", as written or after decoding (for example "%2e%2e"),
//     makes the path unsafe: some servers resolve it, some (chi, a bare net/http handler,
//     Express) route on the path as sent, and either reading must not widen a match.
//  5. Empty segments ("//") are dropped.
//  6. A segment that is "." or ".." before a ";" (path parameters, "..;x") makes the path
//     unsafe: some servers strip the parameters and then resolve the dot segment.
//  7. A trailing "/" is kept.
//
// ok is false when the path is unsafe; such a request never gets injection.
func NormalizePath(raw string) (path string, ok bool) {
	if !strings.HasPrefix(raw, "/") || len(raw) > 8192 {
		return "", false
	}
	if isNormal(raw) {
		return raw, true // the common case, without allocating
	}
	segs := strings.Split(raw[1:], "/")
	out := make([]string, 0, len(segs))
	trailing := strings.HasSuffix(raw, "/")
	for _, seg := range segs {
		if strings.IndexByte(seg, '\\') >= 0 || hasControl(seg) {
			// A control byte cannot come from a request line (the HTTP parsers refuse it),
			// but a path override header is read here too.
			return "", false
		}
		dec, good := decodeSegment(seg)
		if !good || strings.Contains(dec, "%25") && unsafeDecodedAgain(dec) {
			return "", false
		}
		// Servers such as Tomcat strip ";params" from a segment before resolving dot
		// segments, so "..;x" is ".." to them: unsafe rather than a literal name.
		if base, _, found := strings.Cut(dec, ";"); found && (base == "." || base == "..") {
			return "", false
		}
		switch dec {
		case "":
			continue
		case ".", "..":
			// Unsafe even as written: servers that route on the path as sent (chi, a bare
			// net/http handler, Express) never resolve it, so "/v1/admin/../chat" would
			// be matched as /v1/chat and served as /v1/admin/..; and Tomcat strips a
			// ";params" segment before resolving, so "/v1/;/../admin" is /admin to it.
			// Clients remove dot segments before sending (RFC 3986, 5.2.4: curl,
			// browsers, urllib3, Node's URL), so none is expected. Encoded ("%2e%2e"),
			// it is unsafe all the more.
			return "", false
		}
		out = append(out, dec)
	}
	p := "/" + strings.Join(out, "/")
	if trailing && len(out) > 0 {
		p += "/"
	}
	return p, true
}

// isNormal reports whether NormalizePath would return raw unchanged: no escape, no
// backslash, no empty segment but a trailing one, and no segment starting with "." (which
// covers dot segments and "..;x"). raw starts with "/".
func isNormal(raw string) bool {
	for i := 1; i < len(raw); i++ {
		switch c := raw[i]; c {
		case '%', '\\':
			return false
		case '/', '.':
			if raw[i-1] == '/' {
				return false
			}
		default:
			if isControl(c) {
				return false // a control byte, which NormalizePath refuses
			}
		}
	}
	return true
}

func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if isControl(s[i]) {
			return true
		}
	}
	return false
}

func isControl(c byte) bool { return c < 0x20 || c == 0x7f }

func isUnreserved(c byte) bool {
	return c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' ||
		c == '-' || c == '.' || c == '_' || c == '~'
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// decodeSegment applies rule 2 and 3 to one segment.
func decodeSegment(seg string) (dec string, ok bool) {
	if strings.IndexByte(seg, '%') < 0 {
		return seg, true
	}
	var b strings.Builder
	b.Grow(len(seg))
	for i := 0; i < len(seg); i++ {
		c := seg[i]
		if c != '%' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(seg) {
			return "", false
		}
		hi, ok1 := unhex(seg[i+1])
		lo, ok2 := unhex(seg[i+2])
		if !ok1 || !ok2 {
			return "", false
		}
		v := hi<<4 | lo
		switch {
		case v == '/' || v == '\\' || v == 0:
			return "", false
		case isUnreserved(v):
			b.WriteByte(v)
		default:
			b.WriteByte('%')
			b.WriteString(strings.ToUpper(seg[i+1 : i+3]))
		}
		i += 2
	}
	return b.String(), true
}

// unsafeDecodedAgain reports whether a decoded segment that still holds an escaped '%'
// becomes unsafe when decoded again, however many times, as a server or an application
// that decodes twice does: a '/', '\\' or NUL, or a dot segment ("%252e%252e" is ".." to
// it). A segment that still changes after eight more decodings is unsafe as well.
func unsafeDecodedAgain(seg string) bool {
	for range 8 {
		next, changed := decodeAll(seg)
		if !changed {
			return false
		}
		if strings.ContainsAny(next, "/\\\x00") {
			return true
		}
		if base, _, _ := strings.Cut(next, ";"); base == "." || base == ".." {
			return true
		}
		seg = next
	}
	return true
}

// decodeAll decodes every well-formed %XX escape in s, and reports whether there was one.
func decodeAll(s string) (string, bool) {
	if strings.IndexByte(s, '%') < 0 {
		return s, false
	}
	var b strings.Builder
	changed := false
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			hi, ok1 := unhex(s[i+1])
			lo, ok2 := unhex(s[i+2])
			if ok1 && ok2 {
				b.WriteByte(hi<<4 | lo)
				i += 2
				changed = true
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String(), changed
}

// MatchPath matches a normalized path against a glob: "*" matches any run of characters
// within one segment, "**" as a whole segment matches zero or more segments. A trailing
// slash on the path is ignored for matching.
func MatchPath(glob, path string) bool {
	return matchSegs(strings.Trim(glob, "/"), strings.Trim(path, "/"))
}

func splitPath(s string) []string {
	s = strings.Trim(s, "/")
	if s == "" {
		return nil
	}
	return strings.Split(s, "/")
}

// matchSegs matches "/"-separated segments given as strings ("" is no segment), walking
// them in place so the decision allocates nothing per binding.
func matchSegs(g, p string) bool {
	for g != "" {
		gs, grest, _ := strings.Cut(g, "/")
		if gs == "**" {
			for {
				if matchSegs(grest, p) {
					return true
				}
				if p == "" {
					return false
				}
				_, p, _ = strings.Cut(p, "/")
			}
		}
		if p == "" {
			return false
		}
		ps, prest, _ := strings.Cut(p, "/")
		if !matchSeg(gs, ps) {
			return false
		}
		g, p = grest, prest
	}
	return p == ""
}

// matchSeg matches one segment with "*" wildcards (greedy with backtracking over stars only,
// which is linear enough for the short globs a config holds).
func matchSeg(g, s string) bool {
	star, mark := -1, 0
	i, j := 0, 0
	for j < len(s) {
		switch {
		case i < len(g) && g[i] == '*':
			star, mark = i, j
			i++
		case i < len(g) && g[i] == s[j]:
			i++
			j++
		case star >= 0:
			i = star + 1
			mark++
			j = mark
		default:
			return false
		}
	}
	for i < len(g) && g[i] == '*' {
		i++
	}
	return i == len(g)
}

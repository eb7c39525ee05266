package intercept

import "strings"

// The checks net/http's server applies to a parsed request, kept here because the
// golang.org/x/net package that has them pulls in golang.org/x/text for IDNA.

// validHostHeader accepts the bytes a Host header can hold (RFC 3986 host and port), as
// net/http's server does.
func validHostHeader(h string) bool {
	for i := 0; i < len(h); i++ {
		c := h[i]
		ok := c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' ||
			strings.IndexByte("!$%&()*+,-.:;=[']_~", c) >= 0
		if !ok {
			return false
		}
	}
	return true
}

// validHeaderFieldName reports whether k is an RFC 9110 token.
func validHeaderFieldName(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if !isTokenByte(k[i]) {
			return false
		}
	}
	return true
}

func isTokenByte(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' ||
		strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// validHeaderFieldValue rejects control bytes other than horizontal tab.
func validHeaderFieldValue(v string) bool {
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// headerValuesContainToken reports whether a comma-separated header lists token
// (case-insensitively), as in "Connection: keep-alive, Upgrade".
func headerValuesContainToken(values []string, token string) bool {
	for _, v := range values {
		for part := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.Trim(part, " \t"), token) {
				return true
			}
		}
	}
	return false
}

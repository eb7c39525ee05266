package bws

import (
	"encoding/base64"
	"net/url"
	"regexp"
	"strconv"
	"strings"
)

// sdk-go errors are plain strings built from the server's answer. Some quote the whole raw
// response body (which can hold the bearer JWT, or anything a proxy reflected, including
// the access token), and serde messages quote the values they could not parse. So an SDK
// error never leaves the helper as is: Scrub maps it to a fixed sentence that keeps only
// what an operator needs (the HTTP status, the host that could not be reached, which check
// failed), and Redactor removes the token's parts and anything shaped like a credential
// from whatever text is left.

// Redactor removes one access token's parts, and JWTs and EncStrings, from text.
type Redactor struct {
	needles []string
}

var (
	reJWT       = regexp.MustCompile(`eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.?[A-Za-z0-9_-]*`)
	reEncString = regexp.MustCompile(`\b[0-9]\.[A-Za-z0-9+/=]{8,}\|[A-Za-z0-9+/=|]*`)
	// reLongToken is used on free text (the helper's stderr): any long run of token
	// characters is treated as a possible credential.
	reLongToken = regexp.MustCompile(`[A-Za-z0-9+/=_\-.~]{24,}`)
)

// NewRedactor prepares to remove token, its client secret, its key (with and without
// padding) and its id.
func NewRedactor(token string) *Redactor {
	r := &Redactor{}
	add := func(s string) {
		if len(s) >= 6 {
			r.needles = append(r.needles, s)
		}
	}
	add(token)
	left, key, _ := strings.Cut(token, ":")
	add(key)
	add(strings.TrimRight(key, "="))
	if k, err := base64.StdEncoding.DecodeString(key); err == nil {
		add(base64.RawURLEncoding.EncodeToString(k))
		add(url.QueryEscape(key))
	}
	parts := strings.Split(left, ".")
	for _, p := range parts[min(1, len(parts)):] {
		add(p)
		add(url.QueryEscape(p))
	}
	return r
}

// Redact replaces the token's parts, JWTs and EncStrings in s.
func (r *Redactor) Redact(s string) string {
	if r != nil {
		for _, n := range r.needles {
			s = strings.ReplaceAll(s, n, "[REDACTED]")
		}
	}
	s = reJWT.ReplaceAllString(s, "[REDACTED-JWT]")
	s = reEncString.ReplaceAllString(s, "[REDACTED-ENCSTRING]")
	return s
}

// RedactFreeText is Redact plus the removal of every long token-like run, for text whose
// shape nobody controls (the SDK's own log lines and panic messages).
func (r *Redactor) RedactFreeText(s string) string {
	s = reLongToken.ReplaceAllString(r.Redact(s), "[REDACTED]")
	if len(s) > 400 {
		s = s[:400] + "..."
	}
	return s
}

var (
	reStatus      = regexp.MustCompile(`Received error message from server: \[(\d{3})([A-Za-z '\-]{0,40})\]`)
	reSendURL     = regexp.MustCompile(`error sending request for url \(([^)\s]+)\)`)
	reSafePrefix  = regexp.MustCompile(`^[A-Za-z][A-Za-z ,'\-]{0,79}$`)
	tokenFormatOK = []string{
		"Doesn't contain a decryption key", "Has the wrong number of parts", "Is the wrong version",
		"Has an invalid identifier", "Invalid base64 length",
	}
)

// Scrub turns a raw sdk-go error into a sentence that quotes nothing from the server, and
// returns the HTTP status when the SDK reported one.
func Scrub(raw string, r *Redactor) (msg string, status int) {
	s := strings.TrimPrefix(raw, "API error: ")
	switch {
	case strings.Contains(s, "Access token is not in a valid format"):
		msg = "the access token is not in the BWS format 0.<id>.<secret>:<key>"
		for _, reason := range tokenFormatOK {
			if strings.Contains(s, reason) {
				msg += " (" + strings.ToLower(reason[:1]) + reason[1:] + ")"
				break
			}
		}
	case reStatus.MatchString(s):
		m := reStatus.FindStringSubmatch(s)
		status, _ = strconv.Atoi(m[1])
		msg = "BWS answered HTTP " + strings.TrimSpace(m[1]+m[2]) + " (response body withheld)"
		switch status {
		case 200:
			msg = "BWS answered HTTP 200 with a body the SDK could not read (body withheld)"
			status = 0
		case 401, 403:
			msg += "; the machine account may have lost access"
		case 404:
			msg += "; not found"
		}
	case reSendURL.MatchString(s):
		u, err := url.Parse(reSendURL.FindStringSubmatch(s)[1])
		where := "the BWS server"
		if err == nil && u.Host != "" {
			where = u.Scheme + "://" + u.Host
		}
		msg = "cannot reach " + where + " (connection refused, DNS, TLS or proxy error)"
	case strings.Contains(s, "Error parsing Identity response"):
		msg = "the identity server refused the login: the access token is wrong, expired or revoked"
	case strings.Contains(s, "MAC doesn't match"), strings.Contains(s, "Cryptography error"):
		msg = "decryption failed: the access token does not match the organization's key (wrong or revoked token?)"
	case strings.Contains(s, "UUID parsing failed"):
		msg = "a secret id is not a UUID"
	case strings.Contains(s, "missing a required field"), strings.Contains(s, "invalid type"),
		strings.Contains(s, "EncString error"), strings.Contains(s, "premature end"),
		strings.Contains(s, "Invalid padding"), strings.Contains(s, "expected"),
		strings.Contains(s, "unmarshal"), strings.Contains(s, "EOF while parsing"):
		msg = "BWS sent a response the SDK could not read (details withheld)"
	default:
		first, _, _ := strings.Cut(s, ":")
		first = strings.TrimSpace(first)
		if reSafePrefix.MatchString(first) {
			msg = "BWS SDK error: " + first + " (details withheld)"
		} else {
			msg = "BWS SDK error (details withheld: they may quote the server's response)"
		}
	}
	return r.Redact(msg), status
}

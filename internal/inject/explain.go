package inject

import (
	"fmt"
	"strings"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
)

// Explain runs Decide and describes the outcome for an operator: the decision, the reason,
// and for every secret whose placeholder was found, which binding allowed it or why none
// did. It never prints a header value or a placeholder.
func (p *Policy) Explain(f Facts, r Request) string {
	var b strings.Builder
	bound := p.Bound(f.SNI)
	uid := "unknown (bindings limited to uids never match)"
	if f.UID >= 0 {
		uid = fmt.Sprint(f.UID)
	}
	fmt.Fprintf(&b, "request:  %s https://%s%s (sni %s, uid %s)\n", r.Method, r.Authority, r.RawPath, f.SNI, uid)
	if !bound {
		fmt.Fprintf(&b, "decision: passthrough\nreason:   no binding covers %q; the connection is spliced to the real server untouched\n", NormalizeHost(f.SNI))
		return b.String()
	}
	d := p.Decide(f, r)
	fmt.Fprintf(&b, "decision: %s\n", d.Action)
	if d.Action == Refuse {
		fmt.Fprintf(&b, "status:   %d\n", d.Status)
	}
	fmt.Fprintf(&b, "reason:   %s\n", d.Reason)
	if d.Path != "" {
		fmt.Fprintf(&b, "path:     %s (normalized, matched against paths)\n", d.Path)
	} else if d.Action != Refuse {
		fmt.Fprintf(&b, "path:     cannot be normalized safely; no injection on this path\n")
	}
	for _, in := range d.Injections {
		bd := in.Secret.Bindings[in.Binding]
		fmt.Fprintf(&b, "inject:   %s into %s, allowed by binding %d (%s) at %s\n", in.Secret.Name, headerList(in.Secret), in.Binding, bindingSummary(bd.Host, bd.Methods, bd.Paths), bd.Pos)
	}
	for _, dn := range d.Denials {
		fmt.Fprintf(&b, "verbatim: %s: %s\n", dn.Secret.Name, denialText(dn.Reason, headerList(dn.Secret)))
	}
	return b.String()
}

// headerList names the headers a secret is replaced in ("X-Api-Key or Authorization").
func headerList(s *config.Secret) string {
	h := s.Header
	for i, a := range s.Also {
		if firstTarget(s, a.Header) == i+1 {
			h += " or " + a.Header
		}
	}
	return h
}

func bindingSummary(host string, methods, paths []string) string {
	m, p := "any method", "any path"
	if methods != nil {
		m = strings.Join(methods, ",")
	}
	if paths != nil {
		p = strings.Join(paths, " ")
	}
	return fmt.Sprintf("host %s, %s, %s", host, m, p)
}

func denialText(reason, header string) string {
	switch reason {
	case ReasonHostNotBound:
		return "no binding of this secret covers the host"
	case ReasonUIDNotAllowed:
		return "the bindings for this host are limited to other uids"
	case ReasonMethodNotAllowed:
		return "the bindings for this host do not allow the method"
	case ReasonMethodOverride:
		return "the request names another method (X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override, a _method query parameter, or a _method in a form, multipart or JSON body) that the bindings for this host do not allow"
	case ReasonPathOverride:
		return "the request names another path (X-Original-URL or X-Rewrite-URL) that no path glob of the bindings for this host matches, or that cannot be normalized safely"
	case ReasonPathNotAllowed:
		return "no path glob of the bindings for this host matches"
	case ReasonPathUnsafe:
		return "the path cannot be normalized safely (encoded slash or dot, '..' above the root, ...)"
	case ReasonFormatMismatch:
		return "the " + header + " value does not have the configured format around the placeholder"
	case ReasonWrongHeader:
		return "the placeholder is outside its configured header " + header + " and is never replaced there"
	case ReasonPlaceholderInURL:
		return "the placeholder is in the URL (query or path), where avpd never injects: the client must send the key in a header (Google's APIs take it as x-goog-api-key), listed under inject or inject.also"
	}
	return reason
}

// ExplainInput builds the facts and request for Explain from what an operator types: a
// method, an https URL, "Name: value" headers and a uid (-1 for unknown). The SNI is the
// URL's host, as a client would send it.
func ExplainInput(uid int64, method, rawURL string, headers []string) (Facts, Request, error) {
	rest, ok := strings.CutPrefix(rawURL, "https://")
	if !ok {
		return Facts{}, Request{}, fmt.Errorf("URL %q must start with https:// (avpd only intercepts TLS on port 443)", rawURL)
	}
	authority, target := rest, "/"
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority, target = rest[:i], rest[i:]
	}
	if i := strings.IndexByte(target, '#'); i >= 0 {
		target = target[:i]
	}
	if !strings.HasPrefix(target, "/") {
		target = "/" + target
	}
	rawPath, rawQuery, _ := strings.Cut(target, "?")
	if authority == "" {
		return Facts{}, Request{}, fmt.Errorf("URL %q has no host", rawURL)
	}
	h := make(map[string][]string)
	req := Request{Method: method, Authority: authority, RawPath: rawPath, RawQuery: rawQuery, Header: h}
	for _, hv := range headers {
		name, value, ok := strings.Cut(hv, ":")
		if !ok || strings.TrimSpace(name) == "" {
			return Facts{}, Request{}, fmt.Errorf("header %q must be \"Name: value\"", hv)
		}
		if strings.EqualFold(strings.TrimSpace(name), "Host") {
			// As in net/http, Host is the authority, not a header.
			req.Authority = strings.TrimSpace(value)
			continue
		}
		req.Header.Add(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	return Facts{UID: uid, SNI: NormalizeHost(authority)}, req, nil
}

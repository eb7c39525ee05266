package inject

import (
	"net/http"
	"strings"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
)

const testConfig = `version: 1
backend: {type: file, file: {path: /etc/avp/secrets.yaml}}
secrets:
  OPENAI:
    placeholder: sk-avp-PLACEHOLDER-openai-000000000000
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings:
      - host: api.openai.com
        methods: [POST, GET]
        paths: ["/v1/**"]
  ANTHROPIC:
    placeholder: sk-avp-PLACEHOLDER-anthropic-0000000000
    inject:
      header: x-api-key
      also: [{header: Authorization, format: "Bearer {secret}"}]
    bindings:
      - host: api.anthropic.com
  GITHUB:
    placeholder: ghp_avpPLACEHOLDERgithub00000000000000
    inject:
      header: Authorization
      format: "token {secret}"
      also: [{header: Authorization, format: "Bearer {secret}"}]
    bindings:
      - host: "*.github.com"
        methods: [GET]
        paths: ["/repos/*/issues", "/user"]
`

const (
	phOpenAI    = "sk-avp-PLACEHOLDER-openai-000000000000"
	phAnthropic = "sk-avp-PLACEHOLDER-anthropic-0000000000"
	phGitHub    = "ghp_avpPLACEHOLDERgithub00000000000000"
)

func testPolicy(t testing.TB) *Policy {
	t.Helper()
	cfg, err := config.Parse("bindings.yaml", []byte(testConfig))
	if err != nil {
		t.Fatal(err)
	}
	return NewPolicy(cfg)
}

func req(method, authority, path string, hdr ...string) Request {
	h := http.Header{}
	for i := 0; i+1 < len(hdr); i += 2 {
		h.Add(hdr[i], hdr[i+1])
	}
	p, q, _ := cut(path, "?")
	return Request{Method: method, Authority: authority, RawPath: p, RawQuery: q, Header: h}
}

func cut(s, sep string) (string, string, bool) {
	for i := 0; i+len(sep) <= len(s); i++ {
		if s[i:i+len(sep)] == sep {
			return s[:i], s[i+len(sep):], true
		}
	}
	return s, "", false
}

func TestDecide(t *testing.T) {
	p := testPolicy(t)
	bearer := "Bearer " + phOpenAI
	tests := []struct {
		name    string
		sni     string
		r       Request
		action  Action
		status  int
		reason  string
		secrets []string
	}{
		{"allowed POST in glob", "api.openai.com", req("POST", "api.openai.com", "/v1/chat/completions", "Authorization", bearer), Inject, 0, ReasonAllowed, []string{"OPENAI"}},
		{"I3 host mismatch gets 421", "api.openai.com", req("POST", "evil.example.com", "/v1/chat", "Authorization", bearer), Refuse, 421, ReasonHostMismatch, nil},
		{"I3 host with port, trailing dot, upper case is the same host", "api.openai.com", req("POST", "API.OpenAI.com.:443", "/v1/x", "Authorization", bearer), Inject, 0, ReasonAllowed, []string{"OPENAI"}},
		{"I3 empty SNI never injects", "", req("POST", "api.openai.com", "/v1/x", "Authorization", bearer), Refuse, 421, ReasonHostMismatch, nil},
		{"wrong method forwarded verbatim", "api.openai.com", req("DELETE", "api.openai.com", "/v1/files/1", "Authorization", bearer), ForwardVerbatim, 0, ReasonMethodNotAllowed, nil},
		{"lower-case method is not the upper-case one", "api.openai.com", req("post", "api.openai.com", "/v1/x", "Authorization", bearer), ForwardVerbatim, 0, ReasonMethodNotAllowed, nil},
		{"path outside glob forwarded verbatim", "api.openai.com", req("GET", "api.openai.com", "/admin", "Authorization", bearer), ForwardVerbatim, 0, ReasonPathNotAllowed, nil},
		{"I4 dot-dot is unsafe", "api.openai.com", req("GET", "api.openai.com", "/v1/../admin", "Authorization", bearer), ForwardVerbatim, 0, ReasonPathUnsafe, nil},
		// Resolved, it is /v1/chat/completions; chi or a bare net/http handler route it as
		// sent, under /v1/admin.
		{"I4 dot-dot back into the glob is unsafe", "api.openai.com", req("GET", "api.openai.com", "/v1/admin/keys/../../chat/completions", "Authorization", bearer), ForwardVerbatim, 0, ReasonPathUnsafe, nil},
		// Tomcat strips ";" before resolving: /v1//../admin/keys, then /admin/keys.
		{"I4 dot-dot after a parameters-only segment is unsafe", "api.openai.com", req("GET", "api.openai.com", "/v1/;x=1/../admin/keys", "Authorization", bearer), ForwardVerbatim, 0, ReasonPathUnsafe, nil},
		{"I4 dot is unsafe", "api.openai.com", req("GET", "api.openai.com", "/v1/./models", "Authorization", bearer), ForwardVerbatim, 0, ReasonPathUnsafe, nil},
		{"I4 a name that starts with a dot is a name", "api.openai.com", req("GET", "api.openai.com", "/v1/.well-known/x..y", "Authorization", bearer), Inject, 0, ReasonAllowed, []string{"OPENAI"}},
		{"I4 encoded dot-dot is unsafe", "api.openai.com", req("GET", "api.openai.com", "/v1/%2e%2e/admin", "Authorization", bearer), ForwardVerbatim, 0, ReasonPathUnsafe, nil},
		{"I4 double slash collapses", "api.openai.com", req("GET", "api.openai.com", "//admin", "Authorization", bearer), ForwardVerbatim, 0, ReasonPathNotAllowed, nil},
		{"I4 double slash inside the glob still matches", "api.openai.com", req("GET", "api.openai.com", "/v1//models", "Authorization", bearer), Inject, 0, ReasonAllowed, []string{"OPENAI"}},
		{"I4 encoded slash is unsafe", "api.openai.com", req("GET", "api.openai.com", "/v1/x%2Fy", "Authorization", bearer), ForwardVerbatim, 0, ReasonPathUnsafe, nil},
		{"I4 encoded unreserved decodes into the glob", "api.openai.com", req("GET", "api.openai.com", "/%761/models", "Authorization", bearer), Inject, 0, ReasonAllowed, []string{"OPENAI"}},
		{"query is not part of the path", "api.openai.com", req("GET", "api.openai.com", "/v1/models?x=/admin", "Authorization", bearer), Inject, 0, ReasonAllowed, []string{"OPENAI"}},
		{"host bound to a different secret", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "Authorization", bearer), ForwardVerbatim, 0, ReasonHostNotBound, nil},
		{"no placeholder", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "Authorization", "Bearer sk-mine"), ForwardVerbatim, 0, ReasonNoPlaceholder, nil},
		{"I11 placeholder in another header is not replaced", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "X-Other", bearer), ForwardVerbatim, 0, ReasonWrongHeader, nil},
		{"I11 placeholder in the query is not replaced", "api.openai.com", req("GET", "api.openai.com", "/v1/models?key="+phOpenAI), ForwardVerbatim, 0, ReasonPlaceholderInURL, nil},
		{"I11 placeholder in the path is not replaced", "api.openai.com", req("GET", "api.openai.com", "/v1/keys/"+phOpenAI), ForwardVerbatim, 0, ReasonPlaceholderInURL, nil},
		{"format mismatch is forwarded verbatim", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "Authorization", "Basic "+phOpenAI), ForwardVerbatim, 0, ReasonFormatMismatch, nil},
		{"auth scheme is case-insensitive", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "Authorization", "bearer "+phOpenAI), Inject, 0, ReasonAllowed, []string{"OPENAI"}},
		{"extra bytes around the placeholder do not match the format", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "Authorization", bearer+"x"), ForwardVerbatim, 0, ReasonFormatMismatch, nil},
		{"two placeholders in one header get 400", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "Authorization", bearer+" "+phGitHub), Refuse, 400, ReasonMultiplePlaceholder, nil},
		{"the inject header twice gets 400", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "Authorization", bearer, "Authorization", bearer), Refuse, 400, ReasonRepeatedHeader, nil},
		// One copy with the placeholder and one without: the upstream may join them, or
		// take either.
		{"the inject header twice, once with the placeholder, gets 400", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "Authorization", bearer, "Authorization", "Bearer mine"), Refuse, 400, ReasonRepeatedHeader, nil},
		{"the inject header twice, the placeholder second, gets 400", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "Authorization", "Bearer mine", "Authorization", bearer), Refuse, 400, ReasonRepeatedHeader, nil},
		{"anthropic any method any path", "api.anthropic.com", req("PATCH", "api.anthropic.com", "/anything", "X-Api-Key", phAnthropic), Inject, 0, ReasonAllowed, []string{"ANTHROPIC"}},
		{"any-path binding still refuses an unsafe path", "api.anthropic.com", req("GET", "api.anthropic.com", "/a/%2e%2e/b", "X-Api-Key", phAnthropic), ForwardVerbatim, 0, ReasonPathUnsafe, nil},
		{"wildcard matches one label", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub), Inject, 0, ReasonAllowed, []string{"GITHUB"}},
		{"wildcard never matches the apex", "github.com", req("GET", "github.com", "/user", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonHostNotBound, nil},
		{"wildcard never matches two labels", "a.b.github.com", req("GET", "a.b.github.com", "/user", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonHostNotBound, nil},
		{"single star stays within a segment", "api.github.com", req("GET", "api.github.com", "/repos/o/r/issues", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonPathNotAllowed, nil},
		{"single star matches one segment", "api.github.com", req("GET", "api.github.com", "/repos/o/issues", "Authorization", "token "+phGitHub), Inject, 0, ReasonAllowed, []string{"GITHUB"}},
		{"also: the placeholder in the alternative header injects", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "Authorization", "Bearer "+phAnthropic), Inject, 0, ReasonAllowed, []string{"ANTHROPIC"}},
		{"also: in both of its headers injects once", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "X-Api-Key", phAnthropic, "Authorization", "Bearer "+phAnthropic), Inject, 0, ReasonAllowed, []string{"ANTHROPIC"}},
		{"also: the alternative's format is checked", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "Authorization", "Basic "+phAnthropic), ForwardVerbatim, 0, ReasonFormatMismatch, nil},
		{"also: one header in the wrong format fails the secret", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "X-Api-Key", phAnthropic, "Authorization", "Basic "+phAnthropic), ForwardVerbatim, 0, ReasonFormatMismatch, nil},
		{"also: the alternative header twice gets 400", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "Authorization", "Bearer "+phAnthropic, "Authorization", "Bearer "+phAnthropic), Refuse, 400, ReasonRepeatedHeader, nil},
		{"also: a header not listed is still the wrong header", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "X-Other", phAnthropic), ForwardVerbatim, 0, ReasonWrongHeader, nil},
		{"also: the alternative header on an unbound host", "api.openai.com", req("POST", "api.openai.com", "/v1/chat", "Authorization", "Bearer "+phAnthropic), ForwardVerbatim, 0, ReasonHostNotBound, nil},
		{"also: the same header in its other format injects", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "Bearer "+phGitHub), Inject, 0, ReasonAllowed, []string{"GITHUB"}},
		{"also: the same header in neither format is verbatim", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "Basic "+phGitHub), ForwardVerbatim, 0, ReasonFormatMismatch, nil},
		{"also: the same header twice is still refused", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "Bearer "+phGitHub, "Authorization", "token "+phGitHub), Refuse, 400, ReasonRepeatedHeader, nil},
		{"method override to a method the binding lacks is verbatim", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-HTTP-Method-Override", "DELETE"), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"method override in lower case is read as upstreams read it", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-Http-Method-Override", "delete"), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"an override header spelt with underscores is an override (Puma and Unicorn read it as one)", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X_HTTP_METHOD_OVERRIDE", "DELETE"), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"an override header with some underscores is an override", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "x-http_method-override", "DELETE"), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"a path override header spelt with underscores is a path override", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X_Original_URL", "/admin"), ForwardVerbatim, 0, ReasonPathOverride, nil},
		{"a header with underscores that is no override changes nothing", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X_Request_Id", "abc"), Inject, 0, ReasonAllowed, []string{"GITHUB"}},
		{"X-HTTP-Method is an override too", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-HTTP-Method", "PATCH"), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"X-Method-Override is an override too", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-Method-Override", "PUT"), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"one allowed and one forbidden override value is verbatim", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-HTTP-Method-Override", "GET", "X-HTTP-Method-Override", "DELETE"), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"a list in one override value is read item by item", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-HTTP-Method-Override", "GET, DELETE"), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"_method in the query is an override", "api.github.com", req("GET", "api.github.com", "/user?_method=DELETE", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"an escaped _method in the query is an override", "api.github.com", req("GET", "api.github.com", "/user?a=1&%5Fmethod=delete", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"_method in the query is read as PHP reads names: '.' for '_'", "api.github.com", req("GET", "api.github.com", "/user?.method=DELETE", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"_method in the query is read as PHP reads names: leading spaces dropped", "api.github.com", req("GET", "api.github.com", "/user?+_method=DELETE", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"_method in the query is read as PHP reads names: an unmatched '[' for '_'", "api.github.com", req("GET", "api.github.com", "/user?[method=DELETE", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"_method in the query is read as PHP reads names: cut at NUL", "api.github.com", req("GET", "api.github.com", "/user?_method%00x=DELETE", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"_method in the query with an escaped letter is an override", "api.github.com", req("GET", "api.github.com", "/user?_m%65thod=DELETE", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		// PHP's $_GET splits on '&' alone: the name is ".method\x00;", cut at the NUL.
		{"_method in the query with a ';' PHP keeps is an override", "api.github.com", req("GET", "api.github.com", "/user?.method%00;=DELETE", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"_method in the query after a ';' is an override", "api.github.com", req("GET", "api.github.com", "/user?a=1;_method=DELETE", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"an allowed _method in the query injects", "api.github.com", req("GET", "api.github.com", "/user?_method=get&a=%zz", "Authorization", "token "+phGitHub), Inject, 0, ReasonAllowed, []string{"GITHUB"}},
		{"_method in the query of X-Original-URL is an override", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-Original-URL", "/user?_method=DELETE"), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"a query that cannot be parsed and names a method fails closed", "api.github.com", req("GET", "api.github.com", "/user?_method=%zz", "Authorization", "token "+phGitHub), ForwardVerbatim, 0, ReasonMethodOverride, nil},
		{"method override to an allowed method injects", "api.openai.com", req("GET", "api.openai.com", "/v1/models", "Authorization", bearer, "X-HTTP-Method-Override", "POST"), Inject, 0, ReasonAllowed, []string{"OPENAI"}},
		{"an empty override is no override", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-HTTP-Method-Override", ""), Inject, 0, ReasonAllowed, []string{"GITHUB"}},
		{"method override on an any-method binding injects", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "X-Api-Key", phAnthropic, "X-HTTP-Method-Override", "DELETE"), Inject, 0, ReasonAllowed, []string{"ANTHROPIC"}},
		{"a query word that only contains method is not an override", "api.github.com", req("GET", "api.github.com", "/user?payment_method=card", "Authorization", "token "+phGitHub), Inject, 0, ReasonAllowed, []string{"GITHUB"}},
		{"the method itself is still checked first", "api.github.com", req("DELETE", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-HTTP-Method-Override", "GET"), ForwardVerbatim, 0, ReasonMethodNotAllowed, nil},
		{"X-Original-URL outside the path globs is verbatim", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-Original-URL", "/admin/keys"), ForwardVerbatim, 0, ReasonPathOverride, nil},
		{"X-Rewrite-URL outside the path globs is verbatim", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-Rewrite-URL", "/admin?x=1"), ForwardVerbatim, 0, ReasonPathOverride, nil},
		{"X-Original-URL as an absolute URL is read by its path", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-Original-URL", "https://api.github.com/admin"), ForwardVerbatim, 0, ReasonPathOverride, nil},
		{"an unsafe X-Original-URL is verbatim", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-Original-URL", "/user/%2e%2e/admin"), ForwardVerbatim, 0, ReasonPathOverride, nil},
		{"X-Original-URL inside the path globs injects", "api.github.com", req("GET", "api.github.com", "/user", "Authorization", "token "+phGitHub, "X-Original-URL", "/repos/o/issues?state=open"), Inject, 0, ReasonAllowed, []string{"GITHUB"}},
		{"X-Original-URL with an any-path binding still must be safe", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "X-Api-Key", phAnthropic, "X-Original-URL", "/a/%2e%2e/b"), ForwardVerbatim, 0, ReasonPathOverride, nil},
		{"X-Original-URL with an any-path binding injects", "api.anthropic.com", req("POST", "api.anthropic.com", "/v1/messages", "X-Api-Key", phAnthropic, "X-Original-URL", "/v1/other"), Inject, 0, ReasonAllowed, []string{"ANTHROPIC"}},
		{"two secrets in their own headers both inject", "api.anthropic.com", req("GET", "api.anthropic.com", "/x", "X-Api-Key", phAnthropic, "Authorization", "token "+phGitHub), Inject, 0, ReasonAllowed, []string{"ANTHROPIC"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := p.Decide(Facts{UID: 1000, SNI: tc.sni}, tc.r)
			if d.Action != tc.action || d.Status != tc.status || d.Reason != tc.reason {
				t.Fatalf("got %v/%d/%s, want %v/%d/%s", d.Action, d.Status, d.Reason, tc.action, tc.status, tc.reason)
			}
			var got []string
			for _, in := range d.Injections {
				got = append(got, in.Secret.Name)
			}
			if len(got) != len(tc.secrets) {
				t.Fatalf("injections %v, want %v", got, tc.secrets)
			}
			for i := range got {
				if got[i] != tc.secrets[i] {
					t.Fatalf("injections %v, want %v", got, tc.secrets)
				}
			}
		})
	}
}

func TestApplyReplacesOnlyThePlaceholder(t *testing.T) {
	p := testPolicy(t)
	h := http.Header{}
	h.Set("Authorization", "bearer "+phOpenAI)
	h.Set("X-Other", phOpenAI)
	r := Request{Method: "GET", Authority: "api.openai.com", RawPath: "/v1/models", Header: h}
	d := p.Decide(Facts{SNI: "api.openai.com"}, r)
	if d.Action != Inject {
		t.Fatalf("decision %v", d.Action)
	}
	Apply(h, d.Injections[0].Secret, []byte("sk-real"))
	if got := h.Get("Authorization"); got != "bearer sk-real" {
		t.Fatalf("Authorization = %q", got)
	}
	if got := h.Get("X-Other"); got != phOpenAI {
		t.Fatalf("X-Other changed to %q", got)
	}
}

// TestApplyAlso: a secret that may arrive in more than one header is replaced in each
// header that holds it, and nowhere else.
func TestApplyAlso(t *testing.T) {
	p := testPolicy(t)
	h := http.Header{}
	h.Set("X-Api-Key", phAnthropic)
	h.Set("Authorization", "Bearer "+phAnthropic)
	h.Set("X-Other", "x")
	r := Request{Method: "POST", Authority: "api.anthropic.com", RawPath: "/v1/messages", Header: h}
	d := p.Decide(Facts{SNI: "api.anthropic.com"}, r)
	if d.Action != Inject || len(d.Injections) != 1 {
		t.Fatalf("decision %v %+v", d.Action, d.Injections)
	}
	Apply(h, d.Injections[0].Secret, []byte("sk-real"))
	if h.Get("X-Api-Key") != "sk-real" || h.Get("Authorization") != "Bearer sk-real" || h.Get("X-Other") != "x" {
		t.Fatalf("headers after Apply: %v", h)
	}
}

func TestBound(t *testing.T) {
	p := testPolicy(t)
	for host, want := range map[string]bool{
		"api.openai.com": true, "API.OPENAI.COM.": true, "api.github.com": true,
		"github.com": false, "x.y.github.com": false, "example.com": false, "": false, "127.0.0.1": false,
	} {
		if got := p.Bound(host); got != want {
			t.Errorf("Bound(%q) = %v, want %v", host, got, want)
		}
	}
}

func TestNormalizePath(t *testing.T) {
	tests := []struct {
		in, out string
		ok      bool
	}{
		{"/", "/", true},
		{"/v1/models", "/v1/models", true},
		{"/v1/models/", "/v1/models/", true},
		{"/v1/../admin", "", false},
		{"/v1/./x", "", false},
		{"/v1/x/.", "", false},
		{"/v1/x/..", "", false},
		{"/v1/;/../admin", "", false},
		{"/v1/.x/x./...", "/v1/.x/x./...", true},
		{"//admin", "/admin", true},
		{"/v1//x///y", "/v1/x/y", true},
		{"/%76%31/x", "/v1/x", true},
		{"/v1/caf%c3%a9", "/v1/caf%C3%A9", true},
		{"/v1/%2e%2e/admin", "", false},
		{"/v1/.%2E/admin", "", false},
		{"/v1/%2e/admin", "", false},
		{"/v1/x%2Fy", "", false},
		{"/v1/x%2fy", "", false},
		{"/v1/x%5cy", "", false},
		{"/v1\\..\\admin", "", false},
		{"/v1/%00", "", false},
		{"/v1/..;/admin", "", false},
		{"/v1/.;x/admin", "", false},
		{"/v1/a;b/c", "/v1/a;b/c", true},
		// Encoded twice: a server (or an application) that decodes again sees "..", "/", "\".
		{"/v1/%252e%252e/admin", "", false},
		{"/v1/%252E./admin", "", false},
		{"/v1/x%252Fy", "", false},
		{"/v1/x%255cy", "", false},
		{"/v1/x%2500", "", false},
		{"/v1/%25252e%25252e/admin", "", false},
		{"/v1/%2525252e%2525252e/admin", "", false},
		{"/v1/a\x01b", "", false}, // a control byte (a path override header can hold a tab)
		{"/v1/a\tb", "", false},
		{"/v1/100%2525", "/v1/100%2525", true},
		{"/v1/a%252eb", "/v1/a%252eb", true},
		{"/v1/caf%25c3%25a9", "/v1/caf%25c3%25a9", true},
		{"/v1/%zz", "", false},
		{"/v1/%4", "", false},
		{"/..", "", false},
		{"/a/../..", "", false},
		{"*", "", false},
		{"", "", false},
		{"http://evil/", "", false},
	}
	for _, tc := range tests {
		out, ok := NormalizePath(tc.in)
		if out != tc.out || ok != tc.ok {
			t.Errorf("NormalizePath(%q) = %q,%v want %q,%v", tc.in, out, ok, tc.out, tc.ok)
		}
	}
}

func TestMatchPath(t *testing.T) {
	tests := []struct {
		glob, path string
		want       bool
	}{
		{"/v1/**", "/v1", true},
		{"/v1/**", "/v1/", true},
		{"/v1/**", "/v1/a/b/c", true},
		{"/v1/**", "/v2/a", false},
		{"/v1/**", "/v10", false},
		{"/v1/*", "/v1/a", true},
		{"/v1/*", "/v1/a/b", false},
		{"/v1/*/x", "/v1/a/x", true},
		{"/v1/a*z", "/v1/abcz", true},
		{"/v1/a*z", "/v1/abc", false},
		{"/**/x", "/a/b/x", true},
		{"/**/x", "/x", true},
		{"/", "/", true},
		{"/", "/a", false},
		{"/user", "/user", true},
		{"/user", "/User", false},
	}
	for _, tc := range tests {
		if got := MatchPath(tc.glob, tc.path); got != tc.want {
			t.Errorf("MatchPath(%q, %q) = %v, want %v", tc.glob, tc.path, got, tc.want)
		}
	}
}

func FuzzNormalizePath(f *testing.F) {
	for _, s := range []string{"/v1/../admin", "/v1/%2e%2e/admin", "//admin", "/v1/x%2Fy", "/%76%31/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		out, ok := NormalizePath(s)
		if !ok {
			return
		}
		// A normalized path is a fixed point and never holds a dot segment or empty segment.
		again, ok2 := NormalizePath(out)
		if !ok2 || again != out {
			t.Fatalf("not idempotent: %q -> %q -> %q,%v", s, out, again, ok2)
		}
		for _, seg := range splitPath(out) {
			if seg == "." || seg == ".." || seg == "" {
				t.Fatalf("%q normalized to %q with segment %q", s, out, seg)
			}
			// Nor does decoding it again, however many times.
			for d, changed := decodeAll(seg); changed; d, changed = decodeAll(d) {
				base, _, _ := strings.Cut(d, ";")
				if strings.ContainsAny(d, "/\\\x00") || base == "." || base == ".." {
					t.Fatalf("%q normalized to %q, whose segment %q decodes again to %q", s, out, seg, d)
				}
			}
		}
	})
}

func BenchmarkDecide(b *testing.B) {
	p := testPolicy(b)
	r := req("POST", "api.openai.com", "/v1/chat/completions", "Authorization", "Bearer "+phOpenAI, "Content-Type", "application/json")
	f := Facts{UID: 1000, SNI: "api.openai.com"}
	b.ReportAllocs()
	for b.Loop() {
		if d := p.Decide(f, r); d.Action != Inject {
			b.Fatal(d.Reason)
		}
	}
}

// A Host is a name, an optional port of digits, and nothing else; anything else normalizes
// to "" and so matches no SNI.
func TestNormalizeHost(t *testing.T) {
	for in, want := range map[string]string{
		"api.openai.com": "api.openai.com", "API.OpenAI.com.": "api.openai.com",
		"api.openai.com:443": "api.openai.com", "[::1]:443": "::1", "[::1]": "::1", "::1": "::1",
		"api.openai.com:": "", "api.openai.com:x443": "", "api.openai.com:443#frag": "",
		"[::1]x": "", "[::1]:": "", "[::1]:44a": "", "user@api.openai.com": "", "a b": "",
	} {
		if got := NormalizeHost(in); got != want {
			t.Errorf("NormalizeHost(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestCheckValue: the refusals avpd makes at request time, said ahead of time for bindings
// check, naming the secret and never the value.
func TestCheckValue(t *testing.T) {
	s := &config.Secret{Name: "K", Header: "Authorization", Format: "{secret}"}
	for _, tc := range []struct{ v, want string }{
		{"sk-proj-0123456789", ""},
		{"12345678", ""},
		{"", "the value of K is empty"},
		{"sk-...", "the value of K is 6 bytes, shorter than 8"},
		{"sk-proj-01\r\nX: 1", "holds a control character"},
		{"sk-proj-ü-0123", "not ASCII"},
	} {
		err := CheckValue(s, map[string][]byte{"K": []byte(tc.v)})
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%q: %v, want %q", tc.v, err, tc.want)
		}
		if err != nil && tc.v != "" && strings.Contains(err.Error(), tc.v) {
			t.Errorf("%q: the value is in the error %v", tc.v, err)
		}
	}
}

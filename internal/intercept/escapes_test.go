package intercept

import (
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"net/http"
	"strings"
	"testing"
)

// escBasicReal is shaped like a Basic credential or any base64 key: it holds '+' and '/'.
const escBasicReal = "dXNlckBleGFtcGxlLmNvbTpBVEFUVDN4Rm+fR0Zw/aGk9UXo="

// dotnetJSON escapes s as System.Text.Json's default encoder (JavaScriptEncoder.Default)
// does: HTML-sensitive characters, '+' and the quotes as \uXXXX in upper-case hex.
func dotnetJSON(s string) string {
	var b strings.Builder
	for _, c := range s {
		switch c {
		case '+', '<', '>', '&', '\'', '"', '`':
			fmt.Fprintf(&b, "\\u%04X", c)
		case '\\':
			b.WriteString(`\\`)
		default:
			b.WriteRune(c)
		}
	}
	return b.String()
}

var echoPage = template.Must(template.New("p").Parse(`<html><body><p>Invalid credentials: {{.}}</p></body></html>`))

// TestDotnetJSONEchoIsScrubbed: an ASP.NET Core API (System.Text.Json, default encoder) that
// echoes the Authorization header in a JSON error, e.g. {"error":"bad token","received":"..."}.
func TestDotnetJSONEchoIsScrubbed(t *testing.T) {
	e := newRawEnv(t, escBasicReal, []string{"http/1.1"}, serveHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(401)
		io.WriteString(w, `{"error":"invalid_token","received":"`+dotnetJSON(r.Header.Get("Authorization"))+`"}`)
	})))
	checkEchoScrubbed(t, e, "System.Text.Json")
}

// TestGoHTMLTemplateEchoIsScrubbed: a Go service whose HTML error page is rendered with
// html/template, which writes '+' as &#43;.
func TestGoHTMLTemplateEchoIsScrubbed(t *testing.T) {
	e := newRawEnv(t, escBasicReal, []string{"http/1.1"}, serveHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(401)
		echoPage.Execute(w, r.Header.Get("Authorization"))
	})))
	checkEchoScrubbed(t, e, "html/template")
}

// mustacheHTML escapes s as mustache.js's escapeHtml (the default for {{x}} in mustache.js,
// and Handlebars' escapeExpression but for '/') does.
func mustacheHTML(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;", "'", "&#39;",
		"/", "&#x2F;", "`", "&#x60;", "=", "&#x3D;").Replace(s)
}

// TestMustacheHTMLEchoIsScrubbed: a Node service whose error page is a mustache.js (or
// Handlebars) template: '/' and '=' (base64's slash and padding) become &#x2F; and &#x3D;.
func TestMustacheHTMLEchoIsScrubbed(t *testing.T) {
	e := newRawEnv(t, escBasicReal, []string{"http/1.1"}, serveHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(401)
		io.WriteString(w, "<html><body><p>Invalid credentials: "+mustacheHTML(r.Header.Get("Authorization"))+"</p></body></html>")
	})))
	checkEchoScrubbed(t, e, "mustache.js")
}

// echoBody sends one injecting request over HTTP/1.1 and returns the answer's body.
func echoBody(t *testing.T, e *rawEnv) []byte {
	t.Helper()
	agent, br := e.h1Agent(t)
	io.WriteString(agent, "GET /v1/me HTTP/1.1\r\nHost: "+rawHost+"\r\n"+rawAuthLine+"\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	return body
}

// checkEchoScrubbed fails if the answer's body, once the escape the upstream applied is
// undone, holds the real value.
func checkEchoScrubbed(t *testing.T, e *rawEnv, what string) {
	body := echoBody(t, e)
	decoded := strings.NewReplacer(`\u002B`, "+", `\u0022`, `"`, "&#43;", "+", "&#x2F;", "/", "&#x3D;", "=").Replace(string(body))
	if strings.Contains(decoded, escBasicReal) {
		t.Fatalf("LEAK: the %s-escaped real value reached the agent; undone: %s", what, decoded)
	}
}

// symfonyJSON escapes s as PHP's json_encode with Symfony JsonResponse's default options
// (JSON_HEX_TAG | JSON_HEX_APOS | JSON_HEX_AMP | JSON_HEX_QUOT, slashes escaped).
func symfonyJSON(s string) string {
	return strings.NewReplacer(`\`, `\\`, "/", `\/`, "<", `\u003C`, ">", `\u003E`, "'", `\u0027`,
		"&", `\u0026`, `"`, `\u0022`).Replace(s)
}

// TestSymfonyJSONEchoIsScrubbed: a Symfony JsonResponse that quotes a key holding '/' and '&'
// (h1BenchReal's shape): '\/' mixed with upper-case \u0026.
func TestSymfonyJSONEchoIsScrubbed(t *testing.T) {
	const real = "sk-REAL-0123456789abcdef/0123456789+abcdef=x&y"
	e := newRawEnv(t, real, []string{"http/1.1"}, serveHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(401)
		io.WriteString(w, `{"error":"invalid key","key":"`+symfonyJSON(r.Header.Get("Authorization"))+`"}`)
	})))
	body := echoBody(t, e)
	var doc struct{ Key string }
	if json.Unmarshal(body, &doc) == nil && strings.Contains(doc.Key, real) {
		t.Fatalf("LEAK: the JSON-decoded body holds the real value: %q", doc.Key)
	}
}

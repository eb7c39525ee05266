package template

import (
	"crypto/sha256"
	"encoding/base64"
	"net/url"
	"strings"
	"testing"
)

var compose = []string{"JIRA_EMAIL", "JIRA_TOKEN"}

var vals = map[string][]byte{"JIRA_EMAIL": []byte("ops@example.com"), "JIRA_TOKEN": []byte("tok-123")}

func TestRender(t *testing.T) {
	tests := []struct{ src, want string }{
		{`{{ (JIRA_EMAIL + ":" + JIRA_TOKEN) | b64encode }}`, base64.StdEncoding.EncodeToString([]byte("ops@example.com:tok-123"))},
		{`Basic {{ (JIRA_EMAIL + ':' + JIRA_TOKEN) | b64encode }}`, "Basic " + base64.StdEncoding.EncodeToString([]byte("ops@example.com:tok-123"))},
		{`{{JIRA_TOKEN}}`, "tok-123"},
		{`{{ JIRA_EMAIL | urlencode }}`, "ops%40example.com"},
		{`{{ JIRA_TOKEN | sha256 }}`, sha("tok-123")},
		{`{{ hmac_sha256(JIRA_TOKEN, "msg") }}`, hmacHex("tok-123", "msg")},
		{`{{ JIRA_TOKEN | b64encode | b64decode }}`, "tok-123"},
		{`{{ "a\"b\\c" + JIRA_TOKEN }}`, `a"b\ctok-123`},
		{`x{{JIRA_TOKEN}}y{{JIRA_EMAIL}}z`, "xtok-123yops@example.comz"},
	}
	for _, tc := range tests {
		tm, err := Parse(tc.src, compose)
		if err != nil {
			t.Fatalf("Parse(%q): %v", tc.src, err)
		}
		got, err := tm.Render(vals)
		if err != nil || string(got) != tc.want {
			t.Errorf("Render(%q) = %q, %v; want %q", tc.src, got, err, tc.want)
		}
	}
}

// TestSandbox: hostile sources are rejected at load and nothing outside compose is readable.
func TestSandbox(t *testing.T) {
	hostile := []string{
		`{{ HOME }}`,
		`{{ ENV }}`,
		`{{ __import__("os") }}`,
		`{{ config }}`,
		`{{ JIRA_TOKEN.__class__ }}`,
		`{{ JIRA_TOKEN[0] }}`,
		`{{ JIRA_TOKEN() }}`,
		`{{ JIRA_TOKEN | safe }}`,
		`{{ JIRA_TOKEN | exec }}`,
		`{{ JIRA_TOKEN | b64encode() }}`,
		`{{ open("/etc/shadow") }}`,
		`{{ env("AWS_SECRET") }}`,
		`{{ file("/root/.ssh/id_rsa") }}`,
		`{% for x in y %}{{ x }}{% endfor %}`,
		`{{ JIRA_TOKEN * 1000000 }}`,
		`{{ JIRA_TOKEN - 1 }}`,
		`{{ "unterminated }}`,
		`{{ JIRA_TOKEN `,
		`JIRA_TOKEN }}`,
		`{{ {{ JIRA_TOKEN }} }}`,
		`{{ }}`,
		`{{ b64encode }}`,
		`{{ hmac_sha256 }}`,
		`{{ hmac_sha256(JIRA_TOKEN) }}`,
		`{{ hmac_md5(JIRA_TOKEN, "x") }}`,
		`{{ JIRA_TOKEN; rm -rf / }}`,
		`{{ $(id) }}`,
		"{{ JIRA_TOKEN\n}}",
		`{{ "\x41" }}`,
		`{{ "\n" + JIRA_TOKEN }}`,
		`{{ 'a' }}`,
		`plain text`,
		`{{ ` + strings.Repeat("(", 40) + `JIRA_TOKEN` + strings.Repeat(")", 40) + ` }}`,
		`{{ JIRA_TOKEN }}` + strings.Repeat("x", MaxSource),
		`{{ JIRA_TOKEN if x else y }}`,
		`{{ lambda: JIRA_TOKEN }}`,
		`{{ JIRA_TOKEN || JIRA_EMAIL }}`,
		"{{ JIRA_TOKEN }}\u00e9",
	}
	if len(hostile) < 30 {
		t.Fatalf("only %d hostile sources", len(hostile))
	}
	for _, src := range hostile {
		if tm, err := Parse(src, compose); err == nil {
			t.Errorf("accepted hostile template %q (reads %v)", src, tm.Names())
		}
	}
}

func TestParseErrorNamesColumn(t *testing.T) {
	_, err := Parse(`{{ JIRA_EMAIL + HOME }}`, compose)
	if err == nil || err.Error() != `column 17: "HOME" is not in compose; a template can only read the secrets listed in compose` {
		t.Fatalf("err = %v", err)
	}
	_, err = Parse(`{{ JIRA_EMAIL | exec }}`, compose)
	if e, ok := err.(*Error); !ok || e.Column != 17 {
		t.Fatalf("err = %v", err)
	}
}

func TestRenderRefusesUnsafeBytes(t *testing.T) {
	tm, err := Parse(`{{ JIRA_TOKEN | b64decode }}`, compose)
	if err != nil {
		t.Fatal(err)
	}
	// "dG9rDQpYLUV2aWw6IDE=" is "tok\r\nX-Evil: 1": a header injection attempt.
	if _, err := tm.Render(map[string][]byte{"JIRA_TOKEN": []byte("dG9rDQpYLUV2aWw6IDE=")}); err == nil {
		t.Fatal("rendered CR LF into a header value")
	}
	if _, err := tm.Render(map[string][]byte{"JIRA_TOKEN": []byte("!!!")}); err == nil || strings.Contains(err.Error(), "!!!") {
		t.Fatalf("bad base64: %v", err)
	}
	if _, err := tm.Render(map[string][]byte{}); err == nil {
		t.Fatal("rendered with a missing value")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{`{{ (JIRA_EMAIL + ":" + JIRA_TOKEN) | b64encode }}`, `{{ hmac_sha512(JIRA_TOKEN, JIRA_EMAIL | sha256) }}`, `x{{JIRA_TOKEN}}`, `{{ "\"" }}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, src string) {
		tm, err := Parse(src, compose)
		if err != nil {
			return
		}
		for _, n := range tm.Names() {
			if n != "JIRA_EMAIL" && n != "JIRA_TOKEN" {
				t.Fatalf("template %q reads %q outside compose", src, n)
			}
		}
		out, err := tm.Render(vals)
		if err == nil {
			for _, c := range out {
				if c < ' ' && c != '\t' || c > '~' {
					t.Fatalf("unsafe byte in output of %q", src)
				}
			}
		}
	})
}

// sha and hmacHex compute expectations with the standard library directly, independent of
// the code under test.
func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hexString(sum[:])
}

func hmacHex(k, m string) string {
	mac := hmacNew(k)
	mac.Write([]byte(m))
	return hexString(mac.Sum(nil))
}

// queryEscape writes what url.QueryEscape does, into bytes of its own.
func TestQueryEscapeMatchesNetURL(t *testing.T) {
	for i := range 5000 {
		b := make([]byte, i%40)
		for j := range b {
			b[j] = byte((i*31 + j*17) % 256)
		}
		if got, want := string(queryEscape(b)), url.QueryEscape(string(b)); got != want {
			t.Fatalf("%q: %q, want %q", b, got, want)
		}
	}
}

// What went into an encoding filter comes back for scrubbing: an upstream may decode a
// Basic credential and quote "user:password".
func TestRenderInputs(t *testing.T) {
	tpl, err := Parse(`Basic {{ (U + ":" + P) | b64encode }}`, []string{"U", "P"})
	if err != nil {
		t.Fatal(err)
	}
	out, inputs, err := tpl.RenderInputs(map[string][]byte{"U": []byte("ops"), "P": []byte("Tr0ub4d")})
	if err != nil || string(out) != "Basic b3BzOlRyMHViNGQ=" || len(inputs) != 1 || string(inputs[0]) != "ops:Tr0ub4d" {
		t.Fatalf("%q %q %v", out, inputs, err)
	}
}

package intercept

import (
	"bytes"
	"encoding/json"
	"fmt"
	"html"
	"html/template"
	"io"
	"math/rand/v2"
	"net/url"
	"strings"
	"testing"
	"time"
)

// A typical API key has no byte an echo escapes: it is matched as it is, at no extra cost.
func TestTypicalKeysAreNotEscapable(t *testing.T) {
	for _, k := range []string{"sk-proj-abc_DEF-0123456789", "ghp_0123456789abcdefABCDEF", "xoxb-1234-5678-abcdEF.x~y"} {
		if escapable([]byte(k)) {
			t.Errorf("%s: escapable", k)
		}
	}
	for _, k := range []string{"dXNlcjpwYXNz+/=", `a"b`, "a&b", "a b", "line\nbreak"} {
		if !escapable([]byte(k)) {
			t.Errorf("%q: not escapable", k)
		}
	}
}

// escapeOne writes byte c in the escape numbered k (of escapeKinds), or as itself.
func escapeOne(c byte, k int) string {
	upper := k%2 == 0
	hex2 := fmt.Sprintf("%02x", c)
	if upper {
		hex2 = strings.ToUpper(hex2)
	}
	switch k % escapeKinds {
	case 0, 1:
		return "%" + hex2
	case 2, 3:
		return `\u00` + hex2
	case 4, 5:
		return `\x` + hex2
	case 6:
		return fmt.Sprintf("&#%d;", c)
	case 7:
		return fmt.Sprintf("&#%04d;", c)
	case 8, 9:
		x := "x"
		if upper {
			x = "X"
		}
		return "&#" + x + hex2 + ";"
	case 10:
		for name, b := range namedRefs {
			if b == c {
				return "&" + name + ";"
			}
		}
	case 11:
		if c == '"' || c == '\\' || c == '/' || c == '\'' || c == '=' {
			return `\` + string(c)
		}
		if c == '\n' {
			return `\n`
		}
		if c == ' ' {
			return "+"
		}
	}
	return string(c)
}

const escapeKinds = 13

// TestEscapedValuesAreFound: a value whose escapable bytes are each written in any escape,
// mixed along the value, is found in any text around it and replaced, whole or split
// across reads; text that only resembles it is left alone.
func TestEscapedValuesAreFound(t *testing.T) {
	rnd := rand.New(rand.NewPCG(3, 4))
	const special = "+/=\"&<>' \n%\\#;:@!$()*,?[]^`{|}"
	for range 3000 {
		var v []byte
		for range 8 + rnd.IntN(16) {
			if rnd.IntN(3) == 0 {
				v = append(v, special[rnd.IntN(len(special))])
			} else {
				v = append(v, "abcXYZ019-_.~"[rnd.IntN(13)])
			}
		}
		if !escapable(v) {
			continue
		}
		var enc strings.Builder
		for _, c := range v {
			if plainByte(c) {
				enc.WriteByte(c)
			} else {
				enc.WriteString(escapeOne(c, rnd.IntN(escapeKinds)))
			}
		}
		noise := func() string {
			b := make([]byte, rnd.IntN(40))
			for i := range b {
				b[i] = "ab&%\\ #;x0"[rnd.IntN(10)]
			}
			return string(b)
		}
		pre, post := noise(), noise()
		body := pre + enc.String() + post
		r := replacement{from: v, to: []byte("PH"), escaped: true}
		got, changed := replaceEscaped([]byte(body), r)
		if !changed || !strings.Contains(string(got), "PH") || bytes.Contains(got, []byte(enc.String())) {
			t.Fatalf("value %q written %q in %q: got %q", v, enc.String(), body, got)
		}
		// Streamed in small reads, the value never reaches the reader in one piece either.
		sr := newScrubReader(io.NopCloser(chunked(body, 1+rnd.IntN(7))), []replacement{r})
		streamed, err := io.ReadAll(sr)
		if err != nil || bytes.Contains(streamed, []byte(enc.String())) || !bytes.Contains(streamed, []byte("PH")) {
			t.Fatalf("value %q written %q, streamed: got %q %v", v, enc.String(), streamed, err)
		}
		// One byte different is another value.
		other := bytes.Clone(v)
		other[len(other)-1] ^= 0x01
		if s, _ := nextEscaped([]byte(pre+string(other)+post), v); s >= 0 {
			t.Fatalf("value %q matched in %q", v, pre+string(other)+post)
		}
	}
}

// TestEchoesAsEncodersWriteThem: the encoders of common frameworks, each run on a Basic
// credential (base64 with '+', '/', '=') and on a value with quotes and '&'.
func TestEchoesAsEncodersWriteThem(t *testing.T) {
	dotnet := func(s string) string { // System.Text.Json's default encoder
		var b strings.Builder
		for _, c := range []byte(s) {
			if plainByte(c) || c == '/' || c == ':' || c == ' ' {
				b.WriteByte(c)
			} else {
				fmt.Fprintf(&b, `\u%04X`, c)
			}
		}
		return b.String()
	}
	symfony := func(s string) string { // json_encode with JSON_HEX_* and slashes escaped
		r := strings.NewReplacer(`"`, `\u0022`, `&`, `\u0026`, `'`, `\u0027`, `<`, `\u003C`, `>`, `\u003E`, `/`, `\/`)
		return r.Replace(s)
	}
	mustache := func(s string) string { // mustache.js escapeHtml
		r := strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;", "'", "&#39;", "/", "&#x2F;", "`", "&#x60;", "=", "&#x3D;")
		return r.Replace(s)
	}
	gotmpl := func(s string) string {
		var b strings.Builder
		template.Must(template.New("").Parse(`{{.}}`)).Execute(&b, s)
		return b.String()
	}
	gojson := func(s string) string { b, _ := json.Marshal(s); return strings.Trim(string(b), `"`) }
	for _, v := range []string{"Basic dXNlcjpwYXNzd29yZA+/aGk9UXo=", `sk-"quoted"&<tag>'x'/y=z`} {
		for name, enc := range map[string]func(string) string{
			".NET": dotnet, "Symfony": symfony, "mustache.js": mustache, "html/template": gotmpl,
			"encoding/json": gojson, "html.EscapeString": html.EscapeString, "url.QueryEscape": url.QueryEscape,
			"url.PathEscape": url.PathEscape,
		} {
			e := enc(v)
			got, _ := replaceReal([]byte("echo: "+e+" end"), []replacement{{from: []byte(v), to: []byte("PH"), escaped: true}})
			if string(got) != "echo: PH end" {
				t.Errorf("%s writes %q as %q: got %q", name, v, e, got)
			}
		}
	}
}

// partialEscaped keeps back a tail that could begin an escaped value, and nothing else.
func TestPartialEscaped(t *testing.T) {
	v := []byte("ab+/=cd")
	for d, want := range map[string]int{
		"xx a": 1, "xx ab": 2, "xx ab%2": 4, "xx ab%2B": 5, "xx ab&#x2": 6, "xx ab&plu": 6,
		"xx ab\\u002": 7, "xx ab+&sol;&#61": 12, "xx": 0, "xx ab%2C": 0, "xx ab&plus;/": 0 + 0,
		"xx ab&nope": 0, "xx b": 0,
	} {
		got := partialEscaped([]byte(d), v)
		if d == "xx ab&plus;/" {
			want = len("ab&plus;/")
		}
		if got != want {
			t.Errorf("partialEscaped(%q) = %d, want %d", d, got, want)
		}
	}
}

func BenchmarkReplaceEscaped(b *testing.B) {
	body := bytes.Repeat([]byte(`{"id":"chatcmpl-abc","object":"chat.completion","content":"some text & more text / with = signs"},`), 300)
	r := replacement{from: []byte("Basic dXNlcjpwYXNzd29yZA+/aGk9UXo="), to: []byte("PH"), escaped: true}
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		replaceEscaped(body, r)
		partialEscaped(body, r.from)
	}
}

// A value of many bytes that are also the start of their own escape ('\\' as "\\\\") is
// matched in polynomial time, found or not.
func TestEscapedMatchIsNotExponential(t *testing.T) {
	v := []byte(strings.Repeat(`\`, 40) + "y")
	done := make(chan struct{})
	go func() {
		defer close(done)
		if e, _ := matchEscaped([]byte(strings.Repeat(`\`, 79)+"x"), v); e >= 0 {
			t.Error("matched")
		}
		if e, _ := matchEscaped([]byte(strings.Repeat(`\\`, 40)+"y"), v); e != 81 {
			t.Errorf("escaped: end %d, want 81", e)
		}
		if e, _ := matchEscaped([]byte(strings.Repeat(`%25`, 20)+strings.Repeat("%", 20)+"y"), []byte(strings.Repeat("%", 40)+"y")); e != 81 {
			t.Errorf("percent: end %d, want 81", e)
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("no answer in 5 s")
	}
}

package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"mime/multipart"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
)

// scanBody feeds body to a scanner for content type ct in chunks of chunk bytes and returns
// every override it reports (report always goes on), or nil, false when ct is not scanned.
func scanBody(t *testing.T, h http.Header, body string, chunk int) ([]string, bool) {
	t.Helper()
	var got []string
	s := NewBodyScanner(h, func(m string) bool { got = append(got, m); return true })
	if s == nil {
		return nil, false
	}
	for b := []byte(body); len(b) > 0; {
		n := min(chunk, len(b))
		if _, err := s.Write(b[:n]); err != nil {
			t.Fatalf("Write: %v", err)
		}
		b = b[n:]
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return got, true
}

func ctHeader(ct ...string) http.Header {
	h := http.Header{}
	for _, v := range ct {
		h.Add("Content-Type", v)
	}
	return h
}

const unread = UnparsableBodyOverride

// checkScan runs body through the scanner whole and one byte at a time: an override split
// across reads must be found the same.
func checkScan(t *testing.T, h http.Header, body string, want []string) {
	t.Helper()
	for _, chunk := range []int{len(body) + 1, 1, 3} {
		got, ok := scanBody(t, h, body, chunk)
		if !ok {
			t.Fatalf("%q: not scanned", body)
		}
		if !slices.Equal(got, want) {
			t.Errorf("%q in chunks of %d: got %q, want %q", body, chunk, got, want)
		}
	}
}

func TestBodyScannerForm(t *testing.T) {
	form := ctHeader("application/x-www-form-urlencoded")
	cases := []struct {
		body string
		want []string
	}{
		{"a=1&_method=DELETE", []string{"DELETE"}},
		{"_method=delete&a=1", []string{"DELETE"}},
		{"%5Fmethod=PUT", []string{"PUT"}},
		{"_m%65thod=PUT", []string{"PUT"}},
		{"_method=DEL%45TE", []string{"DELETE"}},
		{"_method=+PATCH+", []string{"PATCH"}},
		{"+++_method=PUT", []string{"PUT"}},      // PHP drops leading spaces
		{"%20_method=PUT", []string{"PUT"}},      // ... however written
		{".method=PUT", []string{"PUT"}},         // PHP reads '.' as '_'
		{"+.method=PUT", []string{"PUT"}},        // ... after the leading spaces go
		{"%20method=PUT", nil},                   // "method" to PHP
		{"_METHOD=put", []string{"PUT"}},         // names compared without case
		{"a=1;_method=PATCH", []string{"PATCH"}}, // older Rack splits on ';'
		// PHP splits on '&' alone: to it the name is ".method\x00;", cut at the NUL.
		{".method\x00;=DELETE", []string{"DELETE"}},
		{"_method=PUT;x=1", []string{"PUT", "PUT;X=1"}},
		{"[method=DELETE", []string{"DELETE"}}, // PHP: an unmatched '[' is '_'
		{"[method]=DELETE", nil},
		{"_method%00x=DELETE", []string{"DELETE"}},                          // PHP ends a name at NUL
		{"_method%00" + strings.Repeat("x", 100) + "=PUT", []string{"PUT"}}, // however long
		{"_method[" + strings.Repeat("x", 100) + "]=PUT", []string{unread}},
		{"_method[]=DELETE", []string{unread}},
		{"_method[x]=DELETE", []string{unread}},
		{"_method[]", []string{unread}},
		{"_method=" + strings.Repeat("A", 40), []string{unread}},
		{"_method=GET&_method=DELETE", []string{"GET", "DELETE"}},
		{"_method=", nil},
		{"_method", nil},
		{"x_method=DELETE", nil},
		{"_methods=DELETE", nil},
		{"a=_method%3DDELETE", nil},
		{"a=1&b=%zz&c=%", nil},
		{"_method=%", []string{"%"}},
		{strings.Repeat("x", 100) + "=1&_method=PUT", []string{"PUT"}},
	}
	for _, c := range cases {
		checkScan(t, form, c.body, c.want)
	}
	// Rack reads a POST without a Content-Type as a form.
	checkScan(t, http.Header{}, "_method=DELETE", []string{"DELETE"})
	checkScan(t, ctHeader("Application/X-WWW-Form-Urlencoded; charset=utf-8"), "_method=PUT", []string{"PUT"})
	// PHP cuts the type at the first ';', ',' or space before it compares it.
	for _, ct := range []string{
		"application/x-www-form-urlencoded x",
		"application/x-www-form-urlencoded,text/plain",
		"application/x-www-form-urlencoded\tx",
	} {
		checkScan(t, ctHeader(ct), "_method=PUT", []string{"PUT"})
	}
	checkScan(t, ctHeader("application/json x"), `{"_method":"PUT"}`, []string{"PUT"})
}

func TestBodyScannerJSON(t *testing.T) {
	js := ctHeader("application/json")
	cases := []struct {
		body string
		want []string
	}{
		{`{"model":"x","_method":"DELETE"}`, []string{"DELETE"}},
		{`{"_method" : "put"}`, []string{"PUT"}},
		{`{"\u005fmethod":"PATCH"}`, []string{"PATCH"}},
		{`{"_method":"DEL\u0045TE"}`, []string{"DELETE"}},
		{`{"a":{"_method":"DELETE"},"b":[{"_method":"PUT"}]}`, nil}, // only top-level keys
		{`{"content":"{\"_method\":\"DELETE\"}"}`, nil},             // inside a string
		{`{"a\"_method":"x"}`, nil},
		{`{"messages":[{"role":"user","content":"what does _method do in Rails?"}]}`, nil},
		{`[{"_method":"DELETE"}]`, nil},
		{`{"_method":1}`, []string{unread}},
		{`{"_method":["DELETE"]}`, []string{unread}},
		{`{"_method":null}`, []string{unread}},
		{`{"_method":"` + strings.Repeat("A", 40) + `"}`, []string{unread}},
		{`{"a":1}{"_method":"PUT"}`, []string{"PUT"}},
		{`{"a":1}` + "\n" + `{"_method":"PUT"}`, []string{"PUT"}},
		{`{"_method":"DEL`, []string{unread}},
		{`{"_method"`, []string{unread}},
		{`{"_method":""}`, nil},
		{`{"_METHOD":"put"}`, []string{"PUT"}},
		{`{"x":"\\","_method":"PUT"}`, []string{"PUT"}},
		// Not one object: no framework reads a key from it.
		{`[{"_method":"DELETE"}]`, nil},
		{"\x00\x00\x00\x00\x15{\"_method\":\"DELETE\"}", nil}, // a gRPC frame
		{`"_method"`, nil},
		{"\xef\xbb\xbf {\"_method\":\"PUT\"}", []string{"PUT"}},
	}
	for _, c := range cases {
		checkScan(t, js, c.body, c.want)
	}
	checkScan(t, ctHeader("application/vnd.api+json"), `{"_method":"PUT"}`, []string{"PUT"})
}

// multipartBody builds a multipart body with the given (name, value) fields.
func multipartBody(t *testing.T, fields ...[2]string) (string, http.Header) {
	t.Helper()
	var b bytes.Buffer
	w := multipart.NewWriter(&b)
	for _, f := range fields {
		if err := w.WriteField(f[0], f[1]); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	return b.String(), ctHeader(w.FormDataContentType())
}

func TestBodyScannerMultipart(t *testing.T) {
	body, h := multipartBody(t, [2]string{"purpose", "fine-tune"}, [2]string{"_method", "delete"})
	checkScan(t, h, body, []string{"DELETE"})

	body, h = multipartBody(t, [2]string{"file", "a=1&_method=DELETE\r\n{\"_method\":\"PUT\"}"})
	checkScan(t, h, body, nil)

	// RFC 2231's name*= (which mime.ParseMediaType decodes), and a second Content-Disposition
	// that a parser taking the last one would read.
	const bd = "XyZ"
	mh := ctHeader("multipart/form-data; boundary=" + bd)
	ext := "--" + bd + "\r\nContent-Disposition: form-data; name*=UTF-8''%5Fmethod\r\n\r\nPUT\r\n--" + bd + "--\r\n"
	checkScan(t, mh, ext, []string{"PUT"})
	two := "--" + bd + "\r\nContent-Disposition: form-data; name=\"a\"\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nPUT\r\n--" + bd + "--\r\n"
	checkScan(t, mh, two, []string{"PUT"})
	// Rack finds the name with a regular expression that takes the last "; name=" in the
	// header, even inside another parameter's quoted value.
	rack := "--" + bd + "\r\nContent-Disposition: form-data; name=\"a\"; x=\"; name=_method\"\r\n\r\nPUT\r\n--" + bd + "--\r\n"
	checkScan(t, mh, rack, []string{"PUT"})
	bad := "--" + bd + "\r\nContent-Disposition: form-data; name=_method; x\r\n\r\nPUT\r\n--" + bd + "--\r\n"
	checkScan(t, mh, bad, []string{unread})

	// Bodies PHP splits differently from mime/multipart: PHP ends a part at "\n--B" even
	// in a CRLF body, and reads on for "--B" lines after the closing delimiter.
	lf := "--" + bd + "\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\n--" + bd + "\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--" + bd + "--\r\n"
	checkScan(t, mh, lf, []string{unread})
	epilogue := "--" + bd + "\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--" + bd + "--\r\n--" + bd + "\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--" + bd + "--\r\n"
	checkScan(t, mh, epilogue, []string{unread})
	// PHP takes the boundary from the first "boundary" in the header, Rack from the last.
	for _, ct := range []string{"multipart/form-data; xboundary=C; boundary=" + bd, "multipart/form-data; boundary=" + bd + "; x=\"boundary=C\""} {
		checkScan(t, ctHeader(ct), ext, []string{UncheckableBody})
	}

	// Not well-formed: no closing boundary, or no boundary at all.
	checkScan(t, mh, "--"+bd+"\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n", []string{unread})
	checkScan(t, ctHeader("multipart/form-data"), "x", []string{UncheckableBody})

	// Many overrides neither block the parser nor grow without bound.
	var fields [][2]string
	for range 40 {
		fields = append(fields, [2]string{"_method", "GET"})
	}
	body, h = multipartBody(t, fields...)
	got, _ := scanBody(t, h, body, 7)
	if len(got) != maxMultipartOverrides+1 || got[len(got)-1] != unread {
		t.Errorf("40 overrides: got %d reports (%q...)", len(got), got[:min(3, len(got))])
	}
}

func TestBodyScannerUnreadableAndSkipped(t *testing.T) {
	gz := ctHeader("application/x-www-form-urlencoded")
	gz.Set("Content-Encoding", "gzip")
	checkScan(t, gz, "\x1f\x8b...", []string{UncheckableBody})
	checkScan(t, ctHeader("application/json", "text/plain"), "{}", []string{UncheckableBody})
	for _, ct := range []string{"text/plain", "application/octet-stream", "image/png"} {
		if _, ok := scanBody(t, ctHeader(ct), "_method=DELETE", 100); ok {
			t.Errorf("%s: scanned", ct)
		}
	}
	// Laravel reads JSON (and its _method) when "/json" or "+json" is anywhere in the
	// Content-Type (isJson): read as JSON where the media type is read as nothing, and
	// unreadable where it is also a form.
	for _, ct := range []string{"text/plain; x=/json", "application/octet-stream; profile=+json", "image/png;a=b/JSON"} {
		checkScan(t, ctHeader(ct), `{"name":"x","_method":"DELETE"}`, []string{"DELETE"})
	}
	for _, ct := range []string{"application/x-www-form-urlencoded; a=/json", "multipart/form-data; boundary=x/json", "; x=+json"} {
		checkScan(t, ctHeader(ct), `{"name":"x","_method":"DELETE"}`, []string{UncheckableBody})
	}
	id := ctHeader("application/json")
	id.Set("Content-Encoding", "identity")
	checkScan(t, id, `{"_method":"PUT"}`, []string{"PUT"})

	// Express's JSON parser decodes any utf-* charset it names (UTF-16, UTF-32, UTF-7)
	// before method-override reads the body; the scanner reads only UTF-8's bytes.
	utf16 := func(s string) string {
		var b strings.Builder
		for _, r := range s {
			b.WriteRune(r)
			b.WriteByte(0)
		}
		return b.String()
	}
	for _, ct := range []string{
		"application/json; charset=utf-16le",
		"application/json;charset=UTF-16",
		`application/json; charset="utf-16le"`,
		"application/json; charset=utf-32",
		"application/json; charset=utf-7",
		"application/json; Charset = utf-16le",
		"application/json; charset*=utf-8''utf-16le",
	} {
		checkScan(t, ctHeader(ct), utf16(`{"_method":"DELETE"}`), []string{UncheckableBody})
		checkScan(t, ctHeader(ct), `{"+AF8-method":"DELETE"}`, []string{UncheckableBody})
	}
	for _, ct := range []string{
		"application/json; charset=utf-8",
		"application/json; charset=UTF-8",
		`application/json; charset="utf-8"`,
		"application/json; charset=us-ascii",
		"application/json; foo=bar",
	} {
		checkScan(t, ctHeader(ct), `{"_method":"PUT"}`, []string{"PUT"})
		checkScan(t, ctHeader(ct), `{"model":"x"}`, nil)
	}
}

// A refused override stops the scan: Write and Close fail from then on.
func TestBodyScannerStops(t *testing.T) {
	for _, tc := range []struct {
		h    http.Header
		body string
	}{
		{ctHeader("application/x-www-form-urlencoded"), "_method=DELETE&a=1"},
		{ctHeader("application/json"), `{"_method":"DELETE","a":1}`},
	} {
		s := NewBodyScanner(tc.h, func(m string) bool { return m != "DELETE" })
		_, err := s.Write([]byte(tc.body))
		if !errors.Is(err, ErrBodyOverride) {
			t.Errorf("%q: Write err %v", tc.body, err)
		}
		if _, err := s.Write([]byte("x")); !errors.Is(err, ErrBodyOverride) {
			t.Errorf("%q: second Write err %v", tc.body, err)
		}
		if err := s.Close(); !errors.Is(err, ErrBodyOverride) {
			t.Errorf("%q: Close err %v", tc.body, err)
		}
	}
	body, h := multipartBody(t, [2]string{"_method", "DELETE"}, [2]string{"a", strings.Repeat("x", 100000)})
	s := NewBodyScanner(h, func(m string) bool { return m != "DELETE" })
	var werr error
	for b := []byte(body); len(b) > 0 && werr == nil; b = b[min(len(b), 4096):] {
		_, werr = s.Write(b[:min(len(b), 4096)])
	}
	if err := s.Close(); !errors.Is(err, ErrBodyOverride) {
		t.Errorf("multipart: Close err %v (write err %v)", err, werr)
	}
}

// scanWholeAndInChunks scans body of type ct whole and in chunks of chunk bytes (any
// positive size; others mean whole), fails the fuzz test when the two read it differently,
// and returns what the whole scan reported.
func scanWholeAndInChunks(t *testing.T, ct, body string, chunk int) []string {
	t.Helper()
	if chunk <= 0 || chunk > len(body)+1 {
		chunk = len(body) + 1
	}
	h := ctHeader(ct)
	whole, _ := scanBody(t, h, body, len(body)+1)
	parts, _ := scanBody(t, h, body, chunk)
	if !slices.Equal(whole, parts) {
		t.Fatalf("%q: whole %q, in chunks of %d %q", body, whole, chunk, parts)
	}
	return whole
}

func FuzzBodyScannerForm(f *testing.F) {
	f.Add("a=1&_method=DELETE", 3)
	f.Add("%5Fm%65thod=PUT;x", 1)
	f.Fuzz(func(t *testing.T, body string, chunk int) {
		whole := scanWholeAndInChunks(t, "application/x-www-form-urlencoded", body, chunk)
		// Every _method a Go form parser sees is reported (the scanner reads more).
		q, err := parseFormLikeRack(body)
		if err != nil {
			return
		}
		for _, v := range q {
			if v == "" {
				continue
			}
			if !slices.Contains(whole, strings.ToUpper(v)) && !slices.Contains(whole, unread) {
				t.Fatalf("%q: _method=%q not reported (got %q)", body, v, whole)
			}
		}
	})
}

// phpName is the name PHP registers a decoded form name under (php_register_variable_ex):
// leading spaces dropped, cut at the first NUL, and ' ' and '.' made '_' up to the first
// '[' (where an array starts; the name is then the part before it, with array set).
func phpName(k string) (name string, array bool) {
	k = strings.TrimLeft(k, " ")
	if i := strings.IndexByte(k, 0); i >= 0 {
		k = k[:i]
	}
	b := []byte(k)
	for i, c := range b {
		switch c {
		case ' ', '.':
			b[i] = '_'
		case '[':
			if strings.IndexByte(k[i:], ']') >= 0 {
				return string(b[:i]), true
			}
			b[i] = '_' // an unmatched '[' is '_' too, and ends the mangling
			return string(b), false
		}
	}
	return string(b), false
}

// parseFormLikeRack returns the _method values net/url reads from a form body, split on
// '&' only (as Rack 3 and PHP do), with names read as PHP reads them too.
func parseFormLikeRack(body string) ([]string, error) {
	var out []string
	for pair := range strings.SplitSeq(body, "&") {
		k, v, _ := strings.Cut(pair, "=")
		dk, err := url.QueryUnescape(k)
		if err != nil {
			return nil, err
		}
		dv, err := url.QueryUnescape(v)
		if err != nil {
			return nil, err
		}
		if pk, array := phpName(dk); (dk == "_method" || pk == "_method" && !array) && !strings.Contains(dv, ";") {
			out = append(out, strings.TrimSpace(dv))
		}
	}
	return out, nil
}

// TestAllowsBodyOverride: a body override is held to the injecting binding's methods as a
// header override is; one that allows any method takes any.
func TestAllowsBodyOverride(t *testing.T) {
	p := testPolicy(t)
	bearer := "Bearer " + phOpenAI
	cases := []struct {
		name    string
		r       Request
		body    []string
		matters bool
		allowed bool
	}{
		{"a listed method", req("POST", "api.openai.com", "/v1/files", "Authorization", bearer), []string{"GET"}, true, true},
		{"an unlisted method", req("POST", "api.openai.com", "/v1/files", "Authorization", bearer), []string{"DELETE"}, true, false},
		{"one of two unlisted", req("POST", "api.openai.com", "/v1/files", "Authorization", bearer), []string{"GET", "DELETE"}, true, false},
		{"unreadable", req("POST", "api.openai.com", "/v1/files", "Authorization", bearer), []string{UnparsableBodyOverride}, true, false},
		{"compared as given (the scanner upper-cases)", req("POST", "api.openai.com", "/v1/files", "Authorization", bearer), []string{"get"}, true, false},
		{"any-method binding", req("POST", "api.anthropic.com", "/v1/messages", "X-Api-Key", phAnthropic), []string{"DELETE"}, false, true},
	}
	for _, tc := range cases {
		f := Facts{UID: 1000, SNI: tc.r.Authority}
		d := p.Decide(f, tc.r)
		if d.Action != Inject {
			t.Fatalf("%s: %v %s, want inject", tc.name, d.Action, d.Reason)
		}
		if got := d.BodyOverrideMatters(); got != tc.matters {
			t.Errorf("%s: BodyOverrideMatters %v, want %v", tc.name, got, tc.matters)
		}
		r := tc.r
		r.BodyMethods = tc.body
		if got := p.AllowsBodyOverride(f, r, &d); got != tc.allowed {
			t.Errorf("%s: AllowsBodyOverride(%q) %v, want %v", tc.name, tc.body, got, tc.allowed)
		}
	}
	// A verbatim decision has nothing a body override could change.
	d := p.Decide(Facts{UID: 1000, SNI: "api.openai.com"}, req("POST", "api.openai.com", "/v1/files"))
	if d.BodyOverrideMatters() {
		t.Error("BodyOverrideMatters on a verbatim decision")
	}
}

// BenchmarkBodyScanner scans a chat request with a long prompt, the common injecting body
// that is read for overrides (an LLM API bound to POST only), and a long form (Slack's API).
func BenchmarkBodyScanner(b *testing.B) {
	prompt := strings.Repeat(`Summarise the following text about \"Rails\" and its _method parameter. `, 200)
	for _, tc := range []struct{ name, ct, body string }{
		{"json", "application/json", `{"model":"gpt-4o","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"` + prompt + `"}],"stream":true}`},
		{"form", "application/x-www-form-urlencoded", "channel=C123&text=" + strings.Repeat("hello+world%21+", 600) + "&as_user=true"},
	} {
		b.Run(tc.name, func(b *testing.B) {
			h, body := ctHeader(tc.ct), []byte(tc.body)
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				s := NewBodyScanner(h, func(string) bool { return true })
				s.Write(body)
				s.Close()
			}
		})
	}
}

func FuzzBodyScannerJSON(f *testing.F) {
	f.Add(`{"a":"x\"y","_method":"DELETE"}`, 3)
	f.Add(`{"\u005fmethod":"PUT","b":[1,{"_method":"GET"}]}`, 1)
	f.Fuzz(func(t *testing.T, body string, chunk int) {
		whole := scanWholeAndInChunks(t, "application/json", body, chunk)
		// Every top-level _method encoding/json reads is reported.
		var m map[string]any
		if json.Unmarshal([]byte(body), &m) != nil {
			return
		}
		v, ok := m["_method"]
		if !ok {
			return
		}
		sv, isString := v.(string)
		switch {
		case !isString:
			if !slices.Contains(whole, unread) {
				t.Fatalf("%q: a non-string _method not reported (got %q)", body, whole)
			}
		case strings.TrimSpace(sv) != "":
			if !slices.Contains(whole, strings.ToUpper(strings.TrimSpace(sv))) && !slices.Contains(whole, unread) {
				t.Fatalf("%q: _method=%q not reported (got %q)", body, sv, whole)
			}
		}
	})
}

// A JSON body that does not start with an object settles the scan at its first byte, so an
// interactive stream (gRPC with a JSON codec) is not held back; one that does never does.
func TestBodyScannerSettles(t *testing.T) {
	h := ctHeader("application/grpc+json")
	for _, tc := range []struct {
		body    string
		settled bool
	}{
		{"\x00\x00\x00\x00\x02{}", true},
		{"  [1,2]", true},
		{"  ", false},
		{`{"a":1}`, false},
		{`{"a":1} [`, false},
	} {
		s := NewBodyScanner(h, func(string) bool { return true })
		s.Write([]byte(tc.body))
		if s.Settled() != tc.settled || BodySettledBy([]byte(tc.body)) != tc.settled {
			t.Errorf("%q: Settled %v, BodySettledBy %v, want %v", tc.body, s.Settled(), BodySettledBy([]byte(tc.body)), tc.settled)
		}
	}
	if !BodyMaySettle(h) || BodyMaySettle(ctHeader("application/x-www-form-urlencoded")) {
		t.Error("BodyMaySettle: want true for JSON only")
	}
}

// delimCounter counts across any split of its input as it counts the whole.
func TestDelimCounter(t *testing.T) {
	count := func(b, pat string) int {
		n := 0
		for i := 0; i+len(pat) <= len(b); i++ {
			if b[i:i+len(pat)] == pat {
				n++
			}
		}
		return n
	}
	for _, c := range []struct{ body, pat string }{
		{"--B\r\nx\r\n--B--\r\n", "--B"},
		{"------B------B--B", "----B"},
		{"aaaaaaa", "aa"},
		{strings.Repeat("--xy", 50) + "--x", "--xy"},
	} {
		want := count(c.body, c.pat)
		for chunk := 1; chunk <= len(c.body); chunk++ {
			d := delimCounter{pat: []byte(c.pat)}
			for b := []byte(c.body); len(b) > 0; {
				n := min(chunk, len(b))
				d.feed(b[:n])
				b = b[n:]
			}
			if d.n != want {
				t.Fatalf("%q in chunks of %d: %d, want %d", c.body, chunk, d.n, want)
			}
		}
	}
}

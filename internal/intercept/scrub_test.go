package intercept

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"testing"
)

var reps = []replacement{{from: []byte("sk-REAL-secret-value"), to: []byte("PLACEHOLDER")}}

func TestScrubReaderAcrossChunkBoundaries(t *testing.T) {
	body := "a sk-REAL-secret-value b sk-REAL-secret-valu sk-REAL-secret-value" + strings.Repeat("x", 100) + "sk-REAL-secret-value"
	for size := 1; size < 30; size++ {
		r := newScrubReader(io.NopCloser(chunked(body, size)), reps)
		got, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		want := strings.ReplaceAll(body, "sk-REAL-secret-value", "PLACEHOLDER")
		if string(got) != want {
			t.Fatalf("chunk %d: got %q", size, got)
		}
	}
}

// chunked returns s at most n bytes per Read, as a TCP stream might.
func chunked(s string, n int) io.Reader { return &chunkReader{s: s, n: n} }

type chunkReader struct {
	s string
	n int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if c.s == "" {
		return 0, io.EOF
	}
	k := copy(p[:min(len(p), c.n)], c.s)
	c.s = c.s[k:]
	return k, nil
}

// An SSE event must not wait for more data unless its tail could start a secret.
func TestScrubReaderDoesNotHoldBackEvents(t *testing.T) {
	pr, pw := io.Pipe()
	r := newScrubReader(pr, reps)
	go pw.Write([]byte("data: event 1\n\n"))
	buf := make([]byte, 100)
	n, err := r.Read(buf)
	if err != nil || string(buf[:n]) != "data: event 1\n\n" {
		t.Fatalf("got %q %v", buf[:n], err)
	}
	go pw.Write([]byte("data: sk-RE"))
	n, _ = r.Read(buf)
	if string(buf[:n]) != "data: " {
		t.Fatalf("got %q, want only the part that cannot start a secret", buf[:n])
	}
	go func() { pw.Write([]byte("AL-secret-value\n\n")); pw.Close() }()
	rest, _ := io.ReadAll(r)
	if string(rest) != "PLACEHOLDER\n\n" {
		t.Fatalf("got %q", rest)
	}
}

func TestScrubHeaders(t *testing.T) {
	h := http.Header{"X-Echo": {"Bearer sk-REAL-secret-value"}, "Other": {"fine"}, "X-sk-REAL-secret-value": {"1"}}
	scrubHeaders(h, reps)
	if h.Get("X-Echo") != "Bearer PLACEHOLDER" || h.Get("Other") != "fine" {
		t.Fatalf("%v", h)
	}
	// A header's name is scrubbed too.
	if _, ok := h["X-sk-REAL-secret-value"]; ok || len(h["X-PLACEHOLDER"]) != 1 {
		t.Fatalf("%v", h)
	}
	scrubHeaders(nil, reps) // no trailers: nothing to do
}

func BenchmarkScrubReader(b *testing.B) {
	data := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		io.Copy(io.Discard, newScrubReader(io.NopCloser(bytes.NewReader(data)), reps))
	}
}

// A small body of known length is scrubbed whole and keeps an exact Content-Length.
func TestScrubWhole(t *testing.T) {
	body := `{"echo":"Bearer sk-REAL-secret-value","n":1}`
	resp := &http.Response{Header: http.Header{"Content-Length": {fmt.Sprint(len(body))}},
		ContentLength: int64(len(body)), Body: io.NopCloser(strings.NewReader(body))}
	if err := scrubWhole(resp, reps); err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	want := strings.ReplaceAll(body, "sk-REAL-secret-value", "PLACEHOLDER")
	if string(got) != want || resp.ContentLength != int64(len(want)) || resp.Header.Get("Content-Length") != fmt.Sprint(len(want)) {
		t.Fatalf("got %q, length %d / %q", got, resp.ContentLength, resp.Header.Get("Content-Length"))
	}
	// A body shorter than its Content-Length is an error, not a short response.
	short := &http.Response{Header: http.Header{}, ContentLength: 100, Body: io.NopCloser(strings.NewReader("abc"))}
	if err := scrubWhole(short, reps); err == nil {
		t.Fatal("short body accepted")
	}
	// Larger than one pooled buffer but under the whole-scrub limit.
	big := strings.Repeat("x", 40<<10) + "sk-REAL-secret-value"
	resp = &http.Response{Header: http.Header{}, ContentLength: int64(len(big)), Body: io.NopCloser(strings.NewReader(big))}
	if err := scrubWhole(resp, reps); err != nil {
		t.Fatal(err)
	}
	got, _ = io.ReadAll(resp.Body)
	if !strings.HasSuffix(string(got), "xPLACEHOLDER") || len(got) != len(big)-len("sk-REAL-secret-value")+len("PLACEHOLDER") {
		t.Fatalf("big body scrubbed wrongly (%d bytes)", len(got))
	}
}

// partialTail finds what the plain search over every prefix length finds.
func TestPartialTailMatchesPlainSearch(t *testing.T) {
	plain := func(data []byte, reps []replacement) int {
		best := 0
		for _, r := range reps {
			for k := min(len(r.from)-1, len(data)); k > best; k-- {
				if bytes.HasSuffix(data, r.from[:k]) {
					best = k
					break
				}
			}
		}
		return best
	}
	rnd := rand.New(rand.NewPCG(1, 2))
	word := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = "abc/"[rnd.IntN(4)]
		}
		return b
	}
	for range 20000 {
		var rs []replacement
		for range 1 + rnd.IntN(4) {
			rs = append(rs, replacement{from: word(1 + rnd.IntN(12)), to: []byte("P")})
		}
		data := word(rnd.IntN(20))
		if got, want := partialTail(data, rs), plain(data, rs); got != want {
			t.Fatalf("partialTail(%q, %v) = %d, want %d", data, rs, got, want)
		}
	}
}

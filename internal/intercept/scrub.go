package intercept

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// minScrubLen keeps very short values (which would match ordinary text) out of scrubbing.
// It is the shortest value injected at all, so every injected value is scrubbed; avpctl
// bindings check warns below the same bound.
const minScrubLen = inject.MinValueLen

// replacement is one real value and what the agent sees instead.
type replacement struct {
	from, to []byte
	// escaped is set for a value with bytes an echo inside a document may escape: it is
	// matched written with any of those escapes too (echo.go).
	escaped bool
}

// scrubHeaders replaces real secret bytes in response headers, so an upstream that echoes the
// request (httpbin-style debugging endpoints, error messages quoting the credential) cannot
// hand the real key to the agent (I1).
func scrubHeaders(h http.Header, reps []replacement) {
	for k, vs := range h {
		// A name can hold the value too (a header is any token, and so is a typical key).
		// Names reach the agent in canonical case (or lower case, over HTTP/2), so a value
		// is looked for in them without case: the agent could fold it back.
		if nk := scrubName(k, reps); nk != k {
			delete(h, k)
			h[nk] = append(h[nk], vs...)
		}
	}
	for _, vs := range h {
		for i, v := range vs {
			vs[i] = scrubString(v, reps)
		}
	}
}

// scrubName returns a header name with every real value in it, in any ASCII case, replaced.
func scrubName(k string, reps []replacement) string {
	for _, r := range reps {
		for at := 0; ; {
			i := indexFold(k[at:], r.from)
			if i < 0 {
				break
			}
			i += at
			k = k[:i] + string(r.to) + k[i+len(r.from):]
			at = i + len(r.to)
		}
	}
	return k
}

// indexFold is the index of the first match of sub in s, ASCII letters compared without
// case, or -1. (A name is short; no copy of sub is made, so no real value is folded into
// new memory.)
func indexFold(s string, sub []byte) int {
	lower := func(c byte) byte {
		if 'A' <= c && c <= 'Z' {
			return c + 'a' - 'A'
		}
		return c
	}
	for i := 0; i+len(sub) <= len(s); i++ {
		j := 0
		for j < len(sub) && lower(s[i+j]) == lower(sub[j]) {
			j++
		}
		if j == len(sub) {
			return i
		}
	}
	return -1
}

// replaceReal replaces every real value in b with its placeholder; changed says whether any
// was there (b itself comes back when none was).
func replaceReal(b []byte, reps []replacement) (out []byte, changed bool) {
	for _, r := range reps {
		if r.escaped {
			var ch bool
			if b, ch = replaceEscaped(b, r); ch {
				changed = true
			}
			continue
		}
		if bytes.Contains(b, r.from) {
			b = bytes.ReplaceAll(b, r.from, r.to)
			changed = true
		}
	}
	return b, changed
}

// scrubString returns v with real values replaced; v itself when none is in it. It works on
// bytes, so no real value is ever made into a string.
func scrubString(v string, reps []replacement) string {
	if b, changed := replaceReal([]byte(v), reps); changed {
		return string(b)
	}
	return v
}

// scrubReader replaces real secret bytes in a streamed response body. It holds back only a
// tail that could be the start of a secret, so streamed events still arrive as they are sent.
type scrubReader struct {
	src     io.ReadCloser
	reps    []replacement
	buf     []byte
	out     []byte
	pending []byte
	err     error
	// atEnd runs once, when src has ended and before the end is reported: a response's
	// trailers exist only from then on, and are scrubbed there.
	atEnd func()
	// frames, when the stream is framed, lets a short tail go at a frame's end (frames.go).
	frames *frameTracker
}

func newScrubReader(src io.ReadCloser, reps []replacement) *scrubReader {
	return &scrubReader{src: src, reps: reps, buf: copyBuffers.Get()}
}

func (s *scrubReader) Read(p []byte) (int, error) {
	for len(s.out) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		n, err := s.src.Read(s.buf)
		data := s.buf[:n] // read again only once out is drained
		frameEnd := false
		if s.frames != nil {
			// The raw bytes: frames are counted as the upstream sent them.
			var ok bool
			var ferr error
			if frameEnd, ok, ferr = s.frames.feed(data); ferr != nil {
				s.err = ferr
				return 0, ferr
			} else if !ok {
				s.frames = nil
			}
		}
		if len(s.pending) > 0 {
			data = append(s.pending, data...)
		}
		s.pending = nil
		data, _ = replaceReal(data, s.reps)
		if err != nil {
			s.err = err
			s.out = data
			if s.atEnd != nil {
				s.atEnd()
				s.atEnd = nil
			}
			break
		}
		keep := partialTail(data, s.reps)
		if keep > 0 && keep <= maxReleased && frameEnd {
			keep = 0
			s.frames.released = true
		}
		s.out = data[:len(data)-keep]
		if keep > 0 {
			s.pending = append([]byte(nil), data[len(data)-keep:]...)
		}
	}
	n := copy(p, s.out)
	s.out = s.out[n:]
	return n, nil
}

// partialTail is the length of the longest suffix of data that is a proper prefix of a
// secret: those bytes wait for the next read.
func partialTail(data []byte, reps []replacement) int {
	if len(data) == 0 {
		return 0
	}
	// Such a prefix ends with data's last byte: only the prefixes that end so are tried,
	// found with LastIndexByte, so a read whose last byte is in no secret (a newline, most
	// often) costs one search per value, not one comparison per prefix length.
	last := data[len(data)-1]
	best := 0
	for _, r := range reps {
		if r.escaped {
			best = max(best, partialEscaped(data, r.from))
			continue
		}
		f := r.from[:len(r.from)-1]
		for k := min(len(f), len(data)); k > best; k-- {
			j := bytes.LastIndexByte(f[:k], last)
			if j < best {
				break
			}
			if k = j + 1; bytes.HasSuffix(data, f[:k]) {
				best = k
				break
			}
		}
	}
	return best
}

// Close closes the upstream body and returns the read buffer, wiped (it held the raw
// upstream bytes), to the pool.
func (s *scrubReader) Close() error {
	if s.buf != nil {
		clear(s.buf)
		copyBuffers.Put(s.buf)
		s.buf = nil
		if s.err == nil {
			s.err = errReadAfterClose
		}
	}
	return s.src.Close()
}

var errReadAfterClose = errors.New("read after close")

// maxWholeScrub is the largest response body of an injected request that is scrubbed in one
// piece: read whole, scrubbed, and sent with its (new) Content-Length in one write. Larger
// bodies, bodies of unknown length and event streams are scrubbed as a stream.
const maxWholeScrub = 64 << 10

// scrubWhole reads a small body of known length, scrubs it and replaces it, so the response
// keeps a Content-Length and goes out in one write instead of a flushed chunk per read.
func scrubWhole(resp *http.Response, reps []replacement) error {
	buf := copyBuffers.Get()
	used := 0
	defer func() {
		// It held the raw upstream bytes; only its first used bytes were written. (Clearing
		// all 32 KiB after every small response was 0.4 % of avpd's CPU at 32 connections.)
		clear(buf[:used])
		copyBuffers.Put(buf)
	}()
	var raw []byte
	if resp.ContentLength <= int64(len(buf)) {
		used = int(resp.ContentLength)
		n, err := io.ReadFull(resp.Body, buf[:used])
		if err != nil {
			return err
		}
		raw = buf[:n]
	} else {
		b, err := io.ReadAll(io.LimitReader(resp.Body, resp.ContentLength))
		if err != nil {
			return err
		}
		if int64(len(b)) != resp.ContentLength {
			return io.ErrUnexpectedEOF
		}
		defer clear(b)
		raw = b
	}
	resp.Body.Close()
	out, _ := replaceReal(raw, reps)
	out = bytes.Clone(out) // raw goes back to the pool; out is the scrubbed copy
	resp.Body = io.NopCloser(bytes.NewReader(out))
	resp.ContentLength = int64(len(out))
	resp.Header.Set("Content-Length", strconv.Itoa(len(out)))
	return nil
}

// bufferPool hands out 32 KiB buffers: ReverseProxy's copy buffer (via BufferPool), the
// scrubber's read buffer and scrubWhole's. Without it each proxied response allocated (and
// the GC then scanned) 32-64 KiB.
type bufferPool struct{ p sync.Pool }

var copyBuffers = &bufferPool{p: sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}}

func (b *bufferPool) Get() []byte  { return *b.p.Get().(*[]byte) }
func (b *bufferPool) Put(v []byte) { b.p.Put(&v) }

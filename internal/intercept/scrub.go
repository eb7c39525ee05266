package intercept

import (
	"bytes"
	"io"
	"net/http"
)

// minScrubLen keeps very short values (which would match ordinary text) out of scrubbing.
const minScrubLen = 8

// replacement is one real value and what the agent sees instead.
type replacement struct {
	from, to []byte
}

// scrubHeaders replaces real secret bytes in response headers, so an upstream that echoes the
// request (httpbin-style debugging endpoints, error messages quoting the credential) cannot
// hand the real key to the agent (I1).
func scrubHeaders(h http.Header, reps []replacement) {
	for k, vs := range h {
		for i, v := range vs {
			b := []byte(v)
			changed := false
			for _, r := range reps {
				if bytes.Contains(b, r.from) {
					b = bytes.ReplaceAll(b, r.from, r.to)
					changed = true
				}
			}
			if changed {
				h[k][i] = string(b)
			}
		}
	}
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
}

func newScrubReader(src io.ReadCloser, reps []replacement) *scrubReader {
	return &scrubReader{src: src, reps: reps, buf: make([]byte, 32<<10)}
}

func (s *scrubReader) Read(p []byte) (int, error) {
	for len(s.out) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		n, err := s.src.Read(s.buf)
		data := append(s.pending, s.buf[:n]...)
		s.pending = nil
		for _, r := range s.reps {
			if bytes.Contains(data, r.from) {
				data = bytes.ReplaceAll(data, r.from, r.to)
			}
		}
		if err != nil {
			s.err = err
			s.out = data
			break
		}
		keep := partialTail(data, s.reps)
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

func (s *scrubReader) Close() error { return s.src.Close() }

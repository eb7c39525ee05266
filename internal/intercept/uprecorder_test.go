package intercept

import (
	"bufio"
	"crypto/tls"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// upRecorder is an HTTP/1.1 upstream that records the raw bytes of each request it gets
// (head and body as framed) and answers 200 with an empty body.
type upRecorder struct {
	mu   sync.Mutex
	reqs []string
}

func (rec *upRecorder) serve(c *tls.Conn, br *bufio.Reader) {
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		var sb strings.Builder
		sb.WriteString(req.Method + " " + req.RequestURI + " " + req.Proto + "\n")
		sb.WriteString("Host: " + req.Host + "\n")
		req.Header.Write(&sb)
		b, _ := io.ReadAll(req.Body)
		sb.WriteString("\nBODY:" + string(b) + "\n")
		if len(req.Trailer) > 0 {
			sb.WriteString("TRAILER:\n")
			req.Trailer.Write(&sb)
		}
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, sb.String())
		rec.mu.Unlock()
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
	}
}

func (rec *upRecorder) last(t *testing.T) string {
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		rec.mu.Lock()
		n := len(rec.reqs)
		var s string
		if n > 0 {
			s = rec.reqs[n-1]
		}
		rec.mu.Unlock()
		if n > 0 {
			return s
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("upstream got no request")
	return ""
}

// serveRaw records each request's head as raw bytes (up to the blank line) and answers
// 200 with an empty body; a request with a body is not expected.
func (rec *upRecorder) serveRaw(c *tls.Conn, br *bufio.Reader) {
	for {
		var sb strings.Builder
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			sb.WriteString(l)
			if l == "\r\n" {
				break
			}
		}
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, sb.String())
		rec.mu.Unlock()
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
	}
}

// lastRaw waits for a new request and returns it, clearing the record.
func (rec *upRecorder) lastRaw(t *testing.T) string {
	s := rec.last(t)
	rec.mu.Lock()
	rec.reqs = nil
	rec.mu.Unlock()
	return s
}

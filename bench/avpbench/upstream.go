package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"
)

// The fake upstream: one Go HTTPS server (HTTP/1.1 and h2 by ALPN) answering for the bench
// API name. It counts every request and how many of them carried the real secret for the
// right host, so each load run can prove that injection really happened on every request,
// whatever the load generator verified.
type upstream struct {
	total, good atomic.Int64
	srv         *http.Server
}

// Response bodies. small is the "small fixed JSON" of the issue.
var (
	smallBody = []byte(`{"id":"chatcmpl-bench","object":"chat.completion","model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}`)
	bigBody   = make([]byte, bodySize)
)

const (
	bodySize = 1 << 20
	// sseGap is how long the upstream waits between the first and second SSE event: a proxy
	// that buffered the stream instead of flushing each event would show it as its time to
	// first event.
	sseGap = 10 * time.Millisecond
)

func init() {
	for i := range bigBody {
		bigBody[i] = 'a' + byte(i%26)
	}
}

func (u *upstream) count(r *http.Request) {
	u.total.Add(1)
	if r.Header.Get("Authorization") == "Bearer "+realSecret && hostOnly(r.Host) == apiHost {
		u.good.Add(1)
	}
}

func hostOnly(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		return host
	}
	return h
}

func (u *upstream) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/small", func(w http.ResponseWriter, r *http.Request) {
		u.count(r)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", fmt.Sprint(len(smallBody)))
		w.Write(smallBody)
	})
	mux.HandleFunc("/v1/sse", func(w http.ResponseWriter, r *http.Request) {
		u.count(r)
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		w.WriteHeader(http.StatusOK)
		fl := w.(http.Flusher)
		io.WriteString(w, "data: {\"delta\":\"first\"}\n\n")
		fl.Flush()
		time.Sleep(sseGap)
		io.WriteString(w, "data: [DONE]\n\n")
	})
	mux.HandleFunc("/v1/upload", func(w http.ResponseWriter, r *http.Request) {
		u.count(r)
		n, _ := io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"received":%d}`, n)
	})
	mux.HandleFunc("/v1/download", func(w http.ResponseWriter, r *http.Request) {
		u.count(r)
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", fmt.Sprint(len(bigBody)))
		w.Write(bigBody)
	})
	// check tells a verifying client (curl, before each scenario) whether this request
	// arrived with the real secret, without ever echoing it.
	mux.HandleFunc("/v1/check", func(w http.ResponseWriter, r *http.Request) {
		ok := r.Header.Get("Authorization") == "Bearer "+realSecret && hostOnly(r.Host) == apiHost
		fmt.Fprintf(w, "real_secret=%v proto=%s\n", ok, r.Proto)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.NotFound(w, r)
	})
	return mux
}

// serve starts the upstream on listeners that were created inside the namespace.
func (u *upstream) serve(lns []net.Listener, cert tls.Certificate) {
	u.srv = &http.Server{
		Handler:     u.handler(),
		IdleTimeout: 5 * time.Minute,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			NextProtos:   []string{"h2", "http/1.1"},
		},
		ErrorLog: nil,
	}
	for _, ln := range lns {
		go u.srv.Serve(tls.NewListener(ln, u.srv.TLSConfig))
	}
}

func (u *upstream) snapshot() (total, good int64) { return u.total.Load(), u.good.Load() }

func isReal(s string) bool { return strings.Contains(s, "real_secret=true") }

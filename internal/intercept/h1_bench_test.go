package intercept

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"io"
	"log"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"net/textproto"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// h1BenchReal holds characters that JSON and URLs escape, so an echo of it in either is a
// form other than its raw bytes (see TestEncodedEchoIsScrubbed).
const h1BenchReal = "sk-REAL-0123456789abcdef/0123456789+abcdef=\"x&y"

const h1BenchConfig = `version: 1
backend: {type: file, file: {path: /etc/avp/secrets.yaml}}
secrets:
  OPENAI:
    placeholder: sk-avp-PLACEHOLDER-openai-000000000000
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings:
      - host: api.openai.com
        methods: [POST, GET]
        paths: ["/v1/**"]
`

type mapSecrets map[string]string

func (m mapSecrets) Get(_ context.Context, name string) ([]byte, error) {
	return []byte(m[name]), nil
}

// h1Pair is an agent connection served by the HTTP/1.1 loop, to a local TLS upstream that
// checks the injected key; the facts are what the redirect would have given.
type h1Pair struct {
	agent *tls.Conn
	br    *bufio.Reader
	// upConns counts the connections the upstream accepted.
	upConns *atomic.Int64
	// logs is what avpd logged.
	logs *logBuffer
	// audit is what avpd recorded.
	audit *eventLog
	// charges counts the requests to /v1/charge the upstream received.
	charges *atomic.Int64
	// sinks counts the uploads to /v1/sink the upstream received whole, sinkStarts the
	// requests to it whose head it received.
	sinks, sinkStarts *atomic.Int64
	srv               *Server
	roots             *x509.CertPool
	facts             inject.Facts
	// slowDone gets a value when a request to /v1/slow ended on the upstream's side
	// before the upstream finished it.
	slowDone chan struct{}
}

// eventLog records the decisions an Auditor was given.
type eventLog struct {
	mu     sync.Mutex
	events []audit.Event
	// fail makes the next fail calls fail, as an audit log that does not answer.
	fail int
}

func (l *eventLog) Record(_ context.Context, events ...audit.Event) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fail > 0 {
		l.fail--
		return errors.New("audit log does not answer")
	}
	for i := range events {
		// As the journal client does: an event outside the schema is refused whole.
		if err := events[i].Validate(); err != nil {
			return err
		}
	}
	if len(l.events) < 1000 {
		l.events = append(l.events, events...)
	}
	return nil
}

func (l *eventLog) snapshot() []audit.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]audit.Event(nil), l.events...)
}

type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) logf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(&l.b, format+"\n", args...)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// newH1Pair starts an upstream that offers upProtos in ALPN (only HTTP/1.1 when none are
// given), avpd's server in front of it, and an HTTP/1.1 agent connection.
func newH1Pair(tb testing.TB, upProtos ...string) *h1Pair {
	tb.Helper()
	ca := newTestCA(tb)
	cfg, err := config.Parse("bindings.yaml", []byte(h1BenchConfig))
	if err != nil {
		tb.Fatal(err)
	}
	leaf, err := ca.Leaf("api.openai.com")
	if err != nil {
		tb.Fatal(err)
	}
	if len(upProtos) == 0 {
		upProtos = []string{"http/1.1"}
	}
	upTLS := &tls.Config{Certificates: []tls.Certificate{*leaf}, NextProtos: upProtos}
	if len(upProtos) == 1 && upProtos[0] == "h2-strict" {
		// Speaks only HTTP/2 and says so: a client that does not offer h2 gets the
		// no_application_protocol alert, as strict servers (gRPC's) send. Go's own server
		// would instead talk HTTP/1.1 to such a client.
		upTLS.NextProtos = []string{"h2"}
		upTLS.GetConfigForClient = func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
			if slices.Contains(chi.SupportedProtos, "h2") {
				return nil, nil
			}
			return &tls.Config{Certificates: []tls.Certificate{*leaf}, NextProtos: []string{"h2-only"}}, nil
		}
	}
	upLn, err := tls.Listen("tcp", "127.0.0.1:0", upTLS)
	if err != nil {
		tb.Fatal(err)
	}
	var upConns, charges, sinks, sinkStarts atomic.Int64
	slowDone := make(chan struct{}, 8)
	up := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Upstream-Proto", r.Proto)
		if r.Header.Get("Authorization") != "Bearer "+h1BenchReal {
			http.Error(w, "no key", http.StatusUnauthorized)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/v1/garbled" {
			// A broken upstream that quotes the credential in a malformed response head.
			c, bw, err := w.(http.Hijacker).Hijack()
			if err == nil {
				bw.WriteString("HTTP/1.1 200 OK\r\nEcho " + r.Header.Get("Authorization") + "\r\n\r\n")
				bw.Flush()
				c.Close()
			}
			return
		}
		if r.URL.Path == "/v1/reason-echo" {
			// Quotes the credential in the reason phrase of its status line.
			if c, bw, err := w.(http.Hijacker).Hijack(); err == nil {
				bw.WriteString("HTTP/1.1 401 Invalid key " + strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ") + "\r\nContent-Length: 0\r\n\r\n")
				bw.Flush()
				c.Close()
			}
			return
		}
		if r.URL.Path == "/v1/switch-echo" {
			// An asked-for switch after which the upstream sends back the credential it got.
			c, bw, err := w.(http.Hijacker).Hijack()
			if err == nil {
				bw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n")
				if ext := r.Header.Get("Sec-Websocket-Extensions"); ext != "" {
					// Taken up, as a WebSocket server takes up permessage-deflate.
					bw.WriteString("Sec-WebSocket-Extensions: " + ext + "\r\n")
				} else if r.Header.Get("X-Force-Deflate") != "" {
					// Compressed although not offered.
					bw.WriteString("Sec-WebSocket-Extensions: permessage-deflate\r\n")
				}
				bw.WriteString("\r\n")
				bw.WriteString("you sent " + r.Header.Get("Authorization") + ";")
				bw.Flush()
				c.Close()
			}
			return
		}
		if r.URL.Path == "/v1/ws-turns" {
			// A WebSocket exchange in turns: a frame whose text ends with the first byte of
			// the real value, then nothing until the agent sends, then a frame echoing the
			// credential. An upstream that waits for the agent, as a chat over WebSocket does.
			if c, bw, err := w.(http.Hijacker).Hijack(); err == nil {
				defer c.Close()
				bw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
				first := "your turn, " + h1BenchReal[:1]
				bw.Write(append([]byte{0x81, byte(len(first))}, first...))
				bw.Flush()
				if _, err := bw.ReadByte(); err != nil {
					return
				}
				echo := "you sent " + r.Header.Get("Authorization")
				bw.Write(append([]byte{0x81, byte(len(echo))}, echo...))
				bw.Flush()
			}
			return
		}
		if r.URL.Path == "/v1/grpc-turns" {
			// A bidirectional gRPC call in turns: a message that ends with the first byte of
			// the real value, then the next only after the agent's next message.
			w.Header().Set("Content-Type", "application/grpc")
			w.Header().Set("Trailer", "Grpc-Status")
			msg := func(m string) []byte {
				return append([]byte{0, byte(len(m) >> 24), byte(len(m) >> 16), byte(len(m) >> 8), byte(len(m))}, m...)
			}
			w.Write(msg("your turn, " + h1BenchReal[:1]))
			w.(http.Flusher).Flush()
			if _, err := r.Body.Read(make([]byte, 1)); err != nil {
				return
			}
			w.Write(msg("you sent " + r.Header.Get("Authorization")))
			w.Header().Set("Grpc-Status", "0")
			return
		}
		if r.URL.Path == "/v1/switch" {
			// A protocol switch the request did not ask for.
			c, bw, err := w.(http.Hijacker).Hijack()
			if err == nil {
				bw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\nnot http")
				bw.Flush()
				defer c.Close()
				c.Read(make([]byte, 1))
			}
			return
		}
		if r.URL.Path == "/v1/drop" {
			// Answers in full, then closes the kept-alive connection without saying so.
			if c, bw, err := w.(http.Hijacker).Hijack(); err == nil {
				bw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
				bw.Flush()
				c.Close()
			}
			return
		}
		if r.URL.Path == "/v1/early-echo" {
			// An interim response whose header quotes the credential.
			w.Header().Set("Link", "</echo>; rel=preload; title=\""+r.Header.Get("Authorization")+"\"")
			w.WriteHeader(http.StatusEarlyHints)
			w.Header().Del("Link")
			io.WriteString(w, `{"ok":true}`)
			return
		}
		if r.URL.Path == "/v1/gzip-echo" || r.URL.Path == "/v1/br-echo" {
			// Compressed although asked for identity, and quoting the credential.
			var b bytes.Buffer
			zw := gzip.NewWriter(&b)
			io.WriteString(zw, "you sent "+r.Header.Get("Authorization"))
			zw.Close()
			w.Header().Set("Content-Encoding", "gzip")
			if r.URL.Path == "/v1/br-echo" {
				w.Header().Set("Content-Encoding", "br")
			}
			w.Write(b.Bytes())
			return
		}
		if r.URL.Path == "/v1/grpc-web-text-echo" {
			// gRPC-Web's text form: the frames base64-encoded.
			w.Header().Set("Content-Type", "application/grpc-web-text")
			msg := []byte("you sent " + r.Header.Get("Authorization"))
			io.WriteString(w, base64.StdEncoding.EncodeToString(append([]byte{0, 0, 0, 0, byte(len(msg))}, msg...)))
			return
		}
		if r.URL.Path == "/v1/grpc-echo" {
			// A gRPC method that echoes the credential in its reply message, compressed with
			// gzip when the client accepts it (as grpc-go's server does).
			w.Header().Set("X-Accept", r.Header.Get("Grpc-Accept-Encoding"))
			w.Header().Set("Content-Type", "application/grpc")
			msg := []byte("you sent " + r.Header.Get("Authorization"))
			flag := byte(0)
			if strings.Contains(r.Header.Get("Grpc-Accept-Encoding"), "gzip") || r.Header.Get("X-Force-Gzip") != "" {
				var b bytes.Buffer
				zw := gzip.NewWriter(&b)
				zw.Write(msg)
				zw.Close()
				msg, flag = b.Bytes(), 1
				w.Header().Set("Grpc-Encoding", "gzip")
			}
			w.Header().Set("Trailer", "Grpc-Status")
			w.Write(append([]byte{flag, byte(len(msg) >> 24), byte(len(msg) >> 16), byte(len(msg) >> 8), byte(len(msg))}, msg...))
			w.Header().Set("Grpc-Status", "0")
			return
		}
		if r.URL.Path == "/v1/range-echo" {
			// Serves the credential it got as a document that honours Range, as a file
			// server, or Apache in front of a script, does.
			http.ServeContent(w, r, "echo.txt", time.Time{}, strings.NewReader("you sent "+r.Header.Get("Authorization")))
			return
		}
		if r.URL.Path == "/v1/encoded-echo" {
			// Quotes the credential inside documents rather than verbatim: JSON strings as
			// Go, PHP and JavaScript write them, and URLs (a redirect's query, a path).
			a := r.Header.Get("Authorization")
			w.Header().Set("Location", "https://example.com/cb?token="+url.QueryEscape(a))
			io.WriteString(w, strings.Join(encodedForms(a), "\n"))
			return
		}
		if r.URL.Path == "/v1/trailer-echo" {
			// A trailer that quotes the credential (as a gRPC error message might).
			w.Header().Set("Trailer", "X-Echo")
			io.WriteString(w, `{"ok":true}`)
			w.Header().Set("X-Echo", "you sent "+r.Header.Get("Authorization"))
			return
		}
		if r.URL.Path == "/v1/charge" {
			// Takes the request (a charge, say) and drops the connection without answering.
			charges.Add(1)
			if c, _, err := w.(http.Hijacker).Hijack(); err == nil {
				c.Close()
			}
			return
		}
		if r.URL.Path == "/v1/sink" {
			// Reads the whole upload, then answers with its length.
			sinkStarts.Add(1)
			n, err := io.Copy(io.Discard, r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			sinks.Add(1)
			fmt.Fprintf(w, `{"ok":true,"bytes":%d}`, n)
			return
		}
		if r.URL.Path == "/v1/hangup" {
			// Reads a little of the upload, then drops the connection without an answer.
			io.ReadFull(r.Body, make([]byte, 1024))
			if c, _, err := w.(http.Hijacker).Hijack(); err == nil {
				c.Close()
			}
			return
		}
		if r.URL.Path == "/v1/too-large" {
			// Answers at once without reading the upload, as an API refusing it does.
			http.Error(w, "too large", http.StatusRequestEntityTooLarge)
			return
		}
		if r.URL.Path == "/v1/slow" {
			// Starts a stream and holds it until the request ends on the proxy's side.
			io.WriteString(w, `{"part":1}`)
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				slowDone <- struct{}{}
			case <-time.After(10 * time.Second):
			}
			return
		}
		if r.URL.Path == "/v1/big" {
			// Larger than what is scrubbed whole: streamed through the scrubber, chunked.
			big := strings.Repeat("x", 100<<10)
			w.Header().Set("Content-Length", fmt.Sprint(len(big)))
			io.WriteString(w, big)
			return
		}
		io.WriteString(w, `{"id":"chatcmpl-1","object":"chat.completion","ok":true}`)
	})}
	up.ErrorLog = log.New(io.Discard, "", 0) // the strict upstream's refused handshakes
	up.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			upConns.Add(1)
		}
	}
	go up.Serve(upLn)
	tb.Cleanup(func() { up.Close() })

	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate())
	upAddr := upLn.Addr().String()
	logs := &logBuffer{}
	events := &eventLog{}
	s, err := NewServer(Options{
		Logf:   logs.logf,
		Policy: inject.NewPolicy(cfg), CA: ca, Secrets: mapSecrets{"OPENAI": h1BenchReal}, Auditor: events,
		UpstreamTLS: &tls.Config{RootCAs: roots},
		UpstreamDial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, upAddr)
		},
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Shutdown(context.Background()) })

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	facts := inject.Facts{UID: 1000, SNI: "api.openai.com", OrigDst: netip.MustParseAddrPort("127.0.0.1:443")}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		tc := tls.Server(&agentConn{PrefixConn: NewPrefixConn(c, nil), sni: facts.SNI}, s.agentTLS)
		if tc.Handshake() != nil {
			return
		}
		s.serveH1(tc, facts)
	}()
	agent, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: "api.openai.com", RootCAs: roots, NextProtos: []string{"http/1.1"}})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { agent.Close() })
	return &h1Pair{agent: agent, br: bufio.NewReader(agent), upConns: &upConns, logs: logs, audit: events, charges: &charges, sinks: &sinks, sinkStarts: &sinkStarts, srv: s, roots: roots, facts: facts, slowDone: slowDone}
}

const h1BenchRequest = "GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nUser-Agent: bench\r\nAccept: */*\r\n" +
	"Authorization: Bearer sk-avp-PLACEHOLDER-openai-000000000000\r\n\r\n"

func (p *h1Pair) do(tb testing.TB, raw string) (int, string) {
	resp, body := p.doResp(tb, raw)
	return resp.StatusCode, body
}

// doResp is do with the whole response (its body read).
func (p *h1Pair) doResp(tb testing.TB, raw string) (*http.Response, string) {
	if _, err := io.WriteString(p.agent, raw); err != nil {
		tb.Fatal(err)
	}
	resp, err := http.ReadResponse(p.br, nil)
	if err != nil {
		tb.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return resp, string(body)
}

// TestH1LoopInjects is the loop without the redirect: the upstream answers 200 only when
// the real key arrived, and a path outside the binding goes verbatim (401 here).
func TestH1LoopInjects(t *testing.T) {
	p := newH1Pair(t)
	for i := 0; i < 3; i++ {
		if code, body := p.do(t, h1BenchRequest); code != 200 || !strings.Contains(body, `"ok":true`) {
			t.Fatalf("request %d: %d %q", i, code, body)
		}
	}
	code, _ := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v2/models", 1))
	if code != http.StatusUnauthorized {
		t.Fatalf("outside the binding: %d, want the upstream's 401 for the placeholder", code)
	}
	// A streamed, scrubbed response leaves the upstream connection reusable: its length
	// changed on the agent's side, not the upstream's.
	for i := 0; i < 3; i++ {
		if code, body := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/big", 1)); code != 200 || len(body) != 100<<10 {
			t.Fatalf("big response %d: %d, %d bytes", i, code, len(body))
		}
	}
	// One connection for the injected requests, one for the verbatim one (a connection
	// serves one scope: TestUpstreamConnectionsKeepToOneScope).
	if n := p.upConns.Load(); n != 2 {
		t.Fatalf("the upstream saw %d connections for one agent connection's requests, want 2", n)
	}
}

// TestH1UnaskedSwitch: an upstream that switches protocols without being asked gets the
// agent a 502, not a 101 followed by whatever the upstream sends next.
func TestH1UnaskedSwitch(t *testing.T) {
	p := newH1Pair(t)
	code, body := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/switch", 1))
	if code != http.StatusBadGateway || !strings.Contains(body, "upstream_unreachable") {
		t.Fatalf("got %d %q, want 502 upstream_unreachable", code, body)
	}
}

// TestH1ErrorsKeepSecretsOutOfLogs: an upstream error that quotes what the upstream sent
// (here a malformed header line echoing the credential) is logged without the real value.
func TestH1ErrorsKeepSecretsOutOfLogs(t *testing.T) {
	p := newH1Pair(t)
	code, _ := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/garbled", 1))
	if code != http.StatusBadGateway {
		t.Fatalf("got %d, want 502", code)
	}
	logs := p.logs.String()
	if !strings.Contains(logs, "api.openai.com") {
		t.Fatalf("the upstream error was not logged: %q", logs)
	}
	if strings.Contains(logs, h1BenchReal) {
		t.Fatalf("the real secret reached the log: %q", logs)
	}
}

// TestH1BrokenRequestBody: an agent whose chunked body breaks off gets 400, not a 502 that
// blames the upstream, and nothing is logged as an upstream failure.
func TestH1BrokenRequestBody(t *testing.T) {
	p := newH1Pair(t)
	req := strings.Replace(h1BenchRequest, "GET /v1/models", "POST /v1/chat", 1)
	req = strings.TrimSuffix(req, "\r\n") + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
	code, body := p.do(t, req)
	if code != http.StatusBadRequest || !strings.Contains(body, "bad_request_body") {
		t.Fatalf("got %d %q, want 400 bad_request_body", code, body)
	}
	if logs := p.logs.String(); strings.Contains(logs, "upstream") {
		t.Fatalf("logged as an upstream failure: %q", logs)
	}
}

// TestH1ConnectionListedHeader: an agent that names the inject header in Connection makes
// it hop-by-hop, so it never reaches the upstream. The audit must then not claim an
// injection: the decision is made on the headers that are forwarded.
func TestH1ConnectionListedHeader(t *testing.T) {
	p := newH1Pair(t)
	req := strings.Replace(h1BenchRequest, "Accept: */*\r\n", "Accept: */*\r\nConnection: keep-alive, Authorization\r\n", 1)
	code, _ := p.do(t, req)
	if code != http.StatusUnauthorized {
		t.Fatalf("got %d, want the upstream's 401: the hop-by-hop header is not forwarded", code)
	}
	for _, e := range p.audit.snapshot() {
		if e.Decision == audit.DecisionInject {
			t.Fatalf("audited as injected though nothing was: %+v", e)
		}
	}
}

// TestH1NoRetryOfNonIdempotent: a POST whose reused upstream connection closes without an
// answer may have been acted on (a paid completion, a charge). It is not sent again; the
// agent gets 502 and decides. A GET in the same spot is retried (the e2e test shows it).
func TestH1NoRetryOfNonIdempotent(t *testing.T) {
	p := newH1Pair(t)
	if code, _ := p.do(t, h1BenchRequest); code != 200 {
		t.Fatalf("first request: %d", code)
	}
	post := strings.Replace(h1BenchRequest, "GET /v1/models", "POST /v1/charge", 1)
	post = strings.TrimSuffix(post, "\r\n") + "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
	code, _ := p.do(t, post)
	if code != http.StatusBadGateway {
		t.Fatalf("POST on a connection the upstream dropped: %d, want 502", code)
	}
	if n := p.charges.Load(); n != 1 {
		t.Fatalf("the upstream received the POST %d times, want once", n)
	}
}

// TestH1RetryAfterReload: the HTTP/1.1 loop retries a GET whose pooled connection turns out
// closed only under the policy that decided it; a reload in between makes it a 502, never
// an injection the new policy did not decide.
func TestH1RetryAfterReload(t *testing.T) {
	p := newH1Pair(t)
	if code, _ := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/drop", 1)); code != 200 {
		t.Fatalf("GET /v1/drop: %d", code)
	}
	time.Sleep(50 * time.Millisecond) // the server's FIN arrives
	reloads := reloadBeforeRetry(t, p)
	n := p.upConns.Load()
	if code, body := p.do(t, h1BenchRequest); code != http.StatusBadGateway || *reloads != 1 {
		t.Fatalf("retry after a reload: %d %q (%d retries), want 502 after one", code, body, *reloads)
	}
	if got := p.upConns.Load(); got != n {
		t.Fatalf("the retry reached the upstream (%d new connections) under a policy that did not decide it", got-n)
	}
}

// TestH1PostAfterSilentClose: a POST that finds its pooled connection closed by the server
// (after a complete answer, without Connection: close) goes out on a new one instead of
// failing: it cannot be retried, so the connection is probed before it is used.
func TestH1PostAfterSilentClose(t *testing.T) {
	p := newH1Pair(t)
	if code, _ := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/drop", 1)); code != 200 {
		t.Fatalf("GET /v1/drop: %d", code)
	}
	time.Sleep(50 * time.Millisecond) // the server's FIN arrives
	post := strings.Replace(h1BenchRequest, "GET /v1/models", "POST /v1/models", 1)
	post = strings.TrimSuffix(post, "\r\n") + "Content-Length: 2\r\n\r\n{}"
	if code, body := p.do(t, post); code != 200 {
		t.Fatalf("POST after the server closed the pooled connection: %d %q, want 200", code, body)
	}
}

// TestH1SwitchedProtocolIsScrubbed: after a 101 the upstream's bytes are spliced to the
// agent, but not the real value: an upstream that echoes the credential over the switched
// protocol sends the placeholder to the agent (a WebSocket's framing breaks, failing closed).
func TestH1SwitchedProtocolIsScrubbed(t *testing.T) {
	p := newH1Pair(t)
	req := strings.Replace(h1BenchRequest, "/v1/models", "/v1/switch-echo", 1)
	// The agent offers compression, under which the upstream's echo would pass the
	// scrubber compressed: the offer does not reach the upstream.
	req = strings.TrimSuffix(req, "\r\n") + "Connection: Upgrade\r\nUpgrade: x\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
	if _, err := io.WriteString(p.agent, req); err != nil {
		t.Fatal(err)
	}
	p.agent.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, _ := io.ReadAll(p.br)
	if !strings.HasPrefix(string(got), "HTTP/1.1 101 ") || !strings.Contains(string(got), "you sent Bearer ") {
		t.Fatalf("want the 101 and the echo, got %q", got)
	}
	if strings.Contains(strings.ToLower(string(got)), "permessage-deflate") {
		t.Fatalf("the upstream was offered compression for the switched protocol: %q", got)
	}
	// An upstream that compresses although not offered is not switched to.
	q := newH1Pair(t)
	req = strings.Replace(req, "\r\n\r\n", "\r\nX-Force-Deflate: 1\r\n\r\n", 1)
	if code, body := q.do(t, req); code != http.StatusBadGateway || strings.Contains(body, h1BenchReal) {
		t.Fatalf("an unoffered extension: %d %q, want 502", code, body)
	}
	if strings.Contains(string(got), h1BenchReal) {
		t.Fatalf("the real secret reached the agent over the switched protocol: %q", got)
	}
}

// TestStatsByReason: status splits verbatim and refused requests by reason.
func TestStatsByReason(t *testing.T) {
	p := newH1Pair(t)
	p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v2/models", 1))
	p.do(t, strings.Replace(h1BenchRequest, "Authorization:", "X-Other:", 1))
	p.do(t, strings.Replace(h1BenchRequest, "Host: api.openai.com", "Host: evil.example.com", 1))
	st := p.srv.Stats()
	if st.VerbatimByReason[inject.ReasonPathNotAllowed] != 1 || st.VerbatimByReason[inject.ReasonWrongHeader] != 1 || st.Verbatim != 2 {
		t.Fatalf("verbatim %d by reason %v", st.Verbatim, st.VerbatimByReason)
	}
	if st.RefusedByReason[inject.ReasonHostMismatch] != 1 || st.Refused != 1 {
		t.Fatalf("refused %d by reason %v", st.Refused, st.RefusedByReason)
	}
}

// h2Client returns a client that reaches p's server over HTTP/2, each connection terminated
// as a redirected one would be.
func (p *h1Pair) h2Client(t *testing.T) *http.Client {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go acceptTerminating(ln, p.srv, func() inject.Facts { return p.facts })
	return h2ClientTo(t, ln.Addr().String(), "api.openai.com", p.roots)
}

// TestH2TrailersAreScrubbed: a response trailer that quotes the credential reaches an
// HTTP/2 agent with the placeholder, as a header or the body would.
func TestH2TrailersAreScrubbed(t *testing.T) {
	p := newH1Pair(t)
	req, _ := http.NewRequest("GET", "https://api.openai.com/v1/trailer-echo", nil)
	req.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
	resp, err := p.h2Client(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.ProtoMajor != 2 || resp.StatusCode != 200 || string(body) != `{"ok":true}` {
		t.Fatalf("got %s %d %q", resp.Proto, resp.StatusCode, body)
	}
	echo := resp.Trailer.Get("X-Echo")
	if !strings.HasPrefix(echo, "you sent Bearer ") {
		t.Fatalf("the trailer did not arrive: %v", resp.Trailer)
	}
	if strings.Contains(echo, h1BenchReal) {
		t.Fatalf("the real secret reached the agent in a trailer: %q", echo)
	}
}

// TestInterimResponsesAreScrubbed: a 1xx response whose header quotes the credential reaches
// an HTTP/2 agent whose request goes upstream over HTTP/2 (it asks for trailers) with the
// placeholder; one whose request goes over the HTTP/1.1 pool, and an HTTP/1.1 agent, get no
// interim response at all (those paths do not relay them).
func TestInterimResponsesAreScrubbed(t *testing.T) {
	p := newH1Pair(t, "h2", "http/1.1")
	client := p.h2Client(t)
	for _, te := range []bool{true, false} {
		var interim []string
		ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
			Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
				interim = append(interim, fmt.Sprint(code, h))
				return nil
			},
		})
		req, _ := http.NewRequestWithContext(ctx, "GET", "https://api.openai.com/v1/early-echo", nil)
		req.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
		if te {
			req.Header.Set("Te", "trailers")
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || strings.Contains(fmt.Sprint(interim), h1BenchReal) {
			t.Fatalf("te %v: got %d, interim responses %q", te, resp.StatusCode, interim)
		}
		if te && (len(interim) != 1 || !strings.Contains(interim[0], "103") || !strings.Contains(interim[0], "PLACEHOLDER")) {
			t.Fatalf("over HTTP/2 upstream: interim responses %q, want the 103 with the placeholder", interim)
		}
		if !te && len(interim) != 0 {
			t.Fatalf("over the HTTP/1.1 pool: interim responses %q, want none", interim)
		}
	}
	code, body := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/early-echo", 1))
	if code != 200 || strings.Contains(body, h1BenchReal) {
		t.Fatalf("HTTP/1.1: %d %q", code, body)
	}
}

// encodedForms is s as JSON and URL encoders write it, by their own code: Go's encoding/json
// with and without its HTML escapes, PHP's json_encode (which escapes '/'), url.QueryEscape
// and url.PathEscape, JavaScript's encodeURIComponent, and query escaping in lower-case hex.
func encodedForms(s string) []string {
	goJSON, _ := json.Marshal(s)
	var plain bytes.Buffer
	enc := json.NewEncoder(&plain)
	enc.SetEscapeHTML(false)
	enc.Encode(s)
	js := strings.TrimSpace(plain.String())
	q := url.QueryEscape(s)
	component := strings.ReplaceAll(q, "+", "%20")
	for _, c := range "!*'()" {
		component = strings.ReplaceAll(component, url.QueryEscape(string(c)), string(c))
	}
	lower := regexp.MustCompile(`%[0-9A-F]{2}`).ReplaceAllStringFunc(q, strings.ToLower)
	// HTML: Go's html package, and Python's html.escape (as Django's debug page writes it).
	py := strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;", "'", "&#x27;").Replace(s)
	// XML text as Python's xml.sax.saxutils.escape writes it: the quotes as they are.
	sax := strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
	return []string{string(goJSON), js, strings.ReplaceAll(js, "/", `\/`), q, url.PathEscape(s), component, lower, html.EscapeString(s), py, sax}
}

// TestEncodedEchoIsScrubbed: an upstream that quotes the credential JSON-escaped or
// percent-encoded (in the body and in a Location header) hands the agent the placeholder
// in that form, never the real value in any of them.
func TestEncodedEchoIsScrubbed(t *testing.T) {
	p := newH1Pair(t)
	resp, body := p.doResp(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/encoded-echo", 1))
	got := body + "\n" + resp.Header.Get("Location")
	for _, f := range append(encodedForms(h1BenchReal), h1BenchReal) {
		f = strings.Trim(f, `"`)
		if strings.Contains(got, f) {
			t.Errorf("the real value reached the agent as %q:\n%s", f, got)
		}
	}
	if n := strings.Count(got, "sk-avp-PLACEHOLDER-openai-000000000000"); n != 11 {
		t.Errorf("the placeholder is in the answer %d times, want 11:\n%s", n, got)
	}
}

// wantUpConns fails the test unless the upstream has seen n connections by now.
func (p *h1Pair) wantUpConns(t *testing.T, n int64, when string) {
	t.Helper()
	if got := p.upConns.Load(); got != n {
		t.Fatalf("%s: %d upstream connections, want %d", when, got, n)
	}
}

// TestUpstreamConnectionsKeepToOneScope: an injected request and a verbatim one never share
// an upstream connection, one after the other or pipelined, over HTTP/1.1 and HTTP/2; two
// injected with the same secret do. (An upstream that answers once too often would shift
// an echo of the secret onto the verbatim request, which is not scrubbed of it.)
func TestUpstreamConnectionsKeepToOneScope(t *testing.T) {
	p := newH1Pair(t)
	verbatim := strings.Replace(h1BenchRequest, "/v1/models", "/v2/models", 1) // outside the binding
	for i, req := range []string{h1BenchRequest, verbatim, h1BenchRequest, verbatim} {
		code, _ := p.do(t, req)
		if want := []int{200, 401}[i%2]; code != want {
			t.Fatalf("request %d: %d, want %d", i, code, want)
		}
	}
	p.wantUpConns(t, 2, "one after the other")
	// Pipelined: the connection held for the next request is not the other scope's.
	if _, err := io.WriteString(p.agent, h1BenchRequest+verbatim+h1BenchRequest); err != nil {
		t.Fatal(err)
	}
	for i, want := range []int{200, 401, 200} {
		resp, err := http.ReadResponse(p.br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("pipelined request %d: %d, want %d", i, resp.StatusCode, want)
		}
	}
	p.wantUpConns(t, 2, "pipelined")
	p = newH1Pair(t) // a pool of its own, so no connection of the above is in the count
	h2 := p.h2Client(t)
	for i, path := range []string{"/v1/models", "/v2/models", "/v1/models"} {
		resp, _ := h2Get(t, h2, "GET", path)
		if want := []int{200, 401}[i%2]; resp.StatusCode != want {
			t.Fatalf("HTTP/2 request %d: %d, want %d", i, resp.StatusCode, want)
		}
	}
	p.wantUpConns(t, 2, "HTTP/2")
}

// TestUpstreamConnectionNotReusedAfterAGetWithABody: a server may leave a GET's body unread
// and take it for the next request; the connection such a request went over is not used
// again. A POST's is.
func TestUpstreamConnectionNotReusedAfterAGetWithABody(t *testing.T) {
	p := newH1Pair(t)
	post := strings.Replace(h1BenchRequest, "GET ", "POST ", 1)
	post = strings.Replace(post, "\r\n\r\n", "\r\nContent-Length: 2\r\n\r\n{}", 1)
	for i := range 2 {
		if code, _ := p.do(t, post); code != 200 {
			t.Fatalf("POST %d: %d", i, code)
		}
	}
	p.wantUpConns(t, 1, "two POSTs with a body")
	get := strings.Replace(h1BenchRequest, "\r\n\r\n", "\r\nContent-Length: 2\r\n\r\n{}", 1)
	for i := range 2 {
		if code, _ := p.do(t, get); code != 200 {
			t.Fatalf("GET with a body %d: %d", i, code)
		}
	}
	// The first GET reused the POSTs' connection and closed it; the second dialled one.
	p.wantUpConns(t, 2, "after two GETs with a body")
	if code, _ := p.do(t, h1BenchRequest); code != 200 {
		t.Fatalf("GET: %d", code)
	}
	p.wantUpConns(t, 3, "a GET after them")
}

// TestCompressedGRPCEchoIsRefused: gRPC compresses messages itself (grpc-encoding), past
// the scrubber, which sees only the compressed bytes. An injected gRPC request asks for
// identity, and an answer compressed anyway is refused.
func TestCompressedGRPCEchoIsRefused(t *testing.T) {
	p := newH1Pair(t, "h2", "http/1.1")
	c := p.h2Client(t)
	resp, body := h2Get(t, c, "POST", "/v1/grpc-echo", "Content-Type", "application/grpc", "Grpc-Accept-Encoding", "gzip, identity")
	if resp.Header.Get("X-Accept") != "identity" {
		t.Errorf("the upstream got grpc-accept-encoding %q, want identity", resp.Header.Get("X-Accept"))
	}
	if resp.StatusCode != 200 || !strings.Contains(body, "you sent Bearer sk-avp-PLACEHOLDER-openai-000000000000") {
		t.Errorf("asked for identity: %d %q, want 200 and the echo scrubbed", resp.StatusCode, body)
	}
	resp, body = h2Get(t, c, "POST", "/v1/grpc-echo", "Content-Type", "application/grpc", "X-Force-Gzip", "1")
	if resp.StatusCode != http.StatusBadGateway || resp.Header.Get("Grpc-Encoding") != "" {
		t.Errorf("compressed anyway: %d %v %q, want 502", resp.StatusCode, resp.Header, body)
	}
	// gRPC-Web's text form base64-encodes the frames, past the scrubber too.
	resp, body = h2Get(t, c, "POST", "/v1/grpc-web-text-echo", "Content-Type", "application/grpc-web-text")
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("grpc-web-text: %d %q, want 502", resp.StatusCode, body)
	}
}

// TestReasonPhraseIsScrubbed: the reason phrase of the upstream's status line reaches an
// HTTP/1.1 agent, so an echo there is scrubbed like one in a header.
func TestReasonPhraseIsScrubbed(t *testing.T) {
	p := newH1Pair(t)
	if _, err := io.WriteString(p.agent, strings.Replace(h1BenchRequest, "/v1/models", "/v1/reason-echo", 1)); err != nil {
		t.Fatal(err)
	}
	line, err := p.br.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(line, h1BenchReal) || !strings.Contains(line, "sk-avp-PLACEHOLDER-openai-000000000000") {
		t.Fatalf("status line %q: want the placeholder, not the real value", line)
	}
}

// TestRangeOfEchoIsNotServed: a Range would let the agent read an echoed credential a
// piece at a time, each piece too short to be recognized; an injected request goes
// upstream without it, and the agent gets the whole answer, scrubbed.
func TestRangeOfEchoIsNotServed(t *testing.T) {
	p := newH1Pair(t)
	req := strings.Replace(h1BenchRequest, "/v1/models", "/v1/range-echo", 1)
	req = strings.Replace(req, "Accept: */*\r\n", "Accept: */*\r\nRange: bytes=20-35\r\n", 1)
	resp, body := p.doResp(t, req)
	if resp.StatusCode != http.StatusOK || body != "you sent Bearer sk-avp-PLACEHOLDER-openai-000000000000" {
		t.Fatalf("%d %q: want 200 and the whole answer, scrubbed", resp.StatusCode, body)
	}
	h2resp, b := h2Get(t, p.h2Client(t), "GET", "/v1/range-echo", "Range", "bytes=20-35")
	if h2resp.StatusCode != http.StatusOK || b != "you sent Bearer sk-avp-PLACEHOLDER-openai-000000000000" {
		t.Fatalf("HTTP/2: %d %q: want 200 and the whole answer, scrubbed", h2resp.StatusCode, b)
	}
}

// TestCompressedEchoIsScrubbed: an upstream that compresses although asked for identity
// cannot carry the credential past the scrubber: gzip is decoded and scrubbed (the agent gets
// it uncompressed), an encoding avpd cannot decode is a 502, over HTTP/1.1 and HTTP/2.
func TestCompressedEchoIsScrubbed(t *testing.T) {
	p := newH1Pair(t)
	code, body := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/gzip-echo", 1))
	if code != 200 || body != "you sent Bearer sk-avp-PLACEHOLDER-openai-000000000000" {
		t.Fatalf("HTTP/1.1 gzip: %d %q", code, body)
	}
	if code, body := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/br-echo", 1)); code != http.StatusBadGateway || strings.Contains(body, h1BenchReal) {
		t.Fatalf("HTTP/1.1 br: %d %q, want 502", code, body)
	}
	c := p.h2Client(t)
	for path, want := range map[string]int{"/v1/gzip-echo": 200, "/v1/br-echo": http.StatusBadGateway} {
		req, _ := http.NewRequest("GET", "https://api.openai.com"+path, nil)
		req.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
		req.Header.Set("Accept-Encoding", "gzip")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want || resp.Header.Get("Content-Encoding") != "" || bytes.Contains(raw, []byte(h1BenchReal)) {
			t.Fatalf("HTTP/2 %s: %d %v %q", path, resp.StatusCode, resp.Header, raw)
		}
	}
}

// BenchmarkH1Request is one keep-alive request through the HTTP/1.1 loop: parse, decide,
// fetch, inject, forward over TLS, read and relay the response. The allocations include
// the benchmark's own client and upstream (net/http server), which are the same in every
// run; compare them between changes of the loop.
func BenchmarkH1Request(b *testing.B) {
	p := newH1Pair(b)
	b.ReportAllocs()
	for b.Loop() {
		if code, _ := p.do(b, h1BenchRequest); code != 200 {
			b.Fatal(fmt.Sprint("status ", code))
		}
	}
}

// TestAliveProbe: the probe of an idle upstream connection tells one the server closed from
// one still open, without blocking.
func TestAliveProbe(t *testing.T) {
	ca := newTestCA(t)
	leaf, err := ca.Leaf("api.openai.com")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*leaf}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate())
	conn := func() (*upConn, net.Conn) {
		t.Helper()
		accepted := make(chan net.Conn, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				c.(*tls.Conn).Handshake()
			}
			accepted <- c
		}()
		tc, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: "api.openai.com", RootCAs: roots})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tc.Close() })
		srv := <-accepted
		up := &upConn{c: tc, lastUsed: time.Now().Add(-2 * upstreamProbeAfter)}
		up.lr = limitReader{r: tc, n: math.MaxInt64}
		up.br = bufio.NewReader(&up.lr)
		return up, srv
	}
	open, srv1 := conn()
	defer srv1.Close()
	if !alive(open, false) {
		t.Fatal("an open connection was taken for closed")
	}
	// closedConn is a connection whose server closed it, once the close reached the socket:
	// on a loaded machine the kernel can take a while to deliver it, and until then the
	// connection does look alive.
	closedConn := func() *upConn {
		up, srv := conn()
		srv.Close()
		rc, err := up.c.NetConn().(syscall.Conn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			if peekSocket(rc) != 0 || time.Now().After(deadline) {
				return up
			}
		}
	}
	closed := closedConn()
	if alive(closed, false) {
		t.Fatal("a connection the server closed was taken for alive")
	}
	// Idle for under a second: taken as it is, unless the probe is asked for.
	closed.lastUsed = time.Now()
	if !alive(closed, false) || alive(closed, true) {
		t.Fatal("a connection idle for under a second: want it taken without a probe, and seen closed with one")
	}
	// A loaded machine, where the read's deadline passes before the read is tried: the
	// bytes still waiting are not taken for TLS's own.
	defer func(w time.Duration) { aliveReadWait = w }(aliveReadWait)
	aliveReadWait = 0
	if alive(closedConn(), false) {
		t.Fatal("a connection the server closed was taken for alive when the read timed out first")
	}
}

// TestOverridesAreDecided: a method or path override the binding does not allow leaves the
// request verbatim over HTTP/1.1 and HTTP/2 (the upstream answers the placeholder with
// 401), and the audit names why; the same request without it is injected.
func TestOverridesAreDecided(t *testing.T) {
	p := newH1Pair(t)
	h2 := p.h2Client(t)
	cases := []struct{ header, value, reason string }{
		{"X-HTTP-Method-Override", "DELETE", inject.ReasonMethodOverride},
		{"X-Original-URL", "/admin", inject.ReasonPathOverride},
		{"X_HTTP_METHOD_OVERRIDE", "DELETE", inject.ReasonMethodOverride},
		{"", "", inject.ReasonAllowed},
	}
	for _, tc := range cases {
		want := http.StatusUnauthorized
		if tc.header == "" {
			want = http.StatusOK
		}
		req := h1BenchRequest
		if tc.header != "" {
			req = strings.Replace(req, "Accept: */*\r\n", "Accept: */*\r\n"+tc.header+": "+tc.value+"\r\n", 1)
		}
		if code, _ := p.do(t, req); code != want {
			t.Errorf("HTTP/1.1 %s %q: %d, want %d", tc.header, tc.value, code, want)
		}
		r, _ := http.NewRequest("GET", "https://api.openai.com/v1/models", nil)
		r.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
		if tc.header != "" {
			r.Header.Set(tc.header, tc.value)
		}
		resp, err := h2.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want || resp.ProtoMajor != 2 {
			t.Errorf("HTTP/%d %s %q: %d, want %d over HTTP/2", resp.ProtoMajor, tc.header, tc.value, resp.StatusCode, want)
		}
		n := 0
		for _, e := range p.audit.snapshot() {
			if e.Reason == tc.reason && e.Path == "/v1/models" {
				n++
			}
		}
		if n < 2 {
			t.Errorf("%s: %d audit events with reason %s, want one per protocol", tc.header, n, tc.reason)
		}
	}
}

// TestH1TrailersAreRelayedAndScrubbed: an HTTP/1.1 agent got the upstream's chunked body
// without its trailers (and without the Trailer header that announces them), which an
// HTTP/2 agent gets; a trailer that quotes the credential must reach it with the
// placeholder, as a header would.
func TestH1TrailersAreRelayedAndScrubbed(t *testing.T) {
	p := newH1Pair(t)
	for _, auth := range []string{"Bearer sk-avp-PLACEHOLDER-openai-000000000000"} {
		resp, body := p.doResp(t, "GET /v1/trailer-echo HTTP/1.1\r\nHost: api.openai.com\r\nTE: trailers\r\nAuthorization: "+auth+"\r\n\r\n")
		if resp.StatusCode != 200 || body != `{"ok":true}` {
			t.Fatalf("%s: got %d %q", auth, resp.StatusCode, body)
		}
		// ReadResponse takes the Trailer header's names as resp.Trailer's keys.
		if _, ok := resp.Trailer["X-Echo"]; !ok {
			t.Errorf("%s: no trailer announced: %v", auth, resp.Trailer)
		}
		echo := resp.Trailer.Get("X-Echo")
		if echo != "you sent "+auth {
			t.Errorf("%s: trailer %q, want %q", auth, echo, "you sent "+auth)
		}
		if strings.Contains(echo, h1BenchReal) {
			t.Fatalf("the real secret reached the agent in a trailer: %q", echo)
		}
	}
}

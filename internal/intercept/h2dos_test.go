package intercept

// One enrolled agent against avpd's memory and audit trail over HTTP/2 (a red team's
// findings; each test failed before its fix).

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// rawH2WithWindow opens an HTTP/2 agent connection by hand whose SETTINGS carry initWin as
// SETTINGS_INITIAL_WINDOW_SIZE, and drains what the server sends in the background.
func rawH2WithWindow(t *testing.T, addr string, e *rawEnv, initWin uint32) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: rawHost, RootCAs: e.roots, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	var s [6]byte
	binary.BigEndian.PutUint16(s[:2], 4) // SETTINGS_INITIAL_WINDOW_SIZE
	binary.BigEndian.PutUint32(s[2:], initWin)
	writeH2Frame(c, frSettings, 0, 0, s[:])
	go func() {
		for {
			var fh [9]byte
			if _, err := io.ReadFull(c, fh[:]); err != nil {
				return
			}
			io.CopyN(io.Discard, c, int64(fh[0])<<16|int64(fh[1])<<8|int64(fh[2]))
			if fh[3] == frSettings && fh[4]&1 == 0 {
				writeH2Frame(c, frSettings, 1, 0, nil)
			}
		}
	}()
	return c
}

// TestH2UpstreamAnswerBufferIsBounded: an HTTP/2 agent's request that asks for
// trailers ("te: trailers", as any gRPC client does) goes upstream over net/http's HTTP/2
// Transport, whose per-stream receive window is 4 MiB. An agent that opens streams with a
// flow-control window of 0 (or just never reads) and asks for a large answer (a file, a
// long completion, any big GET of the API) makes avpd read and keep up to 4 MiB of the
// upstream's answer per stream: 60 times the 64 KiB per slot the README's limit reasoning
// assumes ("at the default limit, one user's connections can hold about 1 GiB at most").
// At the default limit that is 16384 x 4 MiB = 64 GiB from one agent.
func TestH2UpstreamAnswerBufferIsBounded(t *testing.T) {
	h2ZeroWindowHolds(t, []string{"h2"}, "te", "trailers")
}

func h2ZeroWindowHolds(t *testing.T, upProtos []string, extra ...string) {
	big := bytes.Repeat([]byte("x"), 1<<20)
	e := newRawEnv(t, "real-secret-value-0123456789", upProtos, serveHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		for i := 0; i < 16; i++ { // 16 MiB
			if _, err := w.Write(big); err != nil {
				return
			}
		}
	})))
	base := heapInUse()
	const streams = 20
	c := rawH2WithWindow(t, e.agent.Addr().String(), e, 0)
	for i := 0; i < streams; i++ {
		blk := h2Block(h2Req("GET", rawHost, fmt.Sprintf("/v1/files/%d/content", i), extra...))
		writeH2Frame(c, frHeaders, flEndHeaders|flEndStream, uint32(2*i+1), blk)
	}
	time.Sleep(3 * time.Second)
	held := int64(heapInUse()) - int64(base)
	per := held / streams
	t.Logf("%d streams that do not read: avpd heap grew %.1f MiB, %.0f KiB per stream", streams, float64(held)/(1<<20), float64(per)/1024)
	if per > 256<<10 {
		t.Fatalf("each HTTP/2 stream whose agent does not read holds %.0f KiB of the upstream's answer in avpd (README: ~64 KiB per slot; 16384 slots x this = %.0f GiB for one uid)", float64(per)/1024, float64(per)*16384/(1<<30))
	}
}

// TestH2RequestBodyBufferIsBounded: net/http's HTTP/2 server advertises a 1 MiB
// receive window per stream and per connection (HTTP2Config leaves MaxReceiveBuffer* at
// their defaults), and keeps whatever DATA the agent sends until the handler reads it. A
// stream whose handler does not read yet (its upstream, the agent's chosen original
// destination, accepts TCP and never answers the TLS handshake: 10 s, then the agent
// starts again) holds 1 MiB of the agent's body. One connection plus one stream is two
// slots of proxy.max_connections_per_uid, so 512 KiB per slot, 8 GiB at the default limit,
// where the README promises about 1 GiB.
func TestH2RequestBodyBufferIsBounded(t *testing.T) {
	e := newRTEnv(t)
	addr := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: tarpitAddr})
	base := heapInUse()
	const conns = 24
	chunk := bytes.Repeat([]byte("a"), 16<<10)
	for i := 0; i < conns; i++ {
		c := e.dialAgent(t, addr, "h2")
		h2Preface(t, c)
		blk := h2Block(h2Req("POST", rawHost, "/v1/upload", "content-type", "application/octet-stream", "content-length", fmt.Sprint(1<<20)))
		writeH2Frame(c, frHeaders, flEndHeaders, 1, blk)
		for n := 0; n < (1<<20)-(16<<10); n += len(chunk) {
			if err := writeH2Frame(c, frData, 0, 1, chunk); err != nil {
				t.Fatal(err)
			}
		}
	}
	time.Sleep(1500 * time.Millisecond)
	held := int64(heapInUse()) - int64(base)
	slots := e.openSlots(1001) + conns // each connection is a slot too through handleConn
	per := held / int64(slots)
	t.Logf("%d connections, 1 stream each, body not yet read: heap +%.1f MiB, %d slots, %.0f KiB per slot (tarpit conns %d)", conns, float64(held)/(1<<20), slots, float64(per)/1024, e.tarpits.Load())
	if per > 128<<10 {
		t.Fatalf("each slot of the user's budget holds %.0f KiB of request body buffered by the HTTP/2 server (README: ~64 KiB per slot, 1 GiB at the default limit; this is %.1f GiB)", float64(per)/1024, float64(per)*16384/(1<<30))
	}
}

// testJournal starts a real audit journal (fdatasync on disk) and returns a client for it.
func testJournal(t *testing.T) *audit.JournalClient {
	t.Helper()
	dir := t.TempDir()
	j, err := audit.OpenJournal(audit.JournalOptions{Log: filepath.Join(dir, "audit.jsonl"), Key: filepath.Join(dir, "key"), AllowUIDs: []uint32{uint32(os.Getuid())}, Logf: func(string, ...any) {}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := audit.ListenJournal(filepath.Join(dir, "j.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { j.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return audit.NewJournalClient(filepath.Join(dir, "j.sock"), 2*time.Second)
}

// TestH2ResetWhileAuditingIsNotAnAuditFailure: an HTTP/2 agent that resets each stream
// (RST_STREAM, as in "rapid reset") right after its HEADERS cancels the request's context
// while prepare waits for the journal's acknowledgement. The journal is healthy, but avpd
// takes the cancelled wait as the audit log failing: it counts an audit error, logs an
// unthrottled "audit: ... canceled before the journal acknowledged" line per stream (the
// README: lines an agent can cause are throttled, since past journald's 10,000 lines per 30
// s every avpd line is dropped, real audit failures included), and queues a bogus late
// "audit_unavailable" refusal per stream into the shared queue of 1024, past which other
// users' genuine late refusals are dropped.
func TestH2ResetWhileAuditingIsNotAnAuditFailure(t *testing.T) {
	e := newRawEnv(t, "real-secret-value-0123456789", []string{"h2", "http/1.1"}, serveHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	})))
	e.srv.auditor = testJournal(t)
	c := rawH2WithWindow(t, e.agent.Addr().String(), e, 65535)
	blk := h2Block(h2Req("GET", rawHost, "/v1/models", "authorization", "Bearer "+rawPlaceholder))
	var rst [4]byte
	binary.BigEndian.PutUint32(rst[:], 0x8) // CANCEL
	start := time.Now()
	var id uint32 = 1
	for time.Since(start) < 2*time.Second {
		var b bytes.Buffer
		for k := 0; k < 50; k++ {
			writeH2Frame(&b, frHeaders, flEndHeaders|flEndStream, id, blk)
			writeH2Frame(&b, frRST, 0, id, rst[:])
			id += 2
		}
		if _, err := c.Write(b.Bytes()); err != nil {
			t.Logf("write: %v", err)
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	st := e.srv.Stats()
	lines := strings.Count(e.logs.String(), "canceled before the journal acknowledged")
	t.Logf("streams sent %d; requests %d, audit errors %d, late dropped %d, log lines %d", (id-1)/2, st.Requests, st.AuditErrors, st.LateDropped, lines)
	if st.AuditErrors > 0 || lines > 10 || st.LateDropped > 0 {
		t.Fatalf("one agent resetting its own streams, with a healthy journal: %d audit errors counted, %d unthrottled 'audit:' log lines, %d late refusals dropped (shared queue of %d)", st.AuditErrors, lines, st.LateDropped, lateQueue)
	}
}

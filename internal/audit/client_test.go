package audit

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The ack fast path takes exactly the journal's form and nothing else; whatever it refuses
// goes to encoding/json, which decides.
func TestClientAckFastPath(t *testing.T) {
	for _, tc := range []struct {
		msg  string
		fast bool
		acks []uint64
	}{
		{`{"acks":[[1,2]]}`, true, []uint64{1}},
		{`{"acks":[[1,2],[3,4],[18446744073709551615,5]]}`, true, []uint64{1, 3, 18446744073709551615}},
		{`{"acks":[]}`, false, nil},
		{`{"acks":[[0,2]]}`, false, nil},
		{`{"acks":[[01,2]]}`, false, nil},
		{`{"acks":[[1,2],]}`, false, nil},
		{`{"acks":[[1,2][3,4]]}`, false, nil},
		{`{"acks":[[1, 2]]}`, false, nil},
		{`{"acks":[[1,2,3]]}`, false, nil},
		{`{"acks":[[-1,2]]}`, false, nil},
		{`{"acks":[[18446744073709551616,2]]}`, false, nil},
		{`{"acks":[[1,2]],"error":"x"}`, false, nil},
		{`{"id":1,"error":"x"}`, false, nil},
	} {
		cc := &clientConn{pending: map[uint64]*waiter{}}
		ws := map[uint64]*waiter{}
		for _, id := range []uint64{1, 3, 18446744073709551615} {
			w := &waiter{ch: make(chan error, 1), left: 1}
			ws[id] = w
			cc.pending[id] = w
		}
		if got := cc.ackFast([]byte(tc.msg)); got != tc.fast {
			t.Errorf("%s: fast path %v, want %v", tc.msg, got, tc.fast)
			continue
		}
		for _, id := range tc.acks {
			if w := ws[id]; !w.done || len(w.ch) != 1 {
				t.Errorf("%s: event %d not acked", tc.msg, id)
			}
			delete(ws, id)
		}
		for id, w := range ws {
			if w.done {
				t.Errorf("%s: event %d acked", tc.msg, id)
			}
		}
	}
	// Over 64 pairs (the fast path's array) in one message, and a Record with several events.
	cc := &clientConn{pending: map[uint64]*waiter{}}
	w := &waiter{ch: make(chan error, 1), left: 100}
	msg := []byte(`{"acks":[`)
	for id := uint64(1); id <= 100; id++ {
		cc.pending[id] = w
		if id > 1 {
			msg = append(msg, ',')
		}
		msg = append(msg, '[')
		msg = append(msg, []byte(itoa(id))...)
		msg = append(msg, ",7]"...)
	}
	msg = append(msg, "]}"...)
	if !cc.ackFast(msg) || !w.done || w.left != 0 || len(cc.pending) != 0 {
		t.Fatalf("100 acks: done %v, %d left, %d pending", w.done, w.left, len(cc.pending))
	}
}

func itoa(v uint64) string {
	if v == 0 {
		return "0"
	}
	var b []byte
	for ; v > 0; v /= 10 {
		b = append([]byte{byte('0' + v%10)}, b...)
	}
	return string(b)
}

// A journal that does not read: Records write until the socket buffer is full, then each
// one fails within its deadline instead of blocking in its write, and the connection stays
// usable (a timed-out write sent nothing).
func TestClientWriteTimesOutWhenTheJournalDoesNotRead(t *testing.T) {
	sock, ln := fakeJournalSocket(t)
	accepted := make(chan *net.UnixConn, 1)
	go func() {
		c, err := ln.AcceptUnix()
		if err == nil {
			accepted <- c
		}
	}()
	c := NewJournalClient(sock, 200*time.Millisecond)
	defer c.Close()
	big := Event{Type: TypeProxyStop, Detail: strings.Repeat("x", maxField)}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var slowest time.Duration
	var errs []error
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 5; i++ {
				t0 := time.Now()
				err := c.Record(context.Background(), big, big, big, big)
				d := time.Since(t0)
				mu.Lock()
				slowest = max(slowest, d)
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if slowest > time.Second {
		t.Fatalf("a Record took %v with a 200ms deadline", slowest)
	}
	for _, err := range errs {
		if !errors.Is(err, ErrJournalUnavailable) || !strings.Contains(err.Error(), "within the deadline") {
			t.Fatalf("got %v, want a deadline error", err)
		}
	}
	if cc := c.cur.Load(); cc == nil || cc.isDead() {
		t.Fatal("a write that timed out killed the connection")
	}
	(<-accepted).Close()
}

// A Record of many events goes out with sendmmsg, in order; one larger than the socket's
// buffer goes out in several calls as the journal makes room. Every event is acked once,
// in the log in the order given.
func TestClientRecordOfManyEvents(t *testing.T) {
	dir := shortDir(t)
	j := openTestJournal(t, dir, func(o *JournalOptions) { o.Logf = nil })
	sock, stop := serveJournal(t, j, dir)
	c := NewJournalClient(sock, 10*time.Second)
	defer c.Close()
	var want []string
	for _, tc := range []struct{ n, size int }{{2, 10}, {50, 10}, {120, maxField - 20}} {
		evs := make([]Event, tc.n)
		for i := range evs {
			evs[i] = Event{Type: TypeProxyStop, Detail: fmt.Sprintf("%d/%d/%s", tc.n, i, strings.Repeat("z", tc.size))}
			want = append(want, evs[i].Detail)
		}
		if err := c.Record(context.Background(), evs...); err != nil {
			t.Fatalf("%d events of %d bytes: %v", tc.n, tc.size, err)
		}
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	lines := readLines(t, j.opts.Log)[1:]
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d", len(lines), len(want))
	}
	for i, raw := range lines {
		l, err := parseLine([]byte(raw), j.key)
		if err != nil || l.Detail != want[i] {
			t.Fatalf("line %d: %v, detail %.20q, want %.20q", i+2, err, l.Detail, want[i])
		}
	}
}

// A journal that restarts while avpd is idle closes the connection with nobody reading it.
// The next Record finds it dead when it sends, which sent nothing, and goes once more on
// a new connection: the restart costs no event.
func TestClientResendsAfterAnIdleRestart(t *testing.T) {
	dir, stop, c := connectedClient(t, 2*time.Second)
	first := c.cur.Load()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	j2 := openTestJournal(t, dir, nil)
	serveJournal(t, j2, dir)
	if err := c.Record(context.Background(), decisionEvent(2), decisionEvent(3)); err != nil {
		t.Fatalf("first Record after the restart: %v", err)
	}
	if c.cur.Load() == first {
		t.Fatal("the Record went on the old connection")
	}
	log, err := os.ReadFile(filepath.Join(dir, "audit.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{`"/v1/n/2"`, `"/v1/n/3"`} {
		if n := strings.Count(string(log), path); n != 1 {
			t.Fatalf("%s is in the log %d times, want once", path, n)
		}
	}
}

// The Record reading the acks for all gives up when its context ends, without waiting for
// its deadline, and hands the role on: a Record waiting behind it still gets its ack, and
// the connection serves the next Record.
func TestClientReaderRoleOnCancel(t *testing.T) {
	dir := shortDir(t)
	j := openTestJournal(t, dir, func(o *JournalOptions) { o.AckDelay = 300 * time.Millisecond; o.Logf = nil })
	sock, _ := serveJournal(t, j, dir)
	c := NewJournalClient(sock, 5*time.Second)
	defer c.Close()
	if err := c.Record(context.Background(), decisionEvent(0)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	readerErr := make(chan error, 1)
	go func() { readerErr <- c.Record(ctx, decisionEvent(1)) }()
	// Wait until that Record holds the role, then queue a second one behind it.
	cc := c.cur.Load()
	for deadline := time.Now().Add(2 * time.Second); ; {
		cc.mu.Lock()
		reading := cc.reading
		cc.mu.Unlock()
		if reading {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no Record took the reader role")
		}
		time.Sleep(time.Millisecond)
	}
	waiterErr := make(chan error, 1)
	go func() { waiterErr <- c.Record(context.Background(), decisionEvent(2)) }()
	time.Sleep(20 * time.Millisecond)
	t0 := time.Now()
	cancel()
	if err := <-readerErr; !errors.Is(err, ErrJournalUnavailable) || !strings.Contains(err.Error(), "canceled") {
		t.Fatalf("canceled reader: %v", err)
	}
	if d := time.Since(t0); d > 200*time.Millisecond {
		t.Fatalf("the canceled reader returned after %v", d)
	}
	if err := <-waiterErr; err != nil {
		t.Fatalf("the Record behind the canceled reader: %v", err)
	}
	if err := c.Record(context.Background(), decisionEvent(3)); err != nil {
		t.Fatalf("next Record on the same connection: %v", err)
	}
	if c.cur.Load() != cc {
		t.Fatal("the connection was replaced")
	}
}

// TestClientReadsAcksQueuedBeforeAReset: a journal that closes with a message of ours unread
// (it failed, or stopped) makes Linux report ECONNRESET to the client before the messages
// the journal sent first. The ack among them still counts: the Record it answers succeeds,
// and the one whose message was never read fails.
func TestClientReadsAcksQueuedBeforeAReset(t *testing.T) {
	sock, ln := fakeJournalSocket(t)
	c := NewJournalClient(sock, 5*time.Second)
	defer c.Close()

	first := make(chan error, 1)
	go func() { first <- c.Record(context.Background(), decisionEvent(1)) }()
	srv, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	buf := make([]byte, 64<<10)
	n, err := srv.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	it, errMsg := decodeRequest(buf[:n])
	if errMsg != "" {
		t.Fatal(errMsg)
	}
	// A second Record's message arrives and is never read.
	second := make(chan error, 1)
	go func() { second <- c.Record(context.Background(), decisionEvent(2)) }()
	time.Sleep(50 * time.Millisecond)
	if _, err := srv.Write([]byte(`{"acks":[[` + itoa(it.id) + `,1]]}`)); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	if err := <-first; err != nil {
		t.Fatalf("the acked Record: %v", err)
	}
	if err := <-second; !errors.Is(err, ErrJournalUnavailable) {
		t.Fatalf("the unread Record: %v, want a failure", err)
	}
}

// fakeJournalSocket listens where a journal would, for a test that plays the journal's part
// itself.
func fakeJournalSocket(t *testing.T) (string, *net.UnixListener) {
	t.Helper()
	sock := filepath.Join(shortDir(t), "j.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return sock, ln
}

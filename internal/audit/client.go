package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/rawconn"
)

// DefaultTimeout is how long avpd waits for the journal's ack when audit.timeout is not set.
const DefaultTimeout = 2 * time.Second

// JournalClient is avpd's side of the journal: Record sends each event as one message and
// returns nil only once the journal acknowledged every one as durable. No ack within the
// deadline (audit.timeout, or the context's if sooner) is an error, which the proxy turns
// into 503 audit_unavailable with nothing sent upstream. A journal restart is survived by
// dialing again on the next Record (a send on a connection the journal closed sends
// nothing, and goes once more on a new one); an event whose connection broke after it was
// sent and before its ack is an error, never resent (it may or may not be in the log).
//
// Record writes its messages to the socket itself, under the connection's write lock, and
// reads the acks itself unless another Record is reading them (see await). There is no
// goroutine of the client's own.
type JournalClient struct {
	socket  string
	timeout time.Duration
	nextID  atomic.Uint64

	dialMu sync.Mutex // one dial at a time
	mu     sync.Mutex // guards the writes of cur and closed
	cur    atomic.Pointer[clientConn]
	closed atomic.Bool
}

var _ Auditor = (*JournalClient)(nil)

// NewJournalClient returns a client for the journal socket; it connects on first use.
func NewJournalClient(socket string, timeout time.Duration) *JournalClient {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &JournalClient{socket: socket, timeout: timeout}
}

// clientConn is one connection. Records write to it under wmu; the Record holding the
// reader role hands each ack to the waiter of the Record that sent the event.
type clientConn struct {
	c    *net.UnixConn
	io   net.Conn // c, read and written with rawconn's system calls
	rc   syscall.RawConn
	wmu  sync.Mutex // one writer at a time, and the write deadline with it
	dead chan struct{}
	once sync.Once

	mu      sync.Mutex // guards err, pending, reading and readerGen, and every waiter's fields
	err     error
	pending map[uint64]*waiter // event id -> the Record that sent it

	// reading says a Record reads the socket for all (see await); readerGen counts the
	// turns, so a turn's context callback cannot touch a later one. turn wakes a waiting
	// Record to read when the reader leaves. rbuf is the reader's buffer.
	reading   bool
	readerGen uint64
	turn      chan struct{}
	rbuf      []byte
}

// waiter is one Record call waiting for its acks. Its fields are guarded by the connection's
// mu; it is signalled once, on ch, when every event is acked or when one failed.
type waiter struct {
	ch    chan error // capacity 1
	left  int        // events not acked yet
	done  bool       // ch was sent to
	timer *time.Timer
	buf   bytes.Buffer  // the encoded messages, one after the other
	enc   *json.Encoder // writes to buf
	ends  []int         // where each message ends in buf
	ids   []uint64

	// sendmmsg's headers for a Record of several events, its progress and its error;
	// sendFn is w.sendmmsg, bound once.
	iov     []unix.Iovec
	hdr     []unix.Mmsghdr
	sent    int
	sendErr error
	sendFn  func(uintptr) bool
}

var waiterPool = sync.Pool{New: func() any {
	w := &waiter{ch: make(chan error, 1)}
	w.enc = json.NewEncoder(&w.buf)
	w.sendFn = w.sendmmsg
	return w
}}

// signal hands the waiter its result, once. The connection's mu is held.
func (w *waiter) signal(err error) {
	if !w.done {
		w.done = true
		w.ch <- err
	}
}

// ErrJournalUnavailable wraps every failure to get an event acknowledged.
var ErrJournalUnavailable = errors.New("audit journal unavailable")

// Record implements Auditor.
func (c *JournalClient) Record(ctx context.Context, events ...Event) error {
	if len(events) == 0 {
		return nil
	}
	if ctx.Err() != nil {
		return c.timeoutErr(ctx)
	}
	deadline := time.Now().Add(c.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	w := waiterPool.Get().(*waiter)
	defer c.putWaiter(w)
	for i := range events {
		if err := events[i].Validate(); err != nil {
			return fmt.Errorf("audit event: %w", err)
		}
		id := c.nextID.Add(1)
		if err := w.appendRequest(id, &events[i]); err != nil {
			return fmt.Errorf("encode audit event: %w", err)
		}
		w.ids = append(w.ids, id)
		w.ends = append(w.ends, w.buf.Len())
	}
	// A connection the journal closed while no Record was reading is found dead by the
	// send, which then sent nothing: the events go once more, on a new connection.
	for attempt := 0; ; attempt++ {
		cc, err := c.conn(ctx, deadline)
		if err != nil {
			return err
		}
		cc.mu.Lock()
		if cc.err != nil {
			// It died since conn() returned: nothing was sent on it, so dial again.
			cc.mu.Unlock()
			continue
		}
		w.left, w.done = len(w.ids), false
		for _, id := range w.ids {
			cc.pending[id] = w
		}
		cc.mu.Unlock()
		sent, err := cc.send(w, deadline)
		if err == nil {
			err = c.await(ctx, cc, w, deadline)
			cc.leave(w)
			return err
		}
		cc.leave(w)
		select { // kill's signal, if it sent one
		case <-w.ch:
		default:
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return c.timeoutErr(ctx)
		}
		if sent > 0 || attempt > 0 {
			return err
		}
	}
}

// await waits for w's acks. The Record reads the socket itself when no other Record does
// (the reader role), so the ack of a lone Record wakes its own goroutine. A reader
// goroutine that handed each ack over a channel cost about as much again as the round trip
// to the journal on a 2-CPU machine: the hand-off woke a second thread, which took a CPU
// the journal or the agent's request needed. Records that wait while another reads get
// their result from that reader, and one of them takes the role when the reader leaves.
func (c *JournalClient) await(ctx context.Context, cc *clientConn, w *waiter, deadline time.Time) error {
	timed := false
	defer func() {
		if timed {
			w.timer.Stop()
		}
	}()
	for {
		cc.mu.Lock()
		if w.done {
			cc.mu.Unlock()
			return <-w.ch
		}
		if !cc.reading {
			cc.reading = true
			cc.readerGen++
			gen := cc.readerGen
			cc.mu.Unlock()
			if cc.read(ctx, w, gen, deadline) {
				continue // answered, or the connection died and kill answered
			}
			cc.mu.Lock()
			done := w.done
			cc.mu.Unlock()
			if done {
				return <-w.ch
			}
			if ctx.Err() != nil {
				return c.timeoutErr(ctx)
			}
			return c.deadlineErr()
		}
		cc.mu.Unlock()
		if !timed {
			timed = true
			if w.timer == nil {
				w.timer = time.NewTimer(time.Until(deadline))
			} else {
				w.timer.Reset(time.Until(deadline))
			}
		}
		select {
		case err := <-w.ch:
			return err
		case <-cc.turn: // the reader left: take the role if nobody else did
		case <-ctx.Done():
			return c.timeoutErr(ctx)
		case <-w.timer.C:
			return c.deadlineErr()
		}
	}
}

// leave takes w's events off the connection once its Record returns, and passes the reader
// role on if that Record was the one that last took a turn for it.
func (cc *clientConn) leave(w *waiter) {
	cc.mu.Lock()
	for _, id := range w.ids {
		delete(cc.pending, id)
	}
	cc.handOff()
	cc.mu.Unlock()
}

// handOff wakes one waiting Record to read when nobody reads and some Record waits. The
// token is buffered, so it is never lost: a Record that takes it and does not read (its
// own answer came) calls handOff again as it leaves. cc.mu is held.
func (cc *clientConn) handOff() {
	if !cc.reading && len(cc.pending) > 0 {
		select {
		case cc.turn <- struct{}{}:
		default:
		}
	}
}

// read is the reader role, held for w: it reads and applies the journal's messages until w
// is answered (true), the connection fails (true: kill answered w), or w's deadline passes
// or ctx ends (false). It gives the role up on return.
func (cc *clientConn) read(ctx context.Context, w *waiter, gen uint64, deadline time.Time) bool {
	if ctx.Done() != nil {
		// Interrupt the read when ctx ends, unless the role went on to another Record.
		stop := context.AfterFunc(ctx, func() {
			cc.mu.Lock()
			if cc.reading && cc.readerGen == gen {
				cc.c.SetReadDeadline(time.Unix(1, 0))
			}
			cc.mu.Unlock()
		})
		defer stop()
	}
	defer func() {
		cc.mu.Lock()
		cc.reading = false
		cc.handOff()
		cc.mu.Unlock()
	}()
	cc.c.SetReadDeadline(deadline)
	if cc.rbuf == nil {
		cc.rbuf = make([]byte, 128<<10)
	}
	resets := 0
	for {
		n, err := cc.io.Read(cc.rbuf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// A timed-out read of a SOCK_SEQPACKET socket took no message: the
			// connection stays good for the next reader.
			return false
		}
		if errors.Is(err, syscall.ECONNRESET) && resets == 0 {
			resets++
			// The journal closed with a message of ours unread (it failed or stopped), and
			// Linux says so before it hands over what the journal sent first: acks, or why
			// it stopped. The error is reported once; the messages come next, then the end.
			continue
		}
		if err != nil || n == 0 {
			cc.kill(errors.New("the journal closed the connection"))
			return true
		}
		if !cc.apply(cc.rbuf[:n]) {
			return true
		}
		cc.mu.Lock()
		done := w.done
		cc.mu.Unlock()
		if done {
			return true
		}
	}
}

// putWaiter returns w to the pool. Its ids are no longer pending, so nothing sends to ch
// any more; a result that came after Record gave up is dropped here.
func (c *JournalClient) putWaiter(w *waiter) {
	select {
	case <-w.ch:
	default:
	}
	if w.buf.Cap() > 64<<10 {
		return // a rare large batch: let it go rather than keep it pooled
	}
	w.buf.Reset()
	w.ends, w.ids = w.ends[:0], w.ids[:0]
	waiterPool.Put(w)
}

// appendRequest appends the message {"id":N,"event":{...}} to buf: the bytes json.Marshal
// writes for it.
func (w *waiter) appendRequest(id uint64, e *Event) error {
	b := append(w.buf.AvailableBuffer(), `{"id":`...)
	b = strconv.AppendUint(b, id, 10)
	b = append(b, `,"event":{`...)
	if b, ok := appendEventFields(b, e, true); ok {
		w.buf.Write(append(b, `}}`...))
		return nil
	}
	var num [20]byte
	w.buf.WriteString(`{"id":`)
	w.buf.Write(strconv.AppendUint(num[:0], id, 10))
	w.buf.WriteString(`,"event":`)
	if err := w.enc.Encode(e); err != nil {
		return err
	}
	w.buf.Bytes()[w.buf.Len()-1] = '}' // Encode ends the value with a newline
	return nil
}

// send writes w's messages, one message per event (the protocol's unit), with one system
// call (write, or sendmmsg for several events) unless the socket's buffer is full, under
// the write lock so no other Record's message comes between them. It returns how many
// messages went out. A write that hits the deadline sent nothing of the message it was at
// (a SOCK_SEQPACKET message goes whole or not at all), so the connection is still good;
// any other failure kills it.
func (cc *clientConn) send(w *waiter, deadline time.Time) (int, error) {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	cc.c.SetWriteDeadline(deadline)
	var err error
	sent := 0
	if len(w.ends) == 1 || cc.rc == nil {
		buf, start := w.buf.Bytes(), 0
		for _, end := range w.ends {
			if _, err = cc.io.Write(buf[start:end]); err != nil {
				break
			}
			sent++
			start = end
		}
	} else {
		err = cc.sendmmsg(w)
		sent = w.sent
	}
	if err == nil {
		return sent, nil
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return sent, err
	}
	cc.kill(fmt.Errorf("send to the journal: %v", err))
	return sent, cc.failure()
}

// sendmmsg writes all of w's messages with sendmmsg: one system call, or more when the
// socket's buffer fills, waiting for room until the write deadline.
func (cc *clientConn) sendmmsg(w *waiter) error {
	buf, n := w.buf.Bytes(), len(w.ends)
	w.iov = slices.Grow(w.iov[:0], n)[:n]
	w.hdr = slices.Grow(w.hdr[:0], n)[:n]
	start := 0
	for i, end := range w.ends {
		w.iov[i] = unix.Iovec{Base: &buf[start]}
		w.iov[i].SetLen(end - start)
		w.hdr[i] = unix.Mmsghdr{}
		w.hdr[i].Hdr.Iov = &w.iov[i]
		w.hdr[i].Hdr.SetIovlen(1)
		start = end
	}
	w.sent, w.sendErr = 0, nil
	err := cc.rc.Write(w.sendFn)
	clear(w.iov) // no pointers into buf stay behind in the pool
	if err != nil {
		return err
	}
	return w.sendErr
}

// sendmmsg is one attempt, called by the poller with the socket's descriptor; it returns
// false to wait until the socket has room.
func (w *waiter) sendmmsg(fd uintptr) bool {
	for w.sent < len(w.hdr) {
		r, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&w.hdr[w.sent])), uintptr(len(w.hdr)-w.sent), unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL, 0, 0)
		switch {
		case e == unix.EINTR:
			continue
		case e == unix.EAGAIN:
			return false
		case e != 0:
			w.sendErr = e
			return true
		case r == 0:
			w.sendErr = io.ErrShortWrite
			return true
		}
		w.sent += int(r)
	}
	return true
}

func (c *JournalClient) timeoutErr(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("%w: canceled before the journal acknowledged", ErrJournalUnavailable)
	}
	return c.deadlineErr()
}

func (c *JournalClient) deadlineErr() error {
	return fmt.Errorf("%w: no acknowledgement from %s within the deadline (audit.timeout %v)", ErrJournalUnavailable, c.socket, c.timeout)
}

// conn returns the live connection, dialing (and retrying until the deadline or ctx ends)
// when there is none: a restarting journal is back within the deadline or the event fails.
func (c *JournalClient) conn(ctx context.Context, deadline time.Time) (*clientConn, error) {
	if c.closed.Load() {
		return nil, fmt.Errorf("%w: client closed", ErrJournalUnavailable)
	}
	if cc := c.cur.Load(); cc != nil && !cc.isDead() {
		return cc, nil
	}
	c.dialMu.Lock()
	defer c.dialMu.Unlock()
	if cc := c.cur.Load(); cc != nil && !cc.isDead() {
		return cc, nil
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	backoff := 10 * time.Millisecond
	var lastErr error
	for {
		var d net.Dialer
		nc, err := d.DialContext(ctx, "unixpacket", c.socket)
		if err == nil {
			cc := newClientConn(nc.(*net.UnixConn))
			c.mu.Lock()
			if c.closed.Load() {
				c.mu.Unlock()
				cc.kill(errors.New("client closed"))
				return nil, fmt.Errorf("%w: client closed", ErrJournalUnavailable)
			}
			c.cur.Store(cc)
			c.mu.Unlock()
			return cc, nil
		}
		lastErr = err
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%w: connect %s: %v", ErrJournalUnavailable, c.socket, lastErr)
		case <-t.C:
		}
		backoff = min(backoff*2, 200*time.Millisecond)
	}
}

func newClientConn(nc *net.UnixConn) *clientConn {
	cc := &clientConn{c: nc, io: rawconn.New(nc), dead: make(chan struct{}), turn: make(chan struct{}, 1), pending: map[uint64]*waiter{}}
	cc.rc, _ = nc.SyscallConn() // nil only for a closed connection: then Write fails anyway
	return cc
}

func (cc *clientConn) isDead() bool {
	select {
	case <-cc.dead:
		return true
	default:
		return false
	}
}

func (cc *clientConn) failure() error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.err
}

// kill closes the connection and fails every event still waiting on it.
func (cc *clientConn) kill(err error) {
	cc.once.Do(func() {
		cc.mu.Lock()
		cc.err = fmt.Errorf("%w: %v", ErrJournalUnavailable, err)
		for id, w := range cc.pending {
			w.signal(cc.err)
			delete(cc.pending, id)
		}
		cc.mu.Unlock()
		close(cc.dead)
		cc.c.Close()
	})
}

// apply hands one message from the journal to the Records it answers; false means it
// killed the connection (a malformed message, or the journal's error for the whole
// connection).
func (cc *clientConn) apply(msg []byte) bool {
	if cc.ackFast(msg) {
		return true
	}
	var a ackMsg
	if err := json.Unmarshal(msg, &a); err != nil {
		cc.kill(fmt.Errorf("malformed message from the journal: %v", err))
		return false
	}
	if len(a.Acks) > 0 {
		cc.mu.Lock()
		for _, ack := range a.Acks {
			cc.acked(ack[0])
		}
		cc.mu.Unlock()
		return true
	}
	if a.ID == 0 {
		cc.kill(fmt.Errorf("the journal says: %s", a.Error))
		return false
	}
	cc.mu.Lock()
	if w, ok := cc.pending[a.ID]; ok { // else its Record already gave up
		w.signal(fmt.Errorf("%w: the journal refused the event: %s", ErrJournalUnavailable, a.Error))
	}
	cc.mu.Unlock()
	return true
}

// acked counts event id as durable. The connection's mu is held.
func (cc *clientConn) acked(id uint64) {
	w, ok := cc.pending[id]
	if !ok { // its Record already gave up
		return
	}
	delete(cc.pending, id)
	if w.left--; w.left == 0 {
		w.signal(nil)
	}
}

// ackFast handles an ack message in the exact form the journal writes,
// {"acks":[[N,S],...]}, without allocating. Anything else is left to encoding/json.
func (cc *clientConn) ackFast(msg []byte) bool {
	const prefix = `{"acks":[`
	if !bytes.HasPrefix(msg, []byte(prefix)) || !bytes.HasSuffix(msg, []byte("]}")) {
		return false
	}
	// Parse every pair first: a message is applied whole or handed to encoding/json.
	var ids [64]uint64
	var more []uint64
	n := 0
	p := msg[len(prefix) : len(msg)-2]
	for {
		if len(p) == 0 || p[0] != '[' {
			return false
		}
		id, rest, ok := parseUint(p[1:])
		if !ok || id == 0 || len(rest) == 0 || rest[0] != ',' {
			return false
		}
		_, rest, ok = parseUint(rest[1:])
		if !ok || len(rest) == 0 || rest[0] != ']' {
			return false
		}
		if n < len(ids) {
			ids[n] = id
		} else {
			more = append(more, id)
		}
		n++
		p = rest[1:]
		if len(p) == 0 {
			break
		}
		if p[0] != ',' {
			return false
		}
		p = p[1:]
	}
	cc.mu.Lock()
	for _, id := range ids[:min(n, len(ids))] {
		cc.acked(id)
	}
	for _, id := range more {
		cc.acked(id)
	}
	cc.mu.Unlock()
	return true
}

// parseUint reads the decimal digits at the start of p (no sign, no leading zero unless
// the number is 0), as JSON writes an unsigned integer.
func parseUint(p []byte) (uint64, []byte, bool) {
	i := 0
	var v uint64
	for i < len(p) && p[i] >= '0' && p[i] <= '9' {
		if i == 20 {
			return 0, nil, false
		}
		d := uint64(p[i] - '0')
		if v > (1<<64-1-d)/10 {
			return 0, nil, false
		}
		v = v*10 + d
		i++
	}
	if i == 0 || (i > 1 && p[0] == '0') {
		return 0, nil, false
	}
	return v, p[i:], true
}

// Close closes the connection; later Records fail.
func (c *JournalClient) Close() error {
	c.mu.Lock()
	c.closed.Store(true)
	cc := c.cur.Swap(nil)
	c.mu.Unlock()
	if cc != nil {
		cc.kill(errors.New("client closed"))
	}
	return nil
}

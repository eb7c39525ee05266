package audit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultTimeout is how long avpd waits for the journal's ack when audit.timeout is not set.
const DefaultTimeout = 2 * time.Second

// JournalClient is avpd's side of the journal: Record sends each event as one message and
// returns nil only once the journal acknowledged every one as durable. No ack within the
// deadline (audit.timeout, or the context's if sooner) is an error, which the proxy turns
// into 503 audit_unavailable with nothing sent upstream. A journal restart is survived by
// dialing again on the next Record; an event whose connection broke before its ack is an
// error too, never resent (it may or may not be in the log).
type JournalClient struct {
	socket  string
	timeout time.Duration
	nextID  atomic.Uint64

	dialMu sync.Mutex // one dial at a time
	mu     sync.Mutex
	cur    *clientConn
	closed bool
}

var _ Auditor = (*JournalClient)(nil)

// NewJournalClient returns a client for the journal socket; it connects on first use.
func NewJournalClient(socket string, timeout time.Duration) *JournalClient {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &JournalClient{socket: socket, timeout: timeout}
}

type ackResult struct {
	seq uint64
	err error
}

// clientConn is one connection: a writer goroutine sends queued messages, a reader
// goroutine hands each ack to the Record waiting for it.
type clientConn struct {
	c       *net.UnixConn
	out     chan []byte
	dead    chan struct{}
	once    sync.Once
	mu      sync.Mutex
	err     error
	pending map[uint64]chan ackResult
}

// ErrJournalUnavailable wraps every failure to get an event acknowledged.
var ErrJournalUnavailable = errors.New("audit journal unavailable")

// Record implements Auditor.
func (c *JournalClient) Record(ctx context.Context, events ...Event) error {
	if len(events) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	msgs := make([][]byte, len(events))
	ids := make([]uint64, len(events))
	for i := range events {
		e := events[i]
		if err := e.Validate(); err != nil {
			return fmt.Errorf("audit event: %w", err)
		}
		ids[i] = c.nextID.Add(1)
		msg, err := json.Marshal(struct {
			ID    uint64 `json:"id"`
			Event *Event `json:"event"`
		}{ids[i], &e})
		if err != nil {
			return fmt.Errorf("encode audit event: %w", err)
		}
		msgs[i] = msg
	}
	waits := make([]chan ackResult, len(events))
	var cc *clientConn
	for {
		var err error
		if cc, err = c.conn(ctx); err != nil {
			return err
		}
		cc.mu.Lock()
		if cc.err == nil {
			break
		}
		// It died since conn() returned: nothing was sent on it, so dial again.
		cc.mu.Unlock()
	}
	for i, id := range ids {
		waits[i] = make(chan ackResult, 1)
		cc.pending[id] = waits[i]
	}
	cc.mu.Unlock()
	defer func() {
		cc.mu.Lock()
		for _, id := range ids {
			delete(cc.pending, id)
		}
		cc.mu.Unlock()
	}()
	for _, m := range msgs {
		select {
		case cc.out <- m:
		case <-cc.dead:
			return cc.failure()
		case <-ctx.Done():
			return c.timeoutErr(ctx)
		}
	}
	for _, w := range waits {
		select {
		case r := <-w:
			if r.err != nil {
				return r.err
			}
		case <-ctx.Done():
			return c.timeoutErr(ctx)
		}
	}
	return nil
}

func (c *JournalClient) timeoutErr(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("%w: canceled before the journal acknowledged", ErrJournalUnavailable)
	}
	return fmt.Errorf("%w: no acknowledgement from %s within the deadline (audit.timeout %v)", ErrJournalUnavailable, c.socket, c.timeout)
}

// conn returns the live connection, dialing (and retrying until ctx ends) when there is
// none: a restarting journal is back within the deadline or the event fails.
func (c *JournalClient) conn(ctx context.Context) (*clientConn, error) {
	c.mu.Lock()
	cc, closed := c.cur, c.closed
	c.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("%w: client closed", ErrJournalUnavailable)
	}
	if cc != nil && !cc.isDead() {
		return cc, nil
	}
	c.dialMu.Lock()
	defer c.dialMu.Unlock()
	c.mu.Lock()
	cc = c.cur
	c.mu.Unlock()
	if cc != nil && !cc.isDead() {
		return cc, nil
	}
	backoff := 10 * time.Millisecond
	var lastErr error
	for {
		var d net.Dialer
		nc, err := d.DialContext(ctx, "unixpacket", c.socket)
		if err == nil {
			cc = newClientConn(nc.(*net.UnixConn))
			c.mu.Lock()
			if c.closed {
				c.mu.Unlock()
				cc.kill(errors.New("client closed"))
				return nil, fmt.Errorf("%w: client closed", ErrJournalUnavailable)
			}
			c.cur = cc
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
	cc := &clientConn{c: nc, out: make(chan []byte, 1024), dead: make(chan struct{}), pending: map[uint64]chan ackResult{}}
	go cc.writeLoop()
	go cc.readLoop()
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
			w <- ackResult{err: cc.err}
			delete(cc.pending, id)
		}
		cc.mu.Unlock()
		close(cc.dead)
		cc.c.Close()
	})
}

func (cc *clientConn) writeLoop() {
	for {
		select {
		case m := <-cc.out:
			cc.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if _, err := cc.c.Write(m); err != nil {
				cc.kill(fmt.Errorf("send to the journal: %v", err))
				return
			}
		case <-cc.dead:
			return
		}
	}
}

func (cc *clientConn) readLoop() {
	buf := make([]byte, 128<<10)
	for {
		n, err := cc.c.Read(buf)
		if err != nil || n == 0 {
			cc.kill(errors.New("the journal closed the connection"))
			return
		}
		var a ackMsg
		if err := json.Unmarshal(buf[:n], &a); err != nil {
			cc.kill(fmt.Errorf("malformed message from the journal: %v", err))
			return
		}
		if len(a.Acks) > 0 {
			cc.mu.Lock()
			for _, ack := range a.Acks {
				if w, ok := cc.pending[ack[0]]; ok { // else its Record already gave up
					delete(cc.pending, ack[0])
					w <- ackResult{seq: ack[1]}
				}
			}
			cc.mu.Unlock()
			continue
		}
		if a.ID == 0 {
			cc.kill(fmt.Errorf("the journal says: %s", a.Error))
			return
		}
		cc.mu.Lock()
		w, ok := cc.pending[a.ID]
		delete(cc.pending, a.ID)
		cc.mu.Unlock()
		if ok {
			w <- ackResult{err: fmt.Errorf("%w: the journal refused the event: %s", ErrJournalUnavailable, a.Error)}
		}
	}
}

// Close closes the connection; later Records fail.
func (c *JournalClient) Close() error {
	c.mu.Lock()
	c.closed = true
	cc := c.cur
	c.cur = nil
	c.mu.Unlock()
	if cc != nil {
		cc.kill(errors.New("client closed"))
	}
	return nil
}

package intercept

import (
	"context"
	"net"
	"net/http"
	"sync"
)

// connQueue hands terminated TLS connections to one shared http.Server, which does HTTP/1.1
// and HTTP/2 (by ALPN) for all of them. The connections stay *tls.Conn so net/http can read
// the negotiated protocol; their facts travel in a map and reach handlers through
// ConnContext.
type connQueue struct {
	ch     chan net.Conn
	closed chan struct{}
	once   sync.Once

	mu    sync.Mutex
	facts map[net.Conn]*queued
}

type queued struct {
	facts *connFacts
	done  chan struct{}
	once  sync.Once
}

type factsKey struct{}

func newConnQueue() *connQueue {
	return &connQueue{ch: make(chan net.Conn), closed: make(chan struct{}), facts: map[net.Conn]*queued{}}
}

// push queues c and returns a channel closed when net/http is done with it.
func (q *connQueue) push(c net.Conn, f *connFacts) <-chan struct{} {
	e := &queued{facts: f, done: make(chan struct{})}
	q.mu.Lock()
	q.facts[c] = e
	q.mu.Unlock()
	select {
	case q.ch <- c:
	case <-q.closed:
		q.finish(c)
		c.Close()
	}
	return e.done
}

func (q *connQueue) finish(c net.Conn) {
	q.mu.Lock()
	e := q.facts[c]
	delete(q.facts, c)
	q.mu.Unlock()
	if e != nil {
		e.once.Do(func() { close(e.done) })
	}
}

func (q *connQueue) connContext(ctx context.Context, c net.Conn) context.Context {
	q.mu.Lock()
	e := q.facts[c]
	q.mu.Unlock()
	if e == nil {
		return ctx
	}
	return context.WithValue(ctx, factsKey{}, e.facts)
}

func (q *connQueue) connState(c net.Conn, st http.ConnState) {
	if st == http.StateClosed || st == http.StateHijacked {
		q.finish(c)
	}
}

func factsFrom(ctx context.Context) *connFacts {
	f, _ := ctx.Value(factsKey{}).(*connFacts)
	return f
}

// Accept implements net.Listener for http.Server.
func (q *connQueue) Accept() (net.Conn, error) {
	select {
	case c := <-q.ch:
		return c, nil
	case <-q.closed:
		return nil, net.ErrClosed
	}
}

func (q *connQueue) Close() error {
	q.once.Do(func() { close(q.closed) })
	return nil
}

func (q *connQueue) Addr() net.Addr { return &net.TCPAddr{} }

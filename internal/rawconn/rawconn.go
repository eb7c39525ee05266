// Package rawconn makes a socket's reads and writes with RawSyscall instead of Syscall.
//
// Go's net package makes each read and write of a non-blocking socket with Syscall, which
// tells the scheduler the goroutine may block: it may wake the sysmon thread, and sysmon
// hands the goroutine's P to another thread when the call takes longer than about 20 µs (a
// write on loopback TCP runs the receiver's side of the stack too, and often does). The
// socket is non-blocking, so the call never blocks; waiting for readiness is still the
// poller's, with the conn's deadlines. On a 2-CPU machine those wake-ups cost about as
// much as the calls themselves: a ping-pong between two Go processes over a socket takes
// 36-37 µs per round trip with Syscall and 19-26 µs with RawSyscall (BenchmarkPingPong).
// Only the hot request path uses it: the agent's and the upstream's connections, and the
// audit journal's socket on both ends.
package rawconn

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Conn is a net.Conn whose Read and Write make their system calls with RawSyscall. Every
// other method, deadlines included, is the wrapped conn's. As with net's conns, goroutines
// may call it at once: one Read and one Write at a time each, and a Write's bytes are never
// interleaved with another's.
type Conn struct {
	net.Conn
	rc   syscall.RawConn
	rmu  sync.Mutex // guards r
	wmu  sync.Mutex // guards w
	r, w op
}

// op is one direction's call state: fn is op.call bound once, so a Read or a Write
// allocates nothing.
type op struct {
	write bool
	p     []byte
	n     int
	err   syscall.Errno
	fn    func(uintptr) bool
}

// New wraps c, or returns it as it is when it has no descriptor of its own (a conn that is
// not a syscall.Conn, such as one end of net.Pipe).
func New(c net.Conn) net.Conn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return c
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return c
	}
	x := &Conn{Conn: c, rc: rc}
	x.w.write = true
	x.r.fn, x.w.fn = x.r.call, x.w.call
	return x
}

// call is one attempt with the socket's descriptor; false means it would block, and the
// poller waits for readiness (or the deadline) before the next.
func (o *op) call(fd uintptr) bool {
	for {
		n, e := o.syscall(fd)
		switch e {
		case 0:
			o.n, o.err = n, 0
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		default:
			o.n, o.err = 0, e
			return true
		}
	}
}

// syscall makes the read or the write once: with RawSyscall, or in race builds with
// syscall's Read and Write (see race.go).
func (o *op) syscall(fd uintptr) (int, syscall.Errno) {
	if raceEnabled {
		var n int
		var err error
		if o.write {
			n, err = syscall.Write(int(fd), o.p)
		} else {
			n, err = syscall.Read(int(fd), o.p)
		}
		if err != nil {
			return 0, err.(syscall.Errno)
		}
		return n, 0
	}
	buf := uintptr(unsafe.Pointer(unsafe.SliceData(o.p)))
	if o.write {
		// MSG_NOSIGNAL: a peer that went away is EPIPE, not SIGPIPE.
		n, _, e := unix.RawSyscall6(unix.SYS_SENDTO, fd, buf, uintptr(len(o.p)), unix.MSG_NOSIGNAL, 0, 0)
		return int(n), e
	}
	n, _, e := unix.RawSyscall(unix.SYS_READ, fd, buf, uintptr(len(o.p)))
	return int(n), e
}

// Read reads as net.Conn's Read does: io.EOF once the peer closed.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.r.p = p
	err := c.rc.Read(c.r.fn)
	c.r.p = nil
	if err != nil {
		return 0, c.opError("read", err)
	}
	if c.r.err != 0 {
		return 0, c.opError("read", os.NewSyscallError("read", c.r.err))
	}
	if c.r.n == 0 {
		return 0, io.EOF
	}
	return c.r.n, nil
}

// Write writes all of p unless it fails, as net.Conn's Write does.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	written := 0
	for written < len(p) {
		c.w.p = p[written:]
		err := c.rc.Write(c.w.fn)
		c.w.p = nil
		if err != nil {
			return written, c.opError("write", err)
		}
		if c.w.err != 0 {
			return written, c.opError("write", os.NewSyscallError("write", c.w.err))
		}
		written += c.w.n
	}
	return written, nil
}

// SyscallConn is the wrapped conn's, for callers that make calls of their own on it.
func (c *Conn) SyscallConn() (syscall.RawConn, error) { return c.rc, nil }

// Unwrap returns the wrapped conn.
func (c *Conn) Unwrap() net.Conn { return c.Conn }

// opError names the operation as net does. The poller's own errors (deadline, closed)
// keep what they wrap, so errors.Is(err, os.ErrDeadlineExceeded) and net.ErrClosed hold,
// and a timeout is a net.Error whose Timeout() is true.
func (c *Conn) opError(op string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

package rawconn

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection, the first wrapped.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	w := New(c)
	if _, ok := w.(*Conn); !ok {
		t.Fatalf("a TCP conn was not wrapped: %T", w)
	}
	return w, s
}

// A large transfer both ways: writes that fill the socket's buffer wait for the poller and
// go on, every byte arrives in order, and EOF comes after the peer closes.
func TestTransfer(t *testing.T) {
	c, s := tcpPair(t)
	data := make([]byte, 8<<20)
	rand.Read(data)
	go func() {
		// The peer echoes everything back, slowly at first, so the writer waits.
		time.Sleep(50 * time.Millisecond)
		io.Copy(s, s)
		s.Close()
	}()
	done := make(chan error, 1)
	go func() {
		n, err := c.Write(data)
		if err == nil && n != len(data) {
			err = io.ErrShortWrite
		}
		done <- err
		c.(*Conn).Unwrap().(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes back, not the %d written", len(got), len(data))
	}
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the peer closed: %d, %v; want io.EOF", n, err)
	}
}

// Deadlines are the poller's: a read past its deadline is a timeout that errors.Is
// os.ErrDeadlineExceeded and net.Error's Timeout both see, and the conn still works after.
func TestDeadlineAndClose(t *testing.T) {
	c, s := tcpPair(t)
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := c.Read(make([]byte, 10))
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past the deadline: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	s.Write([]byte("ping"))
	buf := make([]byte, 10)
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("after the timeout: %q, %v", buf[:n], err)
	}
	c.Close()
	if _, err := c.Read(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
	if _, err := c.Write(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after Close: %v", err)
	}
}

// A write to a peer that reset the connection is an error (EPIPE or ECONNRESET), not a
// SIGPIPE that would kill the process.
func TestWriteToResetPeer(t *testing.T) {
	c, s := tcpPair(t)
	s.(*net.TCPConn).SetLinger(0)
	s.Close()
	time.Sleep(20 * time.Millisecond)
	var err error
	for i := 0; i < 100 && err == nil; i++ {
		_, err = c.Write(make([]byte, 64<<10))
	}
	if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("write to a reset peer: %v", err)
	}
}

// A SOCK_SEQPACKET socket keeps its message boundaries: one Write is one message, and one
// Read takes one message.
func TestSeqpacketMessages(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_SEQPACKET, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "sp")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Skipf("seqpacket FileConn: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	a, b := New(conn(fds[0])), New(conn(fds[1]))
	for _, m := range []string{"one", "two two", "three"} {
		if _, err := a.Write([]byte(m)); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 100)
	for _, want := range []string{"one", "two two", "three"} {
		n, err := b.Read(buf)
		if err != nil || string(buf[:n]) != want {
			t.Fatalf("read %q, %v; want %q", buf[:n], err, want)
		}
	}
}

func TestUnwrappable(t *testing.T) {
	p, q := net.Pipe()
	defer p.Close()
	defer q.Close()
	if New(p) != p {
		t.Fatal("a conn without a descriptor was wrapped")
	}
}

// pingPongChildEnv tells the test binary it is BenchmarkPingPong's echo process; its value
// is "raw" or "net", the calls the echo makes.
const pingPongChildEnv = "AVP_TEST_PINGPONG_CHILD"

// TestPingPongChild is BenchmarkPingPong's other process: it echoes what comes on the
// socket it inherited as descriptor 3.
func TestPingPongChild(t *testing.T) {
	mode := os.Getenv(pingPongChildEnv)
	if mode == "" {
		t.Skip("only in BenchmarkPingPong's child process")
	}
	c, err := net.FileConn(os.NewFile(3, "pingpong"))
	if err != nil {
		t.Fatal(err)
	}
	if mode == "raw" {
		c = New(c)
	}
	buf := make([]byte, 512)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		if _, err := c.Write(buf[:n]); err != nil {
			return
		}
	}
}

// BenchmarkPingPong is one 300-byte round trip between two processes over a Unix stream
// socket, both ends with net's calls or both with rawconn's: the cost of waking the other
// process and of the Go scheduler's work around each call (see the package comment).
func BenchmarkPingPong(b *testing.B) {
	for _, mode := range []string{"net", "raw"} {
		b.Run(mode, func(b *testing.B) {
			fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
			if err != nil {
				b.Fatal(err)
			}
			child := os.NewFile(uintptr(fds[1]), "child")
			cmd := exec.Command(os.Args[0], "-test.run", "^TestPingPongChild$")
			cmd.Env = append(os.Environ(), pingPongChildEnv+"="+mode)
			cmd.ExtraFiles = []*os.File{child}
			cmd.Stderr = os.Stderr
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			child.Close()
			f := os.NewFile(uintptr(fds[0]), "parent")
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { c.Close(); cmd.Process.Kill(); cmd.Wait() })
			if mode == "raw" {
				c = New(c)
			}
			buf := make([]byte, 300)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

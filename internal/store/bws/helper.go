package bws

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
)

// helper is one running helper process and the socket to it.
type helper struct {
	b    *Backend
	cmd  *exec.Cmd
	conn net.Conn
	wmu  sync.Mutex

	mu      sync.Mutex
	pending map[uint64]*pending
	nextID  uint64
	dead    chan struct{}
	deadErr error
	// waited is closed once the process has been reaped; exitErr is what Wait said.
	waited  chan struct{}
	exitErr error
	// logDone is closed when the helper's output has been read to the end; panicked says
	// whether it showed a panic or an abort.
	logDone  chan struct{}
	panicked bool
}

type pending struct {
	ch        chan *Response
	start     time.Time
	abandoned bool
	release   func()
}

// reBacktrace matches the frames of a Rust backtrace, which say nothing without symbols.
var reBacktrace = regexp.MustCompile(`^(\d+:\s+0x[0-9a-f]+ - |stack backtrace:|note: Some details are omitted)`)

// maxHelperLogLines bounds what one helper may write to avpd's log.
const maxHelperLogLines = 20

// spawn starts a helper with one end of a socketpair as its fd 3.
func (b *Backend) spawn() (*helper, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("start the BWS helper: socketpair: %w", err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "bws-helper"), os.NewFile(uintptr(fds[1]), "bws-helper")
	defer theirs.Close()
	conn, err := net.FileConn(mine)
	mine.Close()
	if err != nil {
		theirs.Close()
		return nil, fmt.Errorf("start the BWS helper: %w", err)
	}
	logR, logW, err := os.Pipe()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("start the BWS helper: %w", err)
	}
	cmd := exec.Command(b.opts.Helper[0], b.opts.Helper[1:]...)
	cmd.Env = b.opts.Env
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Stdout, cmd.Stderr = logW, logW
	cmd.Dir = "/"
	err = startWithoutAmbientCaps(cmd)
	logW.Close()
	if err != nil {
		conn.Close()
		logR.Close()
		return nil, fmt.Errorf("start the BWS helper %s: %w", b.opts.Helper[0], err)
	}
	h := &helper{b: b, cmd: cmd, conn: conn, pending: map[uint64]*pending{}, dead: make(chan struct{}), waited: make(chan struct{}), logDone: make(chan struct{})}
	b.mu.Lock()
	b.stats.HelperStarts++
	b.mu.Unlock()
	go h.logLines(logR)
	go func() {
		h.exitErr = cmd.Wait()
		close(h.waited)
		// A helper that exits on its own closes its socket too; this covers one that
		// somehow keeps it open.
		h.die(nil, true)
	}()
	go h.readLoop()
	go h.watchdog()
	return h, nil
}

// startWithoutAmbientCaps starts cmd from a thread whose ambient capabilities are cleared.
// Under systemd avpd holds CAP_NET_ADMIN as an ambient capability, which execve would pass on
// to the helper; the helper parses network input and needs no capability. Capabilities are
// per thread, so the start runs on a thread of its own that is never returned to the pool.
func startWithoutAmbientCaps(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with this goroutine
		if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			errc <- fmt.Errorf("clear ambient capabilities: %w", err)
			return
		}
		errc <- cmd.Start()
	}()
	return <-errc
}

// logLines copies the helper's stdout and stderr (the SDK's own log and panic messages) to
// avpd's log, with anything shaped like a credential removed.
func (h *helper) logLines(r *os.File) {
	defer close(h.logDone)
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 64<<10)
	n := 0
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || reBacktrace.MatchString(line) {
			continue
		}
		if strings.Contains(line, "panicked at") || strings.HasPrefix(line, "SIGABRT") {
			h.mu.Lock()
			h.panicked = true
			h.mu.Unlock()
		}
		if n++; n > maxHelperLogLines {
			continue
		}
		h.b.logf("bws-helper[%d]: %s", h.cmd.Process.Pid, (*Redactor)(nil).RedactFreeText(line))
	}
}

func (h *helper) readLoop() {
	for {
		var r Response
		if err := ReadFrame(h.conn, &r); err != nil {
			h.die(err, true)
			return
		}
		h.mu.Lock()
		p := h.pending[r.ID]
		delete(h.pending, r.ID)
		abandoned := p != nil && p.abandoned
		h.mu.Unlock()
		if p == nil {
			store.Wipe(r.Value)
			continue
		}
		p.release()
		if abandoned {
			store.Wipe(r.Value)
			continue
		}
		p.ch <- &r
	}
}

// watchdog kills a helper with a call that has not returned for twice the timeout: its
// thread is stuck in the SDK (which has no timeouts of its own) and holds a slot.
func (h *helper) watchdog() {
	limit := 2 * h.b.opts.Timeout
	t := time.NewTicker(max(h.b.opts.Timeout/4, 50*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-h.dead:
			return
		case <-t.C:
		}
		h.mu.Lock()
		var stuck bool
		for _, p := range h.pending {
			if time.Since(p.start) > limit {
				stuck = true
			}
		}
		h.mu.Unlock()
		if stuck {
			h.kill(fmt.Errorf("a BWS call did not return within %s; the helper was restarted to free its threads", limit))
			return
		}
	}
}

// call sends req and waits for its answer, the helper's death, or ctx.
func (h *helper) call(ctx context.Context, req *Request) (*Response, error) {
	b := h.b
	select {
	case b.sem <- struct{}{}:
	case <-h.dead:
		return nil, h.err()
	case <-ctx.Done():
		return nil, fmt.Errorf("all %d BWS call slots are busy: %w", cap(b.sem), b.ctxErr(ctx))
	}
	var once sync.Once
	release := func() { once.Do(func() { <-b.sem }) }
	p := &pending{ch: make(chan *Response, 1), start: time.Now(), release: release}
	h.mu.Lock()
	if h.deadErr != nil {
		h.mu.Unlock()
		release()
		return nil, h.err()
	}
	h.nextID++
	req.ID = h.nextID
	h.pending[req.ID] = p
	h.mu.Unlock()

	h.wmu.Lock()
	err := WriteFrame(h.conn, req)
	h.wmu.Unlock()
	if err != nil {
		h.die(fmt.Errorf("write to the BWS helper: %w", err), true)
		return nil, h.err()
	}
	select {
	case r := <-p.ch:
		if r.Err != "" {
			ce := &CallError{Msg: r.Err, Status: r.Status}
			if req.Op != OpLogin && (ce.Status == 401 || ce.Status == 403) {
				b.refused(h, ce)
			}
			return nil, ce
		}
		if req.Op != OpLogin {
			b.accepted()
		}
		return r, nil
	case <-h.dead:
		return nil, h.err()
	case <-ctx.Done():
		h.mu.Lock()
		p.abandoned = true
		h.mu.Unlock()
		// The answer may have arrived just now.
		select {
		case r := <-p.ch:
			store.Wipe(r.Value)
		default:
		}
		return nil, b.ctxErr(ctx)
	}
}

// kill stops the helper on purpose; err is what its callers are told.
func (h *helper) kill(err error) {
	h.die(err, false)
}

// die marks the helper dead once: it closes the socket, kills the process, frees the slots
// of every pending call and tells the backend.
func (h *helper) die(err error, crashed bool) {
	h.mu.Lock()
	if h.deadErr != nil {
		h.mu.Unlock()
		return
	}
	if crashed {
		// The process went away by itself: say how, once it has been reaped.
		h.mu.Unlock()
		limit := time.After(2 * time.Second)
		for _, ch := range []chan struct{}{h.waited, h.logDone} {
			select {
			case <-ch:
			case <-limit:
			}
		}
		h.mu.Lock()
		if h.deadErr != nil {
			h.mu.Unlock()
			return
		}
		how := "closed its socket"
		select {
		case <-h.waited:
			how = "exited (" + exitText(h.exitErr) + ")"
		default:
		}
		if h.panicked {
			how = "aborted: the SDK panicked, typically on a malformed BWS response (" + exitText(h.exitErr) + ")"
		}
		err = fmt.Errorf("the BWS helper %s; calls in flight failed", how)
	}
	h.deadErr = err
	pend := h.pending
	h.pending = map[uint64]*pending{}
	h.mu.Unlock()
	h.cmd.Process.Kill()
	h.conn.Close()
	for _, p := range pend {
		p.release()
	}
	if crashed {
		h.b.logf("bws: %v", err)
	}
	// The backend learns first, so a caller woken below already sees the new state.
	h.b.helperDied(h, err, crashed)
	close(h.dead)
}

func exitText(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ProcessState.String()
	}
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

func (h *helper) err() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.deadErr
}

// wait waits up to d for the process to be reaped.
func (h *helper) wait(d time.Duration) {
	select {
	case <-h.waited:
	case <-time.After(d):
	}
}

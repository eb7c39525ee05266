// Package admin owns the admin Unix socket between avpctl and avpd: its wire format, who may
// use it, and the client.
//
// One connection carries one JSON request line and one JSON response line. Access is decided
// by SO_PEERCRED: root, the daemon's own user, and members of the admin group. The socket
// never carries a secret value: handlers answer with names, counts and fingerprints.
package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// SocketName is the admin socket's file name in the runtime directory.
const SocketName = "admin.sock"

// GroupName is the group whose members may use the admin socket.
const GroupName = "avp-admin"

// Request is one command.
type Request struct {
	Cmd  string   `json:"cmd"`
	Args []string `json:"args,omitempty"`
}

// Response is the answer; Error is a user-facing sentence when the command failed.
type Response struct {
	OK    bool            `json:"ok"`
	Error string          `json:"error,omitempty"`
	Data  json.RawMessage `json:"data,omitempty"`
}

// Handler runs one command for an authorized peer.
type Handler func(ctx context.Context, peerUID uint32, args []string) (any, error)

// Server serves the admin socket.
type Server struct {
	ln       *net.UnixListener
	handlers map[string]Handler
	logf     func(string, ...any)
	adminGID int // -1 when the group does not exist
	wg       sync.WaitGroup
}

// Listen creates the socket at path with mode 0660, group avp-admin when that group exists.
func Listen(path string, handlers map[string]Handler, logf func(string, ...any)) (*Server, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale admin socket %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create runtime directory %s: %w", filepath.Dir(path), err)
	}
	// Bind under a restrictive umask so the socket is never briefly world-connectable.
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on admin socket %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	gid := -1
	if g, err := user.LookupGroup(GroupName); err == nil {
		gid, _ = strconv.Atoi(g.Gid)
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("chown admin socket %s to group %s: %w; add avpd's user to that group (usermod -aG %s USER; avpd.service does it with SupplementaryGroups=%s), or run avpd as root", path, GroupName, err, GroupName, GroupName)
		}
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod admin socket %s: %w", path, err)
	}
	return &Server{ln: ln, handlers: handlers, logf: logf, adminGID: gid}, nil
}

// Serve answers requests until ctx ends.
func (s *Server) Serve(ctx context.Context) {
	stop := context.AfterFunc(ctx, func() { s.ln.Close() })
	defer stop()
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				s.wg.Wait()
				return
			}
			s.logf("admin accept: %v", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveConn(ctx, c)
		}()
	}
}

// Close stops the listener and removes the socket.
func (s *Server) Close() error { return s.ln.Close() }

func (s *Server) serveConn(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	uid, gid, err := peerCred(c)
	if err != nil {
		s.logf("admin: read peer credentials: %v", err)
		return
	}
	enc := json.NewEncoder(c)
	if !s.authorized(uid, gid) {
		s.logf("admin: refused uid %d (not root, not the daemon's user, not in group %s)", uid, GroupName)
		enc.Encode(Response{Error: fmt.Sprintf("permission denied: uid %d is not root and not in group %s", uid, GroupName)})
		return
	}
	var req Request
	if err := json.NewDecoder(bufio.NewReader(&limitedReader{c, 64 << 10})).Decode(&req); err != nil {
		enc.Encode(Response{Error: "malformed request"})
		return
	}
	h, ok := s.handlers[req.Cmd]
	if !ok {
		enc.Encode(Response{Error: fmt.Sprintf("unknown command %q", req.Cmd)})
		return
	}
	data, err := h(ctx, uid, req.Args)
	if err != nil {
		enc.Encode(Response{Error: err.Error()})
		return
	}
	raw, err := json.Marshal(data)
	if err != nil {
		enc.Encode(Response{Error: "encode response"})
		return
	}
	enc.Encode(Response{OK: true, Data: raw})
}

func (s *Server) authorized(uid, gid uint32) bool {
	if uid == 0 || int(uid) == os.Geteuid() {
		return true
	}
	if s.adminGID < 0 {
		return false
	}
	if int(gid) == s.adminGID {
		return true
	}
	u, err := user.LookupId(strconv.Itoa(int(uid)))
	if err != nil {
		return false
	}
	groups, err := u.GroupIds()
	if err != nil {
		return false
	}
	return slices.Contains(groups, strconv.Itoa(s.adminGID))
}

func peerCred(c *net.UnixConn) (uid, gid uint32, err error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *syscall.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, 0, err
	}
	if serr != nil {
		return 0, 0, serr
	}
	return cred.Uid, cred.Gid, nil
}

type limitedReader struct {
	c *net.UnixConn
	n int
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errors.New("request too large")
	}
	if len(p) > l.n {
		p = p[:l.n]
	}
	n, err := l.c.Read(p)
	l.n -= n
	return n, err
}

// Call sends one request to the socket at path and decodes the data into out (if non-nil).
func Call(ctx context.Context, path string, cmd string, args []string, out any) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		switch {
		case errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOENT):
			return fmt.Errorf("connect to avpd at %s: no such socket; is avpd running (systemctl status avpd), and is --runtime-dir right?", path)
		case errors.Is(err, os.ErrPermission) || errors.Is(err, syscall.EACCES):
			return fmt.Errorf("connect to avpd at %s: permission denied; run as root or as a member of group %s", path, GroupName)
		case errors.Is(err, syscall.ECONNREFUSED):
			return fmt.Errorf("connect to avpd at %s: connection refused; avpd is not running", path)
		}
		return fmt.Errorf("connect to avpd at %s: %w", path, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	// avpd may answer (a refusal) and close before reading the request, so a failed write
	// still reads the answer first.
	werr := json.NewEncoder(c).Encode(Request{Cmd: cmd, Args: args})
	var resp Response
	if err := json.NewDecoder(c).Decode(&resp); err != nil {
		if werr != nil {
			return fmt.Errorf("send %s to avpd: %w", cmd, werr)
		}
		return fmt.Errorf("read avpd's answer to %s: %w", cmd, err)
	}
	if !resp.OK {
		return errors.New(resp.Error)
	}
	if out != nil && len(resp.Data) > 0 {
		if err := json.Unmarshal(resp.Data, out); err != nil {
			return fmt.Errorf("decode avpd's answer to %s: %w", cmd, err)
		}
	}
	return nil
}

package intercept

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// peerUID finds the UID that owns the agent's end of a redirected connection with
// sock_diag. From the kernel's view the agent's socket runs from its own address to the
// original destination (NAT is invisible to it), from its own source port (conntrack's
// original tuple, which the NAT may have moved), so that is the tuple to look up. It
// returns -1 when the socket cannot be found; the UID is for audit and per-UID bindings,
// never a reason to widen access.
//
// The lookup is an exact one (SOCK_DIAG_BY_FAMILY without NLM_F_DUMP): the kernel finds the
// socket by its 4-tuple in the established hash. A dump filtered in user space, which is
// what netlink.SocketGet does, walks every socket of the namespace, TIME_WAIT included, on
// every new connection: 1.7 ms per connection under a connect-per-request load, and
// quadratic under a connection flood.
func peerUID(c *net.TCPConn, orig netip.AddrPort) int64 {
	remote, ok := tcpAddrPort(c.RemoteAddr())
	if !ok {
		return -1
	}
	local, ok := tcpAddrPort(c.LocalAddr())
	if !ok {
		return -1
	}
	return peerUIDOf(local, remote, orig)
}

// peerUIDOf is peerUID for the accepted connection's local and remote addresses.
//
// Conntrack is asked first for the connection's source before the NAT
// (ctsource_linux.go): when the NAT moved the agent's source port (two of its sockets on
// one port to two destinations, both redirected), the accepted tuple runs from the moved
// port P' to the destination, and another user's established, not redirected, socket
// from P' to the same destination would be found by it, and taken for the agent's. Only
// when conntrack cannot answer (no ctnetlink) is the accepted tuple looked up as it is.
func peerUIDOf(local, remote, orig netip.AddrPort) int64 {
	src, err := ctSource(local, remote)
	if err != nil {
		src = remote
	}
	return diag.lookup(src, orig)
}

// ctSource is conntrackSource; a test replaces it.
var ctSource = conntrackSource

func tcpAddrPort(a net.Addr) (netip.AddrPort, bool) {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, false
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ip, uint16(ta.Port)), true
}

// diagSocket is one NETLINK_SOCK_DIAG socket shared by all lookups. The kernel answers a
// request synchronously while sendto runs, so a lookup holds the lock for two syscalls.
type diagSocket struct {
	mu  sync.Mutex
	fd  int // -1 when closed
	seq uint32
	buf [1024]byte
	req [unix.SizeofNlMsghdr + sizeofDiagReq]byte
}

var diag = diagSocket{fd: -1}

const (
	sockDiagByFamily = 20 // SOCK_DIAG_BY_FAMILY
	sizeofDiagReq    = 56 // struct inet_diag_req_v2
	// In struct inet_diag_msg: family, state, timer, retrans (4), id (48), expires,
	// rqueue, wqueue (12), then uid.
	diagMsgUIDOffset = 64
	tcpTimeWait      = 6 // TCP_TIME_WAIT, in inet_diag_msg's idiag_state
	tcpClose         = 7 // TCP_CLOSE
	tcpListen        = 10
)

// sameTuple reports whether the socket an inet_diag_msg describes runs from src to dst:
// its ports and addresses, the IPv4 ones of a dual-stack socket as IPv4-mapped IPv6.
func sameTuple(msg []byte, src, dst netip.AddrPort) bool {
	id := msg[4:]
	if binary.BigEndian.Uint16(id[0:]) != src.Port() || binary.BigEndian.Uint16(id[2:]) != dst.Port() {
		return false
	}
	var a, b netip.Addr
	switch msg[0] {
	case unix.AF_INET:
		a, b = netip.AddrFrom4([4]byte(id[4:8])), netip.AddrFrom4([4]byte(id[20:24]))
	case unix.AF_INET6:
		a, b = netip.AddrFrom16([16]byte(id[4:20])), netip.AddrFrom16([16]byte(id[20:36]))
	default:
		return false
	}
	return a.Unmap() == src.Addr().Unmap() && b.Unmap() == dst.Addr().Unmap()
}

func (d *diagSocket) lookup(src, dst netip.AddrPort) int64 {
	s, t := src.Addr().Unmap(), dst.Addr().Unmap()
	family := uint8(unix.AF_INET)
	if !s.Is4() || !t.Is4() {
		family = unix.AF_INET6
		s, t = src.Addr(), dst.Addr()
		if s.Is4() {
			s = netip.AddrFrom16(s.As16())
		}
		if t.Is4() {
			t = netip.AddrFrom16(t.As16())
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fd < 0 && !d.open() {
		return -1
	}
	d.seq++
	r := d.req[:]
	clear(r)
	ne := binary.NativeEndian
	ne.PutUint32(r[0:], uint32(len(r)))
	ne.PutUint16(r[4:], sockDiagByFamily)
	ne.PutUint16(r[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(r[8:], d.seq)
	q := r[unix.SizeofNlMsghdr:]
	q[0], q[1] = family, unix.IPPROTO_TCP
	ne.PutUint32(q[4:], 0xffffffff) // any state
	// struct inet_diag_sockid: ports and addresses in network byte order.
	binary.BigEndian.PutUint16(q[8:], src.Port())
	binary.BigEndian.PutUint16(q[10:], dst.Port())
	if family == unix.AF_INET {
		a, b := s.As4(), t.As4()
		copy(q[12:], a[:])
		copy(q[28:], b[:])
	} else {
		a, b := s.As16(), t.As16()
		copy(q[12:], a[:])
		copy(q[28:], b[:])
	}
	ne.PutUint32(q[48:], 0xffffffff) // INET_DIAG_NOCOOKIE
	ne.PutUint32(q[52:], 0xffffffff)
	if err := unix.Sendto(d.fd, r, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		d.close()
		return -1
	}
	for {
		n, _, err := unix.Recvfrom(d.fd, d.buf[:], 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n < unix.SizeofNlMsghdr {
			d.close()
			return -1
		}
		m := d.buf[:n]
		if ne.Uint32(m[8:]) != d.seq {
			continue // the answer to an earlier request that timed out
		}
		switch ne.Uint16(m[4:]) {
		case sockDiagByFamily:
			if n < unix.SizeofNlMsghdr+diagMsgUIDOffset+4 {
				return -1
			}
			msg := m[unix.SizeofNlMsghdr:]
			switch msg[1] {
			case tcpTimeWait, tcpClose:
				// Closed on both sides: what is left has no owner, and the kernel reports
				// UID 0 for it. An agent that sends and closes at once is not root.
				return -1
			case tcpListen:
				// The kernel's exact lookup falls back to the listener on the source port
				// when no connection has the tuple (a NAT-moved port): that listener's
				// owner, any user, is not the agent.
				return -1
			}
			if !sameTuple(msg, src, dst) {
				return -1
			}
			return int64(ne.Uint32(msg[diagMsgUIDOffset:]))
		default: // NLMSG_ERROR: ENOENT when the socket is gone
			return -1
		}
	}
}

func (d *diagSocket) open() bool {
	d.fd = openNetlink(unix.SOCK_DGRAM, unix.NETLINK_SOCK_DIAG)
	return d.fd >= 0
}

func (d *diagSocket) close() { closeNetlink(&d.fd) }

// openNetlink opens and binds a netlink socket of proto for lookups that hold it open, or
// returns -1.
func openNetlink(typ, proto int) int {
	fd, err := unix.Socket(unix.AF_NETLINK, typ|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return -1
	}
	// The kernel answers inside sendto; the timeout only guards against a kernel that does not.
	tv := unix.NsecToTimeval(int64(time.Second))
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return -1
	}
	return fd
}

func closeNetlink(fd *int) {
	if *fd >= 0 {
		unix.Close(*fd)
		*fd = -1
	}
}

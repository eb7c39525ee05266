package intercept

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"golang.org/x/sys/unix"
)

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST from <linux/netfilter_ipv6/ip6_tables.h>.
// golang.org/x/sys/unix only exports the IPv4 twin (SO_ORIGINAL_DST); both are 80.
const ip6tSOOriginalDst = 80

// OriginalDst returns the pre-NAT destination of a redirected TCP connection.
//
// nftables "redirect" rewrites the destination of an enrolled user's outbound
// connection to avpd's listener, so the accepted socket's local address is the
// listener, not the server the agent wanted. The original destination lives in
// the connection's conntrack entry, which the kernel exposes through
// getsockopt(SO_ORIGINAL_DST) for IPv4 and getsockopt(IP6T_SO_ORIGINAL_DST) for
// IPv6. The family is chosen from the connection's local address: an IPv4
// connection accepted on a dual-stack AF_INET6 socket has a v4-mapped local
// address and an IPv4 conntrack entry, so it is asked the IPv4 way.
//
// The socket is reached through SyscallConn().Control rather than File(),
// because File() dups the descriptor and switches it to blocking mode, which
// would detach it from Go's poller.
//
// A connection that was never tracked (no conntrack entry, e.g. nftables NAT
// was never loaded in this network namespace) yields an error. A connection
// made directly to the listener, without NAT, yields the listener's own
// address; see IsSelf.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	if c == nil {
		return netip.AddrPort{}, errors.New("get original destination: nil connection")
	}
	local, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok || local == nil {
		return netip.AddrPort{}, fmt.Errorf("get original destination: unexpected local address %v", c.LocalAddr())
	}
	v4 := local.IP.To4() != nil

	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("get original destination: %w", err)
	}
	var (
		dst    netip.AddrPort
		sysErr error
	)
	ctlErr := rc.Control(func(fd uintptr) {
		if v4 {
			dst, sysErr = origDst4(int(fd))
		} else {
			dst, sysErr = origDst6(int(fd))
		}
	})
	if ctlErr != nil {
		return netip.AddrPort{}, fmt.Errorf("get original destination: %w", ctlErr)
	}
	if sysErr != nil {
		if errors.Is(sysErr, unix.ENOENT) {
			return netip.AddrPort{}, fmt.Errorf("get original destination: no conntrack entry for %v -> %v: %w",
				c.RemoteAddr(), c.LocalAddr(), sysErr)
		}
		return netip.AddrPort{}, fmt.Errorf("get original destination: %w", sysErr)
	}
	return dst, nil
}

// origDst4 asks conntrack for the original IPv4 destination of fd.
//
// The kernel copies a 16-byte struct sockaddr_in. x/sys/unix has no typed
// getter for that, so we borrow GetsockoptIPv6Mreq, whose 20-byte result
// buffer is large enough; its Multiaddr field holds the raw sockaddr_in bytes:
// family (host order) at 0, port (network order) at 2, address at 4.
func origDst4(fd int) (netip.AddrPort, error) {
	m, err := unix.GetsockoptIPv6Mreq(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST)
	if err != nil {
		return netip.AddrPort{}, err
	}
	raw := m.Multiaddr
	if fam := binary.NativeEndian.Uint16(raw[0:2]); fam != unix.AF_INET {
		return netip.AddrPort{}, fmt.Errorf("unexpected address family %d in SO_ORIGINAL_DST result", fam)
	}
	port := binary.BigEndian.Uint16(raw[2:4])
	addr := netip.AddrFrom4([4]byte(raw[4:8]))
	return netip.AddrPortFrom(addr, port), nil
}

// origDst6 asks conntrack for the original IPv6 destination of fd.
//
// The kernel copies a 28-byte struct sockaddr_in6. GetsockoptIPv6MTUInfo's
// result (struct ip6_mtuinfo) begins with exactly that struct, so we use it
// as a typed buffer of the right size.
func origDst6(fd int) (netip.AddrPort, error) {
	mi, err := unix.GetsockoptIPv6MTUInfo(fd, unix.SOL_IPV6, ip6tSOOriginalDst)
	if err != nil {
		return netip.AddrPort{}, err
	}
	sa := mi.Addr
	if sa.Family != unix.AF_INET6 {
		return netip.AddrPort{}, fmt.Errorf("unexpected address family %d in IP6T_SO_ORIGINAL_DST result", sa.Family)
	}
	addr := netip.AddrFrom16(sa.Addr)
	if sa.Scope_id != 0 && (addr.IsLinkLocalUnicast() || addr.IsLinkLocalMulticast()) {
		addr = addr.WithZone(strconv.FormatUint(uint64(sa.Scope_id), 10))
	}
	return netip.AddrPortFrom(addr, ntohs(sa.Port)), nil
}

// ntohs converts a port read from a sockaddr field, which holds network byte
// order in memory, into a host value. Reading it as a plain uint16 on a
// little-endian machine turns 443 into 47873.
func ntohs(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

// IsSelf reports whether orig, an original destination returned by
// OriginalDst, is one of avpd's own listener addresses.
//
// A connection whose original destination is the proxy itself was not
// redirected (someone dialled the listener directly, or a redirect rule loops
// back). Proxying it would make avpd connect to itself forever, so callers
// must drop it. A destination also counts as self when it has a listener's
// port and a loopback or unspecified address while that listener is bound to
// loopback or to the unspecified address, since such a connection reaches the
// same socket. v4-mapped IPv6 addresses are unmapped before comparing.
func IsSelf(orig netip.AddrPort, listeners []netip.AddrPort) bool {
	oa := orig.Addr().Unmap()
	for _, l := range listeners {
		la := l.Addr().Unmap()
		if orig.Port() != l.Port() {
			continue
		}
		if oa == la {
			return true
		}
		if (oa.IsLoopback() || oa.IsUnspecified()) && (la.IsLoopback() || la.IsUnspecified()) {
			return true
		}
	}
	return false
}

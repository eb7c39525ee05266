package intercept

import (
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// peerUID finds the UID that owns the agent's end of a redirected connection with
// sock_diag. From the kernel's view the agent's socket runs from its own address to the
// original destination (NAT is invisible to it), so that is the tuple to look up. It
// returns -1 when the socket cannot be found; the UID is for audit and per-UID bindings,
// never a reason to widen access.
func peerUID(c *net.TCPConn, orig netip.AddrPort) int64 {
	src, ok := c.RemoteAddr().(*net.TCPAddr)
	if !ok {
		return -1
	}
	srcIP := src.IP
	dstIP := net.IP(orig.Addr().Unmap().AsSlice())
	if v4 := srcIP.To4(); v4 != nil && orig.Addr().Unmap().Is4() {
		srcIP = v4
	}
	sock, err := netlink.SocketGet(&net.TCPAddr{IP: srcIP, Port: src.Port}, &net.TCPAddr{IP: dstIP, Port: int(orig.Port())})
	if err != nil {
		return -1
	}
	return int64(sock.UID)
}

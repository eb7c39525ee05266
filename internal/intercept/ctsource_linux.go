package intercept

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"sync"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Every redirected connection goes to the one listener, so two agent sockets on one source
// port (SO_REUSEADDR, or the kernel reusing a port towards another destination) would give
// the same translated tuple: the NAT then moves the second to another source port. The
// accepted connection's remote port is then not the agent socket's, and sock_diag finds no
// socket (or another's TIME_WAIT). Conntrack knows the source as the agent's socket has it.

// ctnetlink constants (linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h).
const (
	nfnlSubsysCTNetlink = 1
	ipctnlMsgCTGet      = 1
	ctaTupleOrig        = 1
	ctaTupleReply       = 2
	ctaTupleIP          = 1
	ctaTupleProto       = 2
	ctaIPv4Src          = 1
	ctaIPv4Dst          = 2
	ctaIPv6Src          = 3
	ctaIPv6Dst          = 4
	ctaProtoNum         = 1
	ctaProtoSrcPort     = 2
	ctaProtoDstPort     = 3
)

// conntrackSource returns the source of the connection whose reply direction runs from
// local to remote (the accepted socket's own addresses), before any NAT.
func conntrackSource(local, remote netip.AddrPort) (netip.AddrPort, error) {
	l, r := local.Addr().Unmap(), remote.Addr().Unmap()
	family, srcAttr, dstAttr := uint8(unix.AF_INET), uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if !l.Is4() || !r.Is4() {
		family, srcAttr, dstAttr = unix.AF_INET6, ctaIPv6Src, ctaIPv6Dst
		l, r = local.Addr(), remote.Addr()
	}
	ae := netlink.NewAttributeEncoder()
	ae.Nested(ctaTupleReply, func(t *netlink.AttributeEncoder) error {
		t.Nested(ctaTupleIP, func(ip *netlink.AttributeEncoder) error {
			ip.Bytes(srcAttr, addrBytes(l, family))
			ip.Bytes(dstAttr, addrBytes(r, family))
			return nil
		})
		t.Nested(ctaTupleProto, func(p *netlink.AttributeEncoder) error {
			p.Uint8(ctaProtoNum, unix.IPPROTO_TCP)
			p.Bytes(ctaProtoSrcPort, binary.BigEndian.AppendUint16(nil, local.Port()))
			p.Bytes(ctaProtoDstPort, binary.BigEndian.AppendUint16(nil, remote.Port()))
			return nil
		})
		return nil
	})
	attrs, err := ae.Encode()
	if err != nil {
		return netip.AddrPort{}, err
	}
	return ct.get(family, attrs, srcAttr)
}

// ctSocket is one NETLINK_NETFILTER socket shared by all conntrack lookups, as diagSocket
// is for sock_diag: a socket per lookup (netlink.Dial) cost about 300 µs per new
// connection, most of it in creating and closing the socket, against about 3 µs for a
// query on an open one. The kernel answers a request while sendto runs, so a lookup holds
// the lock for two syscalls.
type ctSocket struct {
	mu  sync.Mutex
	fd  int // -1 when closed
	seq uint32
	buf [8192]byte
}

var ct = ctSocket{fd: -1}

var errNoCTSocket = errors.New("conntrack: cannot open a ctnetlink socket")

// get sends IPCTNL_MSG_CT_GET for the tuple in attrs and returns the original source of
// the entry the kernel answers with.
func (d *ctSocket) get(family uint8, attrs []byte, srcAttr uint16) (netip.AddrPort, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fd < 0 && !d.open() {
		return netip.AddrPort{}, errNoCTSocket
	}
	d.seq++
	ne := binary.NativeEndian
	req := make([]byte, unix.SizeofNlMsghdr+4+len(attrs))
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], nfnlSubsysCTNetlink<<8|ipctnlMsgCTGet)
	// No ack asked for: the kernel answers with the entry or with an error, never both.
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(req[8:], d.seq)
	req[unix.SizeofNlMsghdr] = family // nfgenmsg: family, version 0, res_id 0
	copy(req[unix.SizeofNlMsghdr+4:], attrs)
	if err := unix.Sendto(d.fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		d.close()
		return netip.AddrPort{}, err
	}
	for {
		n, _, err := unix.Recvfrom(d.fd, d.buf[:], 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n < unix.SizeofNlMsghdr+4 {
			d.close()
			if err == nil {
				err = errors.New("conntrack: short answer")
			}
			return netip.AddrPort{}, err
		}
		m := d.buf[:n]
		if ne.Uint32(m[8:]) != d.seq {
			continue // the answer to an earlier request that timed out
		}
		l := int(ne.Uint32(m[0:]))
		if l < unix.SizeofNlMsghdr+4 || l > n {
			d.close()
			return netip.AddrPort{}, errors.New("conntrack: malformed answer")
		}
		if ne.Uint16(m[4:]) == unix.NLMSG_ERROR {
			if e := -int32(ne.Uint32(m[unix.SizeofNlMsghdr:])); e != 0 {
				return netip.AddrPort{}, unix.Errno(e)
			}
			return netip.AddrPort{}, errors.New("conntrack: no entry in the answer")
		}
		if src, ok := origSource(m[unix.SizeofNlMsghdr+4:l], srcAttr); ok {
			return src, nil
		}
		return netip.AddrPort{}, errors.New("conntrack has no original tuple for the connection")
	}
}

func (d *ctSocket) open() bool {
	d.fd = openNetlink(unix.SOCK_RAW, unix.NETLINK_NETFILTER)
	return d.fd >= 0
}

func (d *ctSocket) close() { closeNetlink(&d.fd) }

func addrBytes(a netip.Addr, family uint8) []byte {
	if family == unix.AF_INET {
		b := a.As4()
		return b[:]
	}
	b := a.As16()
	return b[:]
}

// origSource reads the source address and port of CTA_TUPLE_ORIG from a conntrack message.
func origSource(b []byte, srcAttr uint16) (netip.AddrPort, bool) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return netip.AddrPort{}, false
	}
	var addr netip.Addr
	var port uint16
	var found bool
	for ad.Next() {
		if ad.Type() != ctaTupleOrig {
			continue
		}
		ad.Nested(func(t *netlink.AttributeDecoder) error {
			for t.Next() {
				switch t.Type() {
				case ctaTupleIP:
					t.Nested(func(ip *netlink.AttributeDecoder) error {
						for ip.Next() {
							if ip.Type() == srcAttr {
								addr, _ = netip.AddrFromSlice(ip.Bytes())
							}
						}
						return nil
					})
				case ctaTupleProto:
					t.Nested(func(p *netlink.AttributeDecoder) error {
						for p.Next() {
							if p.Type() == ctaProtoSrcPort && len(p.Bytes()) == 2 {
								port, found = binary.BigEndian.Uint16(p.Bytes()), true
							}
						}
						return nil
					})
				}
			}
			return nil
		})
	}
	if ad.Err() != nil || !found || !addr.IsValid() {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(addr, port), true
}

package intercept

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"time"

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
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer c.Close()
	// The kernel answers at once; the deadline only keeps a connection from waiting on a
	// kernel that does not.
	if err := c.SetDeadline(time.Now().Add(time.Second)); err != nil {
		return netip.AddrPort{}, err
	}
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(nfnlSubsysCTNetlink<<8 | ipctnlMsgCTGet), Flags: netlink.Request | netlink.Acknowledge},
		// nfgenmsg: family, version 0, res_id 0. (Without an ack asked for, Execute waited
		// past the answer.)
		Data: append([]byte{family, 0, 0, 0}, attrs...),
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		if src, ok := origSource(m.Data[4:], srcAttr); ok {
			return src, nil
		}
	}
	return netip.AddrPort{}, errors.New("conntrack has no original tuple for the connection")
}

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

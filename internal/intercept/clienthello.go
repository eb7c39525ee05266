package intercept

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// ClientHelloInfo is what avpd needs from a ClientHello to decide, before
// any byte is answered, whether to splice the connection or terminate it.
type ClientHelloInfo struct {
	ServerName string   // SNI host_name, lowercased, without a trailing dot; "" if absent
	HasECH     bool     // extension 0xfe0d present: ServerName is only the outer/public name
	ALPN       []string // application_layer_protocol_negotiation offers, in client order
}

// ErrNotTLS reports that a connection does not start with a TLS handshake
// record carrying a ClientHello, so it cannot be classified by SNI. Callers
// decide whether such traffic is spliced or refused.
var ErrNotTLS = errors.New("not a TLS handshake")

const (
	recordHeaderLen     = 5
	recordTypeHandshake = 22
	handshakeHeaderLen  = 4
	typeClientHello     = 1

	// maxRecordLen accepts TLSPlaintext's 2^14 plus the 2048 bytes of
	// expansion RFC 8446 allows for TLSCiphertext, to be lenient with odd
	// clients while still rejecting garbage lengths at once.
	maxRecordLen = 16384 + 2048

	extServerName = 0
	extALPN       = 16
	extECH        = 0xfe0d
)

// PeekClientHello reads from c until one complete TLS ClientHello handshake
// message has been assembled (it may span several TCP segments AND several
// TLS records), up to max bytes of record data (callers pass 16 KiB), with
// the given read deadline (reset the deadline to zero afterwards). It returns
// the parsed info and every byte it read, so the caller can replay them.
//
// It reads record by record with exact lengths, so it never consumes or waits
// for bytes past the last record that carries the ClientHello. The bytes read
// are returned on error too, so a caller may still forward them (for example
// when the error is ErrNotTLS). ErrNotTLS is returned, wrapped, when the first
// record is not a handshake record with a TLS 1.0-1.3 version or the first
// handshake message is not a ClientHello; it is detected from the first bytes
// that arrive, without waiting for a full record header. A timeout yields an
// error matching os.ErrDeadlineExceeded. A timeout <= 0 sets no deadline.
func PeekClientHello(c net.Conn, timeout time.Duration, max int) (ClientHelloInfo, []byte, error) {
	if timeout > 0 {
		if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
			return ClientHelloInfo{}, nil, fmt.Errorf("peek client hello: set deadline: %w", err)
		}
		defer c.SetReadDeadline(time.Time{})
	}

	raw := make([]byte, 0, 2048)
	var msg []byte   // reassembled handshake bytes
	recordBytes := 0 // sum of record payload lengths so far
	for first := true; ; first = false {
		hdrAt := len(raw)
		var err error
		raw, err = readHeader(c, raw, first)
		if err != nil {
			return ClientHelloInfo{}, raw, err
		}
		hdr := raw[hdrAt:]
		if hdr[0] != recordTypeHandshake {
			return ClientHelloInfo{}, raw, fmt.Errorf("peek client hello: record type %d inside the ClientHello", hdr[0])
		}
		n := int(hdr[3])<<8 | int(hdr[4])
		if n == 0 || n > maxRecordLen {
			return ClientHelloInfo{}, raw, fmt.Errorf("peek client hello: bad handshake record length %d", n)
		}
		if recordBytes+n > max {
			return ClientHelloInfo{}, raw, fmt.Errorf("peek client hello: ClientHello exceeds %d bytes", max)
		}
		recordBytes += n

		bodyAt := len(raw)
		raw, err = readN(c, raw, n)
		if err != nil {
			return ClientHelloInfo{}, raw, err
		}
		msg = append(msg, raw[bodyAt:]...)
		if len(msg) < handshakeHeaderLen {
			continue
		}
		if msg[0] != typeClientHello {
			return ClientHelloInfo{}, raw, fmt.Errorf("%w: handshake message type %d, want ClientHello", ErrNotTLS, msg[0])
		}
		total := handshakeHeaderLen + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
		if total > max {
			return ClientHelloInfo{}, raw, fmt.Errorf("peek client hello: ClientHello of %d bytes exceeds %d", total, max)
		}
		if len(msg) >= total {
			// Anything after the ClientHello in its last record is another
			// handshake message, which a client must not send before the
			// server answers; it stays in raw for the caller to replay.
			info, err := ParseClientHello(msg[:total])
			return info, raw, err
		}
	}
}

// readHeader appends one 5-byte record header to raw. On the first record it
// checks each byte as soon as it arrives, so a plaintext protocol is reported
// as ErrNotTLS without waiting for more input.
func readHeader(c net.Conn, raw []byte, first bool) ([]byte, error) {
	start := len(raw)
	raw = grow(raw, recordHeaderLen)
	buf := raw[start : start+recordHeaderLen]
	got := 0
	for got < recordHeaderLen {
		n, err := c.Read(buf[got:])
		got += n
		if first {
			if got >= 1 && buf[0] != recordTypeHandshake {
				return raw[:start+got], fmt.Errorf("%w: first byte 0x%02x", ErrNotTLS, buf[0])
			}
			if got >= 2 && buf[1] != 3 {
				return raw[:start+got], fmt.Errorf("%w: record version major %d", ErrNotTLS, buf[1])
			}
			if got >= 3 && (buf[2] < 1 || buf[2] > 4) {
				return raw[:start+got], fmt.Errorf("%w: record version 0x03%02x", ErrNotTLS, buf[2])
			}
		}
		if got == recordHeaderLen {
			break
		}
		if err != nil {
			return raw[:start+got], readErr(err, got > 0 || !first)
		}
		if n == 0 {
			return raw[:start+got], fmt.Errorf("peek client hello: %w", io.ErrNoProgress)
		}
	}
	return raw, nil
}

// readN appends exactly n bytes read from c to raw.
func readN(c net.Conn, raw []byte, n int) ([]byte, error) {
	start := len(raw)
	raw = grow(raw, n)
	got, err := io.ReadFull(c, raw[start:start+n])
	if err != nil {
		return raw[:start+got], readErr(err, true)
	}
	return raw, nil
}

// grow extends b by n bytes of length, reallocating when needed.
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) < n {
		nb := make([]byte, len(b), 2*cap(b)+n)
		copy(nb, b)
		b = nb
	}
	return b[:len(b)+n]
}

func readErr(err error, midMessage bool) error {
	if midMessage && errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("peek client hello: read: %w", err)
}

// ParseClientHello parses a complete handshake message body (type 1) -
// exported for fuzzing.
//
// msg is the whole reassembled handshake message, starting with its 4-byte
// header (msg_type 1 and a 24-bit length that must cover the rest of msg
// exactly). Every length is bounds-checked, so arbitrary input returns an
// error rather than panicking. A server_name that is not a plausible DNS name
// is an error, because avpd keys policy and certificates on it.
func ParseClientHello(msg []byte) (ClientHelloInfo, error) {
	var info ClientHelloInfo
	fail := func(what string) (ClientHelloInfo, error) {
		return ClientHelloInfo{}, fmt.Errorf("parse client hello: malformed %s", what)
	}

	s := cursor(msg)
	typ, ok := s.u8()
	if !ok {
		return fail("handshake header")
	}
	if typ != typeClientHello {
		return ClientHelloInfo{}, fmt.Errorf("parse client hello: %w: handshake message type %d", ErrNotTLS, typ)
	}
	n, ok := s.u24()
	if !ok || int(n) != len(s) {
		return fail("handshake length")
	}
	if _, ok := s.bytes(2); !ok { // legacy_version
		return fail("legacy_version")
	}
	if _, ok := s.bytes(32); !ok {
		return fail("random")
	}
	if sid, ok := s.vec8(); !ok || len(sid) > 32 {
		return fail("legacy_session_id")
	}
	if cs, ok := s.vec16(); !ok || len(cs) < 2 || len(cs)%2 != 0 {
		return fail("cipher_suites")
	}
	if cm, ok := s.vec8(); !ok || len(cm) < 1 {
		return fail("legacy_compression_methods")
	}
	if len(s) == 0 {
		return info, nil // pre-extension (SSL 3.0 style) hello: no SNI
	}
	exts, ok := s.vec16()
	if !ok || len(s) != 0 {
		return fail("extensions")
	}

	seen := make(map[uint16]bool)
	for len(exts) > 0 {
		typ, ok1 := exts.u16()
		data, ok2 := exts.vec16()
		if !ok1 || !ok2 {
			return fail("extension")
		}
		if seen[typ] {
			return ClientHelloInfo{}, fmt.Errorf("parse client hello: duplicate extension %d", typ)
		}
		seen[typ] = true
		switch typ {
		case extServerName:
			name, err := parseServerName(data)
			if err != nil {
				return ClientHelloInfo{}, err
			}
			info.ServerName = name
		case extALPN:
			protos, ok := parseALPN(data)
			if !ok {
				return fail("application_layer_protocol_negotiation")
			}
			info.ALPN = protos
		case extECH:
			info.HasECH = true
		}
	}
	return info, nil
}

// parseServerName extracts the host_name entry of a server_name extension.
func parseServerName(data cursor) (string, error) {
	list, ok := data.vec16()
	if !ok || len(data) != 0 || len(list) == 0 {
		return "", errors.New("parse client hello: malformed server_name")
	}
	var host string
	found := false
	for len(list) > 0 {
		nameType, ok1 := list.u8()
		name, ok2 := list.vec16()
		if !ok1 || !ok2 {
			return "", errors.New("parse client hello: malformed server_name entry")
		}
		if nameType != 0 { // only host_name(0) is defined; skip others
			continue
		}
		if found {
			return "", errors.New("parse client hello: more than one host_name in server_name")
		}
		found = true
		h, ok := normalizeDNSName(string(name))
		if !ok {
			return "", fmt.Errorf("parse client hello: server_name %q is not a DNS name", truncate(string(name), 64))
		}
		host = h
	}
	return host, nil
}

// parseALPN extracts the protocol_name_list of an ALPN extension.
func parseALPN(data cursor) ([]string, bool) {
	list, ok := data.vec16()
	if !ok || len(data) != 0 || len(list) == 0 {
		return nil, false
	}
	var protos []string
	for len(list) > 0 {
		p, ok := list.vec8()
		if !ok || len(p) == 0 {
			return nil, false
		}
		protos = append(protos, string(p))
	}
	return protos, true
}

// normalizeDNSName lowercases name, strips one trailing dot, and reports
// whether the result is a plausible DNS name: 1-253 bytes of letters, digits,
// '-', '_' and '.', in labels of 1-63 bytes. It allocates only when name has
// upper-case letters.
func normalizeDNSName(name string) (string, bool) {
	name = strings.TrimSuffix(name, ".")
	if len(name) == 0 || len(name) > 253 {
		return "", false
	}
	label := 0
	for i := 0; i < len(name); i++ {
		switch b := name[i]; {
		case b == '.':
			if label == 0 {
				return "", false
			}
			label = 0
			continue
		case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9', b == '-', b == '_':
		default:
			return "", false
		}
		label++
		if label > 63 {
			return "", false
		}
	}
	return strings.ToLower(name), true
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// cursor is a bounds-checked reader over TLS wire encoding. Every method
// reports false instead of reading past the end.
type cursor []byte

func (c *cursor) bytes(n int) ([]byte, bool) {
	if n < 0 || len(*c) < n {
		return nil, false
	}
	b := (*c)[:n]
	*c = (*c)[n:]
	return b, true
}

func (c *cursor) u8() (uint8, bool) {
	b, ok := c.bytes(1)
	if !ok {
		return 0, false
	}
	return b[0], true
}

func (c *cursor) u16() (uint16, bool) {
	b, ok := c.bytes(2)
	if !ok {
		return 0, false
	}
	return uint16(b[0])<<8 | uint16(b[1]), true
}

func (c *cursor) u24() (uint32, bool) {
	b, ok := c.bytes(3)
	if !ok {
		return 0, false
	}
	return uint32(b[0])<<16 | uint32(b[1])<<8 | uint32(b[2]), true
}

func (c *cursor) vec8() (cursor, bool) {
	n, ok := c.u8()
	if !ok {
		return nil, false
	}
	b, ok := c.bytes(int(n))
	return cursor(b), ok
}

func (c *cursor) vec16() (cursor, bool) {
	n, ok := c.u16()
	if !ok {
		return nil, false
	}
	b, ok := c.bytes(int(n))
	return cursor(b), ok
}

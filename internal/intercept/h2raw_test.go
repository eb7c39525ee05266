package intercept

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

// rawH2Conn is a raw HTTP/2 agent (frames written by hand; hpack from x/net): it writes any
// header fields, in any order, split as it likes, including those Go's client refuses.
type rawH2Conn struct {
	t   *testing.T
	c   *tls.Conn
	br  *bufio.Reader
	id  uint32
	dec *hpack.Decoder
}

const (
	frData         = 0x0
	frHeaders      = 0x1
	frRST          = 0x3
	frSettings     = 0x4
	frPing         = 0x6
	frGoAway       = 0x7
	frWindowUpdate = 0x8
	frContinuation = 0x9

	flEndStream  = 0x1
	flEndHeaders = 0x4
)

func (e *rawEnv) rawH2(t *testing.T) *rawH2Conn {
	t.Helper()
	c, err := tls.Dial("tcp", e.agent.Addr().String(), &tls.Config{ServerName: rawHost, RootCAs: e.roots, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if c.ConnectionState().NegotiatedProtocol != "h2" {
		t.Fatal("no h2")
	}
	io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	h := &rawH2Conn{t: t, c: c, br: bufio.NewReader(c), id: 1, dec: hpack.NewDecoder(65536, nil)}
	h.frame(frSettings, 0, 0, nil)
	return h
}

func (h *rawH2Conn) frame(typ, flags byte, stream uint32, payload []byte) {
	if err := writeH2Frame(h.c, typ, flags, stream, payload); err != nil {
		h.t.Fatal(err)
	}
}

// writeH2Frame writes one HTTP/2 frame, header and payload in one write.
func writeH2Frame(w io.Writer, typ, flags byte, stream uint32, payload []byte) error {
	var hdr [9]byte
	hdr[0], hdr[1], hdr[2] = byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	hdr[3], hdr[4] = typ, flags
	binary.BigEndian.PutUint32(hdr[5:], stream)
	_, err := w.Write(append(hdr[:], payload...))
	return err
}

type h2Field struct{ k, v string }

func h2Block(fields []h2Field) []byte {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, f := range fields {
		enc.WriteField(hpack.HeaderField{Name: f.k, Value: f.v})
	}
	return buf.Bytes()
}

type h2Resp struct {
	status             string
	hdr                []hpack.HeaderField
	body               string
	trail              []hpack.HeaderField
	endStreamOnHeaders bool
}

func (r h2Resp) String() string {
	return fmt.Sprintf("%s %v %q trailers %v", r.status, r.hdr, r.body, r.trail)
}

// send writes a request: its header block (split into HEADERS + CONTINUATIONs of at most
// split bytes each, if split > 0), then body in one DATA frame if non-nil.
func (h *rawH2Conn) send(fields []h2Field, body []byte, split int) uint32 {
	id := h.id
	h.id += 2
	blk := h2Block(fields)
	endStream := byte(0)
	if body == nil {
		endStream = flEndStream
	}
	if split <= 0 || split >= len(blk) {
		h.frame(frHeaders, flEndHeaders|endStream, id, blk)
	} else {
		h.frame(frHeaders, endStream, id, blk[:split])
		blk = blk[split:]
		for len(blk) > split {
			h.frame(frContinuation, 0, id, blk[:split])
			blk = blk[split:]
		}
		h.frame(frContinuation, flEndHeaders, id, blk)
	}
	if body != nil {
		h.frame(frData, flEndStream, id, body)
	}
	return id
}

// read reads frames until stream id ends.
func (h *rawH2Conn) read(id uint32) h2Resp {
	h.t.Helper()
	h.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var r h2Resp
	var out bytes.Buffer
	var block []byte
	gotHead := false
	for {
		var fh [9]byte
		if _, err := io.ReadFull(h.br, fh[:]); err != nil {
			h.t.Fatalf("read frame: %v (so far %v)", err, r)
		}
		n := int(fh[0])<<16 | int(fh[1])<<8 | int(fh[2])
		typ, flags, sid := fh[3], fh[4], binary.BigEndian.Uint32(fh[5:])&0x7fffffff
		p := make([]byte, n)
		if _, err := io.ReadFull(h.br, p); err != nil {
			h.t.Fatal(err)
		}
		switch typ {
		case frSettings:
			if flags&1 == 0 {
				h.frame(frSettings, 1, 0, nil)
			}
		case frPing:
			if flags&1 == 0 {
				h.frame(frPing, 1, 0, p)
			}
		case frGoAway:
			r.status = "GOAWAY"
			return r
		case frRST:
			if sid == id {
				r.status = fmt.Sprintf("RST_STREAM(%d)", binary.BigEndian.Uint32(p))
				return r
			}
		case frHeaders, frContinuation:
			if sid != id {
				continue
			}
			if typ == frHeaders {
				block = nil
				if flags&0x8 != 0 { // padded
					pad := int(p[0])
					p = p[1 : len(p)-pad]
				}
				if flags&0x20 != 0 { // priority
					p = p[5:]
				}
				r.endStreamOnHeaders = flags&flEndStream != 0
			}
			block = append(block, p...)
			if flags&flEndHeaders != 0 {
				fs, err := h.dec.DecodeFull(block)
				if err != nil {
					h.t.Fatal(err)
				}
				if !gotHead {
					for _, f := range fs {
						if f.Name == ":status" {
							r.status = f.Value
						} else {
							r.hdr = append(r.hdr, f)
						}
					}
					if r.status != "" && r.status[0] != '1' {
						gotHead = true
					}
				} else {
					r.trail = append(r.trail, fs...)
				}
				if r.endStreamOnHeaders {
					r.body = out.String()
					return r
				}
			}
		case frData:
			if sid != id {
				continue
			}
			out.Write(p)
			if n > 0 {
				var w [4]byte
				binary.BigEndian.PutUint32(w[:], uint32(n))
				h.frame(frWindowUpdate, 0, 0, w[:])
				h.frame(frWindowUpdate, 0, id, w[:])
			}
			if flags&flEndStream != 0 {
				r.body = out.String()
				return r
			}
		}
	}
}

func (h *rawH2Conn) do(fields []h2Field, body []byte) h2Resp {
	return h.read(h.send(fields, body, 0))
}

func h2Req(method, authority, path string, extra ...string) []h2Field {
	fs := []h2Field{{":method", method}, {":scheme", "https"}, {":authority", authority}, {":path", path}}
	for i := 0; i+1 < len(extra); i += 2 {
		fs = append(fs, h2Field{extra[i], extra[i+1]})
	}
	return fs
}

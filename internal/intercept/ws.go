package intercept

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
)

// After a 101 to WebSocket, what the upstream sends the agent is a stream of frames, and a
// message may be split into fragments anywhere: gorilla/websocket's NextWriter, for one,
// sends a fragment each time its buffer fills. An echo split by a fragment's header would
// pass a scrubber of the raw bytes in two pieces, and the agent, which joins the fragments,
// would have it whole; the agent can choose where the split falls by padding what the
// upstream echoes first. So the frames are read, each data message's payload is scrubbed as
// one stream, and the agent gets frames of avpd's own making. RFC 6455 (5.4) lets an
// intermediary fragment a message anew when no extension is agreed, and none is: avpd does
// not pass on the agent's offer, and a 101 that takes one up gets 502.
//
// A message's end lets everything go: a value split across two messages is not scrubbed
// (an API that echoes pieces of what it was sent by a parameter of its own; the README says
// so). Control frames (ping, pong, close) are scrubbed whole, and cut to the 125 bytes a
// control frame may carry should a placeholder be longer than the value it replaces.

// errWSFraming ends the stream when the upstream breaks WebSocket's framing: a masked or
// extended frame, an unknown opcode, a control frame too long or fragmented, or a fragment
// with no message to continue. Passing on what cannot be parsed would pass an echo too.
var errWSFraming = errors.New("upstream broke WebSocket framing after the switch")

const (
	wsContinuation = 0x0
	wsText         = 0x1
	wsBinary       = 0x2
	wsClose        = 0x8
	wsPing         = 0x9
	wsPong         = 0xA
	wsMaxControl   = 125
)

// wsScrubber reads the upstream's frames and hands out the agent's.
type wsScrubber struct {
	src  *bufio.Reader
	reps []replacement
	buf  []byte
	out  []byte // frames ready for the agent
	err  error

	// The frame being read: its payload bytes still to come, and whether it ends its
	// message.
	left uint64
	fin  bool
	// The data message open: its opcode, whether a fragment of it went to the agent, and
	// the tail of its payload held back as the start of a value.
	inMsg   bool
	opcode  byte
	sent    bool
	pending []byte
}

func newWSScrubber(src *bufio.Reader, reps []replacement) *wsScrubber {
	return &wsScrubber{src: src, reps: reps, buf: copyBuffers.Get()}
}

func (w *wsScrubber) Read(p []byte) (int, error) {
	for len(w.out) == 0 {
		if w.err != nil {
			return 0, w.err
		}
		if err := w.step(); err != nil {
			w.err = err
			if len(w.out) == 0 {
				return 0, err
			}
		}
	}
	n := copy(p, w.out)
	w.out = w.out[n:]
	return n, nil
}

// step reads one frame header, or the next piece of a data frame's payload, and appends to
// out what the agent gets of it.
func (w *wsScrubber) step() error {
	if w.left == 0 {
		return w.header()
	}
	n, err := w.src.Read(w.buf[:min(uint64(len(w.buf)), w.left)])
	if n == 0 && err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF // the connection ended inside a frame
		}
		return err
	}
	w.left -= uint64(n)
	w.payload(w.buf[:n], w.left == 0 && w.fin)
	return nil
}

// header reads a frame header. A control frame is read, scrubbed and sent whole here; a
// data frame's payload follows in step.
func (w *wsScrubber) header() error {
	var h [2]byte
	if _, err := io.ReadFull(w.src, h[:]); err != nil {
		if err == io.ErrUnexpectedEOF {
			return err
		}
		if err == io.EOF && w.inMsg {
			return io.ErrUnexpectedEOF // the connection ended inside a message
		}
		return err
	}
	fin, op := h[0]&0x80 != 0, h[0]&0x0f
	if h[0]&0x70 != 0 || h[1]&0x80 != 0 {
		return errWSFraming // an extension's bit, or a mask only a client may use
	}
	size := uint64(h[1] & 0x7f)
	switch size {
	case 126:
		var x [2]byte
		if _, err := io.ReadFull(w.src, x[:]); err != nil {
			return io.ErrUnexpectedEOF
		}
		size = uint64(binary.BigEndian.Uint16(x[:]))
	case 127:
		var x [8]byte
		if _, err := io.ReadFull(w.src, x[:]); err != nil {
			return io.ErrUnexpectedEOF
		}
		if size = binary.BigEndian.Uint64(x[:]); size>>63 != 0 {
			return errWSFraming
		}
	}
	switch op {
	case wsClose, wsPing, wsPong:
		if !fin || size > wsMaxControl {
			return errWSFraming
		}
		b := make([]byte, size)
		if _, err := io.ReadFull(w.src, b); err != nil {
			return io.ErrUnexpectedEOF
		}
		b, _ = replaceReal(b, w.reps)
		w.out = appendWSFrame(w.out, true, op, b[:min(len(b), wsMaxControl)])
		return nil
	case wsText, wsBinary:
		if w.inMsg {
			return errWSFraming // a new message inside one not ended
		}
		w.inMsg, w.opcode, w.sent = true, op, false
	case wsContinuation:
		if !w.inMsg {
			return errWSFraming
		}
	default:
		return errWSFraming
	}
	w.left, w.fin = size, fin
	if size == 0 {
		w.payload(nil, fin)
	}
	return nil
}

// payload scrubs the next bytes b of the open message's payload and sends what may go: all
// of it at the message's end, else all but a tail that could start a value.
func (w *wsScrubber) payload(b []byte, end bool) {
	data := b
	if len(w.pending) > 0 {
		data = append(w.pending, b...)
		w.pending = nil
	}
	data, _ = replaceReal(data, w.reps)
	keep := 0
	if !end {
		keep = partialTail(data, w.reps)
	}
	if send := data[:len(data)-keep]; len(send) > 0 || end {
		op := byte(wsContinuation)
		if !w.sent {
			op = w.opcode
		}
		w.out = appendWSFrame(w.out, end, op, send)
		w.sent = true
	}
	if keep > 0 {
		w.pending = append([]byte(nil), data[len(data)-keep:]...)
	}
	if end {
		w.inMsg = false
	}
}

// appendWSFrame appends an unmasked frame with payload p.
func appendWSFrame(dst []byte, fin bool, op byte, p []byte) []byte {
	b0 := op
	if fin {
		b0 |= 0x80
	}
	switch n := len(p); {
	case n < 126:
		dst = append(dst, b0, byte(n))
	case n < 1<<16:
		dst = binary.BigEndian.AppendUint16(append(dst, b0, 126), uint16(n))
	default:
		dst = binary.BigEndian.AppendUint64(append(dst, b0, 127), uint64(n))
	}
	return append(dst, p...)
}

// Close returns the read buffer, wiped (it held the upstream's raw bytes), to the pool.
func (w *wsScrubber) Close() error {
	if w.buf != nil {
		clear(w.buf)
		copyBuffers.Put(w.buf)
		w.buf = nil
		if w.err == nil {
			w.err = errReadAfterClose
		}
	}
	return nil
}

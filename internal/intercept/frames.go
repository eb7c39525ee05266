package intercept

import (
	"encoding/binary"
	"errors"
	"net/http"
)

// A streamed response holds back a tail that could start a real value until the next read,
// so that a value split across two reads is still scrubbed. A stream whose next bytes wait
// for the agent (a bidirectional gRPC call) would stall on it. In a framed stream the tail
// can go at the end of a frame: what comes next is the next frame's header, whose first
// byte no real value holds, so no value can run on across the end. (A WebSocket's frames
// are read and made anew instead: ws.go.)

// framing is a framed protocol whose frame ends the scrubber can find.
type framing uint8

const (
	noFraming framing = iota
	// framingEnvelope: gRPC, gRPC-Web and Connect streaming; each message has a 5-byte
	// header, a flag byte and a 32-bit big-endian length.
	framingEnvelope
)

// maxReleased bounds the tail let go at a frame's end. Only an upstream that breaks its own
// framing right there could continue a value after it, and then the stream is cut (see
// frameTracker.feed); the agent has at most this many leading bytes of a value, which for
// an API key are its public prefix ("sk-", "ghp_"). A longer tail still waits.
const maxReleased = 4

// responseFraming returns the framing of a response body with header h.
func responseFraming(h http.Header) framing {
	ct := h.Get("Content-Type")
	if hasPrefixFold(ct, "application/grpc") && !hasPrefixFold(ct, "application/grpc-web-text") ||
		hasPrefixFold(ct, "application/connect+") {
		return framingEnvelope
	}
	return noFraming
}

// frameStart reports whether c can be the first byte of a frame header of kind f: an
// envelope's flags (gRPC's 0 and 1, gRPC-Web's trailer frame 0x80 and 0x81, Connect's
// end of stream 2 and 3).
func frameStart(f framing, c byte) bool {
	return f == framingEnvelope && (c <= 3 || c == 0x80 || c == 0x81)
}

// frameTracker follows the frames of the upstream's raw bytes.
type frameTracker struct {
	kind framing
	hdr  [5]byte
	nhdr int    // header bytes seen of the frame to come
	left uint64 // payload bytes still to come of the current frame
	// released is set when the last read's tail was let go at a frame's end: the next
	// byte must then start a frame.
	released bool
}

var errFramingBroken = errors.New("upstream broke its framing after a released tail")

// newFrameTracker returns a tracker for a stream of kind f scrubbed of reps, or nil when
// none can be used: no framing, or a value that holds a byte a frame header can start with.
func newFrameTracker(f framing, reps []replacement) *frameTracker {
	if f == noFraming {
		return nil
	}
	for _, r := range reps {
		for _, c := range r.from {
			if frameStart(f, c) {
				return nil
			}
		}
	}
	return &frameTracker{kind: f}
}

// feed follows the next raw bytes b. atEnd reports whether they end exactly where a frame
// does. A tracker that finds b breaking the framing drops out (ok false, nil error), unless
// a tail was let go just before: then the first byte of b, which must have started a frame,
// may instead continue a value, and the stream has to end (errFramingBroken).
func (t *frameTracker) feed(b []byte) (atEnd, ok bool, err error) {
	if len(b) == 0 {
		return t.nhdr == 0 && t.left == 0, true, nil
	}
	first := t.released
	t.released = false
	for len(b) > 0 {
		if t.left > 0 {
			n := min(uint64(len(b)), t.left)
			t.left -= n
			b = b[n:]
			continue
		}
		if t.nhdr == 0 && !frameStart(t.kind, b[0]) {
			if first {
				return false, false, errFramingBroken
			}
			return false, false, nil
		}
		first = false
		t.hdr[t.nhdr] = b[0]
		t.nhdr++
		b = b[1:]
		if t.nhdr == len(t.hdr) { // the flag byte and a 32-bit big-endian length
			t.nhdr, t.left = 0, uint64(binary.BigEndian.Uint32(t.hdr[1:]))
		}
	}
	return t.nhdr == 0 && t.left == 0, true, nil
}

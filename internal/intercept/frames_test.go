package intercept

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestWebSocketTurnIsNotHeldBack: a WebSocket frame that ends with what could start a real
// value reaches the agent whole although the upstream then waits for the agent; an echo in
// a later frame is still scrubbed.
func TestWebSocketTurnIsNotHeldBack(t *testing.T) {
	p := newH1Pair(t)
	req := strings.Replace(h1BenchRequest, "/v1/models", "/v1/ws-turns", 1)
	req = strings.TrimSuffix(req, "\r\n") + "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
	if _, err := io.WriteString(p.agent, req); err != nil {
		t.Fatal(err)
	}
	p.agent.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(p.br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("want 101, got %v %v", resp, err)
	}
	first := "your turn, " + h1BenchReal[:1]
	frame := make([]byte, 2+len(first))
	p.agent.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := io.ReadFull(p.br, frame); err != nil {
		t.Fatalf("the frame stalled: got %q (%v), want all of %q", frame[:n], err, first)
	}
	if string(frame[2:]) != first {
		t.Fatalf("got %q, want %q", frame[2:], first)
	}
	p.agent.Write([]byte{0x81})
	p.agent.SetReadDeadline(time.Now().Add(5 * time.Second))
	rest, _ := io.ReadAll(p.br)
	if bytes.Contains(rest, []byte(h1BenchReal)) || !bytes.Contains(rest, []byte("you sent Bearer sk-avp-PLACEHOLDER-openai-000000000000")) {
		t.Fatalf("want the echo scrubbed, got %q", rest)
	}
}

// TestGRPCTurnIsNotHeldBack: the same for a bidirectional gRPC call from an HTTP/2 agent.
func TestGRPCTurnIsNotHeldBack(t *testing.T) {
	p := newH1Pair(t, "h2", "http/1.1")
	c := p.h2Client(t)
	pr, pw := io.Pipe()
	defer pw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", "https://api.openai.com/v1/grpc-turns", pr)
	req.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
	req.Header.Set("Content-Type", "application/grpc")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	first := "your turn, " + h1BenchReal[:1]
	msg := make([]byte, 5+len(first))
	got := make(chan error, 1)
	go func() { _, err := io.ReadFull(resp.Body, msg); got <- err }()
	select {
	case err := <-got:
		if err != nil || string(msg[5:]) != first {
			t.Fatalf("got %q %v, want %q", msg, err, first)
		}
	case <-time.After(2 * time.Second):
		t.Fatalf("the message stalled: want all of %q before the agent's next message", first)
	}
	pw.Write([]byte{0, 0, 0, 0, 0})
	pw.Close()
	rest, _ := io.ReadAll(resp.Body)
	if bytes.Contains(rest, []byte(h1BenchReal)) || !bytes.Contains(rest, []byte("you sent Bearer sk-avp-PLACEHOLDER-openai-000000000000")) {
		t.Fatalf("want the echo scrubbed, got %q", rest)
	}
}

// envelope is a gRPC message m with flags f.
func envelope(f byte, m string) []byte {
	return append(binary.BigEndian.AppendUint32([]byte{f}, uint32(len(m))), m...)
}

// turnsReader hands out one chunk per Read, then blocks (as an upstream waiting for the agent
// does) until the test reads on.
type turnsReader struct {
	chunks [][]byte
	more   chan struct{}
}

func (r *turnsReader) Read(p []byte) (int, error) {
	if len(r.chunks) == 0 {
		<-r.more
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0])
	r.chunks[0] = r.chunks[0][n:]
	if len(r.chunks[0]) == 0 {
		r.chunks = r.chunks[1:]
	}
	return n, nil
}

func (r *turnsReader) Close() error { return nil }

// readWithin reads what sr hands out until want bytes came or it blocks for 200 ms.
func readWithin(sr io.Reader, want int) []byte {
	got := make(chan []byte, 1)
	go func() {
		var b []byte
		buf := make([]byte, 64)
		for len(b) < want {
			n, err := sr.Read(buf)
			b = append(b, buf[:n]...)
			if err != nil {
				break
			}
		}
		got <- b
	}()
	select {
	case b := <-got:
		return b
	case <-time.After(200 * time.Millisecond):
		return nil
	}
}

// TestScrubReaderReleasesAtFrameEnd: at a gRPC message's end a tail of up to maxReleased bytes
// that could start a value goes on; one in the middle of a frame, or a longer one, waits.
func TestScrubReaderReleasesAtFrameEnd(t *testing.T) {
	secret := string(reps[0].from)
	for _, tc := range []struct {
		name    string
		f       framing
		chunks  [][]byte
		release bool
	}{
		{"envelope end, 1 byte", framingEnvelope, [][]byte{envelope(0, "a turn s")}, true},
		{"envelope end, 4 bytes", framingEnvelope, [][]byte{envelope(0, "a turn sk-R")}, true},
		{"envelope end, 5 bytes", framingEnvelope, [][]byte{envelope(0, "a turn sk-RE")}, false},
		{"two envelopes, split header", framingEnvelope, [][]byte{envelope(0, "x")[:3], append(envelope(0, "x")[3:], envelope(0x80, "trailer s")...)}, true},
		{"mid envelope", framingEnvelope, [][]byte{envelope(0, "a turn s and more")[:13]}, false},
		{"connect end of stream", framingEnvelope, [][]byte{envelope(2, `{"s`)}, true},
		{"no framing", noFraming, [][]byte{envelope(0, "a turn s")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := &turnsReader{chunks: tc.chunks, more: make(chan struct{})}
			defer close(src.more)
			sr := newScrubReader(src, reps)
			sr.frames = newFrameTracker(tc.f, reps)
			var all []byte
			for _, c := range tc.chunks {
				all = append(all, c...)
			}
			got := readWithin(sr, len(all))
			if tc.release && !bytes.Equal(got, all) {
				t.Fatalf("got %q, want all of %q before the upstream sends more", got, all)
			}
			if !tc.release && len(got) == len(all) {
				t.Fatalf("got all of %q, want its tail held back", got)
			}
			if bytes.Contains(got, []byte(secret)) {
				t.Fatalf("the real value got through: %q", got)
			}
		})
	}
}

// TestFramingBrokenAfterRelease: an upstream whose next byte after a released tail does not
// start a frame could be continuing a value there; the stream ends before that byte.
func TestFramingBrokenAfterRelease(t *testing.T) {
	secret := string(reps[0].from)
	for _, f := range []framing{framingEnvelope} {
		head := envelope(0, "x "+secret[:3])
		src := &turnsReader{chunks: [][]byte{head, []byte(secret[3:] + " more")}, more: make(chan struct{})}
		close(src.more)
		sr := newScrubReader(src, reps)
		sr.frames = newFrameTracker(f, reps)
		got, err := io.ReadAll(sr)
		if !errors.Is(err, errFramingBroken) || !bytes.Equal(got, head) {
			t.Fatalf("framing %d: got %q %v, want only the first frame and errFramingBroken", f, got, err)
		}
	}
	// Broken where nothing was let go: the tracker drops out and the stream is scrubbed as
	// one of no framing.
	src := &turnsReader{chunks: [][]byte{[]byte("not a frame " + secret[:3]), []byte(secret[3:])}, more: make(chan struct{})}
	close(src.more)
	sr := newScrubReader(src, reps)
	sr.frames = newFrameTracker(framingEnvelope, reps)
	got, err := io.ReadAll(sr)
	if err != nil || string(got) != "not a frame PLACEHOLDER" {
		t.Fatalf("got %q %v", got, err)
	}
}

// TestFrameTrackerNeedsValuesWithoutHeaderBytes: a value that holds a byte a frame can start
// with could run on across a frame's end; nothing is released then.
func TestFrameTrackerNeedsValuesWithoutHeaderBytes(t *testing.T) {
	for _, f := range []framing{framingEnvelope} {
		if newFrameTracker(f, []replacement{{from: []byte("sk-\x01abcdefgh")}}) != nil ||
			newFrameTracker(f, []replacement{{from: []byte("sk-\x81abcdefgh")}}) != nil {
			t.Fatalf("framing %d: a tracker for a value with a header byte", f)
		}
		if newFrameTracker(f, reps) == nil {
			t.Fatalf("framing %d: no tracker for a printable value", f)
		}
	}
}

func TestResponseFraming(t *testing.T) {
	for ct, want := range map[string]framing{
		"application/grpc": framingEnvelope, "application/grpc+proto": framingEnvelope,
		"Application/GRPC-Web": framingEnvelope, "application/connect+json": framingEnvelope,
		"application/grpc-web-text": noFraming, "application/json": noFraming,
		"text/event-stream": noFraming, "": noFraming,
	} {
		if got := responseFraming(http.Header{"Content-Type": {ct}}); got != want {
			t.Errorf("%q: %d, want %d", ct, got, want)
		}
	}
}

package intercept

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"testing"
	"time"
)

// wsRead reads one frame: its first byte and payload.
func wsRead(br *bufio.Reader) (b0 byte, p []byte, err error) {
	var h [2]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return 0, nil, err
	}
	if h[1]&0x80 != 0 {
		return 0, nil, errors.New("masked frame to the agent")
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var x [2]byte
		io.ReadFull(br, x[:])
		n = uint64(binary.BigEndian.Uint16(x[:]))
	case 127:
		var x [8]byte
		io.ReadFull(br, x[:])
		n = binary.BigEndian.Uint64(x[:])
	}
	p = make([]byte, n)
	_, err = io.ReadFull(br, p)
	return h[0], p, err
}

// wsMessages parses what the agent got into its messages (each with its opcode) and control
// frames, checking the fragments' order as a client does.
func wsMessages(t *testing.T, b []byte) (msgs []string, ops []byte, controls []string) {
	t.Helper()
	br := bufio.NewReader(bytes.NewReader(b))
	var cur []byte
	open := false
	for {
		b0, p, err := wsRead(br)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("agent side: %v", err)
		}
		op, fin := b0&0x0f, b0&0x80 != 0
		switch {
		case op >= 0x8:
			if !fin || len(p) > 125 {
				t.Fatalf("control frame %#x: fin %v, %d bytes", op, fin, len(p))
			}
			controls = append(controls, string(p))
			continue
		case op == 0 && !open, op != 0 && open:
			t.Fatalf("fragment %#x out of order", b0)
		case op != 0:
			ops = append(ops, op)
		}
		open = !fin
		cur = append(cur, p...)
		if fin {
			msgs = append(msgs, string(cur))
			cur = nil
		}
	}
	if open {
		t.Fatal("a message never ended")
	}
	return msgs, ops, controls
}

// TestWSScrubberJoinsFragments: messages sent in fragments split anywhere, with control
// frames between them, read in reads of any size, reach the agent as the same messages and
// controls with every real value (split across fragments or not) replaced.
func TestWSScrubberJoinsFragments(t *testing.T) {
	rnd := rand.New(rand.NewPCG(5, 6))
	secret := string(reps[0].from)
	for range 500 {
		var up []byte
		var want, wantCtl []string
		var wantOps []byte
		for range 1 + rnd.IntN(4) {
			msg := strings.Repeat("x", rnd.IntN(50)) + secret + strings.Repeat("y", rnd.IntN(50))
			if rnd.IntN(4) == 0 {
				msg = strings.Repeat("z", rnd.IntN(300)) // one without the value
			}
			op := byte(wsText + rnd.IntN(2))
			want = append(want, strings.ReplaceAll(msg, secret, "PLACEHOLDER"))
			wantOps = append(wantOps, op)
			// Fragments of random sizes (some empty), a control frame now and then.
			for i, first := 0, true; ; first = false {
				n := min(len(msg)-i, rnd.IntN(40))
				f := byte(wsContinuation)
				if first {
					f = op
				}
				end := i+n == len(msg) && rnd.IntN(3) > 0
				up = appendWSFrame(up, end, f, []byte(msg[i:i+n]))
				i += n
				if rnd.IntN(4) == 0 {
					ctl := "ping " + secret[:rnd.IntN(len(secret)+1)]
					if rnd.IntN(2) == 0 {
						ctl = "ping " + secret
					}
					up = appendWSFrame(up, true, wsPing, []byte(ctl))
					wantCtl = append(wantCtl, strings.ReplaceAll(ctl, secret, "PLACEHOLDER"))
				}
				if end {
					break
				}
			}
		}
		w := newWSScrubber(bufio.NewReaderSize(chunked(string(up), 1+rnd.IntN(60)), 16), reps)
		got, err := io.ReadAll(w)
		w.Close()
		if err != nil {
			t.Fatal(err)
		}
		msgs, ops, ctls := wsMessages(t, got)
		if strings.Join(msgs, "|") != strings.Join(want, "|") || !bytes.Equal(ops, wantOps) || strings.Join(ctls, "|") != strings.Join(wantCtl, "|") {
			t.Fatalf("got %q %v %q,\nwant %q %v %q", msgs, ops, ctls, want, wantOps, wantCtl)
		}
	}
}

// TestWSScrubberRefusesBrokenFraming: what cannot be parsed as server frames ends the stream
// before any of it reaches the agent.
func TestWSScrubberRefusesBrokenFraming(t *testing.T) {
	secret := reps[0].from
	for name, up := range map[string][]byte{
		"masked":                append([]byte{0x81, 0x80 | 4, 1, 2, 3, 4}, "abcd"...),
		"rsv bit":               append([]byte{0xC1, byte(len(secret))}, secret...),
		"unknown opcode":        append([]byte{0x83, byte(len(secret))}, secret...),
		"long control":          append([]byte{0x89, 126, 0, 200}, bytes.Repeat([]byte("a"), 200)...),
		"fragmented control":    append([]byte{0x09, 1}, 'a'),
		"continuation, no msg":  append([]byte{0x80, byte(len(secret))}, secret...),
		"new message in a msg":  append(appendWSFrame(nil, false, wsText, []byte("a")), appendWSFrame(nil, true, wsText, secret)...),
		"not websocket at all":  []byte("you sent " + string(secret)),
		"ends inside a message": appendWSFrame(nil, false, wsText, secret[:4]),
	} {
		w := newWSScrubber(bufio.NewReader(bytes.NewReader(up)), reps)
		got, err := io.ReadAll(w)
		if err == nil || bytes.Contains(got, secret[:4]) {
			t.Errorf("%s: got %q %v, want an error and nothing of the value", name, got, err)
		}
	}
}

// TestWebSocketFragmentsDoNotSplitAnEcho: an upstream that sends a message in fragments of
// 4 KiB (gorilla/websocket's NextWriter when its buffer fills), quoting first what the agent
// chose and then the credential: the agent pads its part so the split falls inside the
// value. Scrubbed byte by byte, each half passed; the agent joined them.
func TestWebSocketFragmentsDoNotSplitAnEcho(t *testing.T) {
	const frag = 4096
	e := newRawEnv(t, rawReal, []string{"http/1.1"}, serveRaw(func(c *tls.Conn, br *bufio.Reader) {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
			"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
		msg, _ := json.Marshal(map[string]string{"a_note": req.URL.Query().Get("note"), "authorization": req.Header.Get("Authorization")})
		var out []byte
		for i := 0; i < len(msg); i += frag {
			end := min(i+frag, len(msg))
			op := byte(wsContinuation)
			if i == 0 {
				op = wsText
			}
			out = appendWSFrame(out, end == len(msg), op, msg[i:end])
		}
		c.Write(out)
		time.Sleep(300 * time.Millisecond)
	}))
	// {"a_note":"<pad>","authorization":"Bearer sk-live-5...: the split falls 10 bytes into
	// the value.
	prefix := len(`{"a_note":"`) + len(`","authorization":"Bearer `)
	pad := strings.Repeat("x", frag-prefix-10)
	agent, br := e.h1Agent(t)
	io.WriteString(agent, "GET /ws?note="+pad+" HTTP/1.1\r\nHost: "+rawHost+"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"+rawAuthLine+"\r\n")
	agent.SetReadDeadline(time.Now().Add(3 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("want 101, got %v %v", resp, err)
	}
	var msg []byte
	for {
		b0, p, err := wsRead(br)
		if err != nil {
			t.Fatalf("after %q: %v", msg, err)
		}
		msg = append(msg, p...)
		if b0&0x80 != 0 {
			break
		}
	}
	if strings.Contains(string(msg), rawReal) || !strings.HasSuffix(string(msg), `"Bearer `+rawPlaceholder+`"}`) {
		t.Fatalf("the joined message ends %q, want the placeholder", msg[max(0, len(msg)-80):])
	}
}

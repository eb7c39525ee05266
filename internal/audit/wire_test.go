package audit

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// appendHead writes the bytes the json.Marshal encoding wrote, and readHead takes them.
func TestAppendHeadMatchesJSON(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	mac := hmac.New(sha256.New, key)
	dir := t.TempDir()
	for _, tc := range []struct {
		seq  uint64
		hash string
	}{{1, GenesisPrev}, {42, strings.Repeat("ab", 32)}, {1<<64 - 1, strings.Repeat("f", 64)}} {
		h := head{V: LineVersion, Seq: tc.seq, Hash: tc.hash}
		body, _ := json.Marshal(h)
		h.MAC = headMAC(key, body)
		out, _ := json.Marshal(h)
		want := bytes.Repeat([]byte(" "), headSize)
		copy(want, out)
		want[headSize-1] = '\n'
		got := appendHead([]byte("prefix"), mac, tc.seq, tc.hash)
		if !bytes.Equal(got[len("prefix"):], want) || string(got[:len("prefix")]) != "prefix" {
			t.Fatalf("seq %d:\n got %q\nwant %q", tc.seq, got, want)
		}
		p := filepath.Join(dir, "head")
		os.WriteFile(p, encodeHead(key, tc.seq, tc.hash), 0o600)
		if rh, err := readHead(p, key); err != nil || rh.Seq != tc.seq || rh.Hash != tc.hash {
			t.Fatalf("readHead: %+v %v", rh, err)
		}
	}
}

// Messages queued faster than the journal reads them are taken several per system call and
// all acked; a message longer than MaxMessage after them gets the error (at once, before
// the acks, which wait for the commit) and the connection closes once the earlier events
// are acked.
func TestJournalReadsQueuedMessagesAndRefusesLongOnes(t *testing.T) {
	dir := shortDir(t)
	j := openTestJournal(t, dir, nil)
	sock, stop := serveJournal(t, j, dir)
	conn, err := net.Dial("unixpacket", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const n = 3*recvBatch + 1
	for id := 1; id <= n; id++ {
		if _, err := conn.Write([]byte(`{"id":` + itoa(uint64(id)) + `,"event":{"type":"proxy_stop","detail":"x"}}`)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := conn.Write(append([]byte(`{"id":999,"event":{"type":"proxy_stop","detail":"`), bytes.Repeat([]byte("y"), MaxMessage)...)); err != nil {
		t.Fatal(err)
	}
	acked := map[uint64]bool{}
	var refused []ackMsg
	buf := make([]byte, 128<<10)
	for {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		m, err := conn.Read(buf)
		if err != nil || m == 0 {
			break
		}
		var a ackMsg
		if err := json.Unmarshal(buf[:m], &a); err != nil {
			t.Fatalf("%q: %v", buf[:m], err)
		}
		for _, ack := range a.Acks {
			acked[ack[0]] = true
		}
		if a.Error != "" {
			refused = append(refused, a)
		}
	}
	if len(acked) != n {
		t.Fatalf("%d of %d events acked", len(acked), n)
	}
	if len(refused) != 1 || !strings.Contains(refused[0].Error, "longer than") || refused[0].ID != 0 {
		t.Fatalf("errors %+v, want the length error", refused)
	}
	stop()
	if got := len(readLines(t, j.opts.Log)); got != n+1 {
		t.Fatalf("%d lines, want %d", got, n+1)
	}
}

package audit

import (
	"crypto/hmac"
	"crypto/sha256"
	"strings"
	"testing"
	"time"
)

// TestLongStartDetailParsesBack: a journal_start detail over the field limit, with
// multi-byte characters where it is cut, still makes a line the journal can read back
// (a cut through a character was written as U+FFFD, past the limit, and refused).
func TestLongStartDetailParsesBack(t *testing.T) {
	for pad := range 4 {
		detail := "journal started: ...; WARNING: rotated file /var/log/" + strings.Repeat("x", pad) + strings.Repeat("é", 3000)
		l := Line{V: LineVersion, Seq: 1, TS: time.Now().UTC(), Prev: GenesisPrev, Event: Event{Type: TypeJournalStart, Detail: cutField(detail)}}
		key := make([]byte, 32)
		raw, _, err := encodeLine(hmac.New(sha256.New, key), &l, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := parseLine(raw, key); err != nil {
			t.Errorf("pad %d: the journal's own journal_start line does not parse back: %v", pad, err)
		}
	}
}

// TestLineReaderBoundsALine: a line past maxLineLen (a planted file of one huge line) comes
// back cut to maxLineLen+1 bytes, never held whole, and the lines after it read as before.
func TestLineReaderBoundsALine(t *testing.T) {
	huge := strings.Repeat("x", 3*maxLineLen)
	lr := newLineReader(strings.NewReader(huge + "\nnext\n" + strings.Repeat("y", maxLineLen) + "\nlast"))
	for _, want := range []struct {
		n        int
		off      int64
		complete bool
	}{{maxLineLen + 1, 0, true}, {4, int64(len(huge) + 1), true}, {maxLineLen, int64(len(huge) + 6), true}, {4, int64(len(huge) + 7 + maxLineLen), false}} {
		line, off, complete, err := lr.next()
		if err != nil || len(line) != want.n || off != want.off || complete != want.complete {
			t.Fatalf("got %d bytes at %d complete %v err %v, want %+v", len(line), off, complete, err, want)
		}
	}
	if _, _, _, err := lr.next(); err == nil {
		t.Fatal("no end")
	}
}

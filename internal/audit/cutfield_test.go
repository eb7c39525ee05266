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

package audit

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// LineVersion is the value of "v" in every journal line.
const LineVersion = 1

// GenesisPrev is the "prev" of the very first line of a log: there is no line before it.
var GenesisPrev = strings.Repeat("0", 64)

// Line is one journal line: the chain fields, the event, and the MAC.
//
// On disk it is one JSON object, keys in this order: v, seq, ts, prev, the event's fields
// (type, then the set ones), mac. ts is the journal's clock when it sequenced the event (the
// Event's own TS is not written). prev is the hex SHA-256 of the previous line's bytes,
// without its newline. mac is the hex HMAC-SHA256, keyed with the journal's key, of the
// line's bytes without the trailing `,"mac":"..."`, closed with `}`: exactly the JSON object
// the journal encoded before it appended the MAC.
type Line struct {
	V    int       `json:"v"`
	Seq  uint64    `json:"seq"`
	TS   time.Time `json:"ts"`
	Prev string    `json:"prev"`
	Event
	MAC string `json:"mac,omitempty"`
}

// macSuffixLen is len(`,"mac":"` + 64 hex + `"}`).
const macSuffixLen = 8 + 64 + 2

// maxLineLen bounds one line; a longer one is not a line the journal wrote.
const maxLineLen = 1 << 20

// encodeLine renders l (whose MAC is ignored) as the bytes of one line, without the newline,
// appended to buf, and returns them with their SHA-256. mac is the journal's HMAC-SHA256
// (hmac.New(sha256.New, key)); encodeLine resets it before use.
func encodeLine(mac hash.Hash, l *Line, buf []byte) ([]byte, [32]byte, error) {
	l.MAC = ""
	start := len(buf)
	if fast, ok := appendLineJSON(buf, l); ok {
		// The MAC covers the line as encoding/json would write it without a mac field.
		mac.Reset()
		mac.Write(fast[start:])
		buf = append(fast[:len(fast)-1], `,"mac":"`...)
		buf = appendMAC(buf, mac)
		buf = append(buf, `"}`...)
		return buf, sha256.Sum256(buf[start:]), nil
	}
	body, err := json.Marshal(l)
	if err != nil {
		return nil, [32]byte{}, fmt.Errorf("encode journal line: %w", err)
	}
	mac.Reset()
	mac.Write(body)
	buf = append(buf, body[:len(body)-1]...)
	buf = append(buf, `,"mac":"`...)
	buf = appendMAC(buf, mac)
	buf = append(buf, `"}`...)
	return buf, sha256.Sum256(buf[start:]), nil
}

// LineError says why a line is not a valid journal line.
type LineError struct{ Reason string }

func (e *LineError) Error() string { return e.Reason }

func lineErr(format string, args ...any) error {
	return &LineError{Reason: fmt.Sprintf(format, args...)}
}

// parseLine decodes one line (without its newline) strictly and, when key is not nil, checks
// its MAC. It does not check the chain; see chain.
func parseLine(raw []byte, key []byte) (*Line, error) {
	if len(raw) == 0 {
		return nil, lineErr("empty line")
	}
	if len(raw) > maxLineLen {
		return nil, lineErr("line is %d bytes, longer than any line the journal writes", len(raw))
	}
	if len(raw) < macSuffixLen+2 || !bytes.HasPrefix(raw[len(raw)-macSuffixLen:], []byte(`,"mac":"`)) || !bytes.HasSuffix(raw, []byte(`"}`)) {
		return nil, lineErr(`line does not end with ,"mac":"<64 hex>"}`)
	}
	macHex := raw[len(raw)-macSuffixLen+8 : len(raw)-2]
	if !isLowerHex(macHex) {
		return nil, lineErr("mac is not 64 lowercase hex digits")
	}
	var l Line
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&l); err != nil {
		return nil, lineErr("not a journal JSON object: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, lineErr("data after the JSON object")
	}
	if l.V != LineVersion {
		return nil, lineErr("unknown line version v=%d", l.V)
	}
	if l.MAC != string(macHex) {
		return nil, lineErr("the mac field is not the last field of the line")
	}
	if len(l.Prev) != 64 || !isLowerHex([]byte(l.Prev)) {
		return nil, lineErr("prev is not 64 lowercase hex digits")
	}
	if l.Seq == 0 {
		return nil, lineErr("seq is missing or 0")
	}
	if l.TS.IsZero() {
		return nil, lineErr("ts is missing")
	}
	if err := l.Event.Validate(); err != nil {
		return nil, lineErr("event does not fit the schema: %v", err)
	}
	if key != nil {
		m := hmac.New(sha256.New, key)
		m.Write(raw[:len(raw)-macSuffixLen])
		m.Write([]byte("}"))
		want := make([]byte, 32)
		hex.Decode(want, macHex)
		if !hmac.Equal(m.Sum(nil), want) {
			return nil, lineErr("MAC mismatch: the line was changed, or written with another key")
		}
	}
	return &l, nil
}

// ParseLine decodes one line (without its newline) as the journal wrote it and, with a key,
// checks its MAC. It does not check the chain: Verify does.
func ParseLine(raw []byte, key []byte) (*Line, error) { return parseLine(raw, key) }

// ParseAnyLine reads a journal line, or a line of the in-process log (audit.path), which
// is one event with no seq, chain or MAC: it comes back as a Line with Seq 0.
func ParseAnyLine(raw []byte) (*Line, error) {
	l, err := parseLine(raw, nil)
	if err == nil {
		return l, nil
	}
	if e, ok := plainEvent(raw); ok {
		return &Line{TS: e.TS, Event: *e}, nil
	}
	return nil, err
}

// IsPlainEvent reports whether raw is a line of the in-process log.
// IsInProcessLog reports whether the file at path is the in-process writer's log: its first
// line is a plain event (no seq, chain or MAC). The journal and avpctl audit both ask.
func IsInProcessLog(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), maxLineLen+1)
	return sc.Scan() && IsPlainEvent(sc.Bytes())
}

func IsPlainEvent(raw []byte) bool {
	_, ok := plainEvent(raw)
	return ok
}

func plainEvent(raw []byte) (*Event, bool) {
	if len(raw) > maxLineLen || bytes.Contains(raw, []byte(`"mac":`)) {
		return nil, false
	}
	var e Event
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if dec.Decode(&e) != nil || e.TS.IsZero() || e.Validate() != nil {
		return nil, false
	}
	return &e, true
}

func isLowerHex(b []byte) bool {
	for _, c := range b {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return len(b) > 0
}

// chain checks that l follows the line whose seq and hash are given (seq 0 for none).
func chain(l *Line, prevSeq uint64, prevHash string) error {
	if l.Seq != prevSeq+1 {
		switch {
		case l.Seq <= prevSeq:
			return lineErr("seq %d after seq %d: lines are reordered or repeated", l.Seq, prevSeq)
		default:
			return lineErr("seq %d after seq %d: %d line(s) are missing", l.Seq, prevSeq, l.Seq-prevSeq-1)
		}
	}
	if l.Prev != prevHash {
		if prevSeq == 0 {
			return lineErr("the first line (seq 1) must have prev %s", GenesisPrev)
		}
		return lineErr("prev does not match the hash of seq %d: a line was edited, or this line comes from another log", prevSeq)
	}
	return nil
}

// Key files hold 32 random bytes as 64 hex digits and a newline.

// LoadOrCreateKey reads the journal's MAC key, creating it (0600, 32 random bytes) when it
// does not exist. An existing key must belong to the current user and be readable by nobody
// else. created reports whether the key is new.
func LoadOrCreateKey(path string) (key []byte, created bool, err error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, os.ErrNotExist) {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, false, fmt.Errorf("generate journal key: %w", err)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, false, fmt.Errorf("create key directory: %w", err)
		}
		// Written whole to a temporary file and then linked into place, so a crash leaves
		// no key or the whole key, never an empty one that every later start refuses. A
		// link fails if the name exists: of two journals starting at once, one key wins.
		nf, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-*")
		if err != nil {
			return nil, false, fmt.Errorf("create journal key %s: %w", path, err)
		}
		defer os.Remove(nf.Name())
		_, werr := nf.WriteString(hex.EncodeToString(key) + "\n")
		if werr == nil {
			werr = nf.Sync()
		}
		if cerr := nf.Close(); werr == nil {
			werr = cerr
		}
		if werr == nil {
			werr = os.Link(nf.Name(), path)
		}
		if errors.Is(werr, os.ErrExist) {
			return LoadOrCreateKey(path)
		}
		if werr != nil {
			return nil, false, fmt.Errorf("write journal key %s: %w", path, werr)
		}
		if err := syncDir(filepath.Dir(path)); err != nil {
			// The key's name may not survive a power loss, and the log's MACs with it.
			os.Remove(path)
			return nil, false, fmt.Errorf("sync the directory of journal key %s: %w", path, err)
		}
		return key, true, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("open journal key %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, false, err
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Geteuid() {
		return nil, false, fmt.Errorf("journal key %s belongs to uid %d, not to the journal's user (uid %d); chown it", path, sys.Uid, os.Geteuid())
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, false, fmt.Errorf("journal key %s has mode %04o; only its owner may read it: chmod 600 %s", path, st.Mode().Perm(), path)
	}
	key, err = readKey(f, path)
	return key, false, err
}

// ReadKey reads a key file for verification; unlike the journal it accepts any owner.
func ReadKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open key %s: %w", path, err)
	}
	defer f.Close()
	return readKey(f, path)
}

func readKey(r io.Reader, path string) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, 1024))
	if err != nil {
		return nil, fmt.Errorf("read key %s: %w", path, err)
	}
	if len(data) == 0 {
		return nil, fmt.Errorf("key %s is empty: it was never written whole (a crash while the journal first started, before avpd wrote keys whole). If the log holds no line yet, remove the key and start again; else restore it from a backup, since the log's lines were signed with it", path)
	}
	key, err := hex.DecodeString(strings.TrimSpace(string(data)))
	if err != nil || len(key) < 32 {
		return nil, fmt.Errorf("key %s is not 64 hex digits (32 bytes) on one line", path)
	}
	return key, nil
}

// syncDir makes a directory entry change (create, rename) durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

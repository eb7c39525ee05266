package audit

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/rawconn"
)

// The journal is the audit service: it receives events on a SOCK_SEQPACKET Unix socket, one
// event per message, appends each as a hash-chained, MACed JSON line, and acknowledges an
// event only once the fdatasync that covers it has returned. Events that arrive while one
// fdatasync runs are written and synced together by the next (group commit).
//
// Group commit is leader/follower, with no goroutine in between: each connection's reader
// takes every message already queued on its socket, appends the events to the shared
// pending batch and, when no commit is running, becomes the leader: it writes and
// fdatasyncs the whole pending batch (its own events and any other connection's), then
// publishes which events are durable. A reader whose events another leader took waits for
// that commit, and leads the next one when its events are still pending. Each reader then
// writes its own connection's acks and errors itself.
//
// Wire protocol (JSON, one object per message):
//
//	client -> journal  {"id":N,"event":{...Event...}}
//	journal -> client  {"acks":[[N,S],...]}     event N is durable as line seq S
//	journal -> client  {"id":N,"error":"..."}   event N is not recorded
//	journal -> client  {"error":"..."}          connection refused or closing
//
// One ack message carries every event that the reader took from its connection in one go
// (all of them covered by one fdatasync unless MaxBatch split them), in the order the
// events were sent, so a busy connection costs one message per commit.

// Journal defaults.
const (
	DefaultRotateSize = 64 << 20
	DefaultMaxBatch   = 4096
	// maxBatchBytes bounds what one write+fdatasync covers, and so the torn tail a crash
	// can leave: recovery moves aside at most this much (plus one line) on its own.
	maxBatchBytes = 1 << 20
	maxTornBytes  = maxBatchBytes + maxLineLen
	// MaxMessage is the largest message the journal reads; an event is far smaller.
	MaxMessage = 64 << 10
)

// JournalOptions configure a journal.
type JournalOptions struct {
	// Log is the live log file. Rotated files sit beside it.
	Log string
	// Key is the MAC key file, created 0600 on first start.
	Key string
	// AllowUIDs may send events besides root.
	AllowUIDs []uint32
	// RotateSize rotates the live log once it reaches this many bytes; 0 means the default.
	RotateSize int64
	// MaxBatch bounds how many events share one fdatasync; 1 is an fsync per event (the
	// benchmark's baseline); 0 means the default.
	MaxBatch int
	// AckDelay delays every ack after its fdatasync (tests only: it makes the window
	// between "durable" and "acknowledged" observable).
	AckDelay time.Duration
	// Mirror sends each durable event to journald, best effort, never blocking. Nil: none.
	Mirror func(seq uint64, e *Event)
	Logf   func(string, ...any)
	// sync replaces fdatasync in tests that make it fail.
	sync func(*os.File) error
}

// Journal is an open journal log.
type Journal struct {
	opts     JournalOptions
	key      []byte
	f        *os.File
	headF    *os.File
	size     int64
	firstSeq uint64 // seq of the live file's first line, or of the next line when it is empty
	seq      uint64 // last durable seq
	prev     string // hash of the last durable line
	lineMAC  hash.Hash
	headMAC  hash.Hash
	headBuf  []byte
	lineBuf  []byte

	// Group commit. cmu guards pending, committing, stopping, failed and every pending item's
	// seq and errMsg. committing is the token: its holder alone touches f, headF, size,
	// firstSeq, seq, prev, the MACs and buffers above, so it commits (the leader), rotates
	// and reopens the log
	// without holding cmu. cond is signalled whenever a commit ends or the token is free.
	cmu        sync.Mutex
	cond       sync.Cond
	pending    []*item
	spare      []*item // the last batch's array, for the next one
	committing bool
	stopping   bool          // Serve is stopping: no new events
	failed     error         // a write, fdatasync or rotation failed: nothing more is committed
	fatal      chan struct{} // closed when failed is set
	stopCh     chan struct{} // closed when Serve stops accepting

	mu    sync.Mutex
	conns map[*jconn]struct{}
	lns   []net.Listener
	wg    sync.WaitGroup

	// Start is what recovery found, as recorded in the journal_start line.
	Start Event
	// StartSeq is the seq of the journal_start line.
	StartSeq uint64
}

type item struct {
	ev   Event
	id   uint64
	size int // bytes of the message, to bound a batch
	// Set under cmu: seq once the event is durable, or errMsg when it never will be.
	seq    uint64
	errMsg string
}

// ErrFsync marks a failed write or fdatasync: the journal stopped and must be restarted so
// recovery reads the file; the data is never written again by the same process.
var ErrFsync = errors.New("audit journal: write or fdatasync failed")

// OpenJournal recovers the log (resuming seq and prev, moving a torn tail aside), opens it
// for appending and makes a journal_start line durable.
func OpenJournal(opts JournalOptions) (*Journal, error) {
	if opts.Log == "" {
		return nil, errors.New("journal: no log path")
	}
	if opts.RotateSize <= 0 {
		opts.RotateSize = DefaultRotateSize
	}
	if opts.MaxBatch <= 0 {
		opts.MaxBatch = DefaultMaxBatch
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if opts.sync == nil {
		// rawconn's: the disk's wait would otherwise keep the runtime's sysmon busy.
		opts.sync = rawconn.Fdatasync
	}
	if opts.Key == "" {
		opts.Key = filepath.Join(filepath.Dir(opts.Log), "journal.key")
	}
	j := &Journal{
		opts: opts, fatal: make(chan struct{}), stopCh: make(chan struct{}), conns: map[*jconn]struct{}{},
	}
	j.cond.L = &j.cmu
	if err := os.MkdirAll(filepath.Dir(opts.Log), 0o750); err != nil {
		return nil, fmt.Errorf("create log directory: %w", err)
	}
	key, created, err := LoadOrCreateKey(opts.Key)
	if err != nil {
		return nil, err
	}
	j.key = key
	j.lineMAC, j.headMAC = hmac.New(sha256.New, key), hmac.New(sha256.New, key)
	if created {
		// A new key next to an existing log would make every old MAC fail and restart the
		// chain at seq 1: refuse, and leave no key behind.
		var found []string
		if st, err := os.Stat(opts.Log); err == nil && st.Size() > 0 {
			found = append(found, opts.Log)
		}
		if _, err := os.Stat(HeadName(opts.Log)); err == nil {
			found = append(found, HeadName(opts.Log))
		}
		if rot, _ := rotatedFiles(opts.Log); len(rot) > 0 {
			found = append(found, rot...)
		}
		if len(found) > 0 {
			os.Remove(opts.Key)
			if IsInProcessLog(opts.Log) {
				// The hand-run avpd's audit.path is the journal's default log.
				return nil, fmt.Errorf("%s is avpd's in-process audit log (audit.path: lines without seq or MAC), not a journal's: move it aside (mv %s %s.by-hand) and start the journal again", opts.Log, opts.Log, opts.Log)
			}
			return nil, fmt.Errorf("journal key %s was missing but the log exists (%s): restore the key (its MACs cannot be checked with a new one) or move the log aside", opts.Key, strings.Join(found, ", "))
		}
	}
	start, err := j.recover()
	if err != nil {
		j.close()
		return nil, err
	}
	seq, err := j.commit([]*item{{ev: start}})
	if err != nil {
		j.close()
		return nil, err
	}
	j.Start, j.StartSeq = start, seq
	opts.Logf("journal: %s", start.Detail)
	return j, nil
}

// recover reads the live log, resumes the chain and returns the journal_start event.
func (j *Journal) recover() (Event, error) {
	log := j.opts.Log
	dir := filepath.Dir(log)
	var notes []string
	var warnings []string
	start := Event{Type: TypeJournalStart}

	if err := checkLogDir(dir); err != nil {
		return start, err
	}
	f, err := os.OpenFile(log, os.O_RDWR|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o640)
	if err != nil {
		return start, fmt.Errorf("open log %s: %w", log, err)
	}
	j.f = f
	if err := checkOwnFile(f, log); err != nil {
		return start, err
	}
	if err := syncDir(dir); err != nil {
		return start, fmt.Errorf("sync log directory %s (makes the log's name durable): %w", dir, err)
	}
	hf, err := os.OpenFile(HeadName(log), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o640)
	if err != nil {
		return start, fmt.Errorf("open head file: %w", err)
	}
	j.headF = hf
	if err := checkOwnFile(hf, HeadName(log)); err != nil {
		return start, err
	}
	// The head says how far the previous run got: every line up to its seq was acknowledged.
	var h *head
	if hh, err := readHeadFile(hf, HeadName(log), j.key); err == nil {
		h = hh
	} else if !errors.Is(err, errEmptyHead) {
		warnings = append(warnings, err.Error())
	}

	// Scan the live file: the longest prefix of complete, valid, chained lines.
	lr := newLineReader(f)
	var valid, headEnd int64
	var lines int
	var first, last uint64
	var lastHash, badReason string
	var badSeq uint64 // the seq the first bad line says it has, when it says one
	var badHasSeq bool
	for {
		raw, off, complete, err := lr.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return start, fmt.Errorf("read log %s: %w", log, err)
		}
		if !complete {
			badReason = fmt.Sprintf("an incomplete last line after seq %d", last)
			break
		}
		l, err := parseLine(raw, j.key)
		if err == nil && lines > 0 {
			err = chain(l, last, lastHash)
		}
		if err != nil {
			badReason = fmt.Sprintf("line %d (after seq %d) is not valid: %v", lines+1, last, err)
			badSeq, badHasSeq = claimedSeq(raw)
			valid = off
			break
		}
		if lines == 0 {
			first = l.Seq
		}
		sum := sha256.Sum256(raw)
		last, lastHash = l.Seq, hex.EncodeToString(sum[:])
		lines++
		valid = off + int64(len(raw)) + 1
		if h != nil && l.Seq == h.Seq {
			headEnd = valid
		}
	}
	st, err := f.Stat()
	if err != nil {
		return start, err
	}

	// Where does the chain resume? The live file's last line; else the newest rotated file;
	// else the head file.
	var rotLast uint64
	var rotHash, rotName string
	if rot, err := rotatedFiles(log); err == nil && len(rot) > 0 {
		rotName = rot[len(rot)-1]
		rotLast, rotHash, err = lastLine(rotName, j.key)
		if err != nil {
			warnings = append(warnings, fmt.Sprintf("rotated file %s: %v", rotName, err))
		}
	}
	switch {
	case lines > 0:
		j.seq, j.prev, j.firstSeq = last, lastHash, first
		notes = append(notes, fmt.Sprintf("resumed after seq %d in %s", last, filepath.Base(log)))
		if rotName != "" && rotLast > 0 && (first != rotLast+1) {
			warnings = append(warnings, fmt.Sprintf("%s starts at seq %d but %s ends at seq %d", filepath.Base(log), first, filepath.Base(rotName), rotLast))
		}
	case rotLast > 0 && (h == nil || h.Seq <= rotLast):
		j.seq, j.prev = rotLast, rotHash
		notes = append(notes, fmt.Sprintf("resumed after seq %d in %s", rotLast, filepath.Base(rotName)))
	case h != nil:
		j.seq, j.prev = h.Seq, h.Hash
		notes = append(notes, fmt.Sprintf("resumed after seq %d from the head file", h.Seq))
		warnings = append(warnings, fmt.Sprintf("the lines up to seq %d are not in %s or its rotated files: they were moved away (log rotation by another tool) or deleted", h.Seq, filepath.Base(log)))
	default:
		j.seq, j.prev = 0, GenesisPrev
		notes = append(notes, "new log: no earlier events")
	}

	if torn := st.Size() - valid; torn > 0 {
		inspect := fmt.Sprintf("inspect it with \"avpctl audit verify --key %s %s\", then move the damaged part aside by hand", j.opts.Key, log)
		if torn > maxTornBytes {
			return start, fmt.Errorf("log %s is damaged: %s, and %d bytes follow, more than a crash can leave unsynced: "+
				"this is not a torn tail, refusing to start; %s", log, badReason, torn, inspect)
		}
		// A crash tears only what was never synced, so never an acknowledged line: one the
		// head covers, whether the file's valid lines end before the head's seq or the bad
		// line itself (the first of a live file, say) names a seq the head covers.
		if h != nil && (lines > 0 && h.Seq > last || badHasSeq && badSeq <= h.Seq) {
			return start, fmt.Errorf("log %s is damaged: %s, but the head file records seq %d as acknowledged: "+
				"a crash cannot damage acknowledged lines, so this is not a torn tail; refusing to start; %s "+
				"(the journal then goes on after seq %d, and verify shows the gap)", log, badReason, h.Seq, inspect, h.Seq)
		}
		tornPath, err := moveAside(f, log, valid, st.Size())
		if err != nil {
			return start, err
		}
		start.TornBytes, start.TornFile = torn, tornPath
		warnings = append(warnings, fmt.Sprintf("torn tail: %s; moved %d bytes to %s", badReason, torn, tornPath))
		j.opts.Logf("journal: WARNING: torn tail in %s: %s; moved %d bytes to %s", log, badReason, torn, tornPath)
	}
	j.size = valid
	if h != nil && h.Seq > j.seq {
		warnings = append(warnings, fmt.Sprintf("the head file records seq %d but the log ends at seq %d: %d acknowledged event(s) are missing", h.Seq, j.seq, h.Seq-j.seq))
		// An acknowledged seq is never given to another line: the chain goes on after the
		// head, so the gap stays where verify sees it.
		j.seq, j.prev = h.Seq, h.Hash
	}
	if lines == 0 {
		j.firstSeq = j.seq + 1
	}
	// The lines after the head's may never have reached the disk: after a failed writeback
	// (the previous run died of it) Linux keeps them in the page cache marked clean, so they
	// read back whole here and no later fdatasync writes them. Written again and synced, they
	// are durable before anything is acknowledged after them.
	if err := resync(f, log, headEnd, valid); err != nil {
		return start, err
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		return start, err
	}

	detail := "journal started: " + strings.Join(notes, "; ")
	if len(warnings) > 0 {
		detail += "; WARNING: " + strings.Join(warnings, "; ")
	} else {
		detail += "; the tail was intact"
	}
	start.Detail = cutField(detail)
	return start, nil
}

// claimedSeq reads the seq a line that failed its checks says it has (a changed byte
// elsewhere leaves it readable): the journal writes it first, as {"v":1,"seq":N,...}.
func claimedSeq(raw []byte) (uint64, bool) {
	const prefix = `{"v":1,"seq":`
	if !bytes.HasPrefix(raw, []byte(prefix)) {
		return 0, false
	}
	n, rest, ok := parseUint(raw[len(prefix):])
	return n, ok && len(rest) > 0 && rest[0] == ','
}

// resync writes the bytes [from, to) of the log again, as they are, and fdatasyncs them.
// The write goes through a second descriptor without O_APPEND (with it, Linux appends a
// pwrite wherever it is aimed).
func resync(f *os.File, log string, from, to int64) error {
	if from >= to {
		return nil
	}
	w, err := os.OpenFile(log, os.O_WRONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return fmt.Errorf("reopen log %s to sync its tail: %w", log, err)
	}
	defer w.Close()
	if a, err1 := f.Stat(); err1 != nil {
		return err1
	} else if b, err2 := w.Stat(); err2 != nil || !os.SameFile(a, b) {
		return fmt.Errorf("log %s was replaced while the journal started", log)
	}
	buf := make([]byte, min(to-from, 1<<20))
	for off := from; off < to; {
		n := min(int64(len(buf)), to-off)
		if _, err := f.ReadAt(buf[:n], off); err != nil {
			return fmt.Errorf("read log %s: %w", log, err)
		}
		if _, err := w.WriteAt(buf[:n], off); err != nil {
			return fmt.Errorf("%w: write the unacknowledged tail of %s again: %v", ErrFsync, log, err)
		}
		off += n
	}
	if err := unix.Fdatasync(int(w.Fd())); err != nil {
		return fmt.Errorf("%w: fdatasync the unacknowledged tail of %s: %v (the disk still fails: fix it, then start again)", ErrFsync, log, err)
	}
	return nil
}

// checkLogDir refuses a log directory that someone other than the journal's user (or root)
// could change: they could replace the log or its head between runs.
func checkLogDir(dir string) error {
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("log directory %s: %w", dir, err)
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if int(sys.Uid) != os.Geteuid() && sys.Uid != 0 {
		return fmt.Errorf("log directory %s belongs to uid %d, not to the journal's user (uid %d) or root: chown it", dir, sys.Uid, os.Geteuid())
	}
	if st.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("log directory %s has mode %04o: others could replace the log; chmod go-w %s", dir, st.Mode().Perm(), dir)
	}
	return nil
}

// checkOwnFile refuses a log or head file that is not the journal user's own, or that
// others may write.
func checkOwnFile(f *os.File, path string) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Geteuid() {
		return fmt.Errorf("%s belongs to uid %d, not to the journal's user (uid %d): chown it (and check how it got there)", path, sys.Uid, os.Geteuid())
	}
	if st.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s has mode %04o: others could rewrite it; chmod go-w %s", path, st.Mode().Perm(), path)
	}
	return nil
}

// cutField cuts s to maxField bytes on a character's start. A cut through a UTF-8
// sequence (in a log path of the operator's) would be written as U+FFFD, three bytes, past
// the limit, and the journal's own line would not parse back at its next start.
func cutField(s string) string {
	if len(s) <= maxField {
		return s
	}
	cut := maxField
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return strings.ToValidUTF8(s[:cut], "")
}

// moveAside copies the bytes [from, to) of f to a new file beside the log, makes the copy
// durable, then truncates f to from. Nothing is deleted that is not kept.
func moveAside(f *os.File, log string, from, to int64) (string, error) {
	data := make([]byte, to-from)
	if _, err := f.ReadAt(data, from); err != nil && err != io.EOF {
		return "", fmt.Errorf("read torn tail: %w", err)
	}
	p := fmt.Sprintf("%s.torn-%s", log, time.Now().UTC().Format("20060102T150405.000000000Z"))
	tf, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o640)
	if err != nil {
		return "", fmt.Errorf("keep torn tail: %w", err)
	}
	_, err = tf.Write(data)
	if err == nil {
		err = tf.Sync()
	}
	if cerr := tf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(p) // a partial copy (a full disk, say) is not kept: each retry made one
		return "", fmt.Errorf("keep torn tail in %s: %w", p, err)
	}
	if err := syncDir(filepath.Dir(log)); err != nil {
		return "", err
	}
	if err := f.Truncate(from); err != nil {
		return "", fmt.Errorf("truncate torn tail: %w", err)
	}
	if err := f.Sync(); err != nil {
		return "", fmt.Errorf("sync after truncating the torn tail: %w", err)
	}
	return p, nil
}

// lastLine returns the seq and hash of the last line of a rotated file, checking it.
func lastLine(path string, key []byte) (uint64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, "", err
	}
	n := min(st.Size(), int64(maxLineLen+1))
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, st.Size()-n); err != nil && err != io.EOF {
		return 0, "", err
	}
	if len(buf) == 0 || buf[len(buf)-1] != '\n' {
		return 0, "", errors.New("does not end with a complete line")
	}
	buf = buf[:len(buf)-1]
	if i := bytes.LastIndexByte(buf, '\n'); i >= 0 {
		buf = buf[i+1:]
	}
	l, err := parseLine(buf, key)
	if err != nil {
		return 0, "", err
	}
	sum := sha256.Sum256(buf)
	return l.Seq, hex.EncodeToString(sum[:]), nil
}

// commit appends the events as lines with one write and one fdatasync. On success it
// returns the seq of the last line; on failure the journal is unusable (never retry a
// failed fsync: the page cache may already have dropped the data).
func (j *Journal) commit(batch []*item) (uint64, error) {
	buf := j.lineBuf[:0]
	seq, prev := j.seq, j.prev
	now := time.Now().UTC()
	for _, it := range batch {
		seq++
		l := Line{V: LineVersion, Seq: seq, TS: now, Prev: prev, Event: it.ev}
		l.Event.TS = time.Time{}
		var sum [32]byte
		var err error
		buf, sum, err = encodeLine(j.lineMAC, &l, buf)
		if err != nil {
			return 0, err
		}
		buf = append(buf, '\n')
		var hx [64]byte
		hex.Encode(hx[:], sum[:])
		prev = string(hx[:])
	}
	if cap(buf) <= maxBatchBytes+maxLineLen {
		j.lineBuf = buf
	}
	if j.f == nil {
		return 0, fmt.Errorf("%w: the log is closed", ErrFsync)
	}
	n, err := rawconn.WriteFile(j.f, buf, -1)
	if err != nil || n != len(buf) {
		return 0, fmt.Errorf("%w: append to %s: wrote %d of %d bytes: %v", ErrFsync, j.opts.Log, n, len(buf), err)
	}
	if err := j.opts.sync(j.f); err != nil {
		return 0, fmt.Errorf("%w: fdatasync %s: %v", ErrFsync, j.opts.Log, err)
	}
	j.seq, j.prev = seq, prev
	j.size += int64(len(buf))
	if j.headF != nil {
		// Not synced: it only has to be no further than the log, which it never is, since it
		// is written after the log's fdatasync.
		j.headBuf = appendHead(j.headBuf[:0], j.headMAC, seq, prev)
		if _, err := rawconn.WriteFile(j.headF, j.headBuf, 0); err != nil {
			j.opts.Logf("journal: update head file: %v", err)
		}
	}
	if j.opts.Mirror != nil {
		first := seq - uint64(len(batch)) + 1
		for i, it := range batch {
			j.opts.Mirror(first+uint64(i), &it.ev)
		}
	}
	return seq, nil
}

// rotate renames the live file to its rotated name and starts a new one. The chain goes on:
// the new file's first line has prev = hash of the old file's last line.
func (j *Journal) rotate() error {
	log := j.opts.Log
	target := RotatedName(log, j.firstSeq)
	if _, err := os.Lstat(target); err == nil {
		return fmt.Errorf("rotate %s: %s already exists", log, target)
	}
	if err := os.Rename(log, target); err != nil {
		return fmt.Errorf("rotate %s: %w", log, err)
	}
	if err := syncDir(filepath.Dir(log)); err != nil {
		return fmt.Errorf("rotate %s: sync directory: %w", log, err)
	}
	j.f.Close()
	j.f = nil
	f, err := os.OpenFile(log, os.O_WRONLY|os.O_APPEND|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o640)
	if err != nil {
		return fmt.Errorf("rotate: create %s: %w", log, err)
	}
	if err := syncDir(filepath.Dir(log)); err != nil {
		f.Close()
		return fmt.Errorf("rotate %s: sync directory: %w", log, err)
	}
	j.f, j.size, j.firstSeq = f, 0, j.seq+1
	j.opts.Logf("journal: rotated to %s at seq %d", filepath.Base(target), j.seq)
	return nil
}

// reopenLog reopens the log path (SIGHUP), for tools that moved the file away.
func (j *Journal) reopenLog() error {
	log := j.opts.Log
	f, err := os.OpenFile(log, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o640)
	if err != nil {
		return fmt.Errorf("reopen %s: %w", log, err)
	}
	if err := checkOwnFile(f, log); err != nil {
		f.Close()
		return fmt.Errorf("reopen: %w", err)
	}
	if err := syncDir(filepath.Dir(log)); err != nil {
		f.Close()
		return fmt.Errorf("reopen %s: sync directory: %w", log, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return err
	}
	var same bool
	if j.f != nil {
		if old, err := j.f.Stat(); err == nil && os.SameFile(old, st) {
			same = true
		}
		j.f.Close()
	}
	j.f, j.size = f, st.Size()
	if !same {
		j.firstSeq = j.seq + 1
		if st.Size() > 0 {
			j.opts.Logf("journal: WARNING: reopened %s holds %d bytes this journal did not write; appending after them", log, st.Size())
		}
	}
	j.opts.Logf("journal: reopened %s", log)
	return nil
}

// Reopen asks the serving journal to reopen its log file (SIGHUP). It waits for the commit
// that runs, if any, and holds off the next one while it reopens.
func (j *Journal) Reopen() error {
	j.cmu.Lock()
	defer j.cmu.Unlock()
	for j.committing {
		j.cond.Wait()
	}
	if j.stopping || j.failed != nil {
		return errors.New("journal stopped")
	}
	j.committing = true
	j.cmu.Unlock()
	err := j.reopenLog()
	j.cmu.Lock()
	j.committing = false
	j.cond.Broadcast()
	return err
}

// Serve accepts connections on ln and commits events until ctx ends (nil error, after the
// events readers already handed over are committed) or a write or fdatasync fails (an error
// wrapping ErrFsync: the unacked events got an error and the process must exit).
func (j *Journal) Serve(ctx context.Context, ln *net.UnixListener) error {
	j.mu.Lock()
	j.lns = append(j.lns, ln)
	j.mu.Unlock()
	j.wg.Add(1)
	go func() { defer j.wg.Done(); j.acceptLoop(ln) }()
	select {
	case <-ctx.Done():
	case <-j.fatal:
	}
	// Take no new events; commit those already pending (their readers wait for them), then
	// stop.
	j.cmu.Lock()
	j.stopping = true
	for j.failed == nil && (j.committing || len(j.pending) > 0) {
		if !j.committing {
			j.lead()
			continue
		}
		j.cond.Wait()
	}
	err := j.failed
	j.cmu.Unlock()
	close(j.stopCh)
	j.mu.Lock()
	for _, l := range j.lns {
		l.Close()
	}
	for c := range j.conns {
		if err != nil {
			c.sendNow(ackMsg{Error: "audit journal stopped: write or fdatasync failed"})
		}
		c.close()
	}
	j.mu.Unlock()
	j.wg.Wait()
	j.close()
	return err
}

func (j *Journal) close() {
	if j.f != nil {
		j.f.Close()
		j.f = nil
	}
	if j.headF != nil {
		j.headF.Close()
		j.headF = nil
	}
}

// Seq is the last durable seq. Only for tests and the benchmark, after Serve returned.
func (j *Journal) Seq() uint64 { return j.seq }

const (
	msgFailed   = "audit journal: write or fdatasync failed; the event is not recorded"
	msgStopping = "audit journal is stopping; the event is not recorded"
)

// submit hands a reader's events to group commit and returns once each is durable (its
// seq is set) or never will be (its errMsg is set). The caller then acks or fails them.
func (j *Journal) submit(items []*item) {
	j.cmu.Lock()
	defer j.cmu.Unlock()
	if j.failed != nil || j.stopping {
		msg := msgStopping
		if j.failed != nil {
			msg = msgFailed
		}
		for _, it := range items {
			it.errMsg = msg
		}
		return
	}
	j.pending = append(j.pending, items...)
	// Batches are taken from the front of pending, in order: once the last item is
	// durable, all are.
	last := items[len(items)-1]
	for last.seq == 0 && j.failed == nil {
		if !j.committing {
			j.lead()
			continue
		}
		j.cond.Wait()
	}
	if j.failed != nil {
		for _, it := range items {
			if it.seq == 0 {
				it.errMsg = msgFailed
			}
		}
	}
}

// lead commits one batch from the front of pending as the leader. cmu is held, the token is
// free, pending is not empty and no commit failed; cmu is released during the write and
// the fdatasync and held again on return.
func (j *Journal) lead() {
	// A line is the event plus about 250 bytes of chain fields and MAC.
	n, bytes := 1, j.pending[0].size+256
	for n < len(j.pending) && n < j.opts.MaxBatch && bytes < maxBatchBytes {
		bytes += j.pending[n].size + 256
		n++
	}
	var batch []*item
	if n == len(j.pending) {
		batch, j.pending = j.pending, j.spare[:0]
	} else {
		batch = append(j.spare[:0], j.pending[:n]...)
		rest := copy(j.pending, j.pending[n:])
		clear(j.pending[rest:])
		j.pending = j.pending[:rest]
	}
	j.spare = nil
	j.committing = true
	j.cmu.Unlock()

	last, err := j.commit(batch)

	j.cmu.Lock()
	if err != nil {
		j.fail(err, len(batch))
	} else {
		first := last - uint64(len(batch)) + 1
		for i, it := range batch {
			it.seq = first + uint64(i)
		}
		if j.size >= j.opts.RotateSize {
			// The batch is durable: its readers may ack it while the log rotates.
			j.cond.Broadcast()
			j.cmu.Unlock()
			err := j.rotate()
			j.cmu.Lock()
			if err != nil {
				j.opts.Logf("journal: %v", err)
				j.fail(fmt.Errorf("%w: %v", ErrFsync, err), 0)
			}
		}
	}
	clear(batch)
	j.spare = batch[:0]
	j.committing = false
	j.cond.Broadcast()
}

// fail makes the journal unusable after a failed write, fdatasync or rotation: every event
// not durable yet gets an error, nothing is committed again, and Serve returns err. cmu is
// held.
func (j *Journal) fail(err error, batch int) {
	if j.failed != nil {
		return
	}
	if batch > 0 || len(j.pending) > 0 {
		j.opts.Logf("journal: %v; failing %d unacknowledged event(s) and stopping", err, batch+len(j.pending))
	}
	j.failed = err
	// Pending events are never committed now; their readers see failed and answer.
	clear(j.pending)
	j.pending = j.pending[:0]
	close(j.fatal)
}

type ackMsg struct {
	Acks  [][2]uint64 `json:"acks,omitempty"`
	ID    uint64      `json:"id,omitempty"`
	Error string      `json:"error,omitempty"`
}

// maxAcksPerMessage keeps an ack message well under the client's read buffer.
const maxAcksPerMessage = 2000

type request struct {
	ID    uint64 `json:"id"`
	Event *Event `json:"event"`
}

func (j *Journal) acceptLoop(ln *net.UnixListener) {
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			select {
			case <-j.stopCh:
				return
			default:
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			j.opts.Logf("journal: accept: %v", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		uid, pid, err := peerCred(c)
		if err != nil {
			j.opts.Logf("journal: refused a connection: cannot read its credentials: %v", err)
			c.Close()
			continue
		}
		if uid != 0 && !slices.Contains(j.opts.AllowUIDs, uid) {
			j.opts.Logf("journal: refused a connection from uid %d (pid %d): not root and not in --allow-uid", uid, pid)
			go refuse(c, uid)
			continue
		}
		jc, err := newJconn(c)
		if err != nil {
			j.opts.Logf("journal: refused a connection: %v", err)
			c.Close()
			continue
		}
		j.mu.Lock()
		select {
		case <-j.stopCh:
			j.mu.Unlock()
			c.Close()
			return
		default:
		}
		j.conns[jc] = struct{}{}
		j.mu.Unlock()
		j.wg.Add(1)
		go func() {
			defer j.wg.Done()
			j.readLoop(jc)
			j.mu.Lock()
			delete(j.conns, jc)
			j.mu.Unlock()
		}()
	}
}

// refuse tells a client it may not write, then waits briefly for it to hang up: closing
// with its message unread would make it see a bare reset instead of the reason.
func refuse(c *net.UnixConn, uid uint32) {
	defer c.Close()
	msg, _ := json.Marshal(ackMsg{Error: fmt.Sprintf("uid %d may not write to the audit journal", uid)})
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write(msg); err != nil {
		return
	}
	c.CloseWrite()
	buf := make([]byte, 512)
	for {
		if n, err := c.Read(buf); err != nil || n == 0 {
			return
		}
	}
}

func peerCred(c *net.UnixConn) (uid uint32, pid int32, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *unix.Ucred
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, 0, err
	}
	if serr != nil {
		return 0, 0, serr
	}
	return cred.Uid, cred.Pid, nil
}

func (j *Journal) readLoop(c *jconn) {
	defer c.c.Close()
	defer c.close()
	var items []*item
	for {
		// Block for a message, then take those already queued behind it, up to a batch:
		// they all go to one commit and their acks to one message.
		items = items[:0]
		bytes := 0
		closing := false
		a, n, err := c.recv(min(recvBatch, j.opts.MaxBatch), true)
		if err != nil {
			return
		}
		for {
			for i := 0; i < n && !closing; i++ {
				msg, truncated := a.message(i)
				switch {
				case len(msg) == 0: // the client hung up
					closing = true
				case truncated || len(msg) > MaxMessage:
					c.send(ackMsg{Error: fmt.Sprintf("message longer than %d bytes; closing", MaxMessage)})
					closing = true
				default:
					it, errMsg := decodeRequest(msg)
					if errMsg == "" {
						items = append(items, it)
						bytes += len(msg) + 256
					} else if c.send(ackMsg{ID: it.id, Error: errMsg}); it.id == 0 {
						closing = true
					}
				}
			}
			// Fewer messages than asked for: the socket had no more at that moment.
			empty := n < a.asked
			recvArenas.Put(a)
			if closing || empty || len(items) >= j.opts.MaxBatch || bytes >= maxBatchBytes {
				break
			}
			if a, n, err = c.recv(min(recvBatch, j.opts.MaxBatch-len(items)), false); err != nil {
				// Nothing more queued (EAGAIN), or the connection failed: the events read so
				// far are committed and answered either way.
				closing = !errors.Is(err, unix.EAGAIN)
				break
			}
		}
		if len(items) > 0 {
			j.submit(items)
			if !c.reply(items, j.opts.AckDelay, j.opts.Logf) {
				return
			}
			if items[len(items)-1].errMsg != "" {
				// The journal is stopping or failed: it takes nothing more.
				return
			}
			clear(items)
		}
		if closing {
			return
		}
	}
}

func decodeRequest(msg []byte) (*item, string) {
	it := &item{size: len(msg)}
	if !decodeFast(msg, it) {
		it.ev = Event{} // what the fast path read before it gave up
		if errMsg := decodeJSON(msg, it); errMsg != "" {
			return it, errMsg
		}
	}
	if err := it.ev.Validate(); err != nil {
		return it, "event is not in the schema: " + err.Error()
	}
	return it, ""
}

// decodeJSON is decodeRequest for a message decodeFast did not take: encoding/json, with
// the closed schema's unknown fields refused.
func decodeJSON(msg []byte, it *item) string {
	req := request{Event: &it.ev}
	dec := json.NewDecoder(bytes.NewReader(msg))
	dec.DisallowUnknownFields() // applies to the event's fields too: the schema is closed
	err := dec.Decode(&req)
	it.id = req.ID
	if err != nil {
		if req.ID != 0 {
			return fmt.Sprintf("event is not in the schema: %v", err)
		}
		return "malformed message: want {\"id\":N,\"event\":{...}}"
	}
	if req.ID == 0 || req.Event == nil {
		return "malformed message: want {\"id\":N,\"event\":{...}}"
	}
	return ""
}

// jconn is one client connection. Its reader goroutine reads, commits (or waits for the
// commit that covers its events) and writes the acks itself, under wmu; a client that does
// not read its acks for ackWriteTimeout is disconnected, and only its own reader waits for
// it meanwhile, never a commit.
type jconn struct {
	c       *net.UnixConn
	w       net.Conn // c, written with rawconn's system calls
	rc      syscall.RawConn
	wmu     sync.Mutex
	wbuf    []byte // guarded by wmu
	closing atomic.Bool
	once    sync.Once

	// recv's arguments and results, for recvFn (c.recvmmsg, bound once).
	recvFn func(uintptr) bool
	rMax   int
	rBlock bool
	rArena *recvArena
	rN     int
	rErr   error
}

// ackWriteTimeout bounds one write to a client; closingWriteTimeout bounds the last writes
// while the connection closes.
const (
	ackWriteTimeout     = 5 * time.Second
	closingWriteTimeout = 100 * time.Millisecond
)

func newJconn(c *net.UnixConn) (*jconn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	jc := &jconn{c: c, w: rawconn.New(c), rc: rc}
	jc.recvFn = jc.recvmmsg
	return jc, nil
}

// recvBatch is how many messages one recvmmsg takes: a reader that finds several queued
// gets them with one system call, and one that finds fewer than it asked for knows the
// socket is empty without another call that fails with EAGAIN.
const recvBatch = 8

// recvArena is the buffers of one recvmmsg, each big enough for any message the journal
// accepts plus one byte, so that a longer one shows. Readers take one from recvArenas only
// while messages are queued, not while they wait.
type recvArena struct {
	buf   [recvBatch][MaxMessage + 1]byte
	iov   [recvBatch]unix.Iovec
	hdr   [recvBatch]unix.Mmsghdr
	asked int
}

var recvArenas = sync.Pool{New: func() any {
	a := new(recvArena)
	for i := range a.hdr {
		a.iov[i].Base = &a.buf[i][0]
		a.iov[i].SetLen(MaxMessage + 1)
		a.hdr[i].Hdr.Iov = &a.iov[i]
		a.hdr[i].Hdr.SetIovlen(1)
	}
	return a
}}

// message is the i-th message received, and whether the kernel cut it short.
func (a *recvArena) message(i int) ([]byte, bool) {
	h := &a.hdr[i]
	return a.buf[i][:h.Len], h.Hdr.Flags&unix.MSG_TRUNC != 0
}

// recv takes up to max queued messages with one recvmmsg into an arena from recvArenas,
// which the caller puts back; a message of length 0 means the client hung up. With block
// false it returns unix.EAGAIN when no message is queued, instead of waiting for one.
func (c *jconn) recv(max int, block bool) (*recvArena, int, error) {
	c.rMax, c.rBlock = max, block
	err := c.rc.Read(c.recvFn)
	a, n := c.rArena, c.rN
	c.rArena = nil
	if err == nil {
		err = c.rErr
	}
	if err != nil {
		if a != nil {
			recvArenas.Put(a)
		}
		return nil, 0, err
	}
	return a, n, nil
}

// recvmmsg is recv's one attempt, called by the poller with the socket's descriptor; it
// returns false to wait until the socket is readable.
func (c *jconn) recvmmsg(fd uintptr) bool {
	a := recvArenas.Get().(*recvArena)
	a.asked = c.rMax
	var r uintptr
	var e syscall.Errno
	for {
		// RawSyscall: MSG_DONTWAIT never blocks, and Syscall would wake the scheduler's
		// sysmon thread on every event (see package rawconn).
		r, _, e = unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&a.hdr[0])), uintptr(c.rMax), unix.MSG_DONTWAIT, 0, 0)
		if e != unix.EINTR {
			break
		}
	}
	if e != 0 {
		recvArenas.Put(a)
		c.rArena, c.rN, c.rErr = nil, 0, e
		return !c.rBlock || e != unix.EAGAIN
	}
	c.rArena, c.rN, c.rErr = a, int(r), nil
	return true
}

// reply writes the acks of the durable items, in messages of at most maxAcksPerMessage, and
// an error message for each failed one. After AckDelay when it is set (tests only). It
// returns false when the connection failed.
func (c *jconn) reply(items []*item, delay time.Duration, logf func(string, ...any)) bool {
	var failed []*item
	for i := 0; i < len(items); {
		c.wmu.Lock()
		msg := append(c.wbuf[:0], `{"acks":[`...)
		var first, last uint64
		n := 0
		for ; i < len(items) && n < maxAcksPerMessage; i++ {
			it := items[i]
			if it.seq == 0 {
				failed = append(failed, it)
				continue
			}
			if n > 0 {
				msg = append(msg, ',')
			} else {
				first = it.seq
			}
			msg = append(msg, '[')
			msg = strconv.AppendUint(msg, it.id, 10)
			msg = append(msg, ',')
			msg = strconv.AppendUint(msg, it.seq, 10)
			msg = append(msg, ']')
			last = it.seq
			n++
		}
		msg = append(msg, `]}`...)
		c.wbuf = msg
		if n == 0 {
			c.wmu.Unlock()
			continue
		}
		if delay > 0 {
			msg = slices.Clone(msg)
			c.wmu.Unlock()
			time.AfterFunc(delay, func() {
				at := time.Now().UTC()
				c.write(msg)
				logf("journal: test: acked seq %d..%d at %s", first, last, at.Format(time.RFC3339Nano))
			})
			continue
		}
		ok := c.writeLocked(msg)
		c.wmu.Unlock()
		if !ok {
			return false
		}
	}
	for _, it := range failed {
		if !c.send(ackMsg{ID: it.id, Error: it.errMsg}) {
			return false
		}
	}
	return true
}

// send writes one message; false means the connection failed and is closing.
func (c *jconn) send(m ackMsg) bool {
	msg, _ := json.Marshal(m)
	return c.write(msg)
}

func (c *jconn) write(msg []byte) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeLocked(msg)
}

func (c *jconn) writeLocked(msg []byte) bool {
	d := ackWriteTimeout
	if c.closing.Load() {
		d = closingWriteTimeout
	}
	c.c.SetWriteDeadline(time.Now().Add(d))
	if _, err := c.w.Write(msg); err != nil {
		c.close()
		return false
	}
	return true
}

// sendNow writes directly, for the last word before closing, without waiting for a write
// in progress.
func (c *jconn) sendNow(m ackMsg) {
	msg, _ := json.Marshal(m)
	c.c.SetWriteDeadline(time.Now().Add(closingWriteTimeout))
	c.w.Write(msg)
}

// close stops the reader once its events are answered: its next read fails at once, and
// writes from now on wait closingWriteTimeout at most. The reader closes the socket.
func (c *jconn) close() {
	c.once.Do(func() {
		c.closing.Store(true)
		c.c.SetReadDeadline(time.Unix(1, 0))
		c.c.SetWriteDeadline(time.Now().Add(closingWriteTimeout))
	})
}

// ListenJournal binds a SOCK_SEQPACKET socket at path with mode 0660, replacing a stale
// socket file but never a live one.
func ListenJournal(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket; remove it or choose another --socket", path)
		}
		if c, err := net.Dial("unixpacket", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("another journal is listening on %s", path)
		}
		os.Remove(path)
	}
	old := syscall.Umask(0o117)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// FileListener turns a socket passed by systemd into a journal listener; it must be a
// listening SOCK_SEQPACKET Unix socket (ListenSequentialPacket=).
func FileListener(f *os.File) (*net.UnixListener, error) {
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("socket %s from systemd: %w; the journal needs ListenSequentialPacket=", f.Name(), err)
	}
	ul, ok := ln.(*net.UnixListener)
	if !ok || ln.Addr().Network() != "unixpacket" {
		ln.Close()
		return nil, fmt.Errorf("socket %s from systemd is %s, not a SOCK_SEQPACKET Unix socket; use ListenSequentialPacket= in the socket unit", f.Name(), ln.Addr().Network())
	}
	return ul, nil
}

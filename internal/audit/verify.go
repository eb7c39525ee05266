package audit

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// A log set is the live file PATH plus the files the journal rotated out of it, named
// PATH.<16-digit seq of their first line>. The head file PATH.head records the seq and hash
// of the last line the journal made durable, so that cutting whole lines off the end of the
// log is detected too.

const rotatedDigits = 16

// RotatedName is the name a live log gets when it is rotated.
func RotatedName(live string, firstSeq uint64) string {
	return fmt.Sprintf("%s.%0*d", live, rotatedDigits, firstSeq)
}

// HeadName is the head file of a live log.
func HeadName(live string) string { return live + ".head" }

// rotatedSeq returns the first seq encoded in a rotated name of live, if name is one.
func rotatedSeq(live, name string) (uint64, bool) {
	suffix, ok := strings.CutPrefix(name, live+".")
	if !ok || len(suffix) != rotatedDigits {
		return 0, false
	}
	n, err := strconv.ParseUint(suffix, 10, 64)
	return n, err == nil
}

// rotatedFiles lists the rotated files of live, oldest first.
func rotatedFiles(live string) ([]string, error) {
	ents, err := os.ReadDir(filepath.Dir(live))
	if err != nil {
		return nil, err
	}
	type rf struct {
		name string
		seq  uint64
	}
	var out []rf
	for _, e := range ents {
		p := filepath.Join(filepath.Dir(live), e.Name())
		if seq, ok := rotatedSeq(live, p); ok && e.Type().IsRegular() {
			out = append(out, rf{p, seq})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].seq < out[j].seq })
	names := make([]string, len(out))
	for i, r := range out {
		names[i] = r.name
	}
	return names, nil
}

// isRotatedName reports whether p looks like PATH.<16 digits>.
func isRotatedName(p string) bool {
	i := strings.LastIndexByte(p, '.')
	if i < 0 {
		return false
	}
	_, ok := rotatedSeq(p[:i], p)
	return ok
}

// ExpandLogSet turns the paths an operator gives into the files to check: a live log brings
// its rotated files along; a rotated file stands for itself.
func ExpandLogSet(paths []string) ([]string, error) {
	seen := map[string]bool{}
	var out []string
	add := func(p string) {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	for _, p := range paths {
		if isRotatedName(p) {
			add(p)
			continue
		}
		rot, err := rotatedFiles(p)
		if err != nil {
			return nil, err
		}
		for _, r := range rot {
			add(r)
		}
		add(p)
	}
	return out, nil
}

// head is the content of a head file.
type head struct {
	V    int    `json:"v"`
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
	MAC  string `json:"mac,omitempty"`
}

// headSize is the fixed size of a head file, so it is rewritten in place with one pwrite.
const headSize = 256

const headDomain = "agent-vault-proxy journal head\n"

var headDomainBytes = []byte(headDomain)

// appendMAC appends mac's sum in lowercase hex to buf. The raw sum goes through buf's own
// spare capacity: a local array handed to the hash.Hash interface would escape.
func appendMAC(buf []byte, mac hash.Hash) []byte {
	n := len(buf)
	buf = mac.Sum(buf)
	var raw [64]byte
	m := copy(raw[:], buf[n:])
	return hex.AppendEncode(buf[:n], raw[:m])
}

func headMAC(key, body []byte) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(headDomain))
	m.Write(body)
	return hex.EncodeToString(m.Sum(nil))
}

func encodeHead(key []byte, seq uint64, hash string) []byte {
	return appendHead(nil, hmac.New(sha256.New, key), seq, hash)
}

// appendHead appends the head file's headSize bytes to buf: the JSON object json.Marshal
// writes for head{V, Seq, Hash, MAC} (lineHash is 64 lowercase hex digits, so nothing in it is
// escaped), padded with spaces and ended with a newline. mac is hmac.New(sha256.New, key);
// appendHead resets it before use.
func appendHead(buf []byte, mac hash.Hash, seq uint64, lineHash string) []byte {
	start := len(buf)
	buf = append(buf, `{"v":`...)
	buf = strconv.AppendInt(buf, LineVersion, 10)
	buf = append(buf, `,"seq":`...)
	buf = strconv.AppendUint(buf, seq, 10)
	buf = append(buf, `,"hash":"`...)
	buf = append(buf, lineHash...)
	buf = append(buf, `"}`...)
	mac.Reset()
	mac.Write(headDomainBytes)
	mac.Write(buf[start:])
	buf = append(buf[:len(buf)-1], `,"mac":"`...)
	buf = appendMAC(buf, mac)
	buf = append(buf, `"}`...)
	for len(buf)-start < headSize-1 {
		buf = append(buf, ' ')
	}
	return append(buf[:start+headSize-1], '\n')
}

// readHead reads a head file; with a key it checks the MAC. A missing file is
// os.ErrNotExist.
func readHead(path string, key []byte) (*head, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseHead(data, path, key)
}

// errEmptyHead is a head file with nothing in it yet (created, never written).
var errEmptyHead = errors.New("the head file is empty")

// readHeadFile reads the head file the journal holds open.
func readHeadFile(f *os.File, path string, key []byte) (*head, error) {
	data, err := io.ReadAll(io.LimitReader(io.NewSectionReader(f, 0, 1<<20), 1<<20))
	if err != nil {
		return nil, fmt.Errorf("read head file %s: %w", path, err)
	}
	if len(data) == 0 {
		return nil, errEmptyHead
	}
	return parseHead(data, path, key)
}

func parseHead(data []byte, path string, key []byte) (*head, error) {
	var h head
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil || h.V != LineVersion || len(h.Hash) != 64 || !isLowerHex([]byte(h.Hash)) {
		return nil, fmt.Errorf("head file %s is damaged", path)
	}
	if key != nil {
		body, _ := json.Marshal(head{V: h.V, Seq: h.Seq, Hash: h.Hash})
		if !hmac.Equal([]byte(headMAC(key, body)), []byte(h.MAC)) {
			return nil, fmt.Errorf("head file %s: MAC mismatch: it was changed, or written with another key", path)
		}
	}
	return &h, nil
}

// lineReader yields the lines of a file with their offsets. A last line without a newline is
// returned with complete=false.
type lineReader struct {
	r   *bufio.Reader
	off int64
}

func newLineReader(r io.Reader) *lineReader {
	return &lineReader{r: bufio.NewReaderSize(r, 256<<10)}
}

// next returns the next line without its newline, the offset it starts at, and whether it
// was terminated by a newline. At the end it returns io.EOF. A line longer than maxLineLen
// comes back cut to maxLineLen+1 bytes (which no parse accepts), so a file of one huge line
// costs no more memory than that.
func (lr *lineReader) next() (line []byte, off int64, complete bool, err error) {
	off = lr.off
	for {
		frag, e := lr.r.ReadSlice('\n')
		lr.off += int64(len(frag))
		if room := maxLineLen + 1 - len(line); room > 0 {
			line = append(line, frag[:min(len(frag), room)]...)
		}
		switch {
		case e == bufio.ErrBufferFull:
			continue
		case e == io.EOF:
			if lr.off == off {
				return nil, off, false, io.EOF
			}
			return line, off, false, nil
		case e != nil:
			return nil, off, false, e
		}
		if n := len(line); n > 0 && line[n-1] == '\n' && lr.off-off == int64(n) {
			line = line[:n-1]
		}
		return line, off, true, nil
	}
}

// Problem is the first thing wrong with a log set.
type Problem struct {
	File   string
	Line   int    // 1-based line number in File; 0 when the problem is not one line
	Seq    uint64 // the seq of the last good line before the problem
	Reason string
}

func (p *Problem) Error() string {
	if p.Line > 0 {
		return fmt.Sprintf("%s:%d: %s", p.File, p.Line, p.Reason)
	}
	return fmt.Sprintf("%s: %s", p.File, p.Reason)
}

// VerifyReport is what Verify found.
type VerifyReport struct {
	Files             []string
	Lines             int
	FirstSeq, LastSeq uint64
	MACsChecked       bool
	HeadChecked       bool
	// Notes are things an auditor should know that do not break the chain: the set does not
	// start at seq 1, a journal restart found a torn tail, no head file was found.
	Notes []string
	// Problem is nil when the set is intact.
	Problem *Problem
}

// Verify checks a log set: every line is a journal line of the closed schema, seq increases
// by one, prev is the hash of the line before (across files), with a key every MAC, and the
// head file of a live log matches. It returns an error only when a file cannot be read.
//
// The journal never deletes a file, so a set that does not start at seq 1 is missing lines:
// that is a Problem, unless partial says that the caller gave a later part on purpose.
func Verify(paths []string, key []byte) (*VerifyReport, error) {
	return verify(paths, key, false)
}

// VerifyPartial is Verify for a set that may start after seq 1: its first link is not
// checked, and a note says so.
func VerifyPartial(paths []string, key []byte) (*VerifyReport, error) {
	return verify(paths, key, true)
}

func verify(paths []string, key []byte, partial bool) (*VerifyReport, error) {
	rep := &VerifyReport{MACsChecked: key != nil}
	type file struct {
		path  string
		first uint64
	}
	var files []file
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		lr := newLineReader(f)
		raw, _, complete, err := lr.next()
		f.Close()
		if err == io.EOF {
			rep.Notes = append(rep.Notes, fmt.Sprintf("%s is empty", p))
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", p, err)
		}
		if !complete {
			rep.Problem = &Problem{File: p, Line: 1, Reason: "incomplete line: a torn write or a truncated file"}
			return rep, nil
		}
		l, err := parseLine(raw, key)
		if err != nil {
			rep.Problem = &Problem{File: p, Line: 1, Reason: err.Error()}
			return rep, nil
		}
		if want, ok := rotatedSeq(strings.TrimSuffix(p, filepath.Ext(p)), p); ok && want != l.Seq {
			rep.Problem = &Problem{File: p, Line: 1, Reason: fmt.Sprintf("the file name says it starts at seq %d but its first line is seq %d: lines were cut from its start", want, l.Seq)}
			return rep, nil
		}
		files = append(files, file{p, l.Seq})
	}
	sort.SliceStable(files, func(i, j int) bool { return files[i].first < files[j].first })

	// Head files of the live logs in the set, with the hash found at their seq.
	type headCheck struct {
		path string
		h    *head
		got  string
	}
	var heads []*headCheck
	for _, p := range paths {
		if isRotatedName(p) {
			continue
		}
		h, err := readHead(HeadName(p), key)
		if errors.Is(err, os.ErrNotExist) {
			rep.Notes = append(rep.Notes, fmt.Sprintf("no head file %s: lines cut from the end of %s at a line boundary cannot be detected", HeadName(p), p))
			continue
		}
		if err != nil {
			rep.Problem = &Problem{File: HeadName(p), Reason: err.Error()}
			return rep, nil
		}
		heads = append(heads, &headCheck{path: HeadName(p), h: h})
	}

	var prevSeq uint64
	var prevHash string
	for fi, f := range files {
		rep.Files = append(rep.Files, f.path)
		fh, err := os.Open(f.path)
		if err != nil {
			return nil, err
		}
		lr := newLineReader(fh)
		for n := 1; ; n++ {
			raw, _, complete, err := lr.next()
			if err == io.EOF {
				break
			}
			if err != nil {
				fh.Close()
				return nil, fmt.Errorf("read %s: %w", f.path, err)
			}
			bad := func(reason string) (*VerifyReport, error) {
				fh.Close()
				rep.Problem = &Problem{File: f.path, Line: n, Seq: prevSeq, Reason: reason}
				return rep, nil
			}
			if !complete {
				return bad(fmt.Sprintf("incomplete last line of %d bytes: a torn write or a truncated file", len(raw)))
			}
			l, err := parseLine(raw, key)
			if err != nil {
				return bad(err.Error())
			}
			if fi == 0 && n == 1 {
				rep.FirstSeq = l.Seq
				if l.Seq == 1 {
					if err := chain(l, 0, GenesisPrev); err != nil {
						return bad(err.Error())
					}
				} else if partial {
					rep.Notes = append(rep.Notes, fmt.Sprintf("the set starts at seq %d: the files before it were not given, so its first link is not checked", l.Seq))
				} else {
					return bad(fmt.Sprintf("the set starts at seq %d: seq 1..%d are in none of the files given (the journal deletes none: they were deleted, or moved away by another tool); give those files too, or --partial to check from seq %d on", l.Seq, l.Seq-1, l.Seq))
				}
			} else if err := chain(l, prevSeq, prevHash); err != nil {
				reason := err.Error()
				if key == nil && l.Seq == prevSeq+1 && l.Prev != prevHash && prevSeq > 0 {
					// Without the key an edit of the line before shows only here, in its
					// hash: either line may be the one changed.
					reason += fmt.Sprintf("; without --key it cannot be told whether seq %d or this line was changed", prevSeq)
					prevSeq--
				}
				if n == 1 {
					reason += fmt.Sprintf(" (the previous file is %s)", files[fi-1].path)
				}
				return bad(reason)
			}
			sum := sha256.Sum256(raw)
			prevSeq, prevHash = l.Seq, hex.EncodeToString(sum[:])
			for _, hc := range heads {
				if hc.h.Seq == l.Seq {
					hc.got = prevHash
				}
			}
			if l.Type == TypeJournalStart && strings.Contains(l.Detail, "WARNING") {
				rep.Notes = append(rep.Notes, fmt.Sprintf("%s:%d: seq %d: %s", f.path, n, l.Seq, l.Detail))
			}
			rep.Lines++
		}
		fh.Close()
	}
	rep.LastSeq = prevSeq
	for _, hc := range heads {
		switch {
		case hc.h.Seq > prevSeq:
			rep.Problem = &Problem{File: hc.path, Seq: prevSeq, Reason: fmt.Sprintf("the head file records seq %d, but the log ends at seq %d: the log was truncated", hc.h.Seq, prevSeq)}
			return rep, nil
		case hc.h.Seq < rep.FirstSeq:
			rep.Notes = append(rep.Notes, fmt.Sprintf("the head file %s records seq %d, before the files given", hc.path, hc.h.Seq))
		case hc.got != hc.h.Hash:
			rep.Problem = &Problem{File: hc.path, Seq: hc.h.Seq, Reason: fmt.Sprintf("the line with seq %d does not match the head file: the end of the log was rewritten", hc.h.Seq)}
			return rep, nil
		default:
			rep.HeadChecked = true
		}
	}
	return rep, nil
}

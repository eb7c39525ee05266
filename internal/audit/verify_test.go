package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLineFormat(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, nil)
	appendEvents(t, j, 2)
	j.close()
	lines := readLines(t, j.opts.Log)
	if len(lines) != 3 {
		t.Fatalf("%d lines", len(lines))
	}
	// Key order and shape: v, seq, ts, prev, type, event fields, mac last.
	if !strings.HasPrefix(lines[0], `{"v":1,"seq":1,"ts":"`) || !strings.Contains(lines[0], `"prev":"`+GenesisPrev+`","type":"journal_start"`) {
		t.Fatalf("first line %s", lines[0])
	}
	if !strings.Contains(lines[1], `"type":"decision","decision":"inject","secret":"OPENAI","binding":0,"uid":4242,"dst":"127.0.0.2:443","sni":"api.openai.test","method":"POST","path":"/v1/n/0","mac":"`) {
		t.Fatalf("decision line %s", lines[1])
	}
	// prev is the sha256 of the previous line's bytes without the newline.
	sum := sha256.Sum256([]byte(lines[0]))
	var l struct{ Prev, MAC string }
	json.Unmarshal([]byte(lines[1]), &l)
	if l.Prev != hex.EncodeToString(sum[:]) {
		t.Fatalf("prev %s, want %x", l.Prev, sum)
	}
	// mac is HMAC-SHA256 over the line without its mac field.
	body := lines[1][:strings.LastIndex(lines[1], `,"mac":"`)] + "}"
	if got := headMAC(j.key, []byte(body)); got == l.MAC {
		t.Fatal("head and line MACs must be domain-separated")
	}
	if _, err := parseLine([]byte(lines[1]), j.key); err != nil {
		t.Fatal(err)
	}
	if _, err := parseLine([]byte(lines[1]), bytes.Repeat([]byte{1}, 32)); err == nil || !strings.Contains(err.Error(), "MAC mismatch") {
		t.Fatalf("another key: %v", err)
	}
	// The key file is private.
	st, err := os.Stat(filepath.Join(dir, "journal.key"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v %v", st.Mode(), err)
	}
}

func TestKeyPermissionsChecked(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "k")
	if _, created, err := LoadOrCreateKey(p); err != nil || !created {
		t.Fatal(err)
	}
	if _, created, err := LoadOrCreateKey(p); err != nil || created {
		t.Fatalf("reload: %v %v", created, err)
	}
	os.Chmod(p, 0o640)
	if _, _, err := LoadOrCreateKey(p); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("group-readable key accepted: %v", err)
	}
}

func TestJournalRefusesMissingKeyForExistingLog(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, nil)
	appendEvents(t, j, 3)
	j.close()
	os.Remove(filepath.Join(dir, "journal.key"))
	_, err := OpenJournal(JournalOptions{Log: j.opts.Log})
	if err == nil || !strings.Contains(err.Error(), "restore the key") {
		t.Fatalf("got %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "journal.key")); err == nil {
		t.Fatal("a new key was left behind")
	}
	// Also when only rotated files are left.
	dir2 := t.TempDir()
	j2 := openTestJournal(t, dir2, func(o *JournalOptions) { o.RotateSize = 1000 })
	appendEvents(t, j2, 3)
	j2.close()
	if st, _ := os.Stat(j2.opts.Log); st.Size() != 0 {
		t.Fatal("not rotated")
	}
	os.Remove(filepath.Join(dir2, "journal.key"))
	os.Remove(HeadName(j2.opts.Log))
	if _, err := OpenJournal(JournalOptions{Log: j2.opts.Log}); err == nil || !strings.Contains(err.Error(), "audit.jsonl.0000000000000001") {
		t.Fatalf("got %v", err)
	}
}

// rotatedLog writes a log set of several files and returns the live path and the key.
func rotatedLog(t *testing.T, dir string, n int) (string, []byte) {
	t.Helper()
	j := openTestJournal(t, dir, func(o *JournalOptions) { o.RotateSize = 2000 })
	appendEvents(t, j, n)
	j.close()
	return j.opts.Log, j.key
}

func TestVerifyAcceptsIntactRotatedSet(t *testing.T) {
	dir := t.TempDir()
	live, key := rotatedLog(t, dir, 60)
	set := logSet(t, live)
	if len(set) < 4 {
		t.Fatalf("want several rotated files, got %v", set)
	}
	rep := mustVerify(t, set, key)
	if rep.Lines != 61 || rep.FirstSeq != 1 || rep.LastSeq != 61 || !rep.MACsChecked || !rep.HeadChecked {
		t.Fatalf("report %+v", rep)
	}
	// Order of the arguments does not matter; without the key only the chain is checked.
	rev := append([]string(nil), set...)
	for i, k := 0, len(rev)-1; i < k; i, k = i+1, k-1 {
		rev[i], rev[k] = rev[k], rev[i]
	}
	if rep := mustVerify(t, rev, nil); rep.MACsChecked || rep.Lines != 61 {
		t.Fatalf("report %+v", rep)
	}
	// A rotated file's first line refers to the previous file's last line.
	first := readLines(t, set[1])[0]
	prevLines := readLines(t, set[0])
	sum := sha256.Sum256([]byte(prevLines[len(prevLines)-1]))
	if !strings.Contains(first, hex.EncodeToString(sum[:])) {
		t.Fatal("the chain does not continue across files")
	}
	// Given only the later files, the set is missing seq 1..: broken, since the journal
	// deletes no file (the oldest files deleted look just like this), unless the caller
	// says it left them out on purpose.
	if rep, err := Verify(set[2:], key); err != nil || rep.Problem == nil || !strings.Contains(rep.Problem.Reason, "--partial") {
		t.Fatalf("a set without its first files: %v %+v", err, rep)
	}
	rep, err := VerifyPartial(set[2:], key)
	if err != nil || rep.Problem != nil || rep.FirstSeq == 1 || !strings.Contains(strings.Join(rep.Notes, "\n"), "starts at seq") {
		t.Fatalf("partial set: %v %+v", err, rep)
	}
}

// tamperCase copies an intact rotated set, applies one change and expects verify to fail.
func TestVerifyDetectsTampering(t *testing.T) {
	base := t.TempDir()
	live, key := rotatedLog(t, base, 40)
	set := logSet(t, live)
	otherDir := t.TempDir()
	otherLive, otherKey := rotatedLog(t, otherDir, 40)
	otherSet := logSet(t, otherLive)

	copySet := func(t *testing.T) (string, []string) {
		dir := t.TempDir()
		var out []string
		for _, p := range append(set, HeadName(live)) {
			data, _ := os.ReadFile(p)
			q := filepath.Join(dir, filepath.Base(p))
			os.WriteFile(q, data, 0o600)
			if p != HeadName(live) {
				out = append(out, q)
			}
		}
		return filepath.Join(dir, filepath.Base(live)), out
	}
	editLines := func(t *testing.T, path string, f func([]string) []string) {
		lines := readLines(t, path)
		lines = f(lines)
		os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600)
	}
	cases := []struct {
		name   string
		noKey  bool // detected without the key too
		tamper func(t *testing.T, live string, files []string)
		want   string
	}{
		{"edit middle line", true, func(t *testing.T, live string, files []string) {
			editLines(t, files[1], func(l []string) []string { l[1] = strings.Replace(l[1], "/v1/n/", "/v1/x/", 1); return l })
		}, "MAC mismatch|prev does not match"},
		{"edit last line", false, func(t *testing.T, live string, files []string) {
			editLines(t, live, func(l []string) []string {
				l[len(l)-1] = strings.Replace(l[len(l)-1], `"uid":4242`, `"uid":4243`, 1)
				return l
			})
		}, "MAC mismatch"},
		{"delete a line", true, func(t *testing.T, live string, files []string) {
			editLines(t, files[0], func(l []string) []string { return append(l[:2], l[3:]...) })
		}, "missing"},
		{"delete the last line", true, func(t *testing.T, live string, files []string) {
			editLines(t, live, func(l []string) []string { return l[:len(l)-1] })
		}, "the log was truncated"},
		{"swap two lines", true, func(t *testing.T, live string, files []string) {
			editLines(t, files[1], func(l []string) []string { l[1], l[2] = l[2], l[1]; return l })
		}, "seq"},
		{"truncate mid-line", true, func(t *testing.T, live string, files []string) {
			st, _ := os.Stat(live)
			os.Truncate(live, st.Size()-40)
		}, "incomplete last line"},
		{"truncate a rotated file at a line boundary", true, func(t *testing.T, live string, files []string) {
			editLines(t, files[1], func(l []string) []string { return l[:len(l)-2] })
		}, "missing"},
		{"cut lines from the start of a rotated file", true, func(t *testing.T, live string, files []string) {
			editLines(t, files[1], func(l []string) []string { return l[2:] })
		}, "lines were cut from its start"},
		{"splice a file from another log", true, func(t *testing.T, live string, files []string) {
			data, _ := os.ReadFile(otherSet[1])
			os.WriteFile(files[1], data, 0o600)
		}, "MAC mismatch|another log"},
		{"splice a line from another log", true, func(t *testing.T, live string, files []string) {
			foreign := readLines(t, otherSet[1])[1]
			editLines(t, files[1], func(l []string) []string { l[1] = foreign; return l })
		}, "MAC mismatch|another log"},
		{"remove a rotated file", true, func(t *testing.T, live string, files []string) {
			os.Remove(files[1])
		}, "missing"},
		{"rewrite the head file", false, func(t *testing.T, live string, files []string) {
			os.WriteFile(HeadName(live), encodeHead(otherKey, 3, GenesisPrev), 0o600)
		}, "MAC mismatch"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			live, files := copySet(t)
			tc.tamper(t, live, files)
			var present []string
			for _, f := range files {
				if _, err := os.Stat(f); err == nil {
					present = append(present, f)
				}
			}
			rep, err := Verify(present, key)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Problem == nil || !containsAny(rep.Problem.Error(), tc.want) {
				t.Fatalf("problem %v, want one containing %q", rep.Problem, tc.want)
			}
			if tc.noKey {
				if rep, _ := Verify(present, nil); rep.Problem == nil {
					t.Fatalf("not detected without the key")
				} else if tc.name == "edit middle line" && (!strings.Contains(rep.Problem.Error(), "prev does not match") ||
					!strings.Contains(rep.Problem.Error(), "cannot be told whether seq") || rep.Problem.Line != 3) {
					// The edited line is the file's second; its successor shows the break, and
					// the lines verified end before the edited one.
					t.Fatalf("without the key: %v (seq %d)", rep.Problem, rep.Problem.Seq)
				}
			}
		})
	}

	// Every single-byte edit anywhere in a (small) rotated set, its last line included, is
	// detected with the key.
	t.Run("every byte", func(t *testing.T) {
		live, key := smallLog(t)
		files := logSet(t, live)
		if len(files) < 2 {
			t.Fatalf("want a rotated set, got %v", files)
		}
		for fi := range files {
			orig, _ := os.ReadFile(files[fi])
			for i := range orig {
				mod := bytes.Clone(orig)
				mod[i] ^= 0x01
				os.WriteFile(files[fi], mod, 0o600)
				rep, err := Verify(files, key)
				if err != nil {
					t.Fatal(err)
				}
				if rep.Problem == nil {
					t.Fatalf("flipping byte %d of %s (%q) went unnoticed", i, filepath.Base(files[fi]), orig[i])
				}
			}
			os.WriteFile(files[fi], orig, 0o600)
		}
	})
}

func containsAny(s, alts string) bool {
	for _, a := range strings.Split(alts, "|") {
		if strings.Contains(s, a) {
			return true
		}
	}
	return false
}

// smallLog is a set of two files holding 5 lines.
func smallLog(t *testing.T) (string, []byte) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, func(o *JournalOptions) { o.RotateSize = 900 })
	appendEvents(t, j, 2) // with journal_start, past 900 bytes: rotated
	appendEvents(t, j, 2)
	j.close()
	if lines := readLines(t, j.opts.Log); len(lines) != 2 {
		t.Fatalf("live file has %d lines", len(lines))
	}
	return j.opts.Log, j.key
}

package audit

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The journal's start must never lose or relabel an acknowledged event (I9): not when
// acknowledged lines are damaged or cut off, not after a failed writeback, not when the
// directory entry could not be made durable, and not in a file others could rewrite.

// needRootOrCI skips a test that needs root, but only outside CI, where it must run.
func needRootOrCI(t *testing.T, why string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("CI is set but not running as root: %s", why)
	}
	t.Skipf("SKIP: not root and CI unset: %s", why)
}

// needStrace is strace's path; a test that needs it must run in CI (.ci/run installs it).
func needStrace(t *testing.T) string {
	t.Helper()
	strace, err := exec.LookPath("strace")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("strace is not installed (.ci/run installs it)")
		}
		t.Skip("SKIP: strace is not installed")
	}
	return strace
}

// A changed byte in an acknowledged line is not a torn tail: a crash tears only what was
// never synced. Moving it aside would drop every acknowledged line after it and give their
// seqs to new lines, and verify would then pass.
func TestRecoveryRefusesDamageToAcknowledgedLines(t *testing.T) {
	dir := shortDir(t)
	j := openTestJournal(t, dir, nil)
	appendEvents(t, j, 50) // seq 2..51, all acknowledged
	log := j.opts.Log
	j.close()
	data, _ := os.ReadFile(log)
	lines := bytes.SplitAfter(data, []byte("\n"))
	i := bytes.Index(lines[2], []byte("/v1/n/"))
	lines[2][i+1] = 'X'
	os.WriteFile(log, bytes.Join(lines, nil), 0o640)

	_, err := OpenJournal(JournalOptions{Log: log, Logf: t.Logf})
	if err == nil || !strings.Contains(err.Error(), "head file records seq 51 as acknowledged") || !strings.Contains(err.Error(), "line 3") {
		t.Fatalf("journal start on a log with a damaged acknowledged line: %v", err)
	}
	if after, _ := os.ReadFile(log); !bytes.Equal(after, bytes.Join(lines, nil)) {
		t.Fatal("the refused start changed the log")
	}
	if m, _ := filepath.Glob(log + ".torn-*"); len(m) != 0 {
		t.Fatalf("the refused start moved lines aside: %v", m)
	}
}

// Whole acknowledged lines cut off the end: the journal starts (the head proves what is
// missing), but goes on after the head's seq, so no seq names two lines and verify keeps
// reporting the gap.
func TestRecoveryNeverReusesAcknowledgedSeqs(t *testing.T) {
	dir := shortDir(t)
	j := openTestJournal(t, dir, nil)
	appendEvents(t, j, 20) // seq 2..21
	log, key := j.opts.Log, j.key
	j.close()
	lines := readLines(t, log)
	os.WriteFile(log, []byte(strings.Join(lines[:10], "\n")+"\n"), 0o640) // seq 11..21 cut

	j2 := openTestJournal(t, dir, nil)
	appendEvents(t, j2, 2)
	j2.close()
	if j2.StartSeq != 22 || !strings.Contains(j2.Start.Detail, "11 acknowledged event(s) are missing") {
		t.Fatalf("journal_start seq %d (want 22, after the head's 21): %s", j2.StartSeq, j2.Start.Detail)
	}
	rep, err := Verify(logSet(t, log), key)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Problem == nil || rep.Problem.Seq != 10 {
		t.Fatalf("verify after the restart: %+v (want the gap after seq 10 reported)", rep.Problem)
	}
}

// A log and head replaced between runs by another user's files that anyone may write: the
// journal must not append acknowledged events to them.
func TestJournalRefusesLogFilesOthersCanWrite(t *testing.T) {
	needRootOrCI(t, "chown of the log files to another user")
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, dir, log string)
		want   string
	}{
		{"log owned by another user", func(t *testing.T, dir, log string) { os.Chown(log, 65534, 65534) }, "belongs to uid 65534"},
		{"head writable by others", func(t *testing.T, dir, log string) { os.Chmod(HeadName(log), 0o666) }, "chmod go-w"},
		{"directory writable by others", func(t *testing.T, dir, log string) { os.Chmod(dir, 0o777) }, "log directory"},
		{"directory of another user", func(t *testing.T, dir, log string) { os.Chown(dir, 65534, 65534) }, "log directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			j := openTestJournal(t, dir, nil)
			appendEvents(t, j, 3)
			log := j.opts.Log
			j.close()
			tc.change(t, dir, log)
			_, err := OpenJournal(JournalOptions{Log: log, Logf: t.Logf})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("start: %v, want a refusal saying %q", err, tc.want)
			}
		})
	}
}

// A failed fsync of the log's directory at start: the new log's name may not survive a
// power loss, so nothing may be acknowledged in it. strace fails every fsync of the
// directory (-P selects it) in a copy of this test run as a child.
func TestJournalStartFailsWhenItsDirectoryCannotBeSynced(t *testing.T) {
	if d := os.Getenv("AVP_TEST_DIRFSYNC"); d != "" {
		j, err := OpenJournal(JournalOptions{Log: d + "/audit.jsonl", Logf: t.Logf})
		if err != nil {
			t.Logf("CHILD: refused: %v", err)
			return
		}
		appendEvents(t, j, 3)
		j.close()
		t.Logf("CHILD: started and committed seq %d", j.seq)
		return
	}
	strace := needStrace(t)
	dir := shortDir(t)
	if _, _, err := LoadOrCreateKey(dir + "/journal.key"); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(strace, "-f", "-qq", "-P", dir, "-e", "trace=fsync", "-e", "inject=fsync:error=EIO",
		os.Args[0], "-test.run=^TestJournalStartFailsWhenItsDirectoryCannotBeSynced$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "AVP_TEST_DIRFSYNC="+dir)
	out, _ := cmd.CombinedOutput()
	if !strings.Contains(string(out), "(INJECTED)") {
		t.Fatalf("strace injected nothing:\n%s", out)
	}
	if strings.Contains(string(out), "CHILD: started") || !strings.Contains(string(out), "CHILD: refused: sync log directory") {
		t.Fatalf("the journal started although the fsync of its directory failed:\n%s", out)
	}
}

// fsyncgate: after a failed writeback Linux marks the pages clean and keeps them, so a
// restarted journal reads lines that never reached the disk as if they had, and no later
// fdatasync writes them: events it acknowledges after them would sit behind zeros once the
// page cache is dropped. The restart must write the lines after the head's again and sync
// them before it acknowledges anything, and refuse to start if that sync fails. The state
// is built as a failed batch leaves it (its lines in the file, the head before them); strace
// shows the write and the sync, then fails the sync in a second run.
func TestRestartMakesTheUnacknowledgedTailDurable(t *testing.T) {
	if log := os.Getenv("AVP_TEST_RESYNC"); log != "" {
		j, err := OpenJournal(JournalOptions{Log: log, Logf: t.Logf})
		if err != nil {
			t.Logf("CHILD: refused: %v", err)
			return
		}
		j.close()
		t.Logf("CHILD: started at seq %d", j.StartSeq)
		return
	}
	strace := needStrace(t)
	dir := shortDir(t)
	j := openTestJournal(t, dir, nil)
	appendEvents(t, j, 5) // acknowledged: seq 2..6
	log := j.opts.Log
	headBefore, _ := os.ReadFile(HeadName(log))
	st, _ := os.Stat(log)
	ackedEnd := st.Size()
	appendEvents(t, j, 3) // the failed batch: seq 7..9, never acknowledged
	j.close()
	os.WriteFile(HeadName(log), headBefore, 0o640)
	st, _ = os.Stat(log)
	tail := st.Size() - ackedEnd
	failedState, _ := os.ReadFile(log)

	child := func(inject ...string) string {
		args := append([]string{"-f", "-qq", "-P", log, "-e", "trace=pwrite64,write,fdatasync"}, inject...)
		args = append(args, os.Args[0], "-test.run=^TestRestartMakesTheUnacknowledgedTailDurable$", "-test.v", "-test.count=1")
		cmd := exec.Command(strace, args...)
		cmd.Env = append(os.Environ(), "AVP_TEST_RESYNC="+log)
		out, _ := cmd.CombinedOutput()
		return string(out)
	}
	out := child()
	rewrite := strings.Index(out, fmt.Sprintf(", %d, %d) = %d", tail, ackedEnd, tail))
	sync := strings.Index(out[max(rewrite, 0):], "fdatasync(")
	start := strings.Index(out, `write(`) // the journal_start line, seq 10
	if rewrite < 0 || sync < 0 || start < rewrite+sync || !strings.Contains(out, "CHILD: started at seq 10") {
		t.Fatalf("the restart did not write the %d unacknowledged bytes at offset %d again and sync them before its journal_start:\n%s", tail, ackedEnd, out)
	}
	// The same state again, and this time the disk still fails.
	os.WriteFile(log, failedState, 0o640)
	os.WriteFile(HeadName(log), headBefore, 0o640)
	size := func() int64 { st, _ := os.Stat(log); return st.Size() }
	before := size()
	out = child("-e", "inject=fdatasync:error=EIO:when=1")
	if !strings.Contains(out, "CHILD: refused: ") || !strings.Contains(out, "unacknowledged tail") || size() != before {
		t.Fatalf("the restart went on although the unacknowledged tail could not be synced (log %d -> %d bytes):\n%s", before, size(), out)
	}
}

// Damage to the first line of the live file (acknowledged) was taken for a torn tail: with
// no valid line before it the head's seq became the resume point, so the "head beyond the
// valid lines" rule never fired. The bad line says which seq it is, and the head covers it.
func TestRecoveryRefusesDamageToTheFirstAcknowledgedLine(t *testing.T) {
	for _, rotated := range []bool{false, true} {
		dir := shortDir(t)
		j := openTestJournal(t, dir, nil)
		appendEvents(t, j, 5) // seq 2..6
		if rotated {
			if err := j.rotate(); err != nil {
				t.Fatal(err)
			}
			appendEvents(t, j, 5) // seq 7..11, the live file's first line is seq 7
		}
		log := j.opts.Log
		j.close()
		data, _ := os.ReadFile(log)
		i := bytes.Index(data, []byte(`"ts":"2`)) // the first line's time: 2xxx -> 3xxx
		data[i+6] = '3'
		os.WriteFile(log, data, 0o640)
		if _, err := OpenJournal(JournalOptions{Log: log, Logf: t.Logf}); err == nil || !strings.Contains(err.Error(), "acknowledged") {
			m, _ := filepath.Glob(log + ".torn-*")
			t.Fatalf("rotated=%v: start on a log whose first, acknowledged line is damaged: %v (moved aside: %v)", rotated, err, m)
		}
	}
}

// The hand-run avpd's in-process log sits where the journal's log goes by default; a
// journal started on it said "restore the key", which no operator has. It says what the
// file is and how to move it aside.
func TestJournalNamesAnInProcessLogInItsPlace(t *testing.T) {
	dir := shortDir(t)
	log := filepath.Join(dir, "audit.jsonl")
	w, err := OpenFile(log)
	if err != nil {
		t.Fatal(err)
	}
	w.Record(context.Background(), Event{Type: TypeProxyStart, Detail: "avpd started"})
	w.Close()
	_, err = OpenJournal(JournalOptions{Log: log, Logf: t.Logf})
	if err == nil || !strings.Contains(err.Error(), "in-process audit log") || !strings.Contains(err.Error(), "mv "+log) {
		t.Fatalf("journal on an in-process log: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "journal.key")); err == nil {
		t.Fatal("a key was left behind")
	}
}

package audit

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// BenchmarkJournal measures acknowledged events per second through the real path (client,
// seqpacket socket, journal, write, fdatasync, ack) on the real disk, with 1, 16 and 64
// concurrent writers, for group commit and for an fsync-per-event baseline (MaxBatch 1) in
// the same run. `make bench-journal` prints the ratio. AVP_BENCH_DIR picks the disk
// (default: the temporary directory).
func BenchmarkJournal(b *testing.B) {
	for _, mode := range []struct {
		name     string
		maxBatch int
	}{{"fsync-per-event", 1}, {"group-commit", 0}} {
		for _, writers := range []int{1, 16, 64} {
			b.Run(fmt.Sprintf("%s/writers=%d", mode.name, writers), func(b *testing.B) {
				benchJournal(b, mode.maxBatch, writers)
			})
		}
	}
}

func benchJournal(b *testing.B, maxBatch, writers int) {
	dir := os.Getenv("AVP_BENCH_DIR")
	if dir == "" {
		dir = shortDir(b)
	} else {
		d, err := os.MkdirTemp(dir, "avpj")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(d) })
		dir = d
	}
	j := openTestJournal(b, dir, func(o *JournalOptions) { o.MaxBatch = maxBatch; o.Logf = nil })
	sock, stop := serveJournal(b, j, dir)
	// Like avpd: one client (one connection) shared by every concurrent request.
	c := NewJournalClient(sock, 10*time.Second)
	defer c.Close()
	if err := c.Record(context.Background(), decisionEvent(0)); err != nil {
		b.Fatal(err)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Int64
	b.ResetTimer()
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := next.Add(1); n <= int64(b.N); n = next.Add(1) {
				if err := c.Record(context.Background(), decisionEvent(int(n))); err != nil {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if failed.Load() > 0 {
		b.Fatalf("%d events failed", failed.Load())
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	if err := stop(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkRoundTrip measures one Record through the real path (client, seqpacket socket,
// journal, write, fdatasync, ack) as latency per event: one client calling Record
// sequentially, and 32 goroutines sharing one client as avpd's requests do. The log is on
// tmpfs (/dev/shm, where fdatasync is nearly free, so the cost is the hand-offs between
// goroutines and processes' sockets) and on disk (/var/tmp). A file system whose directory
// does not exist is skipped.
func BenchmarkRoundTrip(b *testing.B) {
	for _, fs := range []struct{ name, dir string }{{"tmpfs", "/dev/shm"}, {"disk", "/var/tmp"}} {
		for _, goroutines := range []int{1, 32} {
			b.Run(fmt.Sprintf("fs=%s/goroutines=%d", fs.name, goroutines), func(b *testing.B) {
				benchRoundTrip(b, fs.dir, goroutines)
			})
		}
	}
}

func benchRoundTrip(b *testing.B, base string, goroutines int) {
	if st, err := os.Stat(base); err != nil || !st.IsDir() {
		b.Skipf("%s: not a directory", base)
	}
	dir, err := os.MkdirTemp(base, "avpj")
	if err != nil {
		b.Skip(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	j := openTestJournal(b, dir, func(o *JournalOptions) { o.Logf = nil })
	sock, stop := serveJournal(b, j, dir)
	c := NewJournalClient(sock, 10*time.Second)
	defer c.Close()
	ev := decisionEvent(1)
	if err := c.Record(context.Background(), ev); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	if goroutines == 1 {
		for b.Loop() {
			if err := c.Record(context.Background(), ev); err != nil {
				b.Fatal(err)
			}
		}
	} else {
		var next atomic.Int64
		var failed atomic.Int64
		var wg sync.WaitGroup
		for range goroutines {
			wg.Go(func() {
				for n := next.Add(1); n <= int64(b.N); n = next.Add(1) {
					if err := c.Record(context.Background(), ev); err != nil {
						failed.Add(1)
					}
				}
			})
		}
		wg.Wait()
		if failed.Load() > 0 {
			b.Fatalf("%d events failed", failed.Load())
		}
	}
	b.StopTimer()
	if err := stop(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkRoundTripProcess is BenchmarkRoundTrip with the journal in a child process, as in
// production: every hand-off between the two sides wakes a thread of the other process.
func BenchmarkRoundTripProcess(b *testing.B) {
	for _, fs := range []struct{ name, dir string }{{"tmpfs", "/dev/shm"}, {"disk", "/var/tmp"}} {
		for _, goroutines := range []int{1, 32} {
			b.Run(fmt.Sprintf("fs=%s/goroutines=%d", fs.name, goroutines), func(b *testing.B) {
				benchRoundTripProcess(b, fs.dir, goroutines)
			})
		}
	}
}

// journalChildEnv names the directory TestJournalChildProcess serves a journal in.
const journalChildEnv = "AVP_TEST_JOURNAL_CHILD"

// TestJournalChildProcess is BenchmarkRoundTripProcess's journal: the test binary runs it in a
// child process; on its own it skips.
func TestJournalChildProcess(t *testing.T) {
	dir := os.Getenv(journalChildEnv)
	if dir == "" {
		t.Skip("only in BenchmarkRoundTripProcess's child process")
	}
	j, err := OpenJournal(JournalOptions{Log: filepath.Join(dir, "audit.jsonl")})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := ListenJournal(filepath.Join(dir, "j.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Serve(context.Background(), ln); err != nil {
		t.Fatal(err)
	}
}

func benchRoundTripProcess(b *testing.B, base string, goroutines int) {
	if st, err := os.Stat(base); err != nil || !st.IsDir() {
		b.Skipf("%s: not a directory", base)
	}
	dir, err := os.MkdirTemp(base, "avpj")
	if err != nil {
		b.Skip(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	cmd := exec.Command(os.Args[0], "-test.run", "^TestJournalChildProcess$")
	cmd.Env = append(os.Environ(), journalChildEnv+"="+dir)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sock := filepath.Join(dir, "j.sock")
	c := NewJournalClient(sock, 10*time.Second)
	defer c.Close()
	ev := decisionEvent(1)
	// The first Record dials until the child listens.
	if err := c.Record(context.Background(), ev); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	for range goroutines {
		wg.Go(func() {
			for n := next.Add(1); n <= int64(b.N); n = next.Add(1) {
				if err := c.Record(context.Background(), ev); err != nil {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	if failed.Load() > 0 {
		b.Fatalf("%d events failed", failed.Load())
	}
}

package rawconn

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// WriteFile appends to an O_APPEND file and writes in place at an offset, with raw calls
// and (with one P) with syscall's; Fdatasync succeeds on an open file and fails on a
// closed one.
func TestWriteFileAndFdatasync(t *testing.T) {
	for _, procs := range []int{runtime.GOMAXPROCS(0), 1} {
		prev := runtime.GOMAXPROCS(procs)
		path := filepath.Join(t.TempDir(), "log")
		f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		big := strings.Repeat("y", 1<<20)
		for _, s := range []string{"one\n", "two\n", big} {
			if n, err := WriteFile(f, []byte(s), -1); err != nil || n != len(s) {
				t.Fatalf("append %d bytes: %d %v", len(s), n, err)
			}
		}
		if err := Fdatasync(f); err != nil {
			t.Fatal(err)
		}
		h, err := os.OpenFile(path+".head", os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []string{"aaaa", "bb"} {
			if n, err := WriteFile(h, []byte(s), 0); err != nil || n != len(s) {
				t.Fatalf("pwrite: %d %v", n, err)
			}
		}
		got, _ := os.ReadFile(path)
		head, _ := os.ReadFile(path + ".head")
		if string(got) != "one\ntwo\n"+big || string(head) != "bbaa" {
			t.Fatalf("GOMAXPROCS %d: log %d bytes, head %q", procs, len(got), head)
		}
		f.Close()
		h.Close()
		if err := Fdatasync(f); err == nil {
			t.Fatalf("fdatasync of a closed file: %v", err)
		}
		if _, err := WriteFile(f, []byte("x"), -1); err == nil {
			t.Fatalf("write to a closed file: %v", err)
		}
		runtime.GOMAXPROCS(prev)
	}
}

package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

type countingBackend struct {
	calls atomic.Int32
	delay time.Duration
	fail  atomic.Bool
	value string
}

func (b *countingBackend) Fetch(ctx context.Context, name string) ([]byte, error) {
	b.calls.Add(1)
	time.Sleep(b.delay)
	if b.fail.Load() {
		return nil, errors.New("backend down")
	}
	return []byte(b.value), nil
}

func TestCacheSingleflight(t *testing.T) {
	b := &countingBackend{delay: 50 * time.Millisecond, value: "real-value"}
	c := NewCache(b, time.Minute)
	var wg sync.WaitGroup
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := c.Get(context.Background(), "K")
			if err != nil || string(v) != "real-value" {
				t.Errorf("Get = %q, %v", v, err)
			}
		}()
	}
	wg.Wait()
	if n := b.calls.Load(); n != 1 {
		t.Fatalf("64 concurrent misses made %d fetches, want 1", n)
	}
}

func TestCacheFailuresAreNotCached(t *testing.T) {
	b := &countingBackend{value: "v"}
	b.fail.Store(true)
	c := NewCache(b, time.Minute)
	if _, err := c.Get(context.Background(), "K"); err == nil {
		t.Fatal("want error")
	}
	b.fail.Store(false)
	if v, err := c.Get(context.Background(), "K"); err != nil || string(v) != "v" {
		t.Fatalf("after recovery Get = %q, %v", v, err)
	}
	if n := b.calls.Load(); n != 2 {
		t.Fatalf("calls = %d, want 2", n)
	}
}

func TestCacheTTLAndFlush(t *testing.T) {
	b := &countingBackend{value: "v1"}
	c := NewCache(b, time.Minute)
	now := time.Unix(1000, 0)
	c.now = func() time.Time { return now }
	c.Get(context.Background(), "K")
	c.Get(context.Background(), "K")
	if b.calls.Load() != 1 {
		t.Fatalf("hit refetched")
	}
	now = now.Add(61 * time.Second)
	b.value = "v2"
	if v, _ := c.Get(context.Background(), "K"); string(v) != "v2" {
		t.Fatalf("after TTL got %q", v)
	}
	b.value = "v3"
	c.Flush("K")
	if v, _ := c.Get(context.Background(), "K"); string(v) != "v3" {
		t.Fatalf("after flush got %q", v)
	}
}

func TestCallerCopyIsIndependent(t *testing.T) {
	c := NewCache(&countingBackend{value: "secret"}, time.Minute)
	v, _ := c.Get(context.Background(), "K")
	Wipe(v)
	if v2, _ := c.Get(context.Background(), "K"); string(v2) != "secret" {
		t.Fatalf("wiping a caller copy changed the cache: %q", v2)
	}
}

func writeFile(t *testing.T, mode os.FileMode, body string) string {
	p := filepath.Join(t.TempDir(), "secrets.yaml")
	if err := os.WriteFile(p, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
	os.Chmod(p, mode)
	return p
}

func TestFileBackend(t *testing.T) {
	p := writeFile(t, 0o600, "OPENAI: sk-real-1234\nOTHER: x\n")
	b, err := NewFileBackend(p)
	if err != nil {
		t.Fatal(err)
	}
	v, err := b.Fetch(context.Background(), "OPENAI")
	if err != nil || string(v) != "sk-real-1234" {
		t.Fatalf("Fetch = %q, %v", v, err)
	}
	if _, err := b.Fetch(context.Background(), "MISSING"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing: %v", err)
	}
}

func TestFileBackendRefusesReadableFile(t *testing.T) {
	p := writeFile(t, 0o644, "OPENAI: sk-real-1234\n")
	_, err := NewFileBackend(p)
	if err == nil || !strings.Contains(err.Error(), "chmod 600 "+p) {
		t.Fatalf("err = %v, want a chmod hint", err)
	}
}

func TestFileBackendErrorsNeverQuoteValues(t *testing.T) {
	p := writeFile(t, 0o600, "OPENAI: [sk-real-1234\n")
	_, err := NewFileBackend(p)
	if err == nil || strings.Contains(err.Error(), "sk-real") {
		t.Fatalf("err = %v", err)
	}
}

// A name given twice would have its last value win silently; the file is refused, naming
// the line, and no value is quoted.
func TestFileBackendRefusesADuplicateName(t *testing.T) {
	p := writeFile(t, 0o600, "OPENAI: sk-real-1234\nOTHER: x\nOPENAI: sk-real-5678\n")
	_, err := NewFileBackend(p)
	if err == nil || !strings.Contains(err.Error(), p+":3: OPENAI is given twice") || strings.Contains(err.Error(), "sk-real") {
		t.Fatalf("err = %v", err)
	}
}

// Check reads the file as a fetch does and lists its names; a mode loosened since the start
// is an error.
func TestFileBackendCheck(t *testing.T) {
	p := writeFile(t, 0o600, "OPENAI: sk-real-1234\nOTHER: x\n")
	b, err := NewFileBackend(p)
	if err != nil {
		t.Fatal(err)
	}
	names, err := b.Check()
	if slices.Sort(names); err != nil || strings.Join(names, ",") != "OPENAI,OTHER" {
		t.Fatalf("names %v, %v", names, err)
	}
	os.Chmod(p, 0o644)
	if _, err := b.Check(); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("a readable file: %v", err)
	}
}

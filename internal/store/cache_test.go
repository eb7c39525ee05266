package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

type mapBackend struct {
	mu     sync.Mutex
	values map[string]string
	delay  time.Duration
}

func (b *mapBackend) Fetch(ctx context.Context, name string) ([]byte, error) {
	time.Sleep(b.delay)
	b.mu.Lock()
	defer b.mu.Unlock()
	v, ok := b.values[name]
	if !ok {
		return nil, ErrNotFound
	}
	return []byte(v), nil
}

func TestCacheJitterNeverExceedsTTL(t *testing.T) {
	b := &mapBackend{values: map[string]string{}}
	for i := range 200 {
		b.values[fmt.Sprint(i)] = "v"
	}
	ttl := time.Minute
	c := NewCacheWithOptions(b, CacheOptions{TTL: ttl, Jitter: 0.1})
	now := time.Unix(1000, 0)
	c.now = func() time.Time { return now }
	seen := map[time.Time]bool{}
	for i := range 200 {
		c.Get(context.Background(), fmt.Sprint(i))
	}
	c.mu.Lock()
	for _, e := range c.entries {
		life := e.expires.Sub(now)
		if life > ttl || life < ttl-ttl/10 {
			t.Errorf("an entry lives %v with ttl %v and 10%% jitter", life, ttl)
		}
		seen[e.expires] = true
	}
	c.mu.Unlock()
	if len(seen) < 150 {
		t.Fatalf("only %d distinct expiry times for 200 entries: no jitter", len(seen))
	}
	c.Flush("")
}

func TestCacheMaxEntriesEvictsClosestToExpiry(t *testing.T) {
	b := &mapBackend{values: map[string]string{"A": "a", "B": "b", "C": "c"}}
	c := NewCacheWithOptions(b, CacheOptions{TTL: time.Minute, MaxEntries: 2})
	now := time.Unix(1000, 0)
	c.now = func() time.Time { return now }
	for _, n := range []string{"A", "B", "C"} {
		if _, err := c.Get(context.Background(), n); err != nil {
			t.Fatal(err)
		}
		now = now.Add(time.Second)
	}
	c.mu.Lock()
	_, hasA := c.entries["A"]
	c.mu.Unlock()
	if c.Len() != 2 || hasA {
		t.Fatalf("len %d, A cached %v: want 2 entries without the oldest", c.Len(), hasA)
	}
	c.Flush("")
}

func TestCacheExpiredValueIsWipedWithoutARequest(t *testing.T) {
	b := &mapBackend{values: map[string]string{"K": "secret-value"}}
	c := NewCacheWithOptions(b, CacheOptions{TTL: 50 * time.Millisecond})
	c.Get(context.Background(), "K")
	c.mu.Lock()
	held := c.entries["K"].value
	c.mu.Unlock()
	time.Sleep(150 * time.Millisecond)
	if c.Len() != 0 {
		t.Fatal("an expired entry is still cached")
	}
	if strings.Trim(string(held), "\x00") != "" {
		t.Fatalf("the expired value was not overwritten: %q", held)
	}
}

func TestCacheFlushDuringFetchStoresNothing(t *testing.T) {
	b := &mapBackend{values: map[string]string{"K": "old"}, delay: 100 * time.Millisecond}
	c := NewCache(b, time.Minute)
	done := make(chan []byte)
	go func() { v, _ := c.Get(context.Background(), "K"); done <- v }()
	time.Sleep(30 * time.Millisecond)
	if n := c.Flush("K"); n != 0 {
		t.Fatalf("flushed %d, nothing was cached yet", n)
	}
	if v := <-done; string(v) != "old" {
		t.Fatalf("the waiting caller got %q", v)
	}
	if c.Len() != 0 {
		t.Fatal("a fetch that started before a flush stored its value")
	}
	c.Get(context.Background(), "K")
	if n := c.Flush(""); n != 1 {
		t.Fatalf("Flush(\"\") = %d, want 1", n)
	}
}

func TestCacheLockMemory(t *testing.T) {
	b := &mapBackend{values: map[string]string{"K": "locked-value", "L": "unlocked-value"}}
	c := NewCacheWithOptions(b, CacheOptions{TTL: time.Minute, LockMemory: true})
	if v, err := c.Get(context.Background(), "K"); err != nil || string(v) != "locked-value" {
		t.Fatalf("Get = %q, %v", v, err)
	}
	st := c.Stats()
	if st.Locked != 1 || st.LockedBytes < pageSize || st.Unlocked != 0 {
		t.Fatalf("stats after one locked value: %+v", st)
	}

	orig := mlockFn
	mlockFn = func([]byte) error { return errors.New("cannot allocate memory") }
	defer func() { mlockFn = orig }()
	if v, err := c.Get(context.Background(), "L"); err != nil || string(v) != "unlocked-value" {
		t.Fatalf("Get without mlock = %q, %v", v, err)
	}
	st = c.Stats()
	if st.Locked != 1 || st.Unlocked != 1 || !strings.Contains(st.LockError, "RLIMIT_MEMLOCK") {
		t.Fatalf("an unlocked value must be reported: %+v", st)
	}
	c.Flush("")
	if st := c.Stats(); st.Locked != 0 || st.Unlocked != 0 || st.LockError != "" {
		t.Fatalf("stats after flush: %+v", st)
	}
}

func TestNoCoreDumps(t *testing.T) {
	if err := NoCoreDumps(); err != nil {
		t.Fatal(err)
	}
	h := CurrentHygiene()
	if h.Dumpable || h.CoreLimit != 0 {
		t.Fatalf("after NoCoreDumps: %+v", h)
	}
}

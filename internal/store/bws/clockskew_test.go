package bws_test

import (
	"context"
	"sync"
	"testing"
	"time"
)

// BWS compares lastSyncedDate with revision dates stamped by its own clock. With BWS's clock
// 5 s behind avpd's (the fake stamps its dates 5 s back; the host clock is not touched), a
// lastSyncedDate taken from avpd's clock is in BWS's future: every sync says nothing changed
// and a rotated value stays cached for the whole TTL instead of about one sync_interval (I8).
func TestSyncSeesRotationWhenBWSClockIsBehind(t *testing.T) {
	for _, skew := range []time.Duration{-5 * time.Second, 0, 5 * time.Second} {
		t.Run(skew.String(), func(t *testing.T) {
			f := newFixture(t)
			f.fake.SetClock(skew)
			f.fake.Put("A", "a-value-1-xxxxxxxx")
			b := f.backend()
			if err := b.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			if v, err := b.Fetch(context.Background(), "A"); err != nil || string(v) != "a-value-1-xxxxxxxx" {
				t.Fatalf("fetch: %q %v", v, err)
			}
			var mu sync.Mutex
			var evicted []string
			evict := func(n string) { mu.Lock(); evicted = append(evicted, n); mu.Unlock() }
			b.SyncOnce(context.Background(), evict) // the first sync
			time.Sleep(1100 * time.Millisecond)
			b.SyncOnce(context.Background(), evict) // a quiet one
			mu.Lock()
			if len(evicted) != 0 {
				t.Fatalf("syncs without a change evicted %v", evicted)
			}
			mu.Unlock()
			f.fake.Put("A", "a-value-2-yyyyyyyy") // rotated
			time.Sleep(1100 * time.Millisecond)   // one sync_interval (1s in this fixture)
			b.SyncOnce(context.Background(), evict)
			mu.Lock()
			defer mu.Unlock()
			if len(evicted) != 1 || evicted[0] != "A" {
				t.Fatalf("I8: A was rotated in BWS (clock %v from avpd's) but the next sync evicted %v: the old value stays cached for the whole TTL; health=%+v", skew, evicted, b.Health(nil))
			}
			if v, err := b.Fetch(context.Background(), "A"); err != nil || string(v) != "a-value-2-yyyyyyyy" {
				t.Fatalf("after the eviction: %v", err)
			}
		})
	}
}

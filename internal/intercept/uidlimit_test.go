package intercept

import (
	"testing"
	"time"
)

func TestUIDLimit(t *testing.T) {
	l := newUIDLimit(2)
	if !l.acquire(1000) || !l.acquire(1000) {
		t.Fatal("the first two connections of a user were refused")
	}
	if l.acquire(1000) {
		t.Fatal("a third connection was let in with a limit of 2")
	}
	if !l.acquire(1001) || !l.acquire(-1) {
		t.Fatal("another user, or an unknown one, was held to the first user's count")
	}
	l.release(1000)
	if !l.acquire(1000) {
		t.Fatal("a closed connection did not make room")
	}
	l.release(1000)
	l.release(1000)
	if _, ok := l.open[1000]; ok {
		t.Fatalf("a user with no connections left stays in the map: %v", l.open)
	}

	now := time.Unix(1000, 0)
	if n, ok := l.refused(now); !ok || n != 1 {
		t.Fatalf("first refusal: %d %v, want a log line for 1", n, ok)
	}
	for i := 0; i < 5; i++ {
		if _, ok := l.refused(now.Add(time.Second)); ok {
			t.Fatal("logged again within 10 s")
		}
	}
	if n, ok := l.refused(now.Add(11 * time.Second)); !ok || n != 6 {
		t.Fatalf("after 10 s: %d %v, want a log line for the 6 since the last", n, ok)
	}
}

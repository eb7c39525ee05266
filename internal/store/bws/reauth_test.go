package bws_test

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bwsfake"
)

// The README says the token file is re-read at each login, so replacing it changes the token
// without a restart. When BWS revokes the running session (every call 401), avpd must drop
// it, say so in status (not "ready"), and log in again with the file re-read, so the
// operator's new token is used.
func TestRevokedTokenReplacedInFileIsUsed(t *testing.T) {
	f := newFixture(t)
	f.fake.Put("A", "a-value-aaaaaaaa")
	f.fake.Put("B", "b-value-bbbbbbbb")
	b := f.backend()
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Fetch(context.Background(), "A"); err != nil {
		t.Fatal(err)
	}
	// The machine account's token is revoked; the operator issues a new one.
	old := f.token
	f.fake.Revoke(old)
	tok2 := f.fake.NewToken()
	_, err := b.Fetch(context.Background(), "B")
	if err == nil || !strings.Contains(err.Error(), "HTTP 401") {
		t.Fatalf("fetch after the revocation: %v, want a 401", err)
	}
	// Until a login works again, status must not say ready.
	waitFor(t, 5*time.Second, "status to say unauthorized", func() bool {
		b.Fetch(context.Background(), "B")
		return b.Health(nil).State == "unauthorized"
	})
	if h := b.Health(nil); !strings.Contains(h.Error, "401") {
		t.Fatalf("health while unauthorized: %+v", h)
	} else {
		t.Logf("status while unauthorized: %s: %s", h.State, h.Error)
	}
	f.writeToken(tok2, 0o600)
	waitFor(t, 10*time.Second, "a fetch with the new token", func() bool {
		v, err := b.Fetch(context.Background(), "B")
		return err == nil && string(v) == "b-value-bbbbbbbb"
	})
	if h := b.Health(nil); h.State != "ready" || h.Error != "" {
		t.Fatalf("health after the new token worked: %+v", h)
	}
	for _, tok := range []string{old, tok2} {
		f.token = tok
		f.assertClean("log", f.log.String(), "a-value-aaaaaaaa", "b-value-bbbbbbbb")
		f.assertClean("status", b.Health(nil).Error)
	}
}

// When every new session is refused too (the identity server still accepts the token but
// the API does not), logins back off as failed logins do instead of one per request.
func TestRefusedSessionsBackOff(t *testing.T) {
	var refuse atomic.Bool
	f := newWrappedFixture(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if refuse.Load() && strings.HasPrefix(r.URL.Path, "/api/") {
				w.WriteHeader(http.StatusForbidden)
				return
			}
			h.ServeHTTP(w, r)
		})
	})
	f.fake.Put("A", "a-value-aaaaaaaa")
	b := f.backend() // RetryBackoff 100ms
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	refuse.Store(true)
	before := f.fake.Count(bwsfake.CountLogin)
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		b.Fetch(context.Background(), "A")
	}
	// 100ms doubling: about 5 logins in 3 s; without the backoff one every 100 ms.
	if n := f.fake.Count(bwsfake.CountLogin) - before; n < 1 || n > 7 {
		t.Fatalf("%d logins in 3 s of refused sessions, want 1..7", n)
	}
	if h := b.Health(nil); h.State != "unauthorized" || !strings.Contains(h.Error, "403") {
		t.Fatalf("health: %+v", h)
	}
	refuse.Store(false)
	waitFor(t, 10*time.Second, "a fetch once BWS accepts the session", func() bool {
		v, err := b.Fetch(context.Background(), "A")
		return err == nil && string(v) == "a-value-aaaaaaaa"
	})
	if h := b.Health(nil); h.State != "ready" {
		t.Fatalf("health: %+v", h)
	}
}

// A token replaced in the file while the old one still works is used from the next sync on,
// so revoking the old one afterwards costs nothing. A replacement that is not a usable token
// keeps the working session.
func TestReplacedTokenFileIsUsedFromTheNextSync(t *testing.T) {
	f := newFixture(t)
	f.fake.Put("A", "a-value-aaaaaaaa")
	f.fake.Put("B", "b-value-bbbbbbbb")
	b := f.backend()
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	evict := func(string) {}
	b.SyncOnce(context.Background(), evict)
	if _, err := b.Fetch(context.Background(), "A"); err != nil {
		t.Fatal(err)
	}

	f.writeToken("not-a-token", 0o600)
	b.SyncOnce(context.Background(), evict)
	if n := f.fake.Count(bwsfake.CountLogin); n != 1 {
		t.Fatalf("a malformed replacement made %d logins, want the session kept", n)
	}
	if _, err := b.Fetch(context.Background(), "A"); err != nil || b.Health(nil).State != "ready" {
		t.Fatalf("after a malformed replacement: %v, %+v", err, b.Health(nil))
	}
	if !strings.Contains(f.log.String(), "changed but cannot be used") || strings.Contains(f.log.String(), "not-a-token") {
		t.Fatalf("log:\n%s", f.log)
	}

	old := f.token
	tok2 := f.fake.NewToken()
	f.writeToken(tok2, 0o600)
	b.SyncOnce(context.Background(), evict)
	if n := f.fake.Count(bwsfake.CountLogin); n != 2 {
		t.Fatalf("after the token file was replaced, %d logins, want 2", n)
	}
	f.fake.Revoke(old)
	if v, err := b.Fetch(context.Background(), "B"); err != nil || string(v) != "b-value-bbbbbbbb" {
		t.Fatalf("with the old token revoked after the switch: %v", err)
	}
	waitFor(t, 5*time.Second, "the old helper to be retired", func() bool { return b.Health(nil).HelperKills == 1 })
	if h := b.Health(nil); h.State != "ready" {
		t.Fatalf("health: %+v", h)
	}
	for _, tok := range []string{old, tok2} {
		f.token = tok
		f.assertClean("log", f.log.String(), "a-value-aaaaaaaa", "b-value-bbbbbbbb")
	}
}

package bws_test

// Rotation (I8) under timing that a plain fake never shows: a slow Get overlapping a sync,
// and a BWS whose clock is behind avpd's.

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bws"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bwsfake"
)

// newWrappedFixture is newFixture with a handler in front of the fake.
func newWrappedFixture(t *testing.T, wrap func(http.Handler) http.Handler) *fixture {
	t.Helper()
	f := &fixture{t: t, fake: bwsfake.New(), log: &logBuf{}}
	tl, err := bwsfake.NewTLS()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: wrap(f.fake), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(tls.NewListener(ln, tl.Config))
	t.Cleanup(func() { f.fake.Close(); srv.Close() })
	f.api, f.idp = bwsfake.URLs(bwsfake.BaseURL("https", ln.Addr()))
	dir := t.TempDir()
	ca := filepath.Join(dir, "bws-ca.pem")
	os.WriteFile(ca, tl.CAPEM, 0o644)
	f.token = f.fake.NewToken()
	f.tokFile = filepath.Join(dir, "token")
	f.writeToken(f.token, 0o600)
	for _, kv := range bws.HelperEnv(os.Environ()) {
		k, _, _ := strings.Cut(kv, "=")
		if strings.Contains(strings.ToLower(k), "proxy") {
			continue
		}
		f.env = append(f.env, kv)
	}
	f.env = append(f.env, helperEnvVar+"=1", "SSL_CERT_FILE="+ca, "NO_PROXY=127.0.0.1,localhost")
	return f
}

// recorder buffers a whole answer of the fake so a wrapper can hold or inspect it.
type recorder struct {
	h    http.Header
	code int
	body bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.h }
func (r *recorder) WriteHeader(c int) {
	if r.code == 0 {
		r.code = c
	}
}
func (r *recorder) Write(p []byte) (int, error) {
	if r.code == 0 {
		r.code = 200
	}
	return r.body.Write(p)
}

func (r *recorder) replay(w http.ResponseWriter) {
	for k, v := range r.h {
		w.Header()[k] = v
	}
	w.WriteHeader(r.code)
	w.Write(r.body.Bytes())
}

// A Get that BWS answered just before a rotation, but whose answer arrives late (a slow BWS,
// within the timeout), overlaps a sync that already lists the new revision. The sync cannot
// evict what is not cached yet; the late answer must not then be cached as current, or the
// old value stays for the whole TTL once later syncs report no change.
func TestSyncDuringSlowGetDoesNotLoseRotation(t *testing.T) {
	var mu sync.Mutex
	delayGet := time.Duration(0)
	f := newWrappedFixture(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			d := delayGet
			mu.Unlock()
			isGet := r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/api/secrets/")
			if d == 0 || !isGet {
				h.ServeHTTP(w, r)
				return
			}
			rec := &recorder{h: http.Header{}}
			h.ServeHTTP(rec, r) // BWS reads the value now...
			time.Sleep(d)       // ...and the answer arrives later
			rec.replay(w)
		})
	})
	f.fake.Put("A", "a-value-OLD-xxxxxxxx")
	b := f.backend(func(o *bws.Options) { o.Timeout = 10 * time.Second })
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	c := store.NewCache(b, time.Hour)
	evict := func(n string) { c.Flush(n) }
	time.Sleep(2100 * time.Millisecond)
	b.SyncOnce(context.Background(), evict) // a quiet first sync

	mu.Lock()
	delayGet = 3 * time.Second
	mu.Unlock()
	done := make(chan struct{})
	go func() { defer close(done); c.Get(context.Background(), "A") }()
	time.Sleep(300 * time.Millisecond)
	f.fake.Put("A", "a-value-NEW-yyyyyyyy") // rotated after BWS read the old value
	time.Sleep(2300 * time.Millisecond)
	b.SyncOnce(context.Background(), evict) // runs while the Get's answer is on its way
	<-done
	mu.Lock()
	delayGet = 0
	mu.Unlock()
	time.Sleep(1100 * time.Millisecond) // one more sync interval
	b.SyncOnce(context.Background(), evict)
	v, err := c.Get(context.Background(), "A")
	if err != nil {
		t.Fatal(err)
	}
	if string(v) != "a-value-NEW-yyyyyyyy" {
		t.Fatalf("I8: a sync interval after the sync that saw the rotation, the cache still serves the old value (it would for the whole TTL); evictions=%d", b.Health(nil).Evictions)
	}
	f.assertClean("log", f.log.String(), "a-value-OLD-xxxxxxxx", "a-value-NEW-yyyyyyyy")
}

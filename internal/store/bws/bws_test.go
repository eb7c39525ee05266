package bws_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	sdk "github.com/bitwarden/sdk-go"
	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bws"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bws/sdkhelper"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bwsfake"
)

// The test binary is its own helper: started with this variable it runs the real sdk-go
// helper instead of the tests.
const helperEnvVar = "AVP_BWS_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnvVar) == "1" {
		os.Exit(sdkhelper.Main(os.Stderr))
	}
	if os.Getenv(capsChildEnvVar) != "" {
		os.Exit(capsChild())
	}
	os.Exit(m.Run())
}

// fixture is a fake BWS over HTTPS with its own CA, a token file and a log.
type fixture struct {
	t        *testing.T
	fake     *bwsfake.Server
	token    string
	tokFile  string
	env      []string
	api, idp string
	log      *logBuf
}

type logBuf struct {
	mu    sync.Mutex
	lines []string
}

func (l *logBuf) logf(format string, args ...any) {
	l.mu.Lock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
	l.mu.Unlock()
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	return newWrappedFixture(t, func(h http.Handler) http.Handler { return h })
}

func (f *fixture) writeToken(tok string, mode os.FileMode) {
	f.t.Helper()
	if err := os.WriteFile(f.tokFile, []byte(tok+"\n"), mode); err != nil {
		f.t.Fatal(err)
	}
	os.Chmod(f.tokFile, mode)
}

func (f *fixture) options() bws.Options {
	return bws.Options{
		OrganizationID: f.fake.OrgID, AccessTokenFile: f.tokFile, APIURL: f.api, IdentityURL: f.idp,
		Timeout: 2 * time.Second, SyncInterval: time.Second, MaxInFlight: 8,
		Helper: []string{os.Args[0]}, Env: f.env, RetryBackoff: 100 * time.Millisecond, Logf: f.log.logf,
	}
}

func (f *fixture) backend(mod ...func(*bws.Options)) *bws.Backend {
	f.t.Helper()
	o := f.options()
	for _, m := range mod {
		m(&o)
	}
	b, err := bws.New(o)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { b.Close() })
	return b
}

// secretsOf are the strings that must never appear in an error or a log line.
func (f *fixture) secretsOf(values ...string) []string {
	id, cs, _, _ := bwsfake.ParseToken(f.token)
	_, key, _ := strings.Cut(f.token, ":")
	return append([]string{f.token, cs, key, id, "eyJ"}, values...)
}

func (f *fixture) assertClean(what, text string, values ...string) {
	f.t.Helper()
	for _, s := range f.secretsOf(values...) {
		if strings.Contains(text, s) {
			f.t.Fatalf("%s contains a credential or value (%.6s...):\n%s", what, s, text)
		}
	}
}

// waitFor polls cond for up to d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestFetchThroughRealSDK(t *testing.T) {
	f := newFixture(t)
	f.fake.Put("OPENAI", "sk-real-openai-value")
	f.fake.Put("OTHER", "other-value")
	b := f.backend()
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("start: %v\n%s", err, f.log)
	}
	v, err := b.Fetch(context.Background(), "OPENAI")
	if err != nil || string(v) != "sk-real-openai-value" {
		t.Fatalf("Fetch = %q, %v\n%s", v, err, f.log)
	}
	if _, err := b.Fetch(context.Background(), "NOPE"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("missing name: %v", err)
	}
	if n := f.fake.Count(bwsfake.CountLogin); n != 1 {
		t.Fatalf("logins = %d, want 1", n)
	}
	h := b.Health([]string{"OPENAI", "NOPE"})
	if h.State != "ready" || len(h.Missing) != 1 || h.Missing[0] != "NOPE" {
		t.Fatalf("health = %+v", h)
	}
	f.assertClean("log", f.log.String(), "sk-real-openai-value")
}

func TestRefreshOnMiss(t *testing.T) {
	f := newFixture(t)
	f.fake.Put("A", "a")
	b := f.backend()
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.fake.Put("LATE", "late-value")
	time.Sleep(1100 * time.Millisecond) // past the List rate limit
	v, err := b.Fetch(context.Background(), "LATE")
	if err != nil || string(v) != "late-value" {
		t.Fatalf("a secret created after the first List: %q, %v", v, err)
	}
	if n := f.fake.Count(bwsfake.CountList); n != 2 {
		t.Fatalf("lists = %d, want 2", n)
	}
}

// Acceptance 4: 64 concurrent first requests make one login and one fetch.
func TestConcurrentFirstRequestsOneLoginOneFetch(t *testing.T) {
	f := newFixture(t)
	f.fake.Put("K", "value-k")
	f.fake.SetLatency(100 * time.Millisecond)
	c := store.NewCache(f.backend(), time.Minute)
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := c.Get(context.Background(), "K")
			if err != nil || string(v) != "value-k" {
				t.Errorf("Get = %q, %v", v, err)
			}
		}()
	}
	wg.Wait()
	if l, g := f.fake.Count(bwsfake.CountLogin), f.fake.Count(bwsfake.CountGet); l != 1 || g != 1 {
		t.Fatalf("64 concurrent first requests made %d logins and %d fetches, want 1 and 1", l, g)
	}
}

func TestHungBWSFailsWithinTimeoutAndRecovers(t *testing.T) {
	f := newFixture(t)
	f.fake.Put("A", "a")
	f.fake.Put("B", "b")
	b := f.backend(func(o *bws.Options) { o.Timeout = time.Second })
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.fake.SetAPIFault(bwsfake.Hang)
	start := time.Now()
	_, err := b.Fetch(context.Background(), "A")
	took := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) || took > 1500*time.Millisecond {
		t.Fatalf("hung fetch: %v after %v, want a deadline error within the 1s timeout", err, took)
	}
	// The hung call pins a helper thread; past 2x timeout the helper is replaced.
	waitFor(t, 5*time.Second, "the watchdog to kill the wedged helper", func() bool { return b.Health(nil).HelperKills >= 1 })
	f.fake.SetAPIFault(bwsfake.OK)
	waitFor(t, 5*time.Second, "a fetch to succeed again", func() bool {
		v, err := b.Fetch(context.Background(), "B")
		return err == nil && string(v) == "b"
	})
	if h := b.Health(nil); h.InFlight != 0 {
		t.Fatalf("%d call slots still held after the helper was replaced", h.InFlight)
	}
}

func TestInFlightCallsAreBounded(t *testing.T) {
	f := newFixture(t)
	for _, k := range []string{"A", "B", "C"} {
		f.fake.Put(k, k)
	}
	b := f.backend(func(o *bws.Options) { o.MaxInFlight = 2; o.Timeout = time.Second })
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.fake.SetAPIFault(bwsfake.Hang)
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i, k := range []string{"A", "B"} {
		wg.Add(1)
		go func() { defer wg.Done(); _, errs[i] = b.Fetch(context.Background(), k) }()
	}
	waitFor(t, 2*time.Second, "two calls in flight", func() bool { return b.Health(nil).InFlight == 2 })
	_, errs[2] = b.Fetch(context.Background(), "C")
	wg.Wait()
	if errs[2] == nil || !strings.Contains(errs[2].Error(), "all 2 BWS call slots are busy") {
		t.Fatalf("third call: %v, want it refused for lack of a slot", errs[2])
	}
}

// A malformed identity response makes the SDK abort its process. Only the helper dies.
func TestHelperAbortOnlyFailsItsCalls(t *testing.T) {
	f := newFixture(t)
	f.fake.Put("A", "a-value")
	f.fake.SetIdentityFault(bwsfake.Malformed)
	b := f.backend()
	err := b.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "the SDK panicked") {
		t.Fatalf("start against a malformed identity response: %v\n%s", err, f.log)
	}
	if h := b.Health(nil); h.HelperCrashes != 1 || h.State == "ready" {
		t.Fatalf("health after the abort: %+v", h)
	}
	f.fake.SetIdentityFault(bwsfake.OK)
	waitFor(t, 5*time.Second, "the backend to recover after the helper abort", func() bool {
		v, err := b.Fetch(context.Background(), "A")
		return err == nil && string(v) == "a-value"
	})
	t.Logf("log:\n%s", f.log)
	f.assertClean("log", f.log.String(), "a-value")
}

func TestWrongTokenIsAClearError(t *testing.T) {
	t.Run("unknown_token", func(t *testing.T) {
		f := newFixture(t)
		f.token = bwsfake.ForeignToken()
		f.writeToken(f.token, 0o600)
		err := f.backend().Start(context.Background())
		if err == nil || !strings.Contains(err.Error(), "the access token is wrong, expired or revoked") {
			t.Fatalf("err = %v", err)
		}
		f.assertClean("error", err.Error())
		f.assertClean("log", f.log.String())
	})
	t.Run("wrong_key", func(t *testing.T) {
		f := newFixture(t)
		left, _, _ := strings.Cut(f.token, ":")
		f.token = left + ":" + strings.Split(bwsfake.ForeignToken(), ":")[1]
		f.writeToken(f.token, 0o600)
		err := f.backend().Start(context.Background())
		if err == nil || !strings.Contains(err.Error(), "decryption failed") {
			t.Fatalf("err = %v", err)
		}
		f.assertClean("error", err.Error())
	})
	t.Run("malformed_token", func(t *testing.T) {
		f := newFixture(t)
		f.writeToken("not-a-token-at-all", 0o600)
		_, err := bws.New(f.options())
		if err == nil || !strings.Contains(err.Error(), f.tokFile) || strings.Contains(err.Error(), "not-a-token") {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestTokenFileReadableByOthersIsRefused(t *testing.T) {
	f := newFixture(t)
	f.writeToken(f.token, 0o644)
	_, err := bws.New(f.options())
	if err == nil || !strings.Contains(err.Error(), "chmod 600 "+f.tokFile) {
		t.Fatalf("err = %v, want the file and the chmod", err)
	}
	f.assertClean("error", err.Error())
}

// The fake quotes the access token, its client secret and the bearer JWT in its error
// bodies; none of it may come out of the backend.
func TestErrorsNeverQuoteTheToken(t *testing.T) {
	f := newFixture(t)
	f.fake.Put("A", "a-value")
	b := f.backend(func(o *bws.Options) { o.RetryBackoff = time.Millisecond })
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.fake.SetAPIFault(bwsfake.Fail)
	_, err := b.Fetch(context.Background(), "A")
	if err == nil || !strings.Contains(err.Error(), "BWS answered HTTP 500") {
		t.Fatalf("API failure: %v", err)
	}
	f.assertClean("API error", err.Error())

	for _, fault := range []bwsfake.Fault{bwsfake.Fail, bwsfake.MalformedEcho} {
		f.fake.SetIdentityFault(fault)
		b2 := f.backend(func(o *bws.Options) { o.RetryBackoff = time.Millisecond })
		err := b2.Start(context.Background())
		if err == nil {
			t.Fatalf("fault %d: login succeeded", fault)
		}
		f.assertClean("login error", err.Error())
		f.assertClean("status", fmt.Sprintf("%+v", b2.Health(nil)))
	}
	t.Logf("log:\n%s", f.log)
	f.assertClean("log", f.log.String(), "a-value")
}

func TestSyncEvictsRotatedAndDeletedSecrets(t *testing.T) {
	f := newFixture(t)
	f.fake.Put("A", "a1")
	f.fake.Put("B", "b1")
	b := f.backend()
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"A", "B"} {
		if _, err := b.Fetch(context.Background(), n); err != nil {
			t.Fatal(err)
		}
	}
	var evicted []string
	evict := func(n string) { evicted = append(evicted, n) }
	// Let the first sync see nothing new beyond the skew allowance.
	time.Sleep(2100 * time.Millisecond)
	b.SyncOnce(context.Background(), evict)
	if len(evicted) != 0 {
		t.Fatalf("a sync without changes evicted %v", evicted)
	}
	f.fake.Put("A", "a2")
	b.SyncOnce(context.Background(), evict)
	if strings.Join(evicted, ",") != "A" {
		t.Fatalf("after rotating A, evicted %v", evicted)
	}
	if v, _ := b.Fetch(context.Background(), "A"); string(v) != "a2" {
		t.Fatalf("after rotation fetched %q", v)
	}
	evicted = nil
	f.fake.Delete("B")
	b.SyncOnce(context.Background(), evict)
	if strings.Join(evicted, ",") != "B" {
		t.Fatalf("after deleting B, evicted %v", evicted)
	}
	if _, err := b.Fetch(context.Background(), "B"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("deleted secret: %v", err)
	}
	if h := b.Health(nil); h.LastSync.IsZero() || h.LastSyncError != "" {
		t.Fatalf("health: %+v", h)
	}
}

const capsChildEnvVar = "AVP_BWS_CAPS_CHILD"

// capsChild runs as an unprivileged user holding CAP_NET_ADMIN as an ambient capability, as
// avpd does under systemd: it starts a backend from the options in its environment and
// prints its own and its helper's capability sets.
func capsChild() int {
	var o bws.Options
	if err := json.Unmarshal([]byte(os.Getenv(capsChildEnvVar)), &o); err != nil || o.Timeout == 0 {
		fmt.Println(err)
		return 1
	}
	o.Env = append(os.Environ(), helperEnvVar+"=1")
	self, _ := os.ReadFile("/proc/self/status")
	b, err := bws.New(o)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer b.Close()
	if err := b.Start(context.Background()); err != nil {
		fmt.Println(err)
		return 1
	}
	helper, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", b.Health(nil).HelperPID))
	fmt.Printf("self:\n%s\nhelper:\n%s", capLines(string(self)), capLines(string(helper)))
	return 0
}

func capLines(status string) string {
	var out []string
	for _, l := range strings.Split(status, "\n") {
		if strings.HasPrefix(l, "Cap") {
			out = append(out, strings.Join(strings.Fields(l), " "))
		}
	}
	return strings.Join(out, "\n")
}

// Under systemd avpd runs as user avp with CAP_NET_ADMIN as an ambient capability; the helper
// must not inherit it.
func TestHelperRunsWithoutCapabilities(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set but not running as root")
		}
		t.Skip("SKIP: needs root to start a process as another user with an ambient capability (sudo make test)")
	}
	f := newFixture(t)
	// The child runs as uid 4242: it needs a binary, a token and a CA it can read.
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(dir), 0o755) // the test's own temp root
	bin := filepath.Join(dir, "bws.test")
	data, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Dir(f.tokFile), 0o755)
	os.Chown(f.tokFile, 4242, 4242)
	o := f.options()
	o.Helper, o.Env, o.Logf = []string{bin}, nil, nil
	opts, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	for _, kv := range f.env {
		if !strings.HasPrefix(kv, helperEnvVar+"=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, capsChildEnvVar+"="+string(opts))
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential:  &syscall.Credential{Uid: 4242, Gid: 4242},
		AmbientCaps: []uintptr{unix.CAP_NET_ADMIN},
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	self, helper, ok := strings.Cut(string(out), "helper:")
	if !ok || !strings.Contains(self, "CapAmb: 0000000000001000") {
		t.Fatalf("the child does not hold CAP_NET_ADMIN as an ambient capability, so this proves nothing:\n%s", out)
	}
	// CapInh may stay: without ambient or file capabilities it grants nothing at execve.
	for _, set := range []string{"CapPrm", "CapEff", "CapAmb"} {
		if !strings.Contains(helper, set+": 0000000000000000") {
			t.Errorf("the helper has %s set:\n%s", set, helper)
		}
	}
}

// The fake must answer every call the adapter might make the way sdk-go v1.0.2 reads it;
// this drives the SDK directly (in this process, over plain HTTP) through all four shapes.
func TestFakeSpeaksTheSDKProtocol(t *testing.T) {
	fake := bwsfake.New()
	idA := fake.Put("A", "value-a")
	idB := fake.Put("B", "value-b")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fake.Serve(ln)
	defer fake.Close()
	for _, k := range []string{"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"} {
		t.Setenv(k, "")
	}
	api, idp := bwsfake.URLs(bwsfake.BaseURL("http", ln.Addr()))
	c, err := sdk.NewBitwardenClient(&api, &idp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.AccessTokenLogin(fake.NewToken(), nil); err != nil {
		t.Fatalf("login: %v", err)
	}
	list, err := c.Secrets().List(fake.OrgID)
	if err != nil || len(list.Data) != 2 || list.Data[0].Key != "A" || list.Data[0].ID != idA {
		t.Fatalf("List = %+v, %v", list, err)
	}
	got, err := c.Secrets().Get(idB)
	if err != nil || got.Key != "B" || got.Value != "value-b" || got.RevisionDate.IsZero() {
		t.Fatalf("Get = %+v, %v", got, err)
	}
	byIDs, err := c.Secrets().GetByIDS([]string{idA, idB})
	if err != nil || len(byIDs.Data) != 2 || byIDs.Data[0].Value != "value-a" {
		t.Fatalf("GetByIDS = %+v, %v", byIDs, err)
	}
	all, err := c.Secrets().Sync(fake.OrgID, nil)
	if err != nil || !all.HasChanges || len(all.Secrets) != 2 {
		t.Fatalf("Sync(nil) = %+v, %v", all, err)
	}
	since := time.Now()
	none, err := c.Secrets().Sync(fake.OrgID, &since)
	if err != nil || none.HasChanges || none.Secrets != nil {
		t.Fatalf("Sync(now) = %+v, %v", none, err)
	}
	fake.Put("A", "value-a2")
	changed, err := c.Secrets().Sync(fake.OrgID, &since)
	if err != nil || !changed.HasChanges || len(changed.Secrets) != 2 {
		t.Fatalf("Sync after a change = %+v, %v", changed, err)
	}
	if n := fake.Count(bwsfake.CountLogin); n != 1 {
		t.Fatalf("logins = %d", n)
	}
}

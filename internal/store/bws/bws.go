// Package bws is avpd's Bitwarden Secrets Manager backend.
//
// The SDK (github.com/bitwarden/sdk-go, a Rust library behind cgo) never runs in avpd's own
// process: a supervised helper ("avpd bws-helper", package sdkhelper) runs it behind a
// socketpair. This package is the avpd side: it reads and checks the access token file,
// starts and logs in the helper, maps secret names (the BWS key) to ids with List, fetches
// with Get, and polls Sync so that rotated secrets leave the cache within sync_interval.
//
// Every fetch has a deadline avpd enforces itself (the SDK has none), the calls in flight
// are bounded, a helper whose call hangs past twice the timeout is killed and replaced, and
// a helper that aborts (the SDK panics on a malformed identity response) only fails the calls
// it was running. Error text from the SDK is scrubbed in the helper; this package never sees
// a raw SDK error, never logs a value, and never keeps the token longer than a login.
package bws

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
)

// Options configure a Backend. Every field except Env and Logf is required.
type Options struct {
	OrganizationID  string
	AccessTokenFile string
	// APIURL and IdentityURL are always passed to the SDK: when they are unset it silently
	// talks to the US cloud.
	APIURL      string
	IdentityURL string
	// StateFile, when set, lets the SDK reuse its login across helper restarts.
	StateFile string
	// Timeout bounds each fetch end to end (login, List and Get included) and each SDK call.
	Timeout time.Duration
	// SyncInterval is how often Run asks BWS what changed.
	SyncInterval time.Duration
	// MaxInFlight bounds the SDK calls running at once, hung ones included.
	MaxInFlight int
	// Helper is the helper's argv, for example ["/proc/self/exe", "bws-helper"].
	Helper []string
	// Env is the helper's environment; nil means this process's, without RUST_LOG (at
	// debug level the SDK logs the client secret) and without systemd's socket variables.
	Env []string
	// RetryBackoff is the first pause after a failed login or a helper crash; it doubles up
	// to MaxBackoff. Zero means 1s.
	RetryBackoff time.Duration
	Logf         func(string, ...any) `json:"-"`
}

// MaxBackoff caps the pause between helper restarts.
const MaxBackoff = 30 * time.Second

// maxStaleGets bounds the Gets of one fetch whose answers a concurrent sync had overtaken.
const maxStaleGets = 3

// minListInterval rate-limits List on misses for names BWS does not have.
const minListInterval = time.Second

// syncMargin is how far before the newest revision a sync first asks again from, so a
// change BWS stamped a little earlier but committed after that list is still reported.
const syncMargin = 2 * time.Second

// Backend fetches secrets from BWS through the helper.
type Backend struct {
	opts Options
	logf func(string, ...any)
	sem  chan struct{}

	mu       sync.Mutex
	cur      *helper
	starting chan struct{}
	lastErr  error
	retryAt  time.Time
	failures int
	closed   bool
	stats    Counters
	// authErr is BWS's last 401 or 403 while no call has succeeded since; authStreak counts
	// those sessions, so the backoff keeps growing when every new login is refused again.
	authErr    error
	authStreak int
	unauthed   atomic.Bool
	// tokID is the token file the current session logged in with.
	tokID fileID

	idsMu   sync.Mutex
	ids     map[string][]string // name -> ids; more than one is ambiguous
	idsAt   time.Time
	listing *flight
	known   map[string]revision // id -> what the cached value was fetched at
	// listed is the last sync's list (id -> identity and revision); listGen counts the
	// lists applied, so a Get that overlapped one can check its answer against it.
	listed  map[string]Ident
	listGen uint64

	// syncMu serializes syncs (and guards syncSince and syncNewest); syncStateMu guards what
	// status reads, so status never waits for a hung sync.
	//
	// BWS compares lastSyncedDate with revision dates stamped by its own clock, so avpd never
	// sends a time from its own clock: syncSince is zero (ask for everything) until a list
	// arrives, then derived from the newest revision BWS listed (syncNewest).
	syncMu      sync.Mutex
	syncSince   time.Time
	syncNewest  time.Time
	syncStateMu sync.Mutex
	lastSyncOK  time.Time
	lastSyncErr string
}

// Counters count helper lifecycle events, for status.
type Counters struct {
	Logins        int `json:"logins"`
	LoginFailures int `json:"login_failures"`
	HelperStarts  int `json:"helper_starts"`
	HelperCrashes int `json:"helper_crashes"`
	HelperKills   int `json:"helper_kills"`
	Evictions     int `json:"sync_evictions"`
}

type revision struct {
	name string
	rev  time.Time
}

type flight struct {
	done chan struct{}
	err  error
}

var _ store.SecretsBackend = (*Backend)(nil)

// New validates opts and checks the token file (mode and format); it starts nothing.
func New(opts Options) (*Backend, error) {
	switch {
	case opts.OrganizationID == "" || opts.AccessTokenFile == "" || opts.APIURL == "" || opts.IdentityURL == "":
		return nil, errors.New("bws: organization_id, access_token_file, api_url and identity_url are required")
	case opts.Timeout <= 0 || opts.SyncInterval <= 0:
		return nil, errors.New("bws: timeout and sync_interval must be positive")
	case len(opts.Helper) == 0:
		return nil, errors.New("bws: no helper command")
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = 16
	}
	if opts.RetryBackoff <= 0 {
		opts.RetryBackoff = time.Second
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if opts.Env == nil {
		opts.Env = helperEnv(os.Environ())
	}
	tok, _, err := readToken(opts.AccessTokenFile)
	if err != nil {
		return nil, err
	}
	store.Wipe(tok)
	return &Backend{
		opts: opts, logf: opts.Logf, sem: make(chan struct{}, opts.MaxInFlight),
		known: map[string]revision{},
	}, nil
}

func helperEnv(env []string) []string {
	// A Rust abort in the SDK reaches the Go runtime as SIGABRT; without a goroutine dump
	// its report is a few lines.
	return append(slices.DeleteFunc(slices.Clone(env), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "RUST_LOG", "GOTRACEBACK", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC":
			return true
		}
		return false
	}), "GOTRACEBACK=none")
}

// HelperEnv is env as the helper gets it by default, for callers that add variables.
func HelperEnv(env []string) []string { return helperEnv(env) }

// readToken reads the access token file, refusing one that group or others can read, and
// checks the token's shape without quoting it. It also returns the file's identity. The
// caller wipes the token.
func readToken(path string) ([]byte, fileID, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fileID{}, fmt.Errorf("BWS access token file %s does not exist; write the machine account's access token to it: sudo sh -c 'umask 077; cat > %s' (then chown it to avpd's user)", path, path)
	}
	if err != nil {
		return nil, fileID{}, fmt.Errorf("open BWS access token file %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fileID{}, fmt.Errorf("stat BWS access token file %s: %w", path, err)
	}
	if err := store.CheckPrivate(fi, path, "BWS access token file"); err != nil {
		return nil, fileID{}, err
	}
	raw, err := io.ReadAll(io.LimitReader(f, 4097))
	defer store.Wipe(raw)
	if err != nil {
		return nil, fileID{}, fmt.Errorf("read BWS access token file %s: %w", path, err)
	}
	if len(raw) > 4096 {
		return nil, fileID{}, fmt.Errorf("BWS access token file %s is larger than 4 KiB; it must hold only the token", path)
	}
	tok := append([]byte(nil), bytes.TrimSpace(raw)...)
	if err := checkTokenShape(tok); err != nil {
		store.Wipe(tok)
		return nil, fileID{}, fmt.Errorf("BWS access token file %s: %v; paste the machine account's access token exactly as Bitwarden shows it", path, err)
	}
	return tok, idOf(fi), nil
}

// fileID tells one version of the token file from another: a replaced file has another
// inode, and a rewritten one another change time.
type fileID struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64
}

func idOf(fi os.FileInfo) fileID {
	id := fileID{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.dev, id.ino = uint64(st.Dev), st.Ino
		id.ctime = time.Unix(st.Ctim.Unix()).UnixNano()
	}
	return id
}

// checkTokenShape mirrors the SDK's parser: 0.<uuid>.<client secret>:<base64 of 16 bytes>.
func checkTokenShape(tok []byte) error {
	left, key, ok := bytes.Cut(tok, []byte(":"))
	if !ok {
		return errors.New("the token has no ':<key>' part")
	}
	parts := bytes.Split(left, []byte("."))
	if len(parts) != 3 || string(parts[0]) != "0" || len(parts[2]) == 0 {
		return errors.New("the token does not have the form 0.<id>.<secret>:<key>")
	}
	if !isUUID(string(parts[1])) {
		return errors.New("the token's id is not a UUID")
	}
	k, err := base64.RawStdEncoding.DecodeString(string(bytes.TrimRight(key, "=")))
	defer store.Wipe(k)
	if err != nil || len(k) != 16 {
		return errors.New("the token's key is not 16 bytes of base64")
	}
	return nil
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}

// CallError is a scrubbed SDK error, with the HTTP status when the SDK reported one.
type CallError struct {
	Msg    string
	Status int
}

func (e *CallError) Error() string { return e.Msg }

// Start logs in and lists the organization's secrets, within Timeout. A failure is returned
// for the log and kept for status; requests then fail closed and the helper is retried.
func (b *Backend) Start(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, b.opts.Timeout)
	defer cancel()
	h, err := b.session(ctx)
	if err != nil {
		return err
	}
	return b.refreshIDs(ctx, h, true)
}

// Fetch returns the current value of the secret whose BWS key is name.
func (b *Backend) Fetch(ctx context.Context, name string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, b.opts.Timeout)
	defer cancel()
	v, err := b.fetch(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("BWS: %w", err)
	}
	return v, nil
}

func (b *Backend) fetch(ctx context.Context, name string) ([]byte, error) {
	h, err := b.session(ctx)
	if err != nil {
		return nil, err
	}
	overtaken := 0
	for attempt := 0; ; attempt++ {
		id, err := b.resolve(ctx, h, name, attempt > 0)
		if err != nil {
			return nil, err
		}
		b.idsMu.Lock()
		gen := b.listGen
		b.idsMu.Unlock()
		r, err := h.call(ctx, &Request{Op: OpGet, SecretID: id})
		var ce *CallError
		if errors.As(err, &ce) && ce.Status == 404 && attempt == 0 {
			// Deleted or moved since the last List: look the name up again.
			continue
		}
		if err != nil {
			return nil, err
		}
		if r.Key != name {
			// Renamed since the last List: this id is no longer that name.
			store.Wipe(r.Value)
			if attempt == 0 {
				continue
			}
			return nil, fmt.Errorf("BWS returned a different secret for %s's id; %w", name, store.ErrNotFound)
		}
		b.idsMu.Lock()
		stale := b.overtakenLocked(gen, id, r.Rev)
		if !stale {
			b.known[id] = revision{name: name, rev: r.Rev}
		}
		b.idsMu.Unlock()
		if stale {
			// A sync that ran while this Get was on its way already saw a newer revision
			// (or no such secret): it could not evict a value not yet fetched, and later
			// syncs will not report that change again. Fetch again rather than cache it.
			store.Wipe(r.Value)
			if overtaken++; overtaken >= maxStaleGets {
				return nil, fmt.Errorf("BWS changed %s during each of %d fetches; not using a value older than the one it lists", name, maxStaleGets)
			}
			attempt--
			continue
		}
		return r.Value, nil
	}
}

// overtakenLocked reports whether a Get of id that started when listGen was gen and answered
// revision rev is older than what a sync listed since; the caller holds idsMu.
func (b *Backend) overtakenLocked(gen uint64, id string, rev time.Time) bool {
	if b.listGen == gen {
		return false
	}
	s, ok := b.listed[id]
	return !ok || s.Rev.After(rev)
}

// resolve maps name to its one id, listing again on a miss (or always when force).
func (b *Backend) resolve(ctx context.Context, h *helper, name string, force bool) (string, error) {
	b.idsMu.Lock()
	ids, ok := b.ids[name]
	b.idsMu.Unlock()
	if !ok || force {
		if err := b.refreshIDs(ctx, h, force); err != nil {
			return "", err
		}
		b.idsMu.Lock()
		ids, ok = b.ids[name]
		b.idsMu.Unlock()
	}
	switch {
	case !ok:
		return "", fmt.Errorf("no secret named %s in BWS organization %s that the machine account can read: %w", name, b.opts.OrganizationID, store.ErrNotFound)
	case len(ids) > 1:
		return "", fmt.Errorf("%d secrets are named %s in BWS organization %s (ids %s); rename all but one, avpd will not guess", len(ids), name, b.opts.OrganizationID, strings.Join(ids, ", "))
	}
	return ids[0], nil
}

// refreshIDs runs one List at a time; callers that miss while one runs share it.
func (b *Backend) refreshIDs(ctx context.Context, h *helper, force bool) error {
	b.idsMu.Lock()
	if !force && b.ids != nil && time.Since(b.idsAt) < minListInterval {
		b.idsMu.Unlock()
		return nil
	}
	f := b.listing
	if f == nil {
		f = &flight{done: make(chan struct{})}
		b.listing = f
		go b.list(h, f)
	}
	b.idsMu.Unlock()
	select {
	case <-f.done:
		return f.err
	case <-ctx.Done():
		return b.ctxErr(ctx)
	}
}

func (b *Backend) list(h *helper, f *flight) {
	ctx, cancel := context.WithTimeout(context.Background(), b.opts.Timeout)
	defer cancel()
	r, err := h.call(ctx, &Request{Op: OpList, OrgID: b.opts.OrganizationID})
	if err != nil {
		err = fmt.Errorf("list secrets of organization %s: %w", b.opts.OrganizationID, err)
	}
	b.idsMu.Lock()
	if err == nil {
		b.setIDsLocked(r.Secrets)
	}
	f.err = err
	b.listing = nil
	b.idsMu.Unlock()
	close(f.done)
}

func (b *Backend) setIDsLocked(secrets []Ident) {
	ids := map[string][]string{}
	for _, s := range secrets {
		ids[s.Key] = append(ids[s.Key], s.ID)
	}
	b.ids, b.idsAt = ids, time.Now()
}

// Run polls Sync every SyncInterval until ctx ends, and calls evict for every secret whose
// cached value BWS has changed or deleted since it was fetched. It also retries a failed
// login, so the backend recovers without waiting for a request.
func (b *Backend) Run(ctx context.Context, evict func(name string)) {
	t := time.NewTicker(b.opts.SyncInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			b.SyncOnce(ctx, evict)
		}
	}
}

// SyncOnce asks BWS for changes since the last successful sync and evicts stale names.
func (b *Backend) SyncOnce(ctx context.Context, evict func(name string)) {
	ctx, cancel := context.WithTimeout(ctx, b.opts.Timeout)
	defer cancel()
	b.syncMu.Lock()
	defer b.syncMu.Unlock()
	b.checkTokenFile()
	fail := func(err error) {
		b.syncStateMu.Lock()
		b.lastSyncErr = err.Error()
		b.syncStateMu.Unlock()
	}
	h, err := b.session(ctx)
	if err != nil {
		fail(err)
		return
	}
	req := &Request{Op: OpSync, OrgID: b.opts.OrganizationID}
	if !b.syncSince.IsZero() {
		since := b.syncSince
		req.LastSynced = &since
	}
	r, err := h.call(ctx, req)
	if err != nil {
		fail(fmt.Errorf("sync: %w", err))
		return
	}
	if r.HasChanges {
		for _, name := range b.applySync(r.Secrets) {
			b.logf("bws: secret %s changed in BWS; evicted from the cache", name)
			evict(name)
		}
		b.nextSinceLocked(r.Secrets)
	}
	b.syncStateMu.Lock()
	b.lastSyncOK, b.lastSyncErr = time.Now(), ""
	b.syncStateMu.Unlock()
}

// nextSinceLocked picks the next lastSyncedDate from a full list, on BWS's clock: first the
// newest revision less syncMargin; once a later list shows the same newest revision (a sync
// interval on, nothing stamped earlier can still be uncommitted), just past it, so a quiet
// organization costs an answer without a list. An empty list means asking for everything.
// The caller holds syncMu.
func (b *Backend) nextSinceLocked(secrets []Ident) {
	var newest time.Time
	for _, s := range secrets {
		if s.Rev.After(newest) {
			newest = s.Rev
		}
	}
	switch {
	case newest.IsZero():
		b.syncSince, b.syncNewest = time.Time{}, time.Time{}
	case newest.Equal(b.syncNewest):
		b.syncSince = newest.Add(time.Nanosecond)
	default:
		b.syncSince, b.syncNewest = newest.Add(-syncMargin), newest
	}
}

// applySync takes a sync's full list: it becomes the name map, and every fetched value whose
// id is gone or whose revision differs is stale.
func (b *Backend) applySync(secrets []Ident) []string {
	b.idsMu.Lock()
	defer b.idsMu.Unlock()
	b.setIDsLocked(secrets)
	now := map[string]Ident{}
	for _, s := range secrets {
		now[s.ID] = s
	}
	b.listed = now
	b.listGen++
	var stale []string
	for id, k := range b.known {
		s, ok := now[id]
		if ok && s.Key == k.name && s.Rev.Equal(k.rev) {
			continue
		}
		delete(b.known, id)
		if !slices.Contains(stale, k.name) {
			stale = append(stale, k.name)
		}
	}
	sort.Strings(stale)
	b.mu.Lock()
	b.stats.Evictions += len(stale)
	b.mu.Unlock()
	return stale
}

// session returns a logged-in helper, starting one if none runs and no backoff is pending.
func (b *Backend) session(ctx context.Context) (*helper, error) {
	for {
		b.mu.Lock()
		switch {
		case b.closed:
			b.mu.Unlock()
			return nil, errors.New("the BWS backend is closed")
		case b.cur != nil:
			h := b.cur
			b.mu.Unlock()
			return h, nil
		case b.starting != nil:
			ch := b.starting
			b.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, b.ctxErr(ctx)
			}
		case time.Now().Before(b.retryAt):
			err := fmt.Errorf("unavailable (next attempt in %s): %w", time.Until(b.retryAt).Round(100*time.Millisecond), b.lastErr)
			b.mu.Unlock()
			return nil, err
		}
		b.starting = make(chan struct{})
		b.mu.Unlock()
		go b.startHelper()
	}
}

func (b *Backend) startHelper() {
	h, err := b.spawn()
	var tokID fileID
	if err == nil {
		tokID, err = b.login(h)
	}
	b.mu.Lock()
	if err == nil && b.closed {
		err = errors.New("the BWS backend is closed")
	}
	if err != nil && h != nil {
		// kill reports back through helperDied, which takes b.mu.
		b.mu.Unlock()
		h.kill(err)
		b.mu.Lock()
	}
	defer b.mu.Unlock()
	if err != nil {
		b.stats.LoginFailures++
		b.setFailedLocked(err)
	} else {
		b.cur, b.failures, b.lastErr, b.retryAt, b.tokID = h, 0, nil, time.Time{}, tokID
		b.stats.Logins++
		b.logf("bws: logged in to %s (organization %s)", b.opts.IdentityURL, b.opts.OrganizationID)
	}
	close(b.starting)
	b.starting = nil
}

// setFailedLocked records err and schedules the next attempt; the caller holds b.mu.
func (b *Backend) setFailedLocked(err error) {
	b.failures++
	d := b.opts.RetryBackoff << min(b.failures-1, 10)
	d = min(d, MaxBackoff)
	b.lastErr, b.retryAt = err, time.Now().Add(d)
	if !b.closed {
		b.logf("bws: %v; next attempt in %s", err, d)
	}
}

func (b *Backend) login(h *helper) (fileID, error) {
	tok, id, err := readToken(b.opts.AccessTokenFile)
	if err != nil {
		return id, err
	}
	defer store.Wipe(tok)
	ctx, cancel := context.WithTimeout(context.Background(), b.opts.Timeout)
	defer cancel()
	_, err = h.call(ctx, &Request{
		Op: OpLogin, APIURL: b.opts.APIURL, IdentityURL: b.opts.IdentityURL, Token: tok, StateFile: b.opts.StateFile,
	})
	if err != nil {
		return id, fmt.Errorf("log in to BWS at %s: %w", b.opts.IdentityURL, err)
	}
	return id, nil
}

// checkTokenFile starts a new session when the token file has changed since the current
// session logged in, so a token the operator replaced is used while the old one still
// works. A new file that cannot be used (unreadable, not private, not a token) keeps the
// working session; the reason is logged once, and the next login reports it too.
func (b *Backend) checkTokenFile() {
	fi, err := os.Stat(b.opts.AccessTokenFile)
	if err != nil {
		return
	}
	id := idOf(fi)
	b.mu.Lock()
	h, same := b.cur, id == b.tokID
	b.mu.Unlock()
	if h == nil || same {
		return
	}
	tok, _, err := readToken(b.opts.AccessTokenFile)
	store.Wipe(tok)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cur != h {
		return
	}
	if err != nil {
		b.tokID = idOf(fi)
		b.logf("bws: %s changed but cannot be used (%v); keeping the current session", b.opts.AccessTokenFile, err)
		return
	}
	b.cur = nil
	b.logf("bws: %s changed; logging in again with the new token", b.opts.AccessTokenFile)
	go b.retire(h)
}

// retire kills a helper that no longer takes calls once those it runs have returned (they
// are bounded by the timeout; the watchdog kills it at twice that anyway).
func (b *Backend) retire(h *helper) {
	for deadline := time.Now().Add(2 * b.opts.Timeout); time.Now().Before(deadline); {
		h.mu.Lock()
		n := len(h.pending)
		h.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-h.dead:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
	h.kill(errors.New("replaced after the access token file changed"))
}

// refused is called when BWS answers a call of h with 401 or 403: the session was revoked
// or expired, or the token lost access. The SDK never logs in again by itself, so h is
// dropped and, after the usual backoff, a new helper logs in with the token file re-read
// (the operator may have replaced it). Status says unauthorized until a call succeeds.
func (b *Backend) refused(h *helper, ce *CallError) {
	b.mu.Lock()
	b.authErr = ce
	b.unauthed.Store(true)
	drop := b.cur == h
	if drop {
		b.cur = nil
		b.authStreak++
		b.failures = max(b.failures, b.authStreak-1)
		b.setFailedLocked(fmt.Errorf("%v; logging in again with %s re-read", ce, b.opts.AccessTokenFile))
	}
	b.mu.Unlock()
	if drop {
		h.kill(fmt.Errorf("BWS refused the session (HTTP %d); logging in again", ce.Status))
	}
}

// accepted is called when a call other than login succeeds.
func (b *Backend) accepted() {
	if !b.unauthed.Load() {
		return
	}
	b.mu.Lock()
	b.authErr, b.authStreak = nil, 0
	b.unauthed.Store(false)
	b.mu.Unlock()
}

// helperDied is called once per helper when it exits or is killed.
func (b *Backend) helperDied(h *helper, err error, crashed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if crashed {
		b.stats.HelperCrashes++
	} else {
		b.stats.HelperKills++
	}
	if b.cur == h {
		b.cur = nil
		b.setFailedLocked(err)
	}
}

func (b *Backend) ctxErr(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("BWS did not answer within %s: %w", b.opts.Timeout, context.DeadlineExceeded)
	}
	return ctx.Err()
}

// Close kills the helper. Calls in flight fail.
func (b *Backend) Close() error {
	b.mu.Lock()
	b.closed = true
	h := b.cur
	b.cur = nil
	b.mu.Unlock()
	if h != nil {
		h.kill(errors.New("avpd is stopping"))
		h.wait(5 * time.Second)
	}
	return nil
}

// Health is the backend's state for avpctl status. It holds no token and no value.
type Health struct {
	State          string    `json:"state"` // ready, starting, retrying, unauthorized
	Error          string    `json:"error,omitempty"`
	APIURL         string    `json:"api_url"`
	IdentityURL    string    `json:"identity_url"`
	OrganizationID string    `json:"organization_id"`
	HelperPID      int       `json:"helper_pid,omitempty"`
	InFlight       int       `json:"calls_in_flight"`
	MaxInFlight    int       `json:"max_calls_in_flight"`
	KnownNames     int       `json:"names_in_bws"`
	Missing        []string  `json:"missing,omitempty"`
	LastSync       time.Time `json:"last_sync,omitzero"`
	LastSyncError  string    `json:"last_sync_error,omitempty"`
	Counters
}

// Health reports the backend's state; names are the configured secrets, to list those BWS
// does not have.
func (b *Backend) Health(names []string) Health {
	hl := Health{
		APIURL: b.opts.APIURL, IdentityURL: b.opts.IdentityURL, OrganizationID: b.opts.OrganizationID,
		InFlight: len(b.sem), MaxInFlight: cap(b.sem),
	}
	b.mu.Lock()
	switch {
	case b.authErr != nil:
		hl.State = "unauthorized"
	case b.cur != nil:
		hl.State = "ready"
	case b.starting != nil:
		hl.State = "starting"
	default:
		hl.State = "retrying"
	}
	if b.cur != nil {
		hl.HelperPID = b.cur.cmd.Process.Pid
	}
	if b.lastErr != nil {
		hl.Error = b.lastErr.Error()
	}
	if b.authErr != nil && !strings.HasPrefix(hl.Error, b.authErr.Error()) {
		// A login since the refusal failed, or is still to be confirmed by a call.
		if hl.Error == "" {
			hl.Error = b.authErr.Error() + "; logged in again, no call has succeeded yet"
		} else {
			hl.Error = b.authErr.Error() + "; then: " + hl.Error
		}
	}
	hl.Counters = b.stats
	b.mu.Unlock()
	b.idsMu.Lock()
	hl.KnownNames = len(b.ids)
	if b.ids != nil {
		for _, n := range names {
			if _, ok := b.ids[n]; !ok {
				hl.Missing = append(hl.Missing, n)
			}
		}
	}
	b.idsMu.Unlock()
	b.syncStateMu.Lock()
	hl.LastSync, hl.LastSyncError = b.lastSyncOK, b.lastSyncErr
	b.syncStateMu.Unlock()
	return hl
}

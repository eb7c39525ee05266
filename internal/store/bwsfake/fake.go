// Package bwsfake is a Bitwarden Secrets Manager server for tests. It speaks the wire
// protocol and crypto that github.com/bitwarden/sdk-go v1.0.2 expects (see
// design/bws-protocol.md): access-token key derivation, an identity response with
// encrypted_payload, type-2 EncStrings under a 64-byte organization key, a JWT with an
// organization claim, and the List/Get/GetByIDS/Sync shapes.
//
// It counts logins and fetches, and has knobs for latency, failures, hangs, rotation and
// malformed responses, so the BWS adapter can be tested with the real SDK. It is test code:
// nothing in avpd imports it.
package bwsfake

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"
)

// Fault is how a route class (identity or API) misbehaves.
type Fault int

const (
	// OK answers normally.
	OK Fault = iota
	// Hang never answers: the request blocks until the client goes away or Close.
	Hang
	// Fail answers 500 with a body that quotes the caller's credentials (the access token,
	// its client secret and the bearer JWT), as a careless server or proxy might.
	Fail
	// Refuse closes the connection without an answer, like a server that went down.
	Refuse
	// Malformed answers 200 with a body the SDK cannot use. For identity this is the
	// response without encrypted_payload, which makes sdk-go v1.0.2 abort the process.
	Malformed
	// MalformedEcho answers identity with 200 and a body missing a required field, which the
	// SDK reports with the whole raw body, bearer token included.
	MalformedEcho
)

// Counters of requests seen, by kind.
const (
	CountLogin    = "login"
	CountGet      = "get"
	CountGetByIDs = "get-by-ids"
	CountList     = "list"
	CountSync     = "sync"
)

// Server is one fake organization with its secrets and machine-account tokens.
type Server struct {
	OrgID  string
	orgKey []byte

	mu       sync.Mutex
	tokens   map[string]*token // by access token id
	jwts     map[string]string // issued bearer token -> access token id
	secrets  map[string]*secret
	orgRev   time.Time
	counts   map[string]int
	idFault  Fault
	apiFault Fault
	latency  time.Duration
	// clock is added to time.Now for every date the server stamps: a BWS whose clock differs
	// from the host's.
	clock   time.Duration
	closing chan struct{}
	srvs    []*http.Server
	// ExpiresIn is the expires_in of login responses; keep it above 300 or the SDK logs in
	// again before every call.
	expiresIn int
}

type token struct {
	full         string
	clientSecret string
	secret16     []byte
}

type secret struct {
	id, key, value   string
	created, revised time.Time
}

// New makes an organization with a fresh 64-byte key and no secrets.
func New() *Server {
	k := make([]byte, 64)
	rand.Read(k)
	return &Server{
		OrgID: newUUID(), orgKey: k,
		tokens: map[string]*token{}, jwts: map[string]string{}, secrets: map[string]*secret{},
		counts: map[string]int{}, closing: make(chan struct{}), orgRev: time.Now().UTC(), expiresIn: 3600,
	}
}

// NewToken issues an access token for a machine account of the organization.
func (s *Server) NewToken() string {
	k := make([]byte, 16)
	rand.Read(k)
	id, cs := newUUID(), randB64(22)
	t := &token{full: fmt.Sprintf("0.%s.%s:%s", id, cs, base64.StdEncoding.EncodeToString(k)), clientSecret: cs, secret16: k}
	s.mu.Lock()
	s.tokens[id] = t
	s.mu.Unlock()
	return t.full
}

// ForeignToken is a well-formed token the server has never issued: login is refused.
func ForeignToken() string {
	k := make([]byte, 16)
	rand.Read(k)
	return fmt.Sprintf("0.%s.%s:%s", newUUID(), randB64(22), base64.StdEncoding.EncodeToString(k))
}

// Put creates or replaces the secret named key and returns its id.
func (s *Server) Put(key, value string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.nowLocked()
	for _, sec := range s.secrets {
		if sec.key == key {
			sec.value, sec.revised = value, now
			s.orgRev = now
			return sec.id
		}
	}
	sec := &secret{id: newUUID(), key: key, value: value, created: now, revised: now}
	s.secrets[sec.id] = sec
	s.orgRev = now
	return sec.id
}

// Delete removes the secret named key.
func (s *Server) Delete(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, sec := range s.secrets {
		if sec.key == key {
			delete(s.secrets, id)
		}
	}
	s.orgRev = s.nowLocked()
}

// Revoke withdraws an access token, as revoking it in the Bitwarden web app does: it can no
// longer log in, and every bearer token issued to it is refused with 401 from now on.
func (s *Server) Revoke(accessToken string) {
	id, _, _, err := ParseToken(accessToken)
	if err != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.tokens, id)
	for bearer, tid := range s.jwts {
		if tid == id {
			delete(s.jwts, bearer)
		}
	}
}

// SetClock makes the server's clock run d ahead of the host's (behind when d < 0), for the
// dates it stamps on secrets from now on.
func (s *Server) SetClock(d time.Duration) { s.mu.Lock(); s.clock = d; s.mu.Unlock() }

func (s *Server) nowLocked() time.Time { return time.Now().Add(s.clock).UTC() }

// SetIdentityFault changes how /connect/token answers from now on.
func (s *Server) SetIdentityFault(f Fault) { s.mu.Lock(); s.idFault = f; s.mu.Unlock() }

// SetAPIFault changes how the API routes answer from now on.
func (s *Server) SetAPIFault(f Fault) { s.mu.Lock(); s.apiFault = f; s.mu.Unlock() }

// SetLatency delays every answer.
func (s *Server) SetLatency(d time.Duration) { s.mu.Lock(); s.latency = d; s.mu.Unlock() }

// Count returns how many requests of a kind (CountLogin, CountGet, ...) were seen.
func (s *Server) Count(kind string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[kind]
}

// ResetCounts zeroes every counter.
func (s *Server) ResetCounts() { s.mu.Lock(); s.counts = map[string]int{}; s.mu.Unlock() }

// Serve answers on ln until Close: identity under /identity, API under /api.
func (s *Server) Serve(ln net.Listener) {
	srv := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	s.mu.Lock()
	s.srvs = append(s.srvs, srv)
	s.mu.Unlock()
	go srv.Serve(ln)
}

// Close stops every listener and releases hung requests.
func (s *Server) Close() {
	s.mu.Lock()
	select {
	case <-s.closing:
	default:
		close(s.closing)
	}
	srvs := s.srvs
	s.mu.Unlock()
	for _, srv := range srvs {
		srv.Close()
	}
}

// URLs returns the api_url and identity_url for a base such as https://127.0.0.1:8443.
func URLs(base string) (api, identity string) {
	return base + "/api", base + "/identity"
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	lat := s.latency
	s.mu.Unlock()
	if lat > 0 {
		select {
		case <-time.After(lat):
		case <-r.Context().Done():
			return
		}
	}
	p := r.URL.Path
	switch {
	case p == "/identity/connect/token" && r.Method == http.MethodPost:
		s.login(w, r)
	case strings.HasPrefix(p, "/api/"):
		s.api(w, r, strings.TrimPrefix(p, "/api"))
	default:
		http.NotFound(w, r)
	}
}

func (s *Server) count(kind string) {
	s.mu.Lock()
	s.counts[kind]++
	s.mu.Unlock()
}

// misbehave applies a fault that answers the same way on every route; it reports whether
// the request was handled. echo is what a Fail body quotes.
func (s *Server) misbehave(w http.ResponseWriter, r *http.Request, f Fault, echo string) bool {
	switch f {
	case Hang:
		select {
		case <-r.Context().Done():
		case <-s.closing:
		}
		return true
	case Fail:
		w.WriteHeader(http.StatusInternalServerError)
		fmt.Fprintf(w, "internal error while handling request: %s", echo)
		return true
	case Refuse:
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				c.Close()
				return true
			}
		}
		panic(http.ErrAbortHandler)
	}
	return false
}

func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	s.count(CountLogin)
	r.ParseForm()
	s.mu.Lock()
	f := s.idFault
	t := s.tokens[r.PostForm.Get("client_id")]
	s.mu.Unlock()
	echo := r.PostForm.Encode()
	if t != nil {
		echo += " token=" + t.full
	}
	if s.misbehave(w, r, f, echo) {
		return
	}
	if r.PostForm.Get("grant_type") != "client_credentials" || r.PostForm.Get("scope") != "api.secrets" ||
		t == nil || r.PostForm.Get("client_secret") != t.clientSecret {
		writeJSON(w, http.StatusBadRequest, map[string]any{
			"error": "invalid_client", "error_description": "invalid_client",
			"ErrorModel": map[string]any{"Message": "invalid_client", "Object": "error"},
		})
		return
	}
	bearer := jwt(map[string]any{
		"exp": time.Now().Add(time.Duration(s.expiresIn) * time.Second).Unix(), "nbf": time.Now().Unix(),
		"sub": r.PostForm.Get("client_id"), "organization": s.OrgID, "scope": []string{"api.secrets"},
		"client_id": r.PostForm.Get("client_id"),
	})
	s.mu.Lock()
	s.jwts[bearer] = r.PostForm.Get("client_id")
	s.mu.Unlock()
	resp := map[string]any{
		"access_token": bearer, "expires_in": s.expiresIn, "token_type": "Bearer", "scope": "api.secrets",
	}
	switch f {
	case Malformed:
		// Without encrypted_payload the body parses as a refresh answer and sdk-go v1.0.2
		// reaches unreachable!() across extern "C": the process aborts.
	case MalformedEcho:
		delete(resp, "expires_in")
		delete(resp, "token_type")
		resp["encrypted_payload"] = "not-an-encstring"
	default:
		payload, _ := json.Marshal(map[string]string{"encryptionKey": base64.StdEncoding.EncodeToString(s.orgKey)})
		resp["encrypted_payload"] = EncType2(AccessTokenKey(t.secret16), payload)
	}
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) api(w http.ResponseWriter, r *http.Request, p string) {
	bearer, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	s.mu.Lock()
	f := s.apiFault
	tokID, authed := s.jwts[bearer]
	echo := "authorization=" + bearer
	if t := s.tokens[tokID]; t != nil {
		echo += " token=" + t.full
	}
	s.mu.Unlock()
	kind := ""
	switch {
	case r.Method == http.MethodPost && p == "/secrets/get-by-ids":
		kind = CountGetByIDs
	case r.Method == http.MethodGet && strings.HasPrefix(p, "/secrets/"):
		kind = CountGet
	case r.Method == http.MethodGet && strings.HasPrefix(p, "/organizations/") && strings.HasSuffix(p, "/secrets/sync"):
		kind = CountSync
	case r.Method == http.MethodGet && strings.HasPrefix(p, "/organizations/") && strings.HasSuffix(p, "/secrets"):
		kind = CountList
	}
	if kind != "" {
		s.count(kind)
	}
	if s.misbehave(w, r, f, echo) {
		return
	}
	if !authed {
		writeJSON(w, http.StatusUnauthorized, map[string]any{"message": "unauthorized"})
		return
	}
	switch kind {
	case CountGet:
		id := strings.TrimPrefix(p, "/secrets/")
		s.mu.Lock()
		sec := s.secrets[id]
		var m map[string]any
		if sec != nil {
			m = s.secretJSON(sec, true)
			if f == Malformed {
				delete(m, "note")
			}
		}
		s.mu.Unlock()
		if sec == nil {
			writeJSON(w, http.StatusNotFound, map[string]any{"message": "Resource not found.", "object": "error"})
			return
		}
		writeJSON(w, http.StatusOK, m)
	case CountGetByIDs:
		var body struct {
			IDs []string `json:"ids"`
		}
		json.NewDecoder(r.Body).Decode(&body)
		s.mu.Lock()
		data := []map[string]any{}
		for _, id := range body.IDs {
			if sec := s.secrets[id]; sec != nil {
				data = append(data, s.secretJSON(sec, false))
			}
		}
		s.mu.Unlock()
		writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data, "continuationToken": nil})
	case CountList:
		if !s.orgMatches(w, p, "/secrets") {
			return
		}
		s.mu.Lock()
		list := []map[string]any{}
		for _, sec := range s.sorted() {
			list = append(list, map[string]any{
				"id": sec.id, "organizationId": s.OrgID, "key": EncType2(s.orgKey, []byte(sec.key)),
				"creationDate": sec.created.Format(time.RFC3339Nano), "revisionDate": sec.revised.Format(time.RFC3339Nano),
				"projects": []any{}, "read": true, "write": false,
			})
		}
		s.mu.Unlock()
		writeJSON(w, http.StatusOK, map[string]any{"object": "SecretsWithProjectsList", "secrets": list, "projects": []any{}})
	case CountSync:
		if !s.orgMatches(w, p, "/secrets/sync") {
			return
		}
		var since *time.Time
		if q := r.URL.Query().Get("lastSyncedDate"); q != "" {
			t, err := time.Parse(time.RFC3339Nano, q)
			if err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]any{"message": "bad lastSyncedDate"})
				return
			}
			since = &t
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		// Like the real server: any change after lastSyncedDate returns every secret.
		if since != nil && since.After(s.orgRev) {
			writeJSON(w, http.StatusOK, map[string]any{"object": "secretsSync", "hasChanges": false, "secrets": nil})
			return
		}
		data := []map[string]any{}
		for _, sec := range s.sorted() {
			data = append(data, s.secretJSON(sec, false))
		}
		writeJSON(w, http.StatusOK, map[string]any{"object": "secretsSync", "hasChanges": true, "secrets": map[string]any{"object": "list", "data": data}})
	default:
		http.NotFound(w, r)
	}
}

func (s *Server) orgMatches(w http.ResponseWriter, p, suffix string) bool {
	org := strings.TrimSuffix(strings.TrimPrefix(p, "/organizations/"), suffix)
	if org != s.OrgID {
		writeJSON(w, http.StatusNotFound, map[string]any{"message": "Resource not found.", "object": "error"})
		return false
	}
	return true
}

// sorted returns the secrets in key order; the caller holds s.mu.
func (s *Server) sorted() []*secret {
	out := make([]*secret, 0, len(s.secrets))
	for _, sec := range s.secrets {
		out = append(out, sec)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].key < out[j].key })
	return out
}

// secretJSON is a SecretResponseModel (withAccess adds read/write); the caller holds s.mu.
func (s *Server) secretJSON(sec *secret, withAccess bool) map[string]any {
	m := map[string]any{
		"object": "secret", "id": sec.id, "organizationId": s.OrgID,
		"key":          EncType2(s.orgKey, []byte(sec.key)),
		"value":        EncType2(s.orgKey, []byte(sec.value)),
		"note":         EncType2(s.orgKey, nil),
		"creationDate": sec.created.Format(time.RFC3339Nano), "revisionDate": sec.revised.Format(time.RFC3339Nano),
		"projects": []any{},
	}
	if withAccess {
		m["read"], m["write"] = true, false
	}
	return m
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// BaseURL is the https:// (or http://) base for a listener address.
func BaseURL(scheme string, addr net.Addr) string {
	return (&url.URL{Scheme: scheme, Host: addr.String()}).String()
}

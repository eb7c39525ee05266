package intercept

import (
	"bytes"
	"compress/gzip"
	"compress/zlib"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"net/netip"
	"net/textproto"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/rawconn"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
)

// refuse answers the agent with one line that says it was the proxy, not the upstream.
func refuse(w http.ResponseWriter, status int, reason string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Agent-Vault-Proxy", reason)
	w.WriteHeader(status)
	io.WriteString(w, refusalBody(reason))
}

// refusalBody is the one line of every refusal.
func refusalBody(reason string) string { return "agent-vault-proxy: " + reason + "\n" }

type injectedKey struct{}

// injected carries the real values from the decision to the rewrite of the outgoing
// request. The handler wipes the byte slices once the request is done.
type injected struct {
	secrets []inject.Injection
	values  [][]byte
	// scrub lists every real byte string of this request (injected values and the secrets
	// they were made from) with the placeholder the agent sees instead in the response.
	scrub []replacement
	// wipe holds the raw fetched values until the request is done.
	wipe [][]byte
	// policy decided the request, for uid; a retry injects again only while it is in force
	// and uid is enrolled (regate).
	policy *inject.Policy
	uid    int64
	// agentTargets are the inject headers' values as the agent sent them (placeholders),
	// kept by the HTTP/2 proxy path so the HTTP/2 Transport path can put them back
	// (h2Gate).
	agentTargets http.Header
	// srv and base record the request's refusal when its policy is replaced before anything
	// was sent (recordNotSent): its inject line is already durable.
	srv  *Server
	base audit.Event
	// retried is set once a first attempt was sent and the request is tried again (on a
	// reused connection that closed without an answer).
	retried bool
	// check is set when a method override in the body could change the decision. It is a
	// pointer (512 bytes apart) so that the requests that have none, a GET, allocate and
	// clear only the rest (about 100 bytes).
	check *bodyCheck
}

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	s.stats.requests.Add(1)
	cf := factsFrom(r.Context())
	if cf == nil {
		refuse(w, http.StatusInternalServerError, "internal_error")
		return
	}
	if r.Method == http.MethodConnect {
		s.countRefused("connect_not_allowed")
		refuse(w, http.StatusMethodNotAllowed, "connect_not_allowed")
		return
	}
	if reason := checkH2Request(r); reason != "" {
		s.countRefused(reason)
		refuse(w, http.StatusBadRequest, reason)
		return
	}
	// Each stream counts against its user's connection budget for as long as it runs, as a
	// connection does: a stream holds its head in memory, waits for a body, dials and holds
	// an upstream connection, and 100 of them on each of many connections must not multiply
	// the user's share.
	done, over := s.streamSlot(cf.UID)
	if over {
		refuse(w, http.StatusServiceUnavailable, "connection_limit")
		return
	}
	defer done()
	stripH2CUpgrade(r.Header)
	if needsH2Upstream(r) {
		// Whether the upstream speaks HTTP/2 is found out before the decision, which holds
		// the reload gate until the request is sent: how long the handshake takes is up to
		// the original destination, which the agent chose, and a reload (and every request
		// behind it) would wait for it. The answer is remembered for RoundTrip.
		k := upstreamKey{sni: cf.SNI, addr: cf.OrigDst}
		if _, err := s.upstream.speaksH2(r.Context(), k); err != nil {
			if r.Context().Err() == nil {
				s.logAgent("upstream", cf.UID, "upstream %s (sni %q): %v", cf.OrigDst, cf.SNI, err)
				refuse(w, http.StatusBadGateway, "upstream_unreachable")
			}
			return
		}
	}
	p := s.prepare(r.Context(), cf.Facts, r.Method, r.Host, r.URL, r.Header)
	defer p.finish()
	if p.status != 0 {
		refuse(w, p.status, p.reason)
		return
	}
	if p.inj == nil {
		s.proxy.ServeHTTP(w, r)
		return
	}
	if r.Body != nil && r.Body != http.NoBody && p.inj.checksBody(r.Header) {
		// A _method in the body, as in the HTTP/1.1 loop: a short body is checked whole
		// before anything is sent, a longer one as it streams.
		body, whole := r.Body, false
		if r.ContentLength <= maxWholeBody {
			var pre []byte
			var status int
			var reason string
			if pre, whole, status, reason = s.readAhead(r.Context(), &p, r.Header, r.Body, r.ContentLength, http.NewResponseController(w).SetReadDeadline); status != 0 {
				refuse(w, status, reason)
				return
			}
			if whole {
				r.Body = io.NopCloser(bytes.NewReader(pre))
			} else {
				body = newPrefixed(pre, r.Body)
			}
		}
		if !whole {
			r.Body = s.guardBody(r.Context(), p.inj, r.Header, body)
		}
	}
	ctx := context.WithValue(r.Context(), injectedKey{}, p.inj)
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{WroteHeaders: p.release})
	s.proxy.ServeHTTP(w, r.WithContext(ctx))
}

// checkH2Request makes the checks net/http's HTTP/2 server leaves out and an HTTP/1.1
// upstream relies on: the request goes upstream as an HTTP/1.1 request line, so a space in
// :method or :path would write a second request-target after the one decided on ("DELETE
// /v1/admin? /v1/models HTTP/1.1", which servers that tolerate spaces read as /v1/admin),
// and an :authority that is not a host was written upstream as an empty Host.
func checkH2Request(r *http.Request) string {
	if r.Method == "" {
		return "bad_request"
	}
	for i := 0; i < len(r.Method); i++ {
		if !isTokenByte(r.Method[i]) {
			return "bad_request"
		}
	}
	for i := 0; i < len(r.RequestURI); i++ {
		if c := r.RequestURI[i]; c <= ' ' || c == 0x7f {
			return "bad_request"
		}
	}
	if r.Host == "" || !validHostHeader(r.Host) {
		return "malformed_host_header"
	}
	return ""
}

// prepared is the outcome of deciding one request, shared by the HTTP/1.1 loop and the
// net/http (HTTP/2) handler.
type prepared struct {
	// status and reason, when status is non-zero, are the refusal the agent gets.
	status int
	reason string
	// inj is nil when the request goes upstream verbatim.
	inj *injected
	// release lets a reload proceed. It must run once the request's headers are written
	// upstream (or at once for anything that does not inject); it is idempotent.
	release func()
	// policy is the policy the request was decided under.
	policy *inject.Policy
}

// finish releases the reload gate and wipes the request's real values.
func (p *prepared) finish() {
	p.release()
	if p.inj != nil {
		p.inj.wipeAll()
	}
}

func (inj *injected) wipeAll() {
	for _, v := range inj.values {
		store.Wipe(v)
	}
	for _, v := range inj.wipe {
		store.Wipe(v)
	}
}

// prepare decides a request, fetches what it injects and makes the decision durable in the
// audit log (I7) before the caller forwards anything.
func (s *Server) prepare(ctx context.Context, f inject.Facts, method, authority string, u *url.URL, h http.Header) prepared {
	// The gate makes a reload wait until every request decided under the old policy has
	// written its headers upstream, so once a reload returns nothing the new policy forbids
	// is injected. Non-injecting paths release it as soon as they have decided.
	s.gate.RLock()
	release := sync.OnceFunc(s.gate.RUnlock)
	policy := s.policy.Load()
	rawPath := u.EscapedPath()
	if u.Opaque != "" {
		rawPath = u.Opaque
	}
	ir := inject.Request{
		Method: method, Authority: authority, RawPath: rawPath, RawQuery: u.RawQuery, Header: h,
	}
	d := policy.Decide(f, ir)
	if d.Action == inject.Inject && s.unenrolled(f.UID) {
		// Unenrolled since its connection was accepted: a new connection of this user is
		// spliced and nothing is injected into it, and neither is anything on an old one.
		d = inject.Decision{Action: inject.ForwardVerbatim, Reason: ReasonNotEnrolled, Path: d.Path}
	}
	base := audit.Event{
		Type: audit.TypeDecision, UID: uidPtr(f.UID), Dst: f.OrigDst.String(), SNI: f.SNI,
		Method: auditMethod(method), Path: audit.CutPath(d.Path),
	}
	if d.Action == inject.Inject && base.Method != method {
		d = inject.Decision{Action: inject.Refuse, Status: http.StatusBadRequest, Reason: ReasonMethodNotRecordable, Path: d.Path}
	}
	deny := func(status int, reason string) prepared {
		release()
		return prepared{status: status, reason: reason, release: release, policy: policy}
	}
	refused := func(status int, reason string) prepared {
		s.countRefused(reason)
		return deny(status, reason)
	}

	if d.Action != inject.Inject {
		release()
	}
	switch d.Action {
	case inject.Refuse:
		e := base
		e.Decision, e.Reason, e.Status = audit.DecisionRefuse, d.Reason, d.Status
		if d.Reason == inject.ReasonHostMismatch {
			e.Decision = audit.DecisionHostMismatch
		}
		_ = s.record(ctx, e)
		return refused(d.Status, d.Reason)

	case inject.ForwardVerbatim:
		events := denialEvents(base, d)
		if err := s.record(ctx, events...); err != nil {
			s.auditUnavailable(base)
			return refused(http.StatusServiceUnavailable, "audit_unavailable")
		}
		s.stats.verbatim.Add(1)
		s.stats.verbatimReasons.add(d.Reason)
		return prepared{release: release, policy: policy}
	}

	// Inject: fetch every value first, so nothing is audited as injected that was not.
	inj := &injected{secrets: d.Injections, policy: policy, uid: f.UID, srv: s, base: base}
	for _, in := range d.Injections {
		v, raw, reason, err := s.value(ctx, in)
		inj.wipe = append(inj.wipe, raw...)
		if err != nil {
			inj.wipeAll()
			if reason == "secret_unavailable" {
				s.stats.backendErrors.Add(1)
			}
			// Backend errors are scrubbed; they may quote a response body.
			s.logAgent("value of secret", f.UID, "value of secret %s for %s: %s", in.Secret.Name, f.SNI, scrubError(err))
			e := base
			e.Decision, e.Reason, e.Secret, e.Binding, e.Status = audit.DecisionBackendError, reason, in.Secret.Name, audit.Int(in.Binding), http.StatusServiceUnavailable
			_ = s.record(ctx, e)
			return deny(http.StatusServiceUnavailable, reason)
		}
		inj.values = append(inj.values, v)
		ph := []byte(in.Secret.Placeholder)
		inj.addScrub(v, ph)
		for _, b := range raw {
			inj.addScrub(b, ph)
		}
	}
	events := denialEvents(base, d)
	for _, in := range d.Injections {
		e := base
		e.Decision, e.Reason, e.Secret, e.Binding = audit.DecisionInject, d.Reason, in.Secret.Name, audit.Int(in.Binding)
		events = append(events, e)
	}
	// I7: the decision is durable before any modified byte goes upstream. The auditor bounds
	// the wait (audit.timeout).
	if err := s.record(ctx, events...); err != nil {
		inj.wipeAll()
		s.auditUnavailable(base)
		return refused(http.StatusServiceUnavailable, "audit_unavailable")
	}
	if ctx.Err() != nil {
		// The agent went away (reset its stream, closed) while the decision was recorded:
		// nothing is sent, and the trail says so after the inject line.
		inj.wipeAll()
		inj.refuseAfterInject(ctx, ReasonAgentGone, 0, "the agent closed or reset the request while its decision was being recorded; nothing was sent upstream")
		return deny(http.StatusBadRequest, ReasonAgentGone)
	}
	if d.BodyOverrideMatters() {
		inj.check = &bodyCheck{policy: policy, facts: f, req: ir, d: d}
	}
	s.stats.injected.Add(1)
	return prepared{inj: inj, release: release, policy: policy}
}

// ReasonAgentGone is the refusal recorded after the inject line of a request whose agent
// went away before it could be sent.
const ReasonAgentGone = "agent_gone"

// ReasonPolicyChanged is the refusal recorded after the inject line of a request whose
// policy was replaced (a reload, an unenroll) while it waited for its upstream connection:
// nothing of it was sent.
const ReasonPolicyChanged = "policy_changed"

// ReasonPolicyChangedBeforeRetry is that refusal for a request whose first attempt was sent
// (the upstream closed without answering) and whose retry the new policy stopped.
const ReasonPolicyChangedBeforeRetry = "policy_changed_before_retry"

// recordNotSent records that an injecting request, whose inject line is durable, was not
// sent after all: its policy was replaced before it could be. Best effort, like the
// refusals of late.go: the request already failed closed.
func (inj *injected) recordNotSent(ctx context.Context) {
	if inj == nil || inj.srv == nil {
		return
	}
	reason := ReasonPolicyChanged
	detail := "the config was reloaded or the user unenrolled while this request waited for its upstream connection; nothing was sent upstream"
	if inj.retried {
		// Its first attempt went out, on a reused connection that closed without an
		// answer; only the retry was not made.
		reason = ReasonPolicyChangedBeforeRetry
		detail = "sent once, with the injected value, on an upstream connection that closed without an answer; not sent again because the config was reloaded or the user unenrolled meanwhile"
	}
	inj.refuseAfterInject(ctx, reason, http.StatusBadGateway, detail)
}

// refuseAfterInject records the refusal that follows a request's durable inject line: it
// was not sent after all, or was cut off. The record is bounded by audit.timeout (record),
// whatever the agent does.
func (inj *injected) refuseAfterInject(ctx context.Context, reason string, status int, detail string) {
	e := inj.base
	e.Decision, e.Reason, e.Status, e.Detail = audit.DecisionRefuse, reason, status, detail
	_ = inj.srv.record(ctx, e)
}

// addScrub adds a real value b to what the response is scrubbed of (written as it is, or
// escaped as an echo inside a document writes it: echo.go), to be replaced by the
// placeholder ph.
func (inj *injected) addScrub(b, ph []byte) {
	if len(b) < minScrubLen {
		return
	}
	for _, r := range inj.scrub {
		if bytes.Equal(r.from, b) {
			return // a secret injected as it is: its value and what was fetched are the same
		}
	}
	inj.scrub = append(inj.scrub, replacement{from: b, to: ph, escaped: escapable(b)})
}

// injectHeaders writes the real values into an outgoing request's header.
func (inj *injected) injectHeaders(h http.Header) {
	for i, in := range inj.secrets {
		inject.Apply(h, in.Secret, inj.values[i])
	}
	// A compressed response could carry an echoed secret past the scrubber.
	h.Set("Accept-Encoding", "identity")
	// So could a WebSocket's (permessage-deflate): after the switch, the upstream's frames
	// are scrubbed as they come, which a compressed frame would pass.
	h.Del("Sec-Websocket-Extensions")
	// So could gRPC's and Connect's own message compression (decodeForScrub refuses an
	// answer compressed anyway).
	if _, ok := h["Grpc-Accept-Encoding"]; ok || isGRPC(h) {
		h.Set("Grpc-Accept-Encoding", "identity")
	}
	if _, ok := h["Connect-Accept-Encoding"]; ok {
		h.Set("Connect-Accept-Encoding", "identity")
	}
	// So could an answer in parts: an echo served in ranges would give the agent the secret
	// a piece at a time, each too short to recognize. Without them the answer is whole (a
	// server may always ignore Range).
	h.Del("Range")
	h.Del("If-Range")
}

// errText is err's message for the log, with every real value of the request replaced by
// its placeholder: an error can quote what the upstream sent, and a broken upstream can
// echo the credential (I1 holds for the log too).
func (inj *injected) errText(err error) string {
	msg := err.Error()
	if inj != nil {
		msg = scrubString(msg, inj.scrub)
	}
	if len(msg) > 300 {
		msg = msg[:300] + "..."
	}
	return msg
}

// scrubResponse replaces real values the upstream echoes in the response's headers and body.
func (inj *injected) scrubResponse(resp *http.Response) error {
	if inj == nil || len(inj.scrub) == 0 {
		return nil
	}
	// The reason phrase reaches an HTTP/1.1 agent too ("401 Invalid key sk-..."), and so do
	// a 101's headers (a WebSocket server may echo a token offered as a subprotocol).
	resp.Status = scrubString(resp.Status, inj.scrub)
	scrubHeaders(resp.Header, inj.scrub)
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return nil // what follows a 101 is scrubbed as it is spliced
	}
	if !bodyAllowed(resp.Request, resp) {
		// A HEAD's answer, a 204 or a 304 has no body, whatever its Content-Length says;
		// an HTTP/2 upstream may still send trailers after it.
		sr := newScrubReader(resp.Body, inj.scrub)
		sr.atEnd = func() { scrubHeaders(resp.Trailer, inj.scrub) }
		resp.Body = sr
		return nil
	}
	if err := decodeForScrub(resp); err != nil {
		return err
	}
	if resp.ContentLength >= 0 && resp.ContentLength <= maxWholeScrub && !isEventStream(resp.Header) {
		// Read to its length and closed, not to its end: its trailers, if any, never arrive.
		return scrubWhole(resp, inj.scrub)
	}
	sr := newScrubReader(resp.Body, inj.scrub)
	// Trailers (an HTTP/2 agent gets them; a gRPC error message may quote the request)
	// arrive with the end of the body.
	sr.atEnd = func() { scrubHeaders(resp.Trailer, inj.scrub) }
	// A gRPC or Connect stream may wait for the agent after a message that ends with what
	// could start a value: at a message's end the tail goes on (frames.go).
	sr.frames = newFrameTracker(responseFraming(resp.Header), inj.scrub)
	resp.Body = sr
	// Scrubbing can change the length; the agent gets a chunked (or h2 DATA) body.
	resp.Header.Del("Content-Length")
	resp.ContentLength = -1
	return nil
}

// hasPrefixFold reports whether s starts with prefix, compared without case (a media type).
func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// isGRPC reports whether a request with header h is gRPC or gRPC-Web.
func isGRPC(h http.Header) bool {
	return hasPrefixFold(h.Get("Content-Type"), "application/grpc")
}

// decodeForScrub undoes a content coding the upstream applied although it was asked for
// identity, so the scrubber sees the bytes the agent would: gzip and deflate are decoded
// (the agent gets the body uncompressed); any other coding cannot be checked and is refused.
func decodeForScrub(resp *http.Response) error {
	for _, k := range [...]string{"Grpc-Encoding", "Connect-Content-Encoding"} {
		if v := codings(resp.Header, k); len(v) > 0 {
			resp.Body.Close()
			return fmt.Errorf("upstream answered with %s %q although asked for identity; its messages cannot be checked for echoed secrets", k, strings.Join(v, ", "))
		}
	}
	if hasPrefixFold(resp.Header.Get("Content-Type"), "application/grpc-web-text") {
		resp.Body.Close()
		return errors.New("upstream answered in gRPC-Web's text form, whose base64 cannot be checked for echoed secrets")
	}
	// Every line counts: two lines are one list (RFC 9110, 5.3), and two layers of gzip
	// decoded once would hand the agent the inner one unchecked.
	cs := codings(resp.Header, "Content-Encoding")
	if len(cs) == 0 {
		resp.Header.Del("Content-Encoding") // identity, however it was said
		return nil
	}
	ce := cs[0]
	if len(cs) > 1 {
		ce = strings.Join(cs, ", ")
	}
	var dec io.Reader
	var err error
	switch strings.ToLower(ce) { // more than one coding is refused with the rest
	case "gzip", "x-gzip":
		dec, err = gzip.NewReader(resp.Body)
	case "deflate": // HTTP's deflate is the zlib format
		dec, err = zlib.NewReader(resp.Body)
	default:
		resp.Body.Close()
		return fmt.Errorf("upstream answered with Content-Encoding %q although asked for identity; it cannot be checked for echoed secrets", ce)
	}
	if err != nil {
		resp.Body.Close()
		return fmt.Errorf("decode the upstream's %s body: %w", ce, err)
	}
	resp.Body = struct {
		io.Reader
		io.Closer
	}{dec, resp.Body}
	resp.Header.Del("Content-Encoding")
	resp.Header.Del("Content-Length")
	resp.ContentLength = -1
	resp.Uncompressed = true
	return nil
}

// codings lists the codings the header lines named k give, in order, without identity.
func codings(h http.Header, k string) []string {
	var out []string
	for _, line := range h.Values(k) {
		for c := range strings.SplitSeq(line, ",") {
			if c = strings.TrimSpace(c); c != "" && !strings.EqualFold(c, "identity") {
				out = append(out, c)
			}
		}
	}
	return out
}

// value fetches what one injection needs and computes the replacement. raw are the fetched
// values, which the caller wipes; reason is the one-line refusal for the agent on failure.
func (s *Server) value(ctx context.Context, in inject.Injection) (v []byte, raw [][]byte, reason string, err error) {
	if in.Secret.Template == nil {
		// One value, injected as it is: no map of names to values to build.
		fv, err := s.secrets.Get(ctx, in.Secret.Name)
		if err != nil {
			return nil, nil, "secret_unavailable", fmt.Errorf("fetch %s: %w", in.Secret.Name, err)
		}
		raw = append(raw, fv)
		if v, err = inject.PlainValue(in.Secret, fv); err != nil {
			return nil, raw, "template_render_failed", err
		}
		if err := tooShort(in.Secret.Name, v); err != nil {
			return nil, raw, "secret_too_short", err
		}
		return v, raw, "", nil
	}
	names := in.Secret.FetchNames()
	vals := make(map[string][]byte, len(names))
	for _, n := range names {
		fv, err := s.secrets.Get(ctx, n)
		if err != nil {
			return nil, raw, "secret_unavailable", fmt.Errorf("fetch %s: %w", n, err)
		}
		vals[n] = fv
		raw = append(raw, fv)
	}
	v, inputs, err := inject.ValueInputs(in.Secret, vals)
	raw = append(raw, inputs...) // scrubbed like the fetched values, and wiped with them
	if err != nil {
		return nil, raw, "template_render_failed", err
	}
	if err := tooShort(in.Secret.Name, v); err != nil {
		return nil, raw, "secret_too_short", err
	}
	return v, raw, "", nil
}

// tooShort refuses (and wipes) a value too short to scrub from responses: an echo of it
// could not be told from ordinary text.
func tooShort(name string, v []byte) error {
	if len(v) >= minScrubLen {
		return nil
	}
	store.Wipe(v)
	return fmt.Errorf("the value of %s is shorter than %d bytes, too short to scrub from an echo, so it is not injected", name, minScrubLen)
}

// denialEvents records every placeholder that was found but forwarded verbatim (I5), or
// one no_placeholder event.
// ReasonNotEnrolled is why a request of a user no longer enrolled goes verbatim (and why a
// connection of one is spliced).
const ReasonNotEnrolled = "uid_not_enrolled"

// ReasonMethodNotRecordable refuses an injecting request whose method token is too long
// for the audit line to name it.
const ReasonMethodNotRecordable = "method_not_recordable"

func denialEvents(base audit.Event, d inject.Decision) []audit.Event {
	var out []audit.Event
	for _, dn := range d.Denials {
		e := base
		e.Decision, e.Reason, e.Secret = audit.DecisionForwardVerbatim, dn.Reason, dn.Secret.Name
		out = append(out, e)
	}
	if len(out) == 0 && d.Action == inject.ForwardVerbatim {
		e := base
		e.Decision, e.Reason = audit.DecisionForwardVerbatim, d.Reason
		out = append(out, e)
	}
	return out
}

// auditMethod keeps the audit schema closed: a method is a short token, anything else is
// recorded as such.
func auditMethod(m string) string {
	if m == "" || len(m) > maxAuditMethod {
		return "INVALID"
	}
	for i := 0; i < len(m); i++ {
		if !isTokenByte(m[i]) {
			return "INVALID"
		}
	}
	return m
}

// maxAuditMethod bounds a method the audit records as sent. A request with a longer one is
// not injected: its line would not say what the key was used for.
const maxAuditMethod = 64

// stripH2CUpgrade removes an h2c upgrade: after it the connection would speak HTTP/2 that the
// proxy never parses, so per-request checks would stop.
func stripH2CUpgrade(h http.Header) {
	for _, v := range h.Values("Upgrade") {
		if strings.Contains(strings.ToLower(v), "h2c") {
			h.Del("Upgrade")
			h.Del("Http2-Settings")
			return
		}
	}
}

// scrubError reduces an error to a fixed sentence when it might quote remote data.
func scrubError(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "timed out"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, store.ErrNotFound):
		return "not found in the backend"
	}
	msg := err.Error()
	if len(msg) > 200 {
		msg = msg[:200] + "..."
	}
	return msg
}

// h2ReceiveBufferPerStream bounds the flow-control window avpd grants a peer per HTTP/2
// stream, on the agent's side and the upstream's: what it holds for a stream whose other
// side does not read.
const h2ReceiveBufferPerStream = 64 << 10

// upstreamAuthority is the Host an injected request carries upstream: the bound name the
// TLS connection was verified for, not the agent's spelling of it. The decision compared
// the two normalized (case, port, a trailing dot); an upstream that routes by Host could
// read another spelling as another virtual host and serve the real key from there.
func upstreamAuthority(f inject.Facts) string {
	if f.OrigDst.Port() != 443 {
		return net.JoinHostPort(f.SNI, strconv.Itoa(int(f.OrigDst.Port())))
	}
	return f.SNI
}

func newReverseProxy(up *upstreamPool, logAgent func(reason string, uid int64, format string, args ...any), logf Logf) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		// Rewrite, not Director: hop-by-hop headers (including any the agent lists in
		// Connection) are removed before Rewrite runs, so the injected header cannot be
		// stripped after injection (golang/go#50580).
		Rewrite: func(pr *httputil.ProxyRequest) {
			f := factsFrom(pr.In.Context())
			pr.Out.URL.Scheme = "https"
			pr.Out.URL.Host = upstreamAuthority(f.Facts)
			pr.Out.Host = pr.In.Host
			if inj, ok := pr.In.Context().Value(injectedKey{}).(*injected); ok {
				pr.Out.Host = pr.Out.URL.Host
				inj.agentTargets = targetValues(pr.Out.Header, inj.secrets)
				inj.injectHeaders(pr.Out.Header)
			}
		},
		ModifyResponse: func(resp *http.Response) error {
			inj, _ := resp.Request.Context().Value(injectedKey{}).(*injected)
			return inj.scrubResponse(resp)
		},
		BufferPool:    copyBuffers,
		Transport:     up,
		FlushInterval: 0, // text/event-stream and unknown lengths are flushed immediately
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if errors.Is(err, context.Canceled) {
				return
			}
			inj, _ := r.Context().Value(injectedKey{}).(*injected)
			if inj.refusedBody() {
				// Recorded and counted by the guard, which cut the request off.
				refuse(w, http.StatusForbidden, inj.bodyRefusal())
				return
			}
			if errors.Is(err, errPolicyChanged) {
				inj.recordNotSent(r.Context())
			}
			f := factsFrom(r.Context())
			logAgent("upstream", f.UID, "upstream %s (sni %q): %s", f.OrigDst, f.SNI, inj.errText(err))
			refuse(w, http.StatusBadGateway, "upstream_unreachable")
		},
		ErrorLog: log.New(logfWriter(logf), "", 0),
	}
}

func isEventStream(h http.Header) bool {
	return hasPrefixFold(h.Get("Content-Type"), "text/event-stream")
}

// logfWriter sends net/http's own error messages to the daemon's logger.
type logfWriter Logf

func (l logfWriter) Write(p []byte) (int, error) {
	l("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// upstreamPool holds the upstream connections, per (SNI, original destination), so they are
// reused across agent connections but a request is only ever sent to the address the agent
// dialled, over TLS verified for the name the agent asked for.
//
// Requests go upstream over a pool of HTTP/1.1 keep-alive connections (upstream_h1.go):
// those of avpd's HTTP/1.1 loop, and those of HTTP/2 agents (net/http's handler, through
// RoundTrip and upstream_h2agent.go). Funnelling every agent's requests into one
// multiplexed HTTP/2 connection made them queue behind its single writer and reader, and
// each crossed two more goroutines. An HTTP/2 agent's gRPC request, one that asks for
// trailers, or one to an upstream that refuses HTTP/1.1, goes through one http.Transport
// per key over HTTP/2.
type upstreamPool struct {
	tlsBase *tls.Config
	dial    func(ctx context.Context, network, addr string) (net.Conn, error)

	// onConn, when set, learns of each HTTP/1.1 upstream connection opened and closed, so
	// shutdown can close the ones in use.
	onConn func(c net.Conn, open bool)
	// regate takes the reload gate again for a retry of a request decided under policy, or
	// reports that another policy is in force: Server.regate, set by NewServer (a pool
	// without a server has none, and its HTTP/2 path then does not check). Both retry
	// paths call it through here, so a test can put a reload just before it.
	regate func(inj *injected) (release func(), ok bool)

	mu         sync.Mutex
	transports map[upstreamKey]*http.Transport
	configs    map[upstreamKey]*tls.Config
	idle       map[idleKey][]*upConn
	h2Only     map[upstreamKey]bool      // upstreams that refused HTTP/1.1
	noH2       map[upstreamKey]time.Time // upstreams that did not choose HTTP/2, and when
	h2Configs  map[upstreamKey]*tls.Config
	nIdle      int
	lastSweep  time.Time
	closed     bool
}

type upstreamKey struct {
	sni  string
	addr netip.AddrPort
}

const maxTransports = 1024

func newUpstreamPool(base *tls.Config, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *upstreamPool {
	return &upstreamPool{tlsBase: base, dial: dial, transports: map[upstreamKey]*http.Transport{},
		configs: map[upstreamKey]*tls.Config{}, idle: map[idleKey][]*upConn{}, h2Only: map[upstreamKey]bool{},
		noH2: map[upstreamKey]time.Time{}, h2Configs: map[upstreamKey]*tls.Config{}}
}

func (p *upstreamPool) RoundTrip(r *http.Request) (*http.Response, error) {
	f := factsFrom(r.Context())
	if f == nil {
		return nil, errors.New("request without connection facts")
	}
	k := upstreamKey{sni: f.SNI, addr: f.OrigDst}
	viaH1 := !needsH2Upstream(r)
	if !viaH1 && !p.isH2Only(k) {
		// gRPC or trailers, which want HTTP/2; an upstream without it gets them over the
		// scoped HTTP/1.1 pool (gRPC-Web works there; the agent asked for trailers, which
		// a chunked answer can still carry).
		h2, err := p.speaksH2(r.Context(), k)
		if err != nil {
			return nil, err
		}
		viaH1 = !h2
	}
	inj, _ := r.Context().Value(injectedKey{}).(*injected)
	if viaH1 && !p.isH2Only(k) {
		resp, err := p.roundTripH1(r, f.Facts)
		if !errors.Is(err, errNeedsH2) {
			return resp, err
		}
	}
	if inj != nil && p.regate != nil {
		// The Transport dials by itself (for as long as the original destination, which the
		// agent chose, takes) and retries by itself: the real values go in only while the
		// reload gate is held, from each attempt's connection to its headers' write.
		g := &h2Gate{p: p, inj: inj, h: r.Header}
		// Cancelled when a refused attempt must stop, or once the answer's body is done
		// with (not when this returns: the body streams on after).
		ctx, cancel := context.WithCancel(r.Context())
		g.cancel = cancel
		g.letGo(httptrace.ContextClientTrace(r.Context()))
		r = r.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: g.gotConn, WroteHeaders: g.wrote}))
		defer g.wrote()
		resp, err := p.h2RoundTrip(k, r)
		if g.refused() {
			if resp != nil {
				resp.Body.Close()
			}
			cancel()
			return nil, errPolicyChanged
		}
		if err != nil {
			cancel()
			return nil, err
		}
		resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: cancel}
		return resp, nil
	}
	return p.h2RoundTrip(k, r)
}

// h2RoundTrip sends r over k's HTTP/2 Transport, relaying interim responses scrubbed.
func (p *upstreamPool) h2RoundTrip(k upstreamKey, r *http.Request) (*http.Response, error) {
	inj, _ := r.Context().Value(injectedKey{}).(*injected)
	if inj != nil && len(inj.scrub) > 0 {
		// ReverseProxy relays interim (1xx) responses to the agent from a trace hook, before
		// ModifyResponse sees anything. A hook added here runs before it, on the same header
		// map, so what it relays is scrubbed.
		r = r.WithContext(httptrace.WithClientTrace(r.Context(), &httptrace.ClientTrace{
			Got1xxResponse: func(_ int, h textproto.MIMEHeader) error {
				scrubHeaders(http.Header(h), inj.scrub)
				return nil
			},
		}))
	}
	// The stream's slot of its user's budget is held by serveHTTP.
	return p.transport(k).RoundTrip(r)
}

// cancelOnClose ends a request's context once its answer's body is closed.
type cancelOnClose struct {
	io.ReadCloser
	cancel func()
}

func (b *cancelOnClose) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}

// h2Gate injects an HTTP/2 Transport request's real values only while it holds the reload
// gate: from an attempt's connection (GotConn, called before the headers are encoded) to
// its headers' write (WroteHeaders). Between attempts, and before the first, the request
// holds the agent's placeholders, so a retry the Transport makes by itself after a reload
// or an unenroll returned (REFUSED_STREAM, a graceful GOAWAY) carries no secret.
type h2Gate struct {
	p      *upstreamPool
	inj    *injected
	h      http.Header // the outgoing request's
	cancel func()

	mu     sync.Mutex
	rel    func() // the hold, while the gate is held
	refuse bool
}

// letGo takes the real values out of the request (the agent's header values back) and lets
// go of the gate the decision took (trace's WroteHeaders is that hold's release).
func (g *h2Gate) letGo(trace *httptrace.ClientTrace) {
	g.unInject()
	if trace != nil && trace.WroteHeaders != nil {
		trace.WroteHeaders()
	}
}

// unInject puts the agent's values (the placeholders) back in the inject headers. They are
// restored, not derived: one secret's value may hold another's.
func (g *h2Gate) unInject() {
	for _, in := range g.inj.secrets {
		for _, t := range in.Secret.Targets() {
			if vs, ok := g.inj.agentTargets[t.Header]; ok {
				g.h[t.Header] = slices.Clone(vs)
			} else {
				delete(g.h, t.Header)
			}
		}
	}
}

// targetValues copies h's values of the headers secrets inject into.
func targetValues(h http.Header, secrets []inject.Injection) http.Header {
	out := http.Header{}
	for _, in := range secrets {
		for _, t := range in.Secret.Targets() {
			if vs, ok := h[t.Header]; ok {
				out[t.Header] = slices.Clone(vs)
			}
		}
	}
	return out
}

func (g *h2Gate) gotConn(httptrace.GotConnInfo) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.rel != nil { // an attempt that wrote nothing
		g.rel()
		g.rel = nil
		g.unInject()
	}
	rel, ok := g.p.regate(g.inj)
	if !ok {
		// A reload or an unenroll returned since the decision: nothing is injected, and
		// the request is stopped.
		g.refuse = true
		g.cancel()
		return
	}
	g.rel = rel
	g.inj.injectHeaders(g.h)
}

func (g *h2Gate) wrote() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.rel != nil {
		g.rel()
		g.rel = nil
		g.unInject()
	}
}

func (g *h2Gate) refused() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.refuse
}

func (p *upstreamPool) transport(k upstreamKey) *http.Transport {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t, ok := p.transports[k]; ok {
		return t
	}
	if len(p.transports) >= maxTransports {
		for old, t := range p.transports {
			t.CloseIdleConnections()
			delete(p.transports, old)
			break
		}
	}
	t := &http.Transport{
		// HTTP/2 only: over HTTP/1.1 this Transport would pool one keep-alive connection
		// for every user and every set of secrets, where an answer shifted by an upstream
		// that leaves a body unread reaches another request unscrubbed (connScope).
		// RoundTrip sends a request to an upstream without HTTP/2 to the scoped pool.
		DialTLSContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return p.dialH2(ctx, k)
		},
		ForceAttemptHTTP2:   true,
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second,
		// The agent's Accept-Encoding goes through as sent and the body comes back as is.
		DisableCompression: true,
		// A connection is shared by every user's streams, and a request holds the reload
		// gate while it waits to write its headers (h2Gate): an upstream that stops reading
		// may stall that write for no longer than this, and a dead one is found by pings.
		// What an upstream may send ahead of the agent's reading is what avpd holds for an
		// agent that does not read: Go's default is 4 MiB per stream, 64 GiB for one user at
		// the default proxy.max_connections_per_uid. 64 KiB per stream bounds it as the
		// HTTP/1.1 path's buffers do (at about 1.3 MB/s per stream across a 50 ms path).
		HTTP2: &http.HTTP2Config{
			WriteByteTimeout: h2UpstreamWriteTimeout, SendPingTimeout: 30 * time.Second, PingTimeout: 15 * time.Second,
			MaxReceiveBufferPerStream: h2ReceiveBufferPerStream, MaxReceiveBufferPerConnection: 1 << 20,
		},
		ExpectContinueTimeout: time.Second,
		Proxy:                 nil,
	}
	p.transports[k] = t
	return t
}

// h2UpstreamWriteTimeout bounds a write to an HTTP/2 upstream connection that makes no
// progress. A variable for tests.
var h2UpstreamWriteTimeout = 10 * time.Second

// errNoH2 is the dial's refusal of an upstream that did not choose HTTP/2.
var errNoH2 = errors.New("the upstream does not speak HTTP/2")

// dialH2 opens a verified connection to k on which the upstream chose HTTP/2. It offers
// HTTP/1.1 too, so that an upstream without HTTP/2 answers instead of failing the
// handshake, and is then known as one (noH2).
func (p *upstreamPool) dialH2(ctx context.Context, k upstreamKey) (*tls.Conn, error) {
	raw, err := p.dial(ctx, "tcp", k.addr.String())
	if err != nil {
		return nil, err
	}
	tc := tls.Client(rawconn.New(raw), p.h2Config(k))
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	if tc.ConnectionState().NegotiatedProtocol != "h2" {
		tc.Close()
		p.mu.Lock()
		if len(p.noH2) >= maxTransports {
			clear(p.noH2)
		}
		p.noH2[k] = time.Now()
		p.mu.Unlock()
		return nil, errNoH2
	}
	return tc, nil
}

// h2Config is the TLS config of k's HTTP/2 connections.
func (p *upstreamPool) h2Config(k upstreamKey) *tls.Config {
	return p.cachedTLS(p.h2Configs, k, "h2", "http/1.1")
}

// noH2TTL is how long an upstream that did not choose HTTP/2 is taken not to speak it.
const noH2TTL = 10 * time.Minute

// speaksH2 reports whether k chooses HTTP/2, from the last dial within noH2TTL, or from a
// handshake made to find out (its connection is closed: it happens once per upstream).
func (p *upstreamPool) speaksH2(ctx context.Context, k upstreamKey) (bool, error) {
	p.mu.Lock()
	at, known := p.noH2[k]
	_, used := p.transports[k]
	p.mu.Unlock()
	if known && time.Since(at) < noH2TTL {
		return false, nil
	}
	if used && !known {
		return true, nil // its Transport dialled HTTP/2 before
	}
	dctx, cancel := context.WithTimeout(ctx, dialTimeout+handshakeTimeout)
	defer cancel()
	tc, err := p.dialH2(dctx, k)
	if errors.Is(err, errNoH2) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	tc.Close()
	p.transport(k) // remembered: its Transport is what an HTTP/2 upstream is known by
	return true, nil
}

// clientTLS is the verifying client config for one upstream: its name, the protocols to
// offer, and a session cache of its own, so a new connection resumes.
func (p *upstreamPool) clientTLS(k upstreamKey, protos []string) *tls.Config {
	tc := p.tlsBase.Clone()
	tc.ServerName = k.sni
	tc.NextProtos = protos
	if tc.ClientSessionCache == nil {
		tc.ClientSessionCache = tls.NewLRUClientSessionCache(64)
	}
	return tc
}

func (p *upstreamPool) closeIdle() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, t := range p.transports {
		t.CloseIdleConnections()
	}
}

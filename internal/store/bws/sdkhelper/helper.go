// Package sdkhelper is the process that runs github.com/bitwarden/sdk-go for avpd
// ("avpd bws-helper"). It is the only package that links the SDK's Rust library.
//
// The SDK can abort the whole process (a Rust panic on a malformed identity response),
// has no timeouts, and pins an OS thread per call. Running it here, behind a socketpair,
// means an abort only fails the calls in flight, and avpd can kill a helper whose calls hang.
// The helper never logs a value or the token, and scrubs every SDK error before answering.
package sdkhelper

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	sdk "github.com/bitwarden/sdk-go"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bws"
)

// maxInFlight bounds the SDK calls the helper runs at once; avpd bounds its own side lower.
const maxInFlight = 64

// Main serves the socket avpd passed as fd 3 until avpd closes it, and returns the exit code.
func Main(stderr io.Writer) int {
	if err := store.NoCoreDumps(); err != nil {
		fmt.Fprintf(stderr, "bws-helper: %v\n", err)
		return 1
	}
	// The SDK writes its state file with the process umask.
	syscall.Umask(0o077)
	f := os.NewFile(3, "bws-socket")
	if f == nil {
		fmt.Fprintln(stderr, "bws-helper: no socket on fd 3; avpd serve starts this command itself")
		return 2
	}
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		fmt.Fprintln(stderr, "bws-helper: fd 3 is not a socket; avpd serve starts this command itself")
		return 2
	}
	defer conn.Close()
	h := &helper{conn: conn, sem: make(chan struct{}, maxInFlight)}
	for {
		var req bws.Request
		if err := bws.ReadFrame(conn, &req); err != nil {
			// avpd closed its end (or died): nothing left to serve.
			return 0
		}
		h.sem <- struct{}{}
		go func() {
			defer func() { <-h.sem }()
			h.answer(h.handle(&req))
		}()
	}
}

type helper struct {
	conn net.Conn
	sem  chan struct{}
	wmu  sync.Mutex

	mu     sync.Mutex
	client sdk.BitwardenClientInterface
	red    *bws.Redactor
}

func (h *helper) answer(resp *bws.Response) {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	if err := bws.WriteFrame(h.conn, resp); err != nil {
		// The socket is gone; avpd will notice and start another helper.
		os.Exit(0)
	}
	store.Wipe(resp.Value)
}

func (h *helper) fail(resp *bws.Response, err error) *bws.Response {
	h.mu.Lock()
	red := h.red
	h.mu.Unlock()
	resp.Err, resp.Status = bws.Scrub(err.Error(), red)
	return resp
}

func (h *helper) handle(req *bws.Request) *bws.Response {
	resp := &bws.Response{ID: req.ID}
	if req.Op == bws.OpLogin {
		return h.login(req, resp)
	}
	h.mu.Lock()
	c := h.client
	h.mu.Unlock()
	if c == nil {
		resp.Err = "the helper is not logged in"
		return resp
	}
	switch req.Op {
	case bws.OpList:
		r, err := c.Secrets().List(req.OrgID)
		if err != nil {
			return h.fail(resp, err)
		}
		for _, s := range r.Data {
			resp.Secrets = append(resp.Secrets, bws.Ident{ID: s.ID, Key: s.Key})
		}
	case bws.OpGet:
		r, err := c.Secrets().Get(req.SecretID)
		if err != nil {
			return h.fail(resp, err)
		}
		resp.Key, resp.Value, resp.Rev = r.Key, []byte(r.Value), r.RevisionDate
	case bws.OpSync:
		r, err := c.Secrets().Sync(req.OrgID, req.LastSynced)
		if err != nil {
			return h.fail(resp, err)
		}
		// Only identities and revisions go back: avpd evicts, it never caches from a sync.
		resp.HasChanges = r.HasChanges
		for _, s := range r.Secrets {
			resp.Secrets = append(resp.Secrets, bws.Ident{ID: s.ID, Key: s.Key, Rev: s.RevisionDate})
		}
	default:
		resp.Err = fmt.Sprintf("unknown operation %q", req.Op)
	}
	return resp
}

func (h *helper) login(req *bws.Request, resp *bws.Response) *bws.Response {
	token := string(req.Token)
	store.Wipe(req.Token)
	h.mu.Lock()
	if h.client != nil {
		h.mu.Unlock()
		resp.Err = "the helper is already logged in"
		return resp
	}
	h.red = bws.NewRedactor(token)
	h.mu.Unlock()
	// Both URLs are always passed: with nil the SDK silently talks to the US cloud.
	api, identity := req.APIURL, req.IdentityURL
	c, err := sdk.NewBitwardenClient(&api, &identity)
	if err != nil {
		return h.fail(resp, err)
	}
	var state *string
	if req.StateFile != "" {
		state = &req.StateFile
	}
	if err := c.AccessTokenLogin(token, state); err != nil {
		// avpd kills a helper whose login failed; freeing the client here is not needed.
		return h.fail(resp, err)
	}
	h.mu.Lock()
	h.client = c
	h.mu.Unlock()
	return resp
}

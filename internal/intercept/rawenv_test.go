package intercept

// rawEnv: an in-process avpd in front of an upstream the test controls fully
// (raw TLS bytes or a net/http handler), reached by an HTTP/1.1 or HTTP/2 agent.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

const rawHost = "api.example.com"

const rawPlaceholder = "avp-PLACEHOLDER-example-000000000000"

// rawConfig injects secret KEY as "Bearer {secret}" into Authorization for rawHost.
const rawConfig = `version: 1
backend: {type: file, file: {path: /etc/avp/secrets.yaml}}
secrets:
  KEY:
    placeholder: ` + rawPlaceholder + `
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings:
      - host: ` + rawHost + `
        paths: ["/**"]
`

type rawEnv struct {
	srv   *Server
	roots *x509.CertPool
	facts inject.Facts
	agent net.Listener
	logs  *logBuffer
}

// newRawEnv starts avpd with secret KEY=real. The upstream listener (TLS for rawHost,
// offering upProtos) is handed to serve, which accepts on it.
func newRawEnv(t *testing.T, real string, upProtos []string, serve func(ln net.Listener)) *rawEnv {
	t.Helper()
	return newRawEnvConfig(t, rawConfig, real, upProtos, serve)
}

// newRawEnvConfig is newRawEnv with bindings of the test's own (the secret is still KEY).
func newRawEnvConfig(t *testing.T, cfgYAML, real string, upProtos []string, serve func(ln net.Listener)) *rawEnv {
	t.Helper()
	return newRawEnvSecrets(t, cfgYAML, mapSecrets{"KEY": real}, upProtos, serve)
}

// newRawEnvSecrets is newRawEnvConfig with the backend's secrets of the test's own.
func newRawEnvSecrets(t *testing.T, cfgYAML string, secrets Secrets, upProtos []string, serve func(ln net.Listener)) *rawEnv {
	t.Helper()
	ca := newTestCA(t)
	cfg, err := config.Parse("bindings.yaml", []byte(cfgYAML))
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Leaf(rawHost)
	if err != nil {
		t.Fatal(err)
	}
	upLn, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*leaf}, NextProtos: upProtos})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { upLn.Close() })
	go serve(upLn)

	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate())
	upAddr := upLn.Addr().String()
	logs := &logBuffer{}
	s, err := NewServer(Options{
		Logf:   logs.logf,
		Policy: inject.NewPolicy(cfg), CA: ca, Secrets: secrets, Auditor: &eventLog{},
		UpstreamTLS: &tls.Config{RootCAs: roots},
		UpstreamDial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, upAddr)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Shutdown(context.Background()) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	e := &rawEnv{srv: s, roots: roots, agent: ln, logs: logs,
		facts: inject.Facts{UID: 1000, SNI: rawHost, OrigDst: netip.MustParseAddrPort("127.0.0.1:443")}}
	go acceptTerminating(ln, s, func() inject.Facts { return e.facts })
	return e
}

// acceptTerminating accepts on ln until it is closed and terminates each connection as a
// redirected one would be, with the facts facts gives at that moment.
func acceptTerminating(ln net.Listener, s *Server, facts func() inject.Facts) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go s.terminate(c.(*net.TCPConn), nil, facts())
	}
}

// h2ClientTo returns a client that speaks HTTP/2 to addr, whatever a URL's host, and
// verifies serverName with roots.
func h2ClientTo(t *testing.T, addr, serverName string, roots *x509.CertPool) *http.Client {
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{ServerName: serverName, RootCAs: roots},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// serveHandler serves h on the upstream listener (HTTP/2 too when offered in ALPN).
func serveHandler(h http.Handler) func(net.Listener) {
	return func(ln net.Listener) {
		srv := &http.Server{Handler: h, ErrorLog: log.New(io.Discard, "", 0)}
		srv.Serve(ln)
	}
}

// serveRaw runs f for every accepted upstream connection, after the handshake.
func serveRaw(f func(c *tls.Conn, br *bufio.Reader)) func(net.Listener) {
	return func(ln net.Listener) {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				if tc.Handshake() != nil {
					return
				}
				f(tc, bufio.NewReader(tc))
			}()
		}
	}
}

// h1Agent opens an HTTP/1.1 agent connection.
func (e *rawEnv) h1Agent(t *testing.T) (*tls.Conn, *bufio.Reader) {
	t.Helper()
	c, err := tls.Dial("tcp", e.agent.Addr().String(), &tls.Config{ServerName: rawHost, RootCAs: e.roots, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

// h2Client is an HTTP/2 agent.
func (e *rawEnv) h2Client(t *testing.T) *http.Client {
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{ServerName: rawHost, RootCAs: e.roots},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, e.agent.Addr().String())
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

const rawAuthLine = "Authorization: Bearer " + rawPlaceholder + "\r\n"

package intercept

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

type nopSecrets struct{}

func (nopSecrets) Get(context.Context, string) ([]byte, error) { return nil, nil }

type nopAuditor struct{}

func (nopAuditor) Record(context.Context, ...audit.Event) error { return nil }

func newTestServer(t testing.TB) *Server {
	t.Helper()
	s, err := NewServer(Options{
		Policy: &inject.Policy{}, CA: newTestCA(t), Secrets: nopSecrets{}, Auditor: nopAuditor{},
		UpstreamTLS: &tls.Config{},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Shutdown(context.Background()) })
	return s
}

// TestAgentTLSResumes: terminated connections share one TLS config, so an agent that comes
// back resumes its session (no certificate, no signature), on a leaf for the peeked name.
func TestAgentTLSResumes(t *testing.T) {
	s := newTestServer(t)
	roots := x509.NewCertPool()
	roots.AddCert(s.ca.Certificate())
	client := &tls.Config{ServerName: "api.example.com", RootCAs: roots, ClientSessionCache: tls.NewLRUClientSessionCache(4)}
	handshake := func() tls.ConnectionState {
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		srv := tls.Server(&agentConn{PrefixConn: NewPrefixConn(b, nil), sni: "api.example.com"}, s.agentTLS)
		go func() {
			if srv.Handshake() == nil {
				srv.Write([]byte("x")) // carries the session ticket to the client
			}
		}()
		c := tls.Client(a, client)
		if err := c.Handshake(); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1)
		if _, err := c.Read(buf); err != nil {
			t.Fatal(err)
		}
		return c.ConnectionState()
	}
	if st := handshake(); st.DidResume || st.PeerCertificates[0].DNSNames[0] != "api.example.com" {
		t.Fatalf("first handshake: resumed %v, leaf %v", st.DidResume, st.PeerCertificates[0].DNSNames)
	}
	if st := handshake(); !st.DidResume {
		t.Fatal("second handshake did not resume the session")
	}
}

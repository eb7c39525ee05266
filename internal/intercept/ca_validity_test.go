package intercept

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// An expired CA (ten years on, or a restored backup) loaded without a word, and Leaf minted
// leaves no client accepts, a new key on every handshake: agents saw "certificate has
// expired" and avpd's log nothing. Leaf now refuses with the fix, and mints nothing.
func TestExpiredCALeafSaysSo(t *testing.T) {
	dir := t.TempDir()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42), Subject: pkix.Name{CommonName: "agent-vault-proxy local CA (old)"},
		NotBefore: time.Now().Add(-10 * 365 * 24 * time.Hour), NotAfter: time.Now().Add(-time.Hour),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalPKCS8PrivateKey(key)
	os.WriteFile(filepath.Join(dir, caKeyFile), pemEncode("PRIVATE KEY", kd), 0o600)
	os.WriteFile(filepath.Join(dir, caCertFile), pemEncode("CERTIFICATE", der), 0o644)
	ca, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err) // avpd still starts: connections it splices need no CA
	}
	for range 3 {
		leaf, err := ca.Leaf("api.example.com")
		if err == nil {
			t.Fatalf("an expired CA minted a leaf valid %s..%s", leaf.Leaf.NotBefore, leaf.Leaf.NotAfter)
		}
		if !strings.Contains(err.Error(), "expired") || !strings.Contains(err.Error(), dir) {
			t.Fatalf("Leaf with an expired CA: %v; want the reason and where the CA is", err)
		}
	}
	if n := ca.mints.Load(); n != 0 {
		t.Fatalf("%d leaves minted by an expired CA", n)
	}
}

// In the CA's last day every leaf ends when the CA does, so it is always "due for renewal":
// each handshake minted a new key. Such a leaf is served until it (and the CA) expire.
func TestLeafNearTheCAsEndIsCached(t *testing.T) {
	ca := newTestCA(t)
	end := ca.cert.NotAfter
	ca.now = func() time.Time { return end.Add(-2 * time.Hour) }
	for range 5 {
		if _, err := ca.Leaf("api.example.com"); err != nil {
			t.Fatal(err)
		}
	}
	if n := ca.mints.Load(); n != 1 {
		t.Fatalf("%d leaves minted for one name in the CA's last hours, want 1", n)
	}
}

// After the clock is stepped back (an NTP correction, a VM restored from a snapshot) by more
// than the leaf's hour of backdating, a cached leaf is not valid yet and every client
// rejects it: a new one is minted instead.
func TestCachedLeafNotYetValidIsReminted(t *testing.T) {
	ca := newTestCA(t)
	now := time.Now().Add(10 * time.Hour) // the test CA is valid from an hour ago
	ca.now = func() time.Time { return now }
	if _, err := ca.Leaf("api.example.com"); err != nil {
		t.Fatal(err)
	}
	stepped := now.Add(-3 * time.Hour)
	ca.now = func() time.Time { return stepped }
	l, err := ca.Leaf("api.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if stepped.Before(l.Leaf.NotBefore) {
		t.Fatalf("a cached leaf that is not yet valid was served: NotBefore %s, now %s", l.Leaf.NotBefore.Format(time.RFC3339), stepped.Format(time.RFC3339))
	}
}

// A crash while the CA was written leaves a temporary copy of a key (mode 0600) beside it;
// the next start removes it.
func TestCAStartRemovesTemporaryFilesOfACrash(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadOrCreateCA(dir); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, "."+caKeyFile+".tmp-123456")
	os.WriteFile(stale, []byte("-----BEGIN PRIVATE KEY-----\n"), 0o600)
	other := filepath.Join(dir, "enrolled.json")
	os.WriteFile(other, []byte("[]"), 0o600)
	if _, err := LoadOrCreateCA(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); err == nil {
		t.Fatalf("%s is still there after a start", stale)
	}
	if _, err := os.Stat(other); err != nil {
		t.Fatalf("a start removed %s: %v", other, err)
	}
}

package intercept

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func newTestCA(tb testing.TB) *CA {
	tb.Helper()
	ca, err := LoadOrCreateCA(filepath.Join(tb.TempDir(), "ca"))
	if err != nil {
		tb.Fatal(err)
	}
	return ca
}

func TestLoadOrCreateCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	ca, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	c := ca.Certificate()
	host, _ := os.Hostname()
	if want := fmt.Sprintf("agent-vault-proxy local CA (%s)", host); c.Subject.CommonName != want {
		t.Errorf("CN = %q, want %q", c.Subject.CommonName, want)
	}
	if !c.IsCA || !c.BasicConstraintsValid || c.MaxPathLen != 0 || !c.MaxPathLenZero {
		t.Errorf("basic constraints: IsCA=%v valid=%v MaxPathLen=%d zero=%v", c.IsCA, c.BasicConstraintsValid, c.MaxPathLen, c.MaxPathLenZero)
	}
	if c.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("KeyUsage = %v", c.KeyUsage)
	}
	if _, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || c.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("public key is %T", c.PublicKey)
	}
	if v := c.NotAfter.Sub(c.NotBefore); v < 3650*24*time.Hour || v > 3653*24*time.Hour {
		t.Errorf("validity %v, want 10 years", v)
	}
	if c.SerialNumber.Sign() <= 0 || c.SerialNumber.BitLen() > 128 {
		t.Errorf("serial %v", c.SerialNumber)
	}
	if err := c.CheckSignatureFrom(c); err != nil {
		t.Errorf("not self-signed: %v", err)
	}
	for name, want := range map[string]os.FileMode{"ca-key.pem": 0o600, "ca.pem": 0o644} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode %04o, want %04o", name, fi.Mode().Perm(), want)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Errorf("dir holds %d entries, want only the two PEM files (temp files left?)", len(entries))
	}

	again, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	if !bytes.Equal(again.Certificate().Raw, c.Raw) || !bytes.Equal(again.CertPEM(), ca.CertPEM()) {
		t.Fatal("reload produced a different CA")
	}
	onDisk, _ := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if !bytes.Equal(onDisk, ca.CertPEM()) {
		t.Error("CertPEM differs from ca.pem")
	}
}

func TestLoadOrCreateCARefusesLooseKey(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadOrCreateCA(dir); err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(dir, "ca-key.pem")
	if err := os.Chmod(keyPath, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := LoadOrCreateCA(dir)
	if err == nil {
		t.Fatal("loaded a group/world-readable key")
	}
	if !strings.Contains(err.Error(), "chmod 600") || !strings.Contains(err.Error(), keyPath) {
		t.Errorf("error %q should name the file and the chmod 600 fix", err)
	}
}

func TestLoadOrCreateCAPartialState(t *testing.T) {
	t.Run("cert without key", func(t *testing.T) {
		dir := t.TempDir()
		if _, err := LoadOrCreateCA(dir); err != nil {
			t.Fatal(err)
		}
		os.Remove(filepath.Join(dir, "ca-key.pem"))
		if _, err := LoadOrCreateCA(dir); err == nil || !strings.Contains(err.Error(), "missing") {
			t.Fatalf("err = %v, want a missing-key error", err)
		}
	})
	t.Run("key without cert", func(t *testing.T) {
		dir := t.TempDir()
		first, err := LoadOrCreateCA(dir)
		if err != nil {
			t.Fatal(err)
		}
		os.Remove(filepath.Join(dir, "ca.pem"))
		second, err := LoadOrCreateCA(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !first.Certificate().PublicKey.(*ecdsa.PublicKey).Equal(second.Certificate().PublicKey) {
			t.Fatal("re-issued certificate does not use the existing key")
		}
	})
	t.Run("mismatched pair", func(t *testing.T) {
		a, b := t.TempDir(), t.TempDir()
		if _, err := LoadOrCreateCA(a); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadOrCreateCA(b); err != nil {
			t.Fatal(err)
		}
		other, _ := os.ReadFile(filepath.Join(b, "ca.pem"))
		os.WriteFile(filepath.Join(a, "ca.pem"), other, 0o644)
		if _, err := LoadOrCreateCA(a); err == nil {
			t.Fatal("loaded a certificate that does not match the key")
		}
	})
}

func TestLeafVerifies(t *testing.T) {
	ca := newTestCA(t)
	cert, err := ca.Leaf("Api.Example.COM.")
	if err != nil {
		t.Fatal(err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		t.Fatal("tls.Certificate.Leaf not set")
	}
	if len(cert.Certificate) != 2 || !bytes.Equal(cert.Certificate[1], ca.Certificate().Raw) {
		t.Fatal("chain does not end with the CA certificate")
	}
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "api.example.com" || len(leaf.IPAddresses) != 0 {
		t.Errorf("SANs = %v %v", leaf.DNSNames, leaf.IPAddresses)
	}
	if leaf.IsCA || len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth {
		t.Errorf("IsCA=%v ExtKeyUsage=%v", leaf.IsCA, leaf.ExtKeyUsage)
	}
	if v := leaf.NotAfter.Sub(leaf.NotBefore); v != 7*24*time.Hour {
		t.Errorf("validity %v, want 7 days", v)
	}
	if d := time.Until(leaf.NotBefore); d > -59*time.Minute || d < -61*time.Minute {
		t.Errorf("NotBefore is %v from now, want about -1h", d)
	}
	key, ok := cert.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(leaf.PublicKey) {
		t.Fatal("private key does not match the leaf")
	}
	if key.PublicKey.Equal(ca.Certificate().PublicKey) {
		t.Fatal("leaf reuses the CA key")
	}

	pool := x509.NewCertPool()
	pool.AddCert(ca.Certificate())
	opts := x509.VerifyOptions{Roots: pool, DNSName: "api.example.com", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	if _, err := leaf.Verify(opts); err != nil {
		t.Fatalf("leaf does not verify for its name: %v", err)
	}
	opts.DNSName = "other.example.com"
	if _, err := leaf.Verify(opts); err == nil {
		t.Fatal("leaf verifies for another name")
	}
	other, err := ca.Leaf("other.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Leaf.Verify(opts); err != nil {
		t.Fatalf("second leaf: %v", err)
	}
}

func TestLeafCached(t *testing.T) {
	ca := newTestCA(t)
	a, err := ca.Leaf("cache.example.com")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"cache.example.com", "CACHE.example.com", "cache.example.com."} {
		b, err := ca.Leaf(n)
		if err != nil || b != a {
			t.Fatalf("Leaf(%q) = %p, %v; want the cached %p", n, b, err, a)
		}
	}
	if got := ca.mints.Load(); got != 1 {
		t.Fatalf("minted %d leaves, want 1", got)
	}
}

func TestLeafRejectsBadNames(t *testing.T) {
	ca := newTestCA(t)
	for _, n := range []string{"", ".", "127.0.0.1", "::1", "[::1]", "fe80::1%eth0", "bad name.com", "a..b", "*.example.com", "x/y"} {
		if c, err := ca.Leaf(n); err == nil {
			t.Errorf("Leaf(%q) minted %v", n, c.Leaf.DNSNames)
		}
	}
	if ca.mints.Load() != 0 {
		t.Errorf("minted %d leaves for rejected names", ca.mints.Load())
	}
}

func TestLeafConcurrentMintOnce(t *testing.T) {
	ca := newTestCA(t)
	const n = 64
	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
		got   [n]*tls.Certificate
		errs  [n]error
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			got[i], errs[i] = ca.Leaf("burst.example.com")
		}()
	}
	close(start)
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if got[i] != got[0] {
			t.Fatalf("caller %d got a different certificate", i)
		}
	}
	if m := ca.mints.Load(); m != 1 {
		t.Fatalf("minted %d times, want 1", m)
	}
}

func TestLeafRenewsNearExpiry(t *testing.T) {
	ca := newTestCA(t)
	first, err := ca.Leaf("renew.example.com")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	ca.now = func() time.Time { return now.Add(5*24*time.Hour + 22*time.Hour) } // 25h before expiry
	if again, _ := ca.Leaf("renew.example.com"); again != first {
		t.Fatal("re-minted a leaf with more than 24h left")
	}
	ca.now = func() time.Time { return now.Add(6*24*time.Hour + time.Hour) } // under 24h left
	renewed, err := ca.Leaf("renew.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if renewed == first || !renewed.Leaf.NotAfter.After(first.Leaf.NotAfter) {
		t.Fatal("leaf near expiry was not re-minted")
	}
	if again, _ := ca.Leaf("renew.example.com"); again != renewed {
		t.Fatal("renewed leaf not cached")
	}
}

func TestLeafCacheBounded(t *testing.T) {
	ca := newTestCA(t)
	ca.maxLeafs = 3
	leaf := func(n string) *tls.Certificate {
		t.Helper()
		c, err := ca.Leaf(n)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a := leaf("a.example")
	leaf("b.example")
	leaf("c.example")
	leaf("a.example") // a becomes most recently used, b is now the oldest
	leaf("d.example")
	if len(ca.leaves) != 3 || ca.order.Len() != 3 {
		t.Fatalf("cache holds %d/%d entries, want 3", len(ca.leaves), ca.order.Len())
	}
	if _, ok := ca.leaves["b.example"]; ok {
		t.Fatal("least recently used entry was not evicted")
	}
	if leaf("a.example") != a {
		t.Fatal("recently used entry was evicted")
	}
	before := ca.mints.Load()
	leaf("b.example")
	if ca.mints.Load() != before+1 {
		t.Fatal("evicted entry was not re-minted")
	}
}

func TestGetCertificate(t *testing.T) {
	ca := newTestCA(t)
	if _, err := ca.GetCertificate(&tls.ClientHelloInfo{}); err == nil {
		t.Fatal("minted a certificate without SNI")
	}
	c, err := ca.GetCertificate(&tls.ClientHelloInfo{ServerName: "hook.example.com"})
	if err != nil || c.Leaf.DNSNames[0] != "hook.example.com" {
		t.Fatalf("GetCertificate: %v", err)
	}
}

func BenchmarkLeafCacheHit(b *testing.B) {
	ca := newTestCA(b)
	if _, err := ca.Leaf("bench.example.com"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := ca.Leaf("bench.example.com"); err != nil {
			b.Fatal(err)
		}
	}
}

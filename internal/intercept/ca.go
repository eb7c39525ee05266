package intercept

import (
	"container/list"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	caCertFile = "ca.pem"
	caKeyFile  = "ca-key.pem"

	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 7 * 24 * time.Hour
	leafBackdate = time.Hour      // tolerate agents whose clocks run behind
	leafRenewal  = 24 * time.Hour // re-mint cached leaves this close to expiry

	defaultLeafCacheSize = 4096
)

// CA is the local certificate authority whose leaves the agent is asked to trust.
//
// avpd terminates TLS for intercepted hosts with leaf certificates it mints on
// the fly; the agent trusts them only because its trust store holds this CA's
// certificate. The CA key therefore never signs anything but leaves, and each
// leaf gets its own key so a leaked leaf key compromises one host for at most
// a week. Leaves are cached because minting costs an ECDSA key generation and
// a signature per new host.
type CA struct {
	cert     *x509.Certificate
	certPEM  []byte
	key      *ecdsa.PrivateKey
	certPath string // where it was loaded from, for the errors that tell what to do

	now      func() time.Time // replaced in tests
	maxLeafs int

	mu       sync.Mutex
	leaves   map[string]*list.Element // name -> element holding *leafEntry
	order    *list.List               // front = most recently used
	inflight map[string]*mintCall

	mints atomic.Int64 // number of leaves minted, for tests and metrics
}

type leafEntry struct {
	name     string
	cert     *tls.Certificate
	renewAt  time.Time // NotAfter - leafRenewal
	notAfter time.Time
}

// mintCall lets concurrent misses for one name wait for a single mint.
type mintCall struct {
	done chan struct{}
	cert *tls.Certificate
	err  error
}

// LoadOrCreateCA loads ca.pem/ca-key.pem from dir, or creates them on first start:
// ECDSA P-256, self-signed, CommonName "agent-vault-proxy local CA (<hostname>)", IsCA, MaxPathLen 0 (MaxPathLenZero true),
// KeyUsage CertSign|CRLSign, validity 10 years, random 128-bit serial. The key file is written with
// mode 0600 (atomically: temp file in the same dir, fsync, rename, fsync dir), the cert with 0644.
// If the key file exists with group/other permission bits set, refuse with an error naming the file and the chmod to run.
//
// The CA must survive restarts: agents were told to trust this exact
// certificate, so a silently regenerated CA would break every intercepted
// connection. The key is written before the certificate; if a first start was
// interrupted after the key was written, the certificate is issued again from
// that key. A certificate without its key is an error rather than a reason to
// start over.
func LoadOrCreateCA(dir string) (*CA, error) {
	keyPath := filepath.Join(dir, caKeyFile)
	certPath := filepath.Join(dir, caCertFile)
	removeStaleTemps(dir)

	keyInfo, keyErr := os.Stat(keyPath)
	_, certErr := os.Stat(certPath)
	switch {
	case keyErr != nil && !errors.Is(keyErr, fs.ErrNotExist):
		return nil, fmt.Errorf("load CA: %w", keyErr)
	case certErr != nil && !errors.Is(certErr, fs.ErrNotExist):
		return nil, fmt.Errorf("load CA: %w", certErr)
	}
	keyExists, certExists := keyErr == nil, certErr == nil

	if !keyExists {
		if certExists {
			return nil, fmt.Errorf("load CA: %s exists but its key %s is missing; restore the key, or remove %s to create a new CA (agents must then trust the new one)",
				certPath, keyPath, certPath)
		}
		return createCA(dir, keyPath, certPath)
	}

	if !keyInfo.Mode().IsRegular() {
		return nil, fmt.Errorf("load CA: %s is not a regular file", keyPath)
	}
	if perm := keyInfo.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("load CA: key file %s has mode %04o, readable by group or others; run: chmod 600 %s",
			keyPath, perm, keyPath)
	}
	key, err := readKey(keyPath)
	if err != nil {
		return nil, err
	}
	if !certExists {
		// Interrupted first start: the key made it to disk, the cert did not.
		der, err := selfSign(key)
		if err != nil {
			return nil, err
		}
		if err := writeFileAtomic(certPath, pemEncode("CERTIFICATE", der), 0o644); err != nil {
			return nil, fmt.Errorf("create CA: %w", err)
		}
	}
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	return newCA(certPEM, key, certPath)
}

func createCA(dir, keyPath, certPath string) (*CA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("create CA: generate key: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("create CA: marshal key: %w", err)
	}
	der, err := selfSign(key)
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(keyPath, pemEncode("PRIVATE KEY", keyDER), 0o600); err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	certPEM := pemEncode("CERTIFICATE", der)
	if err := writeFileAtomic(certPath, certPEM, 0o644); err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	return newCA(certPEM, key, certPath)
}

func selfSign(key *ecdsa.PrivateKey) ([]byte, error) {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "unknown host"
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: fmt.Sprintf("agent-vault-proxy local CA (%s)", host)},
		NotBefore:             now.Add(-leafBackdate),
		NotAfter:              now.Add(-leafBackdate).Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create CA: sign certificate: %w", err)
	}
	return der, nil
}

func readKey(path string) (*ecdsa.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("load CA: %s: no PEM block", path)
	}
	var parsed any
	switch block.Type {
	case "PRIVATE KEY":
		parsed, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		parsed, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("load CA: %s: unexpected PEM block %q", path, block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("load CA: %s: %w", path, err)
	}
	key, ok := parsed.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("load CA: %s: key is %T, want ECDSA", path, parsed)
	}
	return key, nil
}

func newCA(certPEM []byte, key *ecdsa.PrivateKey, certPath string) (*CA, error) {
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("load CA: %s: no CERTIFICATE PEM block", certPath)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("load CA: %s: %w", certPath, err)
	}
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("load CA: %s is not a CA certificate", certPath)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(key.Public()) {
		return nil, fmt.Errorf("load CA: %s does not match its key %s", certPath, caKeyFile)
	}
	return &CA{
		cert:     cert,
		certPath: certPath,
		certPEM:  pem.EncodeToMemory(block),
		key:      key,
		now:      time.Now,
		maxLeafs: defaultLeafCacheSize,
		leaves:   make(map[string]*list.Element),
		order:    list.New(),
		inflight: make(map[string]*mintCall),
	}, nil
}

// CertPEM returns the CA certificate in PEM form, for installing into an
// agent's trust store. The caller must not modify the result.
func (ca *CA) CertPEM() []byte { return ca.certPEM }

// Certificate returns the parsed CA certificate, e.g. to build a verification
// pool. The caller must not modify it.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// Leaf returns a cached TLS certificate for name (DNS name, lowercased), minting on a miss.
// Leaves: fresh ECDSA P-256 key per leaf (never the CA key), SAN = name only, ExtKeyUsage ServerAuth, validity 7 days starting 1 hour in the past,
// chain includes the CA cert. Concurrent misses for the same name mint once (de-duplicate). The cache is
// bounded (e.g. 4096 entries, evict oldest) and re-mints leaves that expire within 24h.
//
// name is lowercased and one trailing dot removed before use. An empty name,
// an IP literal, or anything that is not a plausible DNS name is rejected:
// avpd only intercepts by SNI, and a certificate for an address would let one
// leaf stand in for every host behind it. The cache evicts the least recently
// used leaf when full.
func (ca *CA) Leaf(name string) (*tls.Certificate, error) {
	key := strings.ToLower(strings.TrimSuffix(name, "."))

	ca.mu.Lock()
	if el, ok := ca.leaves[key]; ok {
		e := el.Value.(*leafEntry)
		// Not yet valid (the clock was stepped back past its backdating): a client rejects
		// it, a new one is minted.
		if now := ca.now(); now.Before(e.renewAt) && !now.Before(e.cert.Leaf.NotBefore) {
			ca.order.MoveToFront(el)
			ca.mu.Unlock()
			return e.cert, nil
		}
	}
	if call, ok := ca.inflight[key]; ok {
		ca.mu.Unlock()
		<-call.done
		return call.cert, call.err
	}
	// Validate only on a miss: cached names were valid when minted, and the
	// checks would otherwise cost the hot path.
	if err := checkLeafName(name, key); err != nil {
		ca.mu.Unlock()
		return nil, err
	}
	call := &mintCall{done: make(chan struct{})}
	ca.inflight[key] = call
	ca.mu.Unlock()

	call.cert, call.err = ca.mint(key)

	ca.mu.Lock()
	delete(ca.inflight, key)
	if call.err == nil {
		ca.store(key, call.cert)
	}
	ca.mu.Unlock()
	close(call.done)
	return call.cert, call.err
}

func checkLeafName(orig, key string) error {
	if key == "" {
		return errors.New("mint leaf: empty server name")
	}
	if _, err := netip.ParseAddr(strings.Trim(key, "[]")); err == nil {
		return fmt.Errorf("mint leaf: %q is an IP address, not a DNS name", orig)
	}
	if norm, ok := normalizeDNSName(key); !ok || norm != key {
		return fmt.Errorf("mint leaf: %q is not a DNS name", truncate(orig, 64))
	}
	return nil
}

// store caches cert under name, evicting the least recently used leaves
// beyond the bound. ca.mu must be held.
func (ca *CA) store(name string, cert *tls.Certificate) {
	e := &leafEntry{name: name, cert: cert, notAfter: cert.Leaf.NotAfter, renewAt: cert.Leaf.NotAfter.Add(-leafRenewal)}
	if !cert.Leaf.NotAfter.Before(ca.cert.NotAfter) {
		// It ends with the CA: a new one would too, so it serves until then.
		e.renewAt = cert.Leaf.NotAfter
	}
	if el, ok := ca.leaves[name]; ok {
		el.Value = e
		ca.order.MoveToFront(el)
		return
	}
	ca.leaves[name] = ca.order.PushFront(e)
	for ca.order.Len() > ca.maxLeafs {
		oldest := ca.order.Back()
		ca.order.Remove(oldest)
		delete(ca.leaves, oldest.Value.(*leafEntry).name)
	}
}

// mint issues a new leaf for name with its own key.
func (ca *CA) mint(name string) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("mint leaf for %s: generate key: %w", name, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("mint leaf for %s: %w", name, err)
	}
	now := ca.now()
	if !now.Before(ca.cert.NotAfter) {
		// Every leaf it signs would be rejected ("certificate has expired") with nothing in
		// avpd's log to say why.
		return nil, fmt.Errorf("mint leaf for %s: the local CA expired on %s: move %s and %s aside and restart avpd to create a new CA, then have agents trust it (avpctl ca install, avpctl ca env)",
			name, ca.cert.NotAfter.UTC().Format(time.DateOnly), ca.certPath, filepath.Join(filepath.Dir(ca.certPath), caKeyFile))
	}
	notBefore := now.Add(-leafBackdate)
	notAfter := notBefore.Add(leafValidity)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter // a leaf outliving its CA would not verify anyway
	}
	if notBefore.Before(ca.cert.NotBefore) {
		notBefore = ca.cert.NotBefore
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name},
		DNSNames:              []string{name},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return nil, fmt.Errorf("mint leaf for %s: %w", name, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("mint leaf for %s: %w", name, err)
	}
	ca.mints.Add(1)
	return &tls.Certificate{
		Certificate: [][]byte{der, ca.cert.Raw},
		PrivateKey:  key,
		Leaf:        leaf,
	}, nil
}

// GetCertificate is a tls.Config.GetCertificate hook using hello.ServerName.
//
// A ClientHello without SNI is refused: avpd cannot know which host the
// agent expects, and intercepting it under a guessed name would only produce
// a confusing verification failure on the agent's side.
func (ca *CA) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if hello == nil || hello.ServerName == "" {
		return nil, errors.New("mint leaf: client sent no server name (SNI)")
	}
	return ca.Leaf(hello.ServerName)
}

func randomSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("random serial: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

func pemEncode(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// writeFileAtomic replaces path with data so that a crash leaves either the
// old file or the complete new one: it writes a temporary file in the same
// directory, fsyncs it, renames it over path and fsyncs the directory so the
// rename itself is durable.
// removeStaleTemps removes the temporary files a crash in writeFileAtomic left beside the
// CA (a key that never became the CA's, mode 0600): nothing reads them, and a key is
// better not left lying about. Only regular files are removed.
func removeStaleTemps(dir string) {
	for _, base := range []string{caKeyFile, caCertFile} {
		m, _ := filepath.Glob(filepath.Join(dir, "."+base+".tmp-*"))
		for _, p := range m {
			if fi, err := os.Lstat(p); err == nil && fi.Mode().IsRegular() {
				os.Remove(p)
			}
		}
	}
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	// CreateTemp uses 0600; set the final mode explicitly so the umask does
	// not matter and the key is never briefly more readable than intended.
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

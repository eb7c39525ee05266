package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeStore points detectStore at root and makes only the named tools exist, as shell
// scripts that log their arguments and rebuild bundle from the local CA files.
func fakeStore(t *testing.T, tools map[string]string) (root string) {
	t.Helper()
	root = t.TempDir()
	bin := filepath.Join(root, "bin")
	os.MkdirAll(bin, 0o755)
	for name, script := range tools {
		if err := os.WriteFile(filepath.Join(bin, name), []byte("#!/bin/sh\n"+script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	oldRoot, oldLook := storeRoot, lookPath
	storeRoot = root
	lookPath = func(name string) (string, error) {
		p := filepath.Join(bin, name)
		if _, err := os.Stat(p); err != nil {
			return "", errors.New("not found")
		}
		return p, nil
	}
	t.Cleanup(func() { storeRoot, lookPath = oldRoot, oldLook })
	return root
}

func testCA(t *testing.T) []byte {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func TestCAInstallDebian(t *testing.T) {
	root := fakeStore(t, map[string]string{
		"update-ca-certificates": `echo "$@" >> "$(dirname "$0")/../calls"
mkdir -p "$(dirname "$0")/../etc/ssl/certs"
cat "$(dirname "$0")"/../usr/local/share/ca-certificates/*.crt > "$(dirname "$0")/../etc/ssl/certs/ca-certificates.crt" 2>/dev/null || : > "$(dirname "$0")/../etc/ssl/certs/ca-certificates.crt"
`,
		"update-ca-trust": "exit 1\n",
	})
	os.MkdirAll(filepath.Join(root, "usr/local/share"), 0o755)
	// Fedora's directory exists too; Debian's tool wins because it is what is installed first.
	os.MkdirAll(filepath.Join(root, "etc/pki/ca-trust/source/anchors"), 0o755)
	caFile := filepath.Join(root, "ca.pem")
	os.WriteFile(caFile, testCA(t), 0o644)

	var out, errb bytes.Buffer
	if code := run([]string{"ca", "install", "--cert", caFile}, &out, &errb); code != 0 {
		t.Fatalf("ca install: %d %s %s", code, out.String(), errb.String())
	}
	installed := filepath.Join(root, "usr/local/share/ca-certificates/agent-vault-proxy.crt")
	fi, err := os.Stat(installed)
	if err != nil || fi.Mode().Perm() != 0o644 {
		t.Fatalf("installed file: %v %v", fi, err)
	}
	if !strings.Contains(out.String(), "now trusts it (Debian/Ubuntu") {
		t.Fatalf("output: %s", out.String())
	}
	out.Reset()
	if code := run([]string{"ca", "uninstall"}, &out, &errb); code != 0 {
		t.Fatalf("ca uninstall: %d %s %s", code, out.String(), errb.String())
	}
	if _, err := os.Stat(installed); !os.IsNotExist(err) {
		t.Fatal("ca uninstall left the file")
	}
	calls, _ := os.ReadFile(filepath.Join(root, "calls"))
	if string(calls) != "\n--fresh\n" {
		t.Fatalf("update-ca-certificates calls: %q", calls)
	}
}

func TestCAInstallFedora(t *testing.T) {
	root := fakeStore(t, map[string]string{
		"update-ca-trust": `echo "$@" >> "$(dirname "$0")/../calls"
mkdir -p "$(dirname "$0")/../etc/pki/tls/certs"
cat "$(dirname "$0")"/../etc/pki/ca-trust/source/anchors/*.pem > "$(dirname "$0")/../etc/pki/tls/certs/ca-bundle.crt"
`,
	})
	os.MkdirAll(filepath.Join(root, "etc/pki/ca-trust/source/anchors"), 0o755)
	caFile := filepath.Join(root, "ca.pem")
	os.WriteFile(caFile, testCA(t), 0o644)
	var out, errb bytes.Buffer
	if code := run([]string{"ca", "install", "--cert", caFile}, &out, &errb); code != 0 {
		t.Fatalf("ca install: %d %s %s", code, out.String(), errb.String())
	}
	if _, err := os.Stat(filepath.Join(root, "etc/pki/ca-trust/source/anchors/agent-vault-proxy.pem")); err != nil {
		t.Fatal(err)
	}
	if calls, _ := os.ReadFile(filepath.Join(root, "calls")); string(calls) != "extract\n" {
		t.Fatalf("update-ca-trust calls: %q", calls)
	}
	out.Reset()
	run([]string{"ca", "env", "--format", "environment.d"}, &out, &errb)
	if !strings.Contains(out.String(), "NODE_EXTRA_CA_CERTS="+root+"/etc/pki/ca-trust/source/anchors/agent-vault-proxy.pem\n") ||
		!strings.Contains(out.String(), "REQUESTS_CA_BUNDLE="+root+"/etc/pki/tls/certs/ca-bundle.crt\n") {
		t.Fatalf("ca env on Fedora:\n%s", out.String())
	}
}

// A bundle that does not pick the CA up is an error, not a silent success.
func TestCAInstallBundleMissesCA(t *testing.T) {
	root := fakeStore(t, map[string]string{"update-ca-certificates": "exit 0\n"})
	os.MkdirAll(filepath.Join(root, "usr/local/share"), 0o755)
	caFile := filepath.Join(root, "ca.pem")
	os.WriteFile(caFile, testCA(t), 0o644)
	var out, errb bytes.Buffer
	if code := run([]string{"ca", "install", "--cert", caFile}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "does not hold the CA") {
		t.Fatalf("ca install: %d %s %s", code, out.String(), errb.String())
	}
}

func TestCANoStore(t *testing.T) {
	fakeStore(t, nil)
	var out, errb bytes.Buffer
	if code := run([]string{"ca", "env"}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "no system trust store found") {
		t.Fatalf("ca env without a store: %d %s", code, errb.String())
	}
}

func TestCAEnvFormats(t *testing.T) {
	for _, c := range []struct{ format, want string }{
		{"shell", "export NODE_EXTRA_CA_CERTS='/x/it'\\''s.crt'\nexport DENO_CERT='/x/it'\\''s.crt'\nexport REQUESTS_CA_BUNDLE='/b/100%.pem'\n"},
		{"systemd", "[Service]\nEnvironment=\"NODE_EXTRA_CA_CERTS=/x/it's.crt\"\nEnvironment=\"DENO_CERT=/x/it's.crt\"\nEnvironment=\"REQUESTS_CA_BUNDLE=/b/100%%.pem\"\n"},
		{"environment.d", "NODE_EXTRA_CA_CERTS=/x/it's.crt\nDENO_CERT=/x/it's.crt\nREQUESTS_CA_BUNDLE=/b/100%.pem\n"},
	} {
		var out, errb bytes.Buffer
		if code := run([]string{"ca", "env", "--format", c.format, "--ca", "/x/it's.crt", "--bundle", "/b/100%.pem"}, &out, &errb); code != 0 {
			t.Fatalf("%s: exit %d %s", c.format, code, errb.String())
		}
		if !strings.Contains(out.String(), c.want) {
			t.Errorf("%s:\n%s\nwant it to contain:\n%s", c.format, out.String(), c.want)
		}
		for _, v := range []string{"SSL_CERT_FILE", "CURL_CA_BUNDLE", "AWS_CA_BUNDLE", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"} {
			if !strings.Contains(out.String(), v+"=") {
				t.Errorf("%s: no %s", c.format, v)
			}
		}
	}
	var out, errb bytes.Buffer
	if code := run([]string{"ca", "env", "--format", "yaml", "--ca", "/a", "--bundle", "/b"}, &out, &errb); code != 2 {
		t.Fatalf("unknown format: exit %d", code)
	}
}

// TestCAEnvBadFormatNamesIt: "ca env --format bogus" printed only the usage line, never
// what was wrong with the command.
func TestCAEnvBadFormatNamesIt(t *testing.T) {
	code, out, errs := avpctl("ca", "env", "--format", "bogus", "--ca", "/nonexistent/ca.crt", "--bundle", "/nonexistent/bundle.crt")
	if code != 2 || out != "" || !strings.Contains(errs, `"bogus"`) || !strings.Contains(errs, "environment.d") {
		t.Fatalf("exit %d, stdout %q, stderr %q: want exit 2 naming the rejected value and the accepted ones", code, out, errs)
	}
}

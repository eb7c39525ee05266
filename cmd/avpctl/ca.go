package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The CA's file name in the system store. Debian's update-ca-certificates only picks up
// files ending in .crt; Fedora's anchors directory takes any PEM file.
const caStoreName = "agent-vault-proxy"

const caUsage = "ca cert | ca install [--cert FILE] | ca uninstall | ca env [--format shell|systemd|environment.d] [--ca FILE] [--bundle FILE]"

func runCA(g globals, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		return usageErr(stderr, caUsage)
	}
	switch args[0] {
	case "cert":
		if len(args) != 1 {
			return usageErr(stderr, "ca cert")
		}
		pemData, err := fetchCA(g)
		if err != nil {
			return fail(stderr, err)
		}
		stdout.Write(pemData)
		return 0
	case "install":
		return runCAInstall(g, args[1:], stdout, stderr)
	case "uninstall":
		if len(args) != 1 {
			return usageErr(stderr, "ca uninstall")
		}
		return runCAUninstall(stdout, stderr)
	case "env":
		return runCAEnv(args[1:], stdout, stderr)
	}
	return usageErr(stderr, caUsage)
}

// fetchCA asks the running avpd for its CA certificate.
func fetchCA(g globals) ([]byte, error) {
	var out struct {
		PEM string `json:"pem"`
	}
	if err := call(g, "ca-cert", nil, &out); err != nil {
		return nil, err
	}
	return []byte(out.PEM), nil
}

// trustStore is a distribution's system CA store: where a local CA goes, the command that
// rebuilds the bundle, and the bundle that OpenSSL, Go, curl and Python read.
type trustStore struct {
	Distro string   // for messages
	Dir    string   // where local CAs are dropped
	File   string   // our CA's path in Dir
	Update []string // the command that rebuilds Bundle
	// Remove rebuilds Bundle after our file was deleted (Debian needs --fresh to drop the
	// stale links).
	Remove []string
	Bundle string // the PEM bundle of every trusted root
}

// Variables for tests: the filesystem root and the PATH lookup.
var (
	storeRoot = "/"
	lookPath  = exec.LookPath
)

// detectStore finds the system trust store by its rebuild tool: update-ca-certificates on
// Debian and Ubuntu (and Alpine, SUSE), update-ca-trust on Fedora, RHEL and their kin.
func detectStore() (*trustStore, error) {
	at := func(p string) string { return filepath.Join(storeRoot, p) }
	isDir := func(p string) bool {
		fi, err := os.Stat(at(p))
		return err == nil && fi.IsDir()
	}
	if tool, err := lookPath("update-ca-certificates"); err == nil && isDir("/usr/local/share") {
		return &trustStore{
			Distro: "Debian/Ubuntu (update-ca-certificates)",
			Dir:    at("/usr/local/share/ca-certificates"),
			File:   at("/usr/local/share/ca-certificates/" + caStoreName + ".crt"),
			Update: []string{tool},
			Remove: []string{tool, "--fresh"},
			Bundle: at("/etc/ssl/certs/ca-certificates.crt"),
		}, nil
	}
	if tool, err := lookPath("update-ca-trust"); err == nil && isDir("/etc/pki/ca-trust/source/anchors") {
		return &trustStore{
			Distro: "Fedora/RHEL (update-ca-trust)",
			Dir:    at("/etc/pki/ca-trust/source/anchors"),
			File:   at("/etc/pki/ca-trust/source/anchors/" + caStoreName + ".pem"),
			Update: []string{tool, "extract"},
			Remove: []string{tool, "extract"},
			Bundle: at("/etc/pki/tls/certs/ca-bundle.crt"),
		}, nil
	}
	return nil, errors.New("no system trust store found: neither update-ca-certificates (Debian/Ubuntu: apt install ca-certificates) " +
		"nor update-ca-trust (Fedora/RHEL: dnf install ca-certificates) is installed; add the output of \"avpctl ca cert\" to your distribution's store by hand")
}

// parseCA returns the one CA certificate in pemData.
func parseCA(pemData []byte) (*x509.Certificate, error) {
	block, rest := pem.Decode(pemData)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("no PEM certificate")
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("more than one PEM block; give only avpd's CA certificate")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, err
	}
	if !cert.IsCA {
		return nil, errors.New("the certificate is not a CA")
	}
	return cert, nil
}

func fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// bundleHas reports whether the PEM bundle at path holds cert.
func bundleHas(path string, cert *x509.Certificate) (bool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return false, nil
		}
		if block.Type == "CERTIFICATE" && bytes.Equal(block.Bytes, cert.Raw) {
			return true, nil
		}
	}
}

func runCAInstall(g globals, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("avpctl ca install", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	certFile := fs.String("cert", "", "")
	if err := fs.Parse(args); err != nil || fs.NArg() != 0 {
		return usageErr(stderr, "ca install [--cert FILE]   (default: the CA of the running avpd)")
	}
	var pemData []byte
	var err error
	if *certFile != "" {
		pemData, err = os.ReadFile(*certFile)
	} else {
		pemData, err = fetchCA(g)
	}
	if err != nil {
		return fail(stderr, err)
	}
	cert, err := parseCA(pemData)
	if err != nil {
		return fail(stderr, fmt.Errorf("CA certificate: %w", err))
	}
	st, err := detectStore()
	if err != nil {
		return fail(stderr, err)
	}
	if err := os.MkdirAll(st.Dir, 0o755); err != nil {
		return fail(stderr, err)
	}
	if err := writeFileAtomic(st.File, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644); err != nil {
		return fail(stderr, fmt.Errorf("write %s: %w", st.File, err))
	}
	if err := runUpdate(st.Update); err != nil {
		return fail(stderr, err)
	}
	ok, err := bundleHas(st.Bundle, cert)
	if err != nil || !ok {
		return fail(stderr, fmt.Errorf("%s ran, but %s does not hold the CA (%v); check the tool's output and /etc/ca-certificates.conf", strings.Join(st.Update, " "), st.Bundle, err))
	}
	fmt.Fprintf(stdout, "installed avpd's CA %s as %s\n", fingerprint(cert), st.File)
	fmt.Fprintf(stdout, "the system bundle %s now trusts it (%s)\n", st.Bundle, st.Distro)
	fmt.Fprintf(stdout, "for runtimes that ignore the system store (Node, Python requests): avpctl ca env --help\n")
	return 0
}

func runCAUninstall(stdout, stderr io.Writer) int {
	st, err := detectStore()
	if err != nil {
		return fail(stderr, err)
	}
	var old *x509.Certificate
	if data, err := os.ReadFile(st.File); err == nil {
		old, _ = parseCA(data)
	}
	if err := os.Remove(st.File); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(stdout, "%s is not installed\n", st.File)
			return 0
		}
		return fail(stderr, err)
	}
	// A full rebuild (Debian's --fresh) can take a minute on a loaded host: say so first.
	fmt.Fprintf(stderr, "rebuilding %s with %s (this can take a minute)\n", st.Bundle, strings.Join(st.Remove, " "))
	if err := runUpdate(st.Remove); err != nil {
		return fail(stderr, err)
	}
	if old != nil {
		if still, _ := bundleHas(st.Bundle, old); still {
			return fail(stderr, fmt.Errorf("%s ran, but %s still holds the CA; rebuild it by hand", strings.Join(st.Remove, " "), st.Bundle))
		}
	}
	fmt.Fprintf(stdout, "removed %s; %s no longer trusts avpd's CA\n", st.File, st.Bundle)
	return 0
}

func runUpdate(argv []string) error {
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return nil
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".avp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// caEnvVars are the variables of runtimes that do not read the system store, or read only
// their own bundle. The CA file alone goes where a runtime adds it to its built-in roots;
// the whole system bundle goes where a runtime replaces its roots with the file.
var caEnvVars = []struct {
	name, what string
	caOnly     bool
}{
	{"NODE_EXTRA_CA_CERTS", "Node.js: added to its built-in roots", true},
	{"DENO_CERT", "Deno: added to its roots", true},
	{"REQUESTS_CA_BUNDLE", "Python requests (certifi otherwise)", false},
	{"SSL_CERT_FILE", "OpenSSL-based runtimes (Python ssl, httpx, Ruby, PHP) and Go", false},
	{"CURL_CA_BUNDLE", "curl built without the system store", false},
	{"AWS_CA_BUNDLE", "AWS CLI and SDKs", false},
	{"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "gRPC core (Python, Ruby, C++)", false},
}

func runCAEnv(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("avpctl ca env", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	format := fs.String("format", "shell", "")
	caFile := fs.String("ca", "", "")
	bundle := fs.String("bundle", "", "")
	line := "ca env [--format shell|systemd|environment.d] [--ca FILE] [--bundle FILE]"
	if err := fs.Parse(args); err != nil {
		fmt.Fprintf(stderr, "avpctl ca env: %v\n", err)
		return usageErr(stderr, line)
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(stderr, "avpctl ca env: unexpected argument %q\n", fs.Arg(0))
		return usageErr(stderr, line)
	}
	switch *format {
	case "shell", "systemd", "environment.d":
	default:
		fmt.Fprintf(stderr, "avpctl ca env: unknown --format %q; use shell, systemd or environment.d\n", *format)
		return usageErr(stderr, line)
	}
	if *caFile == "" || *bundle == "" {
		st, err := detectStore()
		if err != nil {
			return fail(stderr, fmt.Errorf("%v; or give --ca and --bundle", err))
		}
		if *caFile == "" {
			*caFile = st.File
		}
		if *bundle == "" {
			*bundle = st.Bundle
		}
	}
	for _, p := range []string{*caFile, *bundle} {
		if _, err := os.Stat(p); err != nil {
			fmt.Fprintf(stderr, "avpctl: warning: %s does not exist yet; run \"avpctl ca install\" first\n", p)
		}
	}
	value := func(caOnly bool) string {
		if caOnly {
			return *caFile
		}
		return *bundle
	}
	switch *format {
	case "shell":
		fmt.Fprintln(stdout, "# agent-vault-proxy CA for runtimes that ignore the system store.")
		fmt.Fprintln(stdout, "# Put in /etc/profile.d/agent-vault-proxy.sh or the agent's ~/.profile.")
		for _, v := range caEnvVars {
			fmt.Fprintf(stdout, "export %s=%s\n", v.name, shellQuote(value(v.caOnly)))
		}
	case "systemd":
		fmt.Fprintln(stdout, "# agent-vault-proxy CA for runtimes that ignore the system store.")
		fmt.Fprintln(stdout, "# A drop-in for the agent's unit: systemctl edit AGENT.service")
		fmt.Fprintln(stdout, "[Service]")
		for _, v := range caEnvVars {
			fmt.Fprintf(stdout, "Environment=%s\n", systemdQuote(v.name+"="+value(v.caOnly)))
		}
	case "environment.d":
		fmt.Fprintln(stdout, "# agent-vault-proxy CA for runtimes that ignore the system store.")
		fmt.Fprintln(stdout, "# For user services and sessions: ~/.config/environment.d/50-agent-vault-proxy.conf")
		for _, v := range caEnvVars {
			fmt.Fprintf(stdout, "%s=%s\n", v.name, value(v.caOnly))
		}
	default:
		return usageErr(stderr, line)
	}
	return 0
}

// shellQuote single-quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// systemdQuote double-quotes an Environment= assignment, escaping what systemd would
// interpret: backslashes, double quotes and % specifiers.
func systemdQuote(s string) string {
	s = strings.ReplaceAll(s, `\`, `\\`)
	s = strings.ReplaceAll(s, `"`, `\"`)
	s = strings.ReplaceAll(s, "%", "%%")
	return `"` + s + `"`
}

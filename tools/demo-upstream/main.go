// Command avp-demo-upstream is the fake API server of `make demo`: an HTTPS server with its
// own throwaway CA that answers like an OpenAI-style API and prints, for each request, the
// Authorization it received with all but the last four characters masked.
//
// It exists only for the demo; it never echoes a header back to the client, so whatever the
// agent holds cannot have come from here.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.2:443", "address to serve HTTPS on")
	name := flag.String("name", "api.openai.com", "DNS name for the server certificate")
	caOut := flag.String("ca-out", "", "write the throwaway CA certificate (PEM) here")
	flag.Parse()

	cert, caPEM, err := selfCA(*name)
	if err != nil {
		log.Fatalf("create certificate: %v", err)
	}
	if *caOut != "" {
		if err := os.WriteFile(*caOut, caPEM, 0o644); err != nil {
			log.Fatalf("write %s: %v", *caOut, err)
		}
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen %s: %v", *listen, err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Printf("upstream %s received: %s %s  Authorization: %s\n", *name, r.Method, r.URL.Path, mask(r.Header.Get("Authorization")))
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"id":"chatcmpl-demo","object":"chat.completion","choices":[{"message":{"role":"assistant","content":"hello from the fake %s"}}]}`+"\n", *name)
		}),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}},
		ReadHeaderTimeout: 10 * time.Second,
	}
	log.SetFlags(0)
	log.Fatal(srv.Serve(tls.NewListener(ln, srv.TLSConfig)))
}

// mask keeps the scheme and the last four characters, enough to tell a placeholder from the
// real key without printing the key.
func mask(v string) string {
	if v == "" {
		return "(none)"
	}
	scheme, tok, ok := strings.Cut(v, " ")
	if !ok {
		scheme, tok = "", v
	} else {
		scheme += " "
	}
	if len(tok) <= 4 {
		return scheme + strings.Repeat("*", len(tok))
	}
	return scheme + strings.Repeat("*", len(tok)-4) + tok[len(tok)-4:]
}

func selfCA(name string) (tls.Certificate, []byte, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "avp demo upstream CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), nil
}

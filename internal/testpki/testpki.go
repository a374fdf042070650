// Package testpki makes certificates for tests: a CA, a server certificate
// for 127.0.0.1, a client certificate, and a client certificate of another
// CA, as PEM files and as tls.Certificates.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// PKI is a test's certificates. The files are in a temporary directory
// that the test removes.
type PKI struct {
	CAFile                string // the CA's certificate
	ServerCert, ServerKey string // for 127.0.0.1, signed by the CA
	ClientCert, ClientKey string // CN ClientCN, signed by the CA
	OtherCA               string // another CA's certificate
	Roots                 *x509.CertPool
	Client, OtherClient   tls.Certificate // OtherClient: CN ClientCN, signed by the other CA
	ClientCN              string
}

// New makes the certificates; clientCN names both clients.
func New(t testing.TB, clientCN string) *PKI {
	t.Helper()
	dir := t.TempDir()
	p := &PKI{Roots: x509.NewCertPool(), ClientCN: clientCN}
	ca, caKey := cert(t, "outpost test CA", nil, nil)
	p.Roots.AddCert(ca)
	p.CAFile = writePEM(t, dir, "ca.pem", "CERTIFICATE", ca.Raw)
	srv, srvKey := cert(t, "127.0.0.1", ca, caKey)
	p.ServerCert = writePEM(t, dir, "server.pem", "CERTIFICATE", srv.Raw)
	p.ServerKey = writeKey(t, dir, "server-key.pem", srvKey)
	cli, cliKey := cert(t, clientCN, ca, caKey)
	p.ClientCert = writePEM(t, dir, "client.pem", "CERTIFICATE", cli.Raw)
	p.ClientKey = writeKey(t, dir, "client-key.pem", cliKey)
	p.Client = tls.Certificate{Certificate: [][]byte{cli.Raw}, PrivateKey: cliKey}
	other, otherKey := cert(t, "another CA", nil, nil)
	p.OtherCA = writePEM(t, dir, "other-ca.pem", "CERTIFICATE", other.Raw)
	oc, ocKey := cert(t, clientCN, other, otherKey)
	p.OtherClient = tls.Certificate{Certificate: [][]byte{oc.Raw}, PrivateKey: ocKey}
	return p
}

// cert makes a certificate signed by parent, or a self-signed CA when
// parent is nil.
func cert(t testing.TB, cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	signer, signerKey := tmpl, key
	if parent == nil {
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
		tmpl.KeyUsage |= x509.KeyUsageCertSign
		tmpl.ExtKeyUsage = nil
	} else {
		signer, signerKey = parent, parentKey
	}
	if ip := net.ParseIP(cn); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

func writePEM(t testing.TB, dir, name, typ string, der []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func writeKey(t testing.TB, dir, name string, key *ecdsa.PrivateKey) string {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return writePEM(t, dir, name, "PRIVATE KEY", der)
}

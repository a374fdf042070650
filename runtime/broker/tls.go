package broker

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLS configures a TLS listener. Certificates are read once, in New.
type TLS struct {
	// CertFile and KeyFile are the PEM server certificate (chain) and key.
	CertFile, KeyFile string
	// ClientCAFile holds the PEM CA certificates that client certificates
	// must chain to. Empty: client certificates are not asked for.
	ClientCAFile string
	// RequireClientCert refuses clients without a valid certificate (the
	// TLS handshake fails). Without it, a certificate is verified when a
	// client presents one. Requires ClientCAFile.
	RequireClientCert bool
}

// config builds the listener's tls.Config: TLS 1.2 or later.
func (t *TLS) config() (*tls.Config, error) {
	if t.CertFile == "" || t.KeyFile == "" {
		return nil, errors.New("cert_file and key_file are required")
	}
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("server certificate: %w", err)
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	switch {
	case t.ClientCAFile != "":
		pem, err := os.ReadFile(t.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("client CA %s: no PEM certificate", t.ClientCAFile)
		}
		c.ClientCAs = pool
		c.ClientAuth = tls.VerifyClientCertIfGiven
		if t.RequireClientCert {
			c.ClientAuth = tls.RequireAndVerifyClientCert
		}
	case t.RequireClientCert:
		return nil, errors.New("require_client_cert needs client_ca_file")
	}
	return c, nil
}

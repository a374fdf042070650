package runtime

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/mqtttest"
)

// testPKI is a CA with a server certificate for 127.0.0.1 and a client
// certificate, written as PEM files.
type testPKI struct {
	dir                            string
	caFile, serverCert, serverKey  string
	clientCert, clientKey, otherCA string
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	p := &testPKI{dir: t.TempDir()}
	ca, caKey := makeCert(t, "outpost test CA", nil, nil, true)
	p.caFile = writePEM(t, p.dir, "ca.pem", "CERTIFICATE", ca.Raw)
	srv, srvKey := makeCert(t, "127.0.0.1", ca, caKey, false)
	p.serverCert = writePEM(t, p.dir, "server.pem", "CERTIFICATE", srv.Raw)
	p.serverKey = writeKey(t, p.dir, "server-key.pem", srvKey)
	cli, cliKey := makeCert(t, "outpost-test-gw", ca, caKey, false)
	p.clientCert = writePEM(t, p.dir, "client.pem", "CERTIFICATE", cli.Raw)
	p.clientKey = writeKey(t, p.dir, "client-key.pem", cliKey)
	other, _ := makeCert(t, "another CA", nil, nil, true)
	p.otherCA = writePEM(t, p.dir, "other-ca.pem", "CERTIFICATE", other.Raw)
	return p
}

// makeCert makes a certificate signed by parent (self-signed when parent is
// nil).
func makeCert(t *testing.T, cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, isCA bool) (*x509.Certificate, *ecdsa.PrivateKey) {
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
	if isCA {
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
		tmpl.KeyUsage |= x509.KeyUsageCertSign
		tmpl.ExtKeyUsage = nil
	}
	if ip := net.ParseIP(cn); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	signer, signerKey := tmpl, key
	if parent != nil {
		signer, signerKey = parent, parentKey
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func writePEM(t *testing.T, dir, name, typ string, der []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func writeKey(t *testing.T, dir, name string, key *ecdsa.PrivateKey) string {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return writePEM(t, dir, name, "PRIVATE KEY", der)
}

// startTLSUpstream starts Mosquitto with a plain listener (for the test's
// subscriber) and a TLS listener that requires a client certificate.
func startTLSUpstream(t *testing.T, p *testPKI) (up *mosqtest.Broker, tlsURL string) {
	t.Helper()
	port, err := mosqtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	extra := fmt.Sprintf("listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\nrequire_certificate true\n",
		port, p.caFile, p.serverCert, p.serverKey)
	up = mosqtest.StartT(t, mosqtest.Options{Extra: extra})
	return up, fmt.Sprintf("mqtts://127.0.0.1:%d", port)
}

// TestUplinkTLS forwards over mqtts:// with a CA file and a client
// certificate, and refuses, with a clear error and nothing lost, a server
// it cannot verify or a connection without the client certificate.
func TestUplinkTLS(t *testing.T) {
	requireClients(t)
	p := newTestPKI(t)
	up, tlsURL := startTLSUpstream(t, p)
	col := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/tls/ok")
	refusedCol := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/tls/refused")

	t.Run("client certificate", func(t *testing.T) {
		a := testAgent(t, tlsURL, func(c *Config) {
			c.Uplink.TLS = TLSConfig{CAFile: p.caFile, CertFile: p.clientCert, KeyFile: p.clientKey}
		})
		publishLines(t, a.BrokerAddrs()[0], "tls/ok", 0, 100)
		waitFor(t, 20*time.Second, func() error {
			if d, _ := col.Counts(); d < 100 {
				return fmt.Errorf("%d of 100 arrived over TLS; uplink %+v", d, *a.Status().Uplink)
			}
			return nil
		})
	})

	refused := []struct {
		name string
		tls  TLSConfig
		want string // in the uplink's last error
	}{
		{"unknown CA", TLSConfig{CAFile: p.otherCA, CertFile: p.clientCert, KeyFile: p.clientKey}, "certificate"},
		{"no client certificate", TLSConfig{CAFile: p.caFile}, ""},
	}
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			a := testAgent(t, tlsURL, func(c *Config) { c.Uplink.TLS = tc.tls })
			publishLines(t, a.BrokerAddrs()[0], "tls/refused", 0, 10)
			waitFor(t, 20*time.Second, func() error {
				st := a.Status().Uplink
				if st.LastError == "" || !strings.Contains(st.LastError, tc.want) {
					return fmt.Errorf("no %q error yet; uplink %+v", tc.want, *st)
				}
				return nil
			})
			st := a.Status()
			if st.Uplink.Connected || st.Uplink.Forwarded != 0 {
				t.Fatalf("uplink connected or forwarded without valid TLS: %+v", *st.Uplink)
			}
			if st.Outbox.Messages != 10 {
				t.Fatalf("outbox holds %d messages, want the 10 published", st.Outbox.Messages)
			}
			t.Logf("refused as expected: %s", st.Uplink.LastError)
		})
	}
	if d, _ := refusedCol.Counts(); d != 0 {
		t.Fatalf("%d messages arrived through a refused TLS connection", d)
	}
}

package runtime

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/mqtttest"
	"github.com/outpost-edge/outpost/internal/testpki"
)

// startTLSUpstream starts Mosquitto with a plain listener (for the test's
// subscriber) and a TLS listener that requires a client certificate.
func startTLSUpstream(t *testing.T, p *testpki.PKI) (up *mosqtest.Broker, tlsURL string) {
	t.Helper()
	port, err := mosqtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	extra := fmt.Sprintf("listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\nrequire_certificate true\n",
		port, p.CAFile, p.ServerCert, p.ServerKey)
	up = mosqtest.StartT(t, mosqtest.Options{Extra: extra})
	return up, fmt.Sprintf("mqtts://127.0.0.1:%d", port)
}

// TestUplinkTLS forwards over mqtts:// with a CA file and a client
// certificate, and refuses, with a clear error and nothing lost, a server
// it cannot verify or a connection without the client certificate.
func TestUplinkTLS(t *testing.T) {
	requireClients(t)
	p := testpki.New(t, "outpost-test-gw")
	up, tlsURL := startTLSUpstream(t, p)
	col := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/tls/ok")
	refusedCol := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/tls/refused")

	t.Run("client certificate", func(t *testing.T) {
		a := testAgent(t, tlsURL, func(c *Config) {
			c.Uplink.TLS = TLSConfig{CAFile: p.CAFile, CertFile: p.ClientCert, KeyFile: p.ClientKey}
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
		{"unknown CA", TLSConfig{CAFile: p.OtherCA, CertFile: p.ClientCert, KeyFile: p.ClientKey}, "certificate"},
		{"no client certificate", TLSConfig{CAFile: p.CAFile}, ""},
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

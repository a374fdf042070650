package uplink

import (
	"bytes"
	"context"
	"errors"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/outpost-edge/outpost/internal/mqtttest"
	"github.com/outpost-edge/outpost/storage"
)

// startRaw starts an uplink against a scripted server and returns the
// server side of its first connection, after the handshake.
func startRaw(t *testing.T, opts Options, connack *packets.Properties) (*Uplink, *mqtttest.RawConn, *packets.Connect) {
	t.Helper()
	srv := mqtttest.NewRawServer(t)
	ob, err := storage.Open(storage.Options{Dir: t.TempDir(), Routes: []storage.Route{{Name: "r"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ob.Close() })
	opts.URL, _ = url.Parse(srv.URL())
	opts.ClientID = "dev1"
	opts.Source = ob
	opts.Topic = func(m *storage.Message) string { return m.Topic }
	u, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := u.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = u.Close(ctx)
	})
	c := srv.Accept()
	cp := c.Handshake(connack)
	return u, c, cp
}

func TestCredentialsInConnect(t *testing.T) {
	var calls atomic.Int32 // the network orders the call before the read, unseen by the race detector
	_, _, cp := startRaw(t, Options{Credentials: func() (Credentials, error) {
		calls.Add(1)
		return Credentials{AuthMethod: "SAS", AuthData: []byte{1, 2, 3},
			UserProps: []Property{{Key: "api-version", Value: "2020-10-01-preview"}}}, nil
	}}, nil)
	if n := calls.Load(); n != 1 {
		t.Errorf("Credentials called %d times for one CONNECT", n)
	}
	p := cp.Properties
	if p.AuthMethod != "SAS" || !bytes.Equal(p.AuthData, []byte{1, 2, 3}) {
		t.Errorf("CONNECT auth method %q data %v", p.AuthMethod, p.AuthData)
	}
	if len(p.User) != 1 || p.User[0].Key != "api-version" || p.User[0].Value != "2020-10-01-preview" {
		t.Errorf("CONNECT user properties %v", p.User)
	}
	if p.RequestProblemInfo != nil {
		t.Errorf("CONNECT carries Request Problem Information = %d; it must be left at its default, 1", *p.RequestProblemInfo)
	}
	if cp.UsernameFlag || cp.PasswordFlag {
		t.Errorf("CONNECT has username flag %v, password flag %v; want neither", cp.UsernameFlag, cp.PasswordFlag)
	}
}

func TestSubscribeReceiveAndAckWithReason(t *testing.T) {
	got := make(chan *Inbound, 4)
	connected := make(chan struct{}, 1)
	_, c, _ := startRaw(t, Options{
		Subscriptions: []Subscription{{Filter: "$iothub/methods/+", QoS: 0}, {Filter: "$iothub/commands", QoS: 1}},
		OnMessage:     func(m *Inbound) { got <- m },
		OnConnect:     func() { connected <- struct{}{} },
	}, nil)

	sub := mqtttest.Expect[*packets.Subscribe](c)
	if len(sub.Subscriptions) != 2 || sub.Subscriptions[0].Topic != "$iothub/methods/+" || sub.Subscriptions[0].QoS != 0 ||
		sub.Subscriptions[1].Topic != "$iothub/commands" || sub.Subscriptions[1].QoS != 1 {
		t.Fatalf("SUBSCRIBE %+v: want both filters in one packet", sub.Subscriptions)
	}
	c.Send(&packets.Suback{PacketID: sub.PacketID, Reasons: []byte{0, 1}, Properties: &packets.Properties{}})
	select {
	case <-connected:
	case <-time.After(5 * time.Second):
		t.Fatal("OnConnect not called after the SUBACK")
	}

	// Two commands; the first is abandoned, the second completed. The
	// acknowledgements leave in the order the commands came.
	for i, id := range []uint16{7, 8} {
		c.Send(&packets.Publish{QoS: 1, PacketID: id, Topic: "$iothub/commands", Payload: []byte{byte('a' + i)},
			Properties: &packets.Properties{ContentType: "text/plain", User: []packets.User{{Key: "sequence-no", Value: "41"}}}})
	}
	m1, m2 := <-got, <-got
	if m1.Topic != "$iothub/commands" || string(m1.Payload) != "a" || m1.QoS != 1 || m1.ContentType != "text/plain" ||
		m1.Prop("sequence-no") != "41" {
		t.Fatalf("received %+v", m1)
	}
	if err := m2.Ack(0); err != nil { // the second first: held back until m1 is acknowledged
		t.Fatal(err)
	}
	if err := m1.Ack(0x83, Property{Key: "status", Value: "0603"}); err != nil {
		t.Fatal(err)
	}
	if err := m1.Ack(0); err == nil {
		t.Error("a second Ack of one message succeeded")
	}
	a1 := mqtttest.Expect[*packets.Puback](c)
	a2 := mqtttest.Expect[*packets.Puback](c)
	if a1.PacketID != 7 || a1.ReasonCode != 0x83 || len(a1.Properties.User) != 1 || a1.Properties.User[0] != (packets.User{Key: "status", Value: "0603"}) {
		t.Errorf("first PUBACK: id %d reason 0x%02x props %v; want 7, 0x83, status=0603", a1.PacketID, a1.ReasonCode, a1.Properties.User)
	}
	if a2.PacketID != 8 || a2.ReasonCode != 0 || len(a2.Properties.User) != 0 {
		t.Errorf("second PUBACK: id %d reason 0x%02x props %v; want 8, 0, none", a2.PacketID, a2.ReasonCode, a2.Properties.User)
	}
}

func TestSendQoS0WithCorrelation(t *testing.T) {
	u, c, _ := startRaw(t, Options{}, &packets.Properties{MaximumPacketSize: ptr[uint32](200)})
	waitConnected(t, u)
	err := u.Send(context.Background(), Outbound{Topic: "$iothub/twin/get", CorrelationData: []byte{0, 1, 0xff},
		UserProps: []Property{{Key: "if-version", Value: "3"}}})
	if err != nil {
		t.Fatal(err)
	}
	p := mqtttest.Expect[*packets.Publish](c)
	if p.Topic != "$iothub/twin/get" || p.QoS != 0 || p.Retain || len(p.Payload) != 0 ||
		!bytes.Equal(p.Properties.CorrelationData, []byte{0, 1, 0xff}) || len(p.Properties.User) != 1 {
		t.Errorf("sent %+v props %+v", p, p.Properties)
	}
	err = u.Send(context.Background(), Outbound{Topic: "$iothub/twin/patch/reported", Payload: make([]byte, 300)})
	if !errors.Is(err, ErrTooLarge) {
		t.Errorf("a packet over the Maximum Packet Size: err %v, want ErrTooLarge", err)
	}
}

func TestSendWhileDown(t *testing.T) {
	u, err := New(Options{URL: &url.URL{Scheme: "mqtt", Host: "127.0.0.1:1"}, ClientID: "x",
		Source: nopSource{}, Topic: func(*storage.Message) string { return "" }})
	if err != nil {
		t.Fatal(err)
	}
	if err := u.Send(context.Background(), Outbound{Topic: "t"}); !errors.Is(err, ErrLost) {
		t.Errorf("Send before Start: %v, want ErrLost", err)
	}
}

func TestReauthenticate(t *testing.T) {
	u, c, _ := startRaw(t, Options{}, nil)
	waitConnected(t, u)
	res := make(chan error, 1)
	go func() {
		res <- u.Reauthenticate(context.Background(), Credentials{AuthMethod: "SAS", AuthData: []byte("sig2"),
			UserProps: []Property{{Key: "sas-at", Value: "1"}, {Key: "sas-expiry", Value: "2"}}})
	}()
	a := mqtttest.Expect[*packets.Auth](c)
	if a.ReasonCode != 0x19 || a.Properties.AuthMethod != "SAS" || string(a.Properties.AuthData) != "sig2" || len(a.Properties.User) != 2 {
		t.Fatalf("AUTH reason 0x%02x props %+v", a.ReasonCode, a.Properties)
	}
	c.Send(&packets.Auth{ReasonCode: 0, Properties: &packets.Properties{AuthMethod: "SAS"}})
	if err := <-res; err != nil {
		t.Fatal(err)
	}
}

func waitConnected(t *testing.T, u *Uplink) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !u.Stats().Connected {
		if time.Now().After(deadline) {
			t.Fatal("uplink not connected")
		}
		time.Sleep(time.Millisecond)
	}
}

func ptr[T any](v T) *T { return &v }

type nopSource struct{}

func (nopSource) Next(storage.Cursor, int) ([]storage.Message, error) { return nil, nil }
func (nopSource) Ack(...storage.Ref) error                            { return nil }
func (nopSource) Notify() <-chan struct{}                             { return nil }
func (nopSource) MessageID(uint64) string                             { return "" }

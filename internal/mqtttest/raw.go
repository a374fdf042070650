package mqtttest

import (
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

// RawServer is an MQTT 5 server scripted by a test, packet by packet: the
// test reads what a client sends, exactly as it was encoded, and writes
// what a hub would answer. It checks a client's wire format against the
// specification rather than against another implementation's leniency.
type RawServer struct {
	t  testing.TB
	ln net.Listener
}

// NewRawServer listens on a free loopback port until the test ends.
func NewRawServer(t testing.TB) *RawServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	return &RawServer{t: t, ln: ln}
}

// Addr is the server's host:port.
func (s *RawServer) Addr() string { return s.ln.Addr().String() }

// URL is the server's mqtt:// URL.
func (s *RawServer) URL() string { return "mqtt://" + s.Addr() }

// Accept waits (at most 10 s) for the next client connection.
func (s *RawServer) Accept() *RawConn {
	s.t.Helper()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := s.ln.Accept(); ch <- res{c, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			s.t.Fatalf("raw server: accept: %v", r.err)
		}
		s.t.Cleanup(func() { _ = r.c.Close() })
		return &RawConn{t: s.t, c: r.c}
	case <-time.After(10 * time.Second):
		s.t.Fatal("raw server: no client connected within 10s")
		return nil
	}
}

// RawConn is one client connection of a RawServer.
type RawConn struct {
	t testing.TB
	c net.Conn
}

// Read returns the next packet from the client, waiting at most 10 s.
func (c *RawConn) Read() *packets.ControlPacket {
	c.t.Helper()
	_ = c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	cp, err := packets.ReadPacket(c.c)
	if err != nil {
		c.t.Fatalf("raw server: read: %v", err)
	}
	return cp
}

// ReadSkipping returns the next packet that is not a PINGREQ, answering
// those.
func (c *RawConn) ReadSkipping() *packets.ControlPacket {
	c.t.Helper()
	for {
		cp := c.Read()
		if cp.Type != packets.PINGREQ {
			return cp
		}
		c.Send(packets.NewControlPacket(packets.PINGRESP).Content)
	}
}

// Expect reads the next packet (answering PINGREQs) and fails the test
// unless it is a T.
func Expect[T any](c *RawConn) T {
	c.t.Helper()
	cp := c.ReadSkipping()
	v, ok := cp.Content.(T)
	if !ok {
		var want T
		c.t.Fatalf("raw server: read %T, want %T", cp.Content, want)
	}
	return v
}

// Send sends one packet to the client.
func (c *RawConn) Send(p packets.Packet) {
	c.t.Helper()
	_ = c.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := p.WriteTo(c.c); err != nil {
		c.t.Fatalf("raw server: write: %v", err)
	}
}

// Handshake reads the client's CONNECT, answers CONNACK success with props
// (nil = none), and returns the CONNECT.
func (c *RawConn) Handshake(props *packets.Properties) *packets.Connect {
	c.t.Helper()
	cp := Expect[*packets.Connect](c)
	if props == nil {
		props = &packets.Properties{}
	}
	c.Send(&packets.Connack{Properties: props})
	return cp
}

// Close closes the connection.
func (c *RawConn) Close() { _ = c.c.Close() }

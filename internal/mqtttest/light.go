package mqtttest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Light is an MQTT 5 client for load generators: mochi's packet codec on a
// plain connection, no session state, QoS 0 only. A paho client allocates
// about 8 KiB to read each packet; on a 2-core machine that load generator
// takes CPU from the broker it measures. Publish may be called while
// another goroutine is in ReadPublish; Subscribe reads too, so it must not
// run while ReadPublish does.
type Light struct {
	conn net.Conn
	r    *bufio.Reader
	wmu  sync.Mutex
	wbuf bytes.Buffer
}

// DialLight connects to addr as id and waits for the CONNACK, for at most
// 10 s.
func DialLight(addr, id string) (*Light, error) {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	defer conn.SetDeadline(time.Time{})
	l := &Light{conn: conn, r: bufio.NewReaderSize(conn, 64<<10)}
	connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id}}
	if err := l.write(connect.ConnectEncode); err != nil {
		conn.Close()
		return nil, fmt.Errorf("connect: %w", err)
	}
	pk, err := l.read()
	if err != nil || pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		conn.Close()
		return nil, fmt.Errorf("connect: no CONNACK 0 (type %d, reason %d): %v", pk.FixedHeader.Type, pk.ReasonCode, err)
	}
	return l, nil
}

// Subscribe subscribes to filter at QoS 0 and waits for the SUBACK.
func (l *Light) Subscribe(filter string) error {
	sub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 5, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: filter}}}
	if err := l.write(sub.SubscribeEncode); err != nil {
		return err
	}
	pk, err := l.read()
	if err != nil || pk.FixedHeader.Type != packets.Suback || len(pk.ReasonCodes) != 1 || pk.ReasonCodes[0] != 0 {
		return fmt.Errorf("subscribe %s: no SUBACK 0 (%+v): %v", filter, pk.ReasonCodes, err)
	}
	return nil
}

// Publish sends a QoS 0 PUBLISH with a Response Topic and Correlation Data
// (either may be empty).
func (l *Light) Publish(topic string, payload []byte, responseTopic string, correlation []byte) error {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 5, TopicName: topic,
		Payload: payload, Properties: packets.Properties{ResponseTopic: responseTopic, CorrelationData: correlation},
		Mods: packets.Mods{AllowResponseInfo: true}} // mochi encodes these only when allowed
	return l.write(pk.PublishEncode)
}

// ReadPublish returns the next PUBLISH; other packets are skipped.
func (l *Light) ReadPublish() (packets.Packet, error) {
	for {
		pk, err := l.read()
		if err != nil || pk.FixedHeader.Type == packets.Publish {
			return pk, err
		}
	}
}

// Close sends a DISCONNECT and closes the connection.
func (l *Light) Close() error {
	d := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ProtocolVersion: 5}
	_ = l.write(d.DisconnectEncode)
	return l.conn.Close()
}

func (l *Light) write(encode func(*bytes.Buffer) error) error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.wbuf.Reset()
	if err := encode(&l.wbuf); err != nil {
		return err
	}
	_, err := l.conn.Write(l.wbuf.Bytes())
	return err
}

func (l *Light) read() (packets.Packet, error) {
	var pk packets.Packet
	b, err := l.r.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(b); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(l.r)
	if err != nil {
		return pk, err
	}
	pk.FixedHeader.Remaining = n
	buf := make([]byte, n)
	if _, err := io.ReadFull(l.r, buf); err != nil {
		return pk, err
	}
	pk.ProtocolVersion = 5
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(buf)
	case packets.Suback:
		err = pk.SubackDecode(buf)
	case packets.Publish:
		err = pk.PublishDecode(buf)
	}
	return pk, err
}

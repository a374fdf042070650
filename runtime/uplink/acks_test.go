package uplink

import (
	"bytes"
	"errors"
	"io"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/outpost-edge/outpost/internal/batchconn"
)

type ack struct {
	id     uint16
	reason byte
	props  string // the user properties, as key=value
}

// readThrough writes stream into an ackReader in chunks of chunk bytes and
// returns what paho reads from it (until the error that ends it) and the
// acknowledgements taken out.
func readThrough(t *testing.T, stream []byte, chunk int) ([]*packets.ControlPacket, []ack, error) {
	t.Helper()
	client, server := net.Pipe()
	defer client.Close()
	go func() {
		for b := stream; len(b) > 0; {
			n := min(chunk, len(b))
			if _, err := server.Write(b[:n]); err != nil {
				return
			}
			b = b[n:]
		}
		server.Close()
	}()
	var acks []ack
	ar := newAckReader(batchconn.New(client).(lockedConn), client, func(id uint16, reason byte, props []Property) {
		var ps []string
		for _, p := range props {
			ps = append(ps, p.Key+"="+p.Value)
		}
		acks = append(acks, ack{id, reason, strings.Join(ps, ",")})
	})
	var got []*packets.ControlPacket
	for {
		cp, err := packets.ReadPacket(ar)
		if err != nil {
			return got, acks, err
		}
		got = append(got, cp)
	}
}

func encode(t *testing.T, ps ...packets.Packet) []byte {
	t.Helper()
	var b bytes.Buffer
	for _, p := range ps {
		if _, err := p.WriteTo(&b); err != nil {
			t.Fatal(err)
		}
	}
	return b.Bytes()
}

// TestAckReaderTakesOutPubacks: PUBACKs of every shape (success without a
// reason code, a reason code, properties larger than the read buffer) are
// taken out of the stream with their identifier and reason; every other
// packet, including one larger than the read buffer, reaches paho intact and
// in order, however the bytes are split.
func TestAckReaderTakesOutPubacks(t *testing.T) {
	big := bytes.Repeat([]byte("p"), 3*ackReadBuffer)
	stream := encode(t,
		&packets.Connack{Properties: &packets.Properties{}},
		&packets.Puback{PacketID: 1, Properties: &packets.Properties{}},
		&packets.Publish{Topic: "cmd", QoS: 1, PacketID: 7, Payload: big, Properties: &packets.Properties{}},
		&packets.Puback{PacketID: 0x1234, ReasonCode: 0x10, Properties: &packets.Properties{}},
		&packets.Pingresp{},
		&packets.Puback{PacketID: 3, ReasonCode: 0x97, Properties: &packets.Properties{ReasonString: strings.Repeat("r", 2*ackReadBuffer)}},
		&packets.Suback{PacketID: 9, Reasons: []byte{1}, Properties: &packets.Properties{}},
		&packets.Puback{PacketID: 4, ReasonCode: 0x83, Properties: &packets.Properties{ReasonString: "bad",
			User: []packets.User{{Key: "status", Value: "0100"}, {Key: "trace-id", Value: "t1"}}}},
		&packets.Puback{PacketID: 5, ReasonCode: 0x10, Properties: &packets.Properties{ // a success: properties not read
			User: []packets.User{{Key: "status", Value: "0001"}}}},
	)
	wantAcks := []ack{{1, 0, ""}, {0x1234, 0x10, ""}, {3, 0x97, ""}, {4, 0x83, "status=0100,trace-id=t1"}, {5, 0x10, ""}}
	for _, chunk := range []int{len(stream), 1, 7, 4096} {
		got, acks, err := readThrough(t, stream, chunk)
		if !errors.Is(err, io.EOF) {
			t.Fatalf("chunk %d: stream ended with %v, want EOF", chunk, err)
		}
		if !reflect.DeepEqual(acks, wantAcks) {
			t.Fatalf("chunk %d: acks %v, want %v", chunk, acks, wantAcks)
		}
		var types []byte
		for _, cp := range got {
			types = append(types, cp.Type)
		}
		if want := []byte{packets.CONNACK, packets.PUBLISH, packets.PINGRESP, packets.SUBACK}; !bytes.Equal(types, want) {
			t.Fatalf("chunk %d: paho read packet types %v, want %v", chunk, types, want)
		}
		pub := got[1].Content.(*packets.Publish)
		if pub.Topic != "cmd" || pub.PacketID != 7 || !bytes.Equal(pub.Payload, big) {
			t.Fatalf("chunk %d: the PUBLISH changed on the way: topic %q id %d %d bytes", chunk, pub.Topic, pub.PacketID, len(pub.Payload))
		}
		if sa := got[3].Content.(*packets.Suback); sa.PacketID != 9 {
			t.Fatalf("chunk %d: SUBACK id %d, want 9", chunk, sa.PacketID)
		}
	}
}

// TestAckReaderMalformed: a remaining length that does not end within four
// bytes, a PUBACK too short for an identifier, and a stream cut inside a
// PUBACK end the stream with an error, and no acknowledgement is made up.
func TestAckReaderMalformed(t *testing.T) {
	for name, tc := range map[string]struct {
		stream []byte
		want   error
	}{
		"length over 4 bytes": {[]byte{0x40, 0xff, 0xff, 0xff, 0xff, 0x01}, errMalformedLength},
		"short PUBACK":        {[]byte{0x40, 0x01, 0x00}, nil},
		"cut in a PUBACK":     {[]byte{0x40, 0x03, 0x00}, io.ErrUnexpectedEOF},
		"cut in a header":     {[]byte{0x40, 0x80}, io.ErrUnexpectedEOF},
	} {
		got, acks, err := readThrough(t, tc.stream, 1)
		if err == nil || errors.Is(err, io.EOF) || (tc.want != nil && !errors.Is(err, tc.want)) {
			t.Errorf("%s: stream ended with %v, want %v", name, err, tc.want)
		}
		if len(got) != 0 || len(acks) != 0 {
			t.Errorf("%s: read %d packets and %d acks, want none", name, len(got), len(acks))
		}
	}
}

// TestAckReaderPaces: with pacing on, the reader waits before reading the
// socket only when everything read so far is handled, and nothing is lost
// or reordered.
func TestAckReaderPaces(t *testing.T) {
	stream := encode(t,
		&packets.Puback{PacketID: 1, Properties: &packets.Properties{}},
		&packets.Pingresp{},
		&packets.Puback{PacketID: 2, ReasonCode: 0x10, Properties: &packets.Properties{}},
	)
	client, server := net.Pipe()
	defer client.Close()
	go func() {
		_, _ = server.Write(stream) // one write: one read takes it all
		server.Close()
	}()
	var acks []ack
	ar := newAckReader(batchconn.New(client).(lockedConn), client, func(id uint16, reason byte, props []Property) {
		var ps []string
		for _, p := range props {
			ps = append(ps, p.Key+"="+p.Value)
		}
		acks = append(acks, ack{id, reason, strings.Join(ps, ",")})
	})
	paced := 0
	ar.pace = func() time.Duration { paced++; return time.Millisecond }
	var types []byte
	for {
		cp, err := packets.ReadPacket(ar)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("stream ended with %v, want EOF", err)
			}
			break
		}
		types = append(types, cp.Type)
	}
	if want := []ack{{1, 0, ""}, {2, 0x10, ""}}; !reflect.DeepEqual(acks, want) {
		t.Fatalf("acks %v, want %v", acks, want)
	}
	if !bytes.Equal(types, []byte{packets.PINGRESP}) {
		t.Fatalf("paho read %v, want only the PINGRESP", types)
	}
	// Once before the first read, once before the read that finds the end:
	// never while packets were buffered.
	if paced != 2 {
		t.Fatalf("paced %d times, want 2", paced)
	}
}

package storage

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestRecordRoundTrip(t *testing.T) {
	created := time.UnixMilli(1_700_000_000_123)
	tests := []struct {
		name string
		m    Message
	}{
		{"empty", Message{Created: created}},
		{"qos0 plain", Message{Topic: "a/b", Payload: []byte("21.5"), Created: created}},
		{"everything", Message{
			Topic: "plant/line1/temp", Payload: []byte{0, 1, 2, 255}, QoS: 1, Retain: true,
			ContentType: "application/json", ResponseTopic: "r/t", CorrelationData: []byte("corr"),
			PayloadUTF8: true, UserProps: []Property{{"k", "v"}, {"", ""}, {"k", "v2"}},
			Created: created, Expires: created.Add(time.Hour),
		}},
		{"qos2 large", Message{Topic: strings.Repeat("t", 65535), Payload: bytes.Repeat([]byte{7}, 1<<20), QoS: 2, Created: created}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := encodeRecord(nil, &tc.m)
			var got Message
			if err := decodeRecord(b, &got); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(normalize(got), normalize(tc.m)) {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, tc.m)
			}
		})
	}
}

// normalize makes empty and nil slices equal and drops monotonic clocks.
func normalize(m Message) Message {
	if len(m.Payload) == 0 {
		m.Payload = nil
	}
	if len(m.CorrelationData) == 0 {
		m.CorrelationData = nil
	}
	if len(m.UserProps) == 0 {
		m.UserProps = nil
	}
	m.Created = m.Created.Round(0).UTC()
	if !m.Expires.IsZero() {
		m.Expires = m.Expires.Round(0).UTC()
	}
	return m
}

func TestRecordRejectsGarbage(t *testing.T) {
	good := encodeRecord(nil, &Message{Topic: "a", Payload: []byte("p"), Created: time.UnixMilli(1)})
	tests := map[string][]byte{
		"empty":     nil,
		"version":   append([]byte{9}, good[1:]...),
		"flags":     append([]byte{1, 0xff}, good[2:]...),
		"truncated": good[:len(good)-1],
		"trailing":  append(append([]byte{}, good...), 0),
		"huge len":  {1, 0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f},
	}
	for name, b := range tests {
		var m Message
		err := decodeRecord(b, &m)
		if err == nil || !strings.HasPrefix(err.Error(), "storage: record:") {
			t.Errorf("%s: error %v, want a storage: record: error", name, err)
		}
	}
}

func FuzzRecord(f *testing.F) {
	f.Add(encodeRecord(nil, &Message{Topic: "a/b", Payload: []byte("x"), QoS: 1, Created: time.UnixMilli(5)}))
	f.Add(encodeRecord(nil, &Message{Topic: "t", UserProps: []Property{{"a", "b"}}, Expires: time.UnixMilli(9), Created: time.UnixMilli(1)}))
	f.Add([]byte{1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var m Message
		if err := decodeRecord(b, &m); err != nil {
			return
		}
		// A record that decodes re-encodes to a record that decodes to the same message.
		var m2 Message
		if err := decodeRecord(encodeRecord(nil, &m), &m2); err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if !reflect.DeepEqual(normalize(m), normalize(m2)) {
			t.Fatalf("unstable: %+v vs %+v", m, m2)
		}
	})
}

// FuzzSegment: splitting arbitrary bytes into records never panics, and a
// segment that splits re-frames into one that splits into the same records.
// Keys parse back to the segment they name.
func FuzzSegment(f *testing.F) {
	rec := encodeRecord(nil, &Message{Topic: "a/b", Payload: []byte("x"), QoS: 1, Created: time.UnixMilli(5)})
	f.Add(appendFramed(appendFramed(nil, rec), rec), uint8(2), []byte("r"), uint64(7))
	f.Add([]byte{0}, uint8(1), []byte{}, uint64(1))
	f.Add([]byte{5, 1}, uint8(3), []byte("route"), uint64(2))
	f.Fuzz(func(t *testing.T, b []byte, n uint8, route []byte, last uint64) {
		var recs [][]byte
		err := splitSegment(b, int(n), func(_ int, r []byte) bool { recs = append(recs, r); return true })
		if err == nil {
			if len(recs) != int(n) {
				t.Fatalf("%d records from a segment of %d", len(recs), n)
			}
			var again []byte
			for _, r := range recs {
				again = appendFramed(again, r)
			}
			var recs2 [][]byte
			if err := splitSegment(again, int(n), func(_ int, r []byte) bool { recs2 = append(recs2, r); return true }); err != nil {
				t.Fatalf("re-framed segment does not split: %v", err)
			}
			if !reflect.DeepEqual(recs, recs2) {
				t.Fatalf("unstable: %q vs %q", recs, recs2)
			}
		}
		if len(route) > 255 || n == 0 || uint64(n) > last {
			return
		}
		s := segment{route: string(route), last: last, n: uint32(n)}
		got, ok := parseKey(s.key())
		if !ok || got != s {
			t.Fatalf("key of %+v parses to %+v, %v", s, got, ok)
		}
	})
}

package mqtttest

import (
	"bytes"
	"testing"

	"github.com/outpost-edge/outpost/runtime/broker"
	"github.com/outpost-edge/outpost/storage"
)

// TestLight: a Light client's publish reaches a subscriber through the
// local broker with its response topic and correlation data.
func TestLight(t *testing.T) {
	br, err := broker.New(broker.Options{
		Listeners: []broker.Listener{{Address: "127.0.0.1:0"}},
		Route:     func(string) (string, bool) { return "", false },
		Store:     func(*storage.Message, func(uint64, error)) error { return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := br.Start(); err != nil {
		t.Fatal(err)
	}
	defer br.Close()
	sub, err := DialLight(br.Addrs()[0], "sub")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if err := sub.Subscribe("light/#"); err != nil {
		t.Fatal(err)
	}
	pub, err := DialLight(br.Addrs()[0], "pub")
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	if err := pub.Publish("light/a", []byte("hello"), "light/replies", []byte{1, 2}); err != nil {
		t.Fatal(err)
	}
	pk, err := sub.ReadPublish()
	if err != nil {
		t.Fatal(err)
	}
	if pk.TopicName != "light/a" || string(pk.Payload) != "hello" || pk.Properties.ResponseTopic != "light/replies" || !bytes.Equal(pk.Properties.CorrelationData, []byte{1, 2}) {
		t.Fatalf("got %q %q %q %x", pk.TopicName, pk.Payload, pk.Properties.ResponseTopic, pk.Properties.CorrelationData)
	}
}

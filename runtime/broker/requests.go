package broker

import (
	"errors"
	"fmt"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/outpost-edge/outpost/runtime/router"
)

// Request is a publish to one of the request filters: a local client asks
// for a method, a command or an action (MQTT 5 request/response).
type Request struct {
	Topic           string
	Payload         []byte // the broker's copy; the receiver may keep it
	QoS             byte
	ContentType     string
	ResponseTopic   string // "" = no response expected
	CorrelationData []byte
	ExpirySeconds   uint32 // MQTT 5 Message Expiry Interval; 0 = none
	UserProps       [][2]string
}

// Response is published on a request's response topic.
type Response struct {
	Topic           string
	Payload         []byte
	QoS             byte
	ContentType     string
	CorrelationData []byte
	UserProps       [][2]string
}

// HandleRequests delivers every publish matching filter to fn, on the
// publisher's goroutine: fn must not block. Such publishes are never stored
// or forwarded upstream, whatever the routes say. Call before Start.
func (b *Broker) HandleRequests(filter string, id int, fn func(Request)) error {
	if !mqtt.IsValidFilter(filter, false) {
		return fmt.Errorf("broker: request filter %q is not a valid topic filter", filter)
	}
	filters := append(b.hook.requestFilters, filter)
	rt, err := router.New([]router.Rule{{Route: "requests", Match: filters}})
	if err != nil {
		return fmt.Errorf("broker: request filter: %w", err)
	}
	b.hook.requestFilters, b.hook.requests = filters, rt
	err = b.srv.Subscribe(filter, id, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
		p := &pk.Properties
		r := Request{
			Topic:           pk.TopicName,
			Payload:         append([]byte(nil), pk.Payload...),
			QoS:             pk.FixedHeader.Qos,
			ContentType:     p.ContentType,
			ResponseTopic:   p.ResponseTopic,
			CorrelationData: append([]byte(nil), p.CorrelationData...),
			ExpirySeconds:   p.MessageExpiryInterval,
		}
		for _, u := range p.User {
			r.UserProps = append(r.UserProps, [2]string{u.Key, u.Val})
		}
		fn(r)
	})
	if err != nil {
		return fmt.Errorf("broker: subscribe %q: %w", filter, err)
	}
	return nil
}

// ErrRequestTopic is returned for a response or a publish of the agent's
// on a request topic: the agent publishes without ACLs and would serve it,
// so a client could make the agent call a handler it chose.
var ErrRequestTopic = errors.New("broker: a request topic")

// IsRequestTopic reports whether topic matches a filter given to
// HandleRequests.
func (b *Broker) IsRequestTopic(topic string) bool { return b.hook.isRequest(topic) }

// Respond publishes a response to local subscribers. Responses stay local:
// they are not stored or forwarded. A response topic that is a request
// topic is refused with ErrRequestTopic.
func (b *Broker) Respond(r Response) error {
	if !mqtt.IsValidFilter(r.Topic, true) {
		return fmt.Errorf("broker: response topic %q is not a valid topic", r.Topic)
	}
	if b.hook.isRequest(r.Topic) {
		return fmt.Errorf("%w: response topic %q", ErrRequestTopic, r.Topic)
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: r.QoS},
		TopicName:   r.Topic,
		Payload:     r.Payload,
		PacketID:    uint16(r.QoS),
		Properties: packets.Properties{
			ContentType:     r.ContentType,
			CorrelationData: r.CorrelationData,
		},
	}
	for _, u := range r.UserProps {
		pk.Properties.User = append(pk.Properties.User, packets.UserProperty{Key: u[0], Val: u[1]})
	}
	cl, ok := b.srv.Clients.Get(mqtt.InlineClientId)
	if !ok {
		return fmt.Errorf("broker: respond on %q: no inline client", r.Topic)
	}
	if err := b.srv.InjectPacket(cl, pk); err != nil {
		return fmt.Errorf("broker: respond on %q: %w", r.Topic, err)
	}
	return nil
}

// PublishLocal publishes to local subscribers only, as the agent: it is
// not stored or forwarded (the caller stores what must go upstream). A
// request topic is refused with ErrRequestTopic.
func (b *Broker) PublishLocal(topic string, payload []byte, qos byte) error {
	if b.hook.isRequest(topic) {
		return fmt.Errorf("%w: %q", ErrRequestTopic, topic)
	}
	if err := b.srv.Publish(topic, payload, false, qos); err != nil {
		return fmt.Errorf("broker: publish %q: %w", topic, err)
	}
	return nil
}

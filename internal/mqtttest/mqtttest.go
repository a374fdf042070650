// Package mqtttest holds MQTT clients for tests: a collector that counts
// what arrives upstream across broker restarts, and a publisher that records
// which messages the broker acknowledged.
package mqtttest

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/paho"
)

// Collector is a subscriber with a persistent session that reconnects after
// broker restarts and counts every payload it receives.
type Collector struct {
	mu    sync.Mutex
	seen  map[string]int // payload -> times received
	order []string       // payloads in order of first arrival
}

// NewCollector subscribes to filter at QoS 1 on the broker at brokerURL and
// returns once the subscription is acknowledged. It stops with the test.
func NewCollector(t testing.TB, brokerURL, filter string) *Collector {
	t.Helper()
	c := &Collector{seen: map[string]int{}}
	u, err := url.Parse(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	subscribed := make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	cm, err := autopaho.NewConnection(ctx, autopaho.ClientConfig{
		ServerUrls: []*url.URL{u},
		KeepAlive:  5,
		// Clean start off even on the first connection (the client id is
		// new, so there is no old session): Mosquitto 2.0.11 saves a session
		// to its persistence file only when the client connected without
		// clean start, so after a restart of the broker the subscription
		// would be gone until the collector reconnects, and what arrived
		// meanwhile would be acknowledged with 0x10 (no matching
		// subscribers) and dropped.
		CleanStartOnInitialConnection: false,
		SessionExpiryInterval:         3600,
		ReconnectBackoff:              autopaho.NewConstantBackoff(50 * time.Millisecond),
		OnConnectionUp: func(cm *autopaho.ConnectionManager, _ *paho.Connack) {
			go func() {
				sub := &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}}
				if _, err := cm.Subscribe(ctx, sub); err == nil {
					select {
					case subscribed <- struct{}{}:
					default:
					}
				}
			}()
		},
		ClientConfig: paho.ClientConfig{
			ClientID: fmt.Sprintf("collector-%d", time.Now().UnixNano()),
			OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
				p := string(pr.Packet.Payload)
				c.mu.Lock()
				if c.seen[p] == 0 {
					c.order = append(c.order, p)
				}
				c.seen[p]++
				c.mu.Unlock()
				return true, nil
			}},
		},
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		<-cm.Done()
	})
	select {
	case <-subscribed:
	case <-time.After(10 * time.Second):
		t.Fatal("collector did not subscribe within 10s")
	}
	return c
}

// Counts returns how many distinct payloads arrived and how many extra
// copies (duplicates).
func (c *Collector) Counts() (distinct, dups int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range c.seen {
		distinct++
		dups += n - 1
	}
	return distinct, dups
}

// Has reports whether payload arrived.
func (c *Collector) Has(payload string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seen[payload] > 0
}

// Order returns the payloads in order of first arrival.
func (c *Collector) Order() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.order...)
}

// Client connects an MQTT 5 paho client to addr. It disconnects with the test.
func Client(t testing.TB, addr, id string) *paho.Client {
	t.Helper()
	c, err := Dial(addr, id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	return c
}

// Dial connects an MQTT 5 paho client to addr.
func Dial(addr, id string) (*paho.Client, error) { return DialWith(addr, id, nil) }

// DialWith is Dial with the client's configuration adjusted by configure
// (callbacks, typically) before it connects.
func DialWith(addr, id string, configure func(*paho.ClientConfig)) (*paho.Client, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	cfg := paho.ClientConfig{ClientID: id, Conn: conn}
	if configure != nil {
		configure(&cfg)
	}
	c := paho.NewClient(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30}); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// Publisher publishes numbered QoS 1 messages from several goroutines and
// records each one the broker acknowledged. Payloads are the decimal numbers.
type Publisher struct {
	acked sync.Map // payload -> struct{}
	count atomic.Int64
}

// Run publishes messages 0..n-1 to topic on addr with workers connections in
// parallel (message i goes through worker i % workers), and returns when all
// are acknowledged or a connection fails. It returns the first error.
func (p *Publisher) Run(addr, topic string, n, workers int) error {
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := Dial(addr, fmt.Sprintf("pub-%d-%d", time.Now().UnixNano(), w))
			if err != nil {
				errs <- err
				return
			}
			defer c.Disconnect(&paho.Disconnect{})
			for i := w; i < n; i += workers {
				payload := strconv.Itoa(i)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)})
				cancel()
				if err != nil {
					errs <- fmt.Errorf("publish %d: %w", i, err)
					return
				}
				p.acked.Store(payload, struct{}{})
				p.count.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// Acked returns how many messages were acknowledged so far.
func (p *Publisher) Acked() int64 { return p.count.Load() }

// AckedPayloads returns every acknowledged payload.
func (p *Publisher) AckedPayloads() []string {
	var out []string
	p.acked.Range(func(k, _ any) bool {
		out = append(out, k.(string))
		return true
	})
	return out
}

package hub

import (
	"bytes"
	"net"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Dialects of a connection.
const (
	dialectAzure  = "azure"
	dialectWatson = "watson"
	// dialectObserver is a loopback client without credentials: it reads
	// everything, and publishes as a plain MQTT 5 client (the generic
	// dialect) outside the hubs' namespaces.
	dialectObserver = "observer"
)

// reserved reports whether topic is in a hub dialect's namespace, where a
// plain client may not publish.
func reserved(topic string) bool {
	for _, p := range []string{"$", "iot-2/", "iotdevice-1/", "iotdm-1/"} {
		if strings.HasPrefix(topic, p) {
			return true
		}
	}
	return false
}

// hook connects mochi's events to the hub.
type hook struct {
	mqtt.HookBase
	h *Hub
}

func (k *hook) ID() string { return "outpost-hub" }

func (k *hook) Provides(b byte) bool {
	return bytes.Contains([]byte{
		mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnSessionEstablished, mqtt.OnDisconnect,
		mqtt.OnPublish, mqtt.OnPacketRead, mqtt.OnAuthPacket, mqtt.OnSubscribed,
	}, []byte{b})
}

// OnConnectAuthenticate tells the dialect by the CONNECT: an
// Authentication Method is Azure, a client id d:... or g:... is Watson,
// anything else an observer (loopback only).
func (k *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	h := k.h
	var c *conn
	var err error
	switch {
	case pk.Properties.AuthenticationMethod != "":
		c, err = h.azureConnect(cl, pk)
	case strings.HasPrefix(cl.ID, "d:") || strings.HasPrefix(cl.ID, "g:"):
		c, err = h.watsonConnect(cl, pk)
	default:
		if !isLoopback(cl.Net.Remote) || pk.Connect.UsernameFlag {
			err = errString("not a device, and observers connect from loopback without credentials")
		} else {
			c = &conn{cl: cl, dev: &device{dialect: dialectObserver, id: cl.ID}}
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil && h.offline && c.dev.dialect != dialectObserver {
		// Accepted just before Offline closed the listener.
		err = errString("the hub is offline")
	}
	if err != nil {
		h.stats.Refused++
		h.log.Warn("hub refused a connection", "client", cl.ID, "remote", cl.Net.Remote, "error", err)
		return false
	}
	h.conns[cl] = c
	return true
}

type errString string

func (e errString) Error() string { return string(e) }

func isLoopback(remote string) bool {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func (k *hook) connOf(cl *mqtt.Client) *conn {
	k.h.mu.Lock()
	defer k.h.mu.Unlock()
	return k.h.conns[cl]
}

// OnSessionEstablished makes the connection its device's current one.
func (k *hook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	c := k.connOf(cl)
	if c == nil || c.dev.dialect == dialectObserver {
		return
	}
	h := k.h
	h.mu.Lock()
	h.stats.Connects++
	old := c.dev.conn
	c.dev.conn = c
	h.mu.Unlock()
	if old != nil && old.cl != cl {
		old.cl.Stop(packets.ErrSessionTakenOver)
	}
	h.log.Info("device connected", "dialect", c.dev.dialect, "device", c.dev.id, "client", cl.ID)
}

// OnDisconnect forgets the connection.
func (k *hook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	h := k.h
	h.mu.Lock()
	c := h.conns[cl]
	delete(h.conns, cl)
	if c != nil && c.dev.conn == c {
		c.dev.conn = nil
	}
	h.mu.Unlock()
	if c == nil {
		return
	}
	if c.expiry != nil {
		c.expiry.Stop()
	}
	if c.dev.dialect == dialectAzure {
		h.requeue(c)
	}
	if c.dev.dialect != dialectObserver {
		h.log.Info("device disconnected", "dialect", c.dev.dialect, "device", c.dev.id, "error", err)
	}
}

// OnACLCheck: observers read everything and publish nothing; each
// dialect's devices subscribe to their own request topics only. Publishes
// are checked in OnPublish, which answers as the hub does.
func (k *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	c := k.connOf(cl)
	if c == nil {
		return false
	}
	switch c.dev.dialect {
	case dialectObserver:
		return !write || !reserved(topic)
	case dialectAzure:
		return write || azureFilter(topic)
	case dialectWatson:
		return write || k.h.watsonFilter(c, topic)
	}
	return false
}

// OnPublish serves a device's publish.
func (k *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	c := k.connOf(cl)
	if c == nil {
		return pk, packets.ErrRejectPacket
	}
	switch c.dev.dialect {
	case dialectAzure:
		return k.h.azurePublish(c, pk)
	case dialectWatson:
		return k.h.watsonPublish(c, pk)
	}
	// A plain client (the generic dialect): its publishes are telemetry.
	props := userProps(pk.Properties.User)
	if len(props) == 0 {
		props = nil
	}
	k.h.record(Event{Time: time.Now(), Dialect: "generic", Device: cl.ID, Topic: pk.TopicName, QoS: pk.FixedHeader.Qos,
		ContentType: pk.Properties.ContentType, Props: props, Payload: string(pk.Payload)})
	return pk, nil
}

// OnPacketRead sees the acknowledgements of the commands the hub sent.
func (k *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Puback {
		if c := k.connOf(cl); c != nil && c.dev.dialect == dialectAzure {
			k.h.azurePuback(c, pk)
		}
	}
	return pk, nil
}

// OnAuthPacket serves an Azure re-authentication.
func (k *hook) OnAuthPacket(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if c := k.connOf(cl); c != nil && c.dev.dialect == dialectAzure {
		k.h.azureReauth(c, pk)
	}
	return pk, nil
}

// OnSubscribed delivers an Azure device's queued commands once it
// subscribes to them.
func (k *hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	c := k.connOf(cl)
	if c == nil || c.dev.dialect != dialectAzure {
		return
	}
	for i, f := range pk.Filters {
		if f.Filter == azureCommands && i < len(codes) && codes[i] < 0x80 {
			// After the SUBACK, which mochi writes when this returns.
			k.h.after(10*time.Millisecond, func() { k.h.deliverCommands(c.dev) })
		}
	}
}

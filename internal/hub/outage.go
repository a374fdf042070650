package hub

import (
	"errors"
	"fmt"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// listenerID is the MQTT listener's id in the embedded broker.
const listenerID = "hub"

// ErrClosed is returned by the hub's operations once it is closed.
var ErrClosed = errors.New("hub: closed")

// Offline simulates an outage of the hub: the MQTT listener closes, so
// connections are refused, and every device connection is cut without a
// DISCONNECT, as a network failure would. The API keeps serving. Offline
// while offline does nothing.
func (h *Hub) Offline() error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return ErrClosed
	}
	if h.offline {
		h.mu.Unlock()
		return nil
	}
	h.offline = true
	var cut []*mqtt.Client
	for cl, c := range h.conns {
		if c.dev.dialect != dialectObserver {
			cut = append(cut, cl)
		}
	}
	h.mu.Unlock()
	h.srv.Listeners.Close(listenerID, func(string) {})
	h.srv.Listeners.Delete(listenerID)
	for _, cl := range cut {
		cl.Stop(packets.ErrServerUnavailable)
	}
	h.log.Warn("hub offline: the MQTT listener is closed", "mqtt", h.addr, "devices_cut", len(cut))
	return nil
}

// Online ends an outage begun by Offline: the MQTT listener opens again on
// the same address.
func (h *Hub) Online() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return ErrClosed
	}
	if !h.offline {
		return nil
	}
	tcp := listeners.NewTCP(listeners.Config{ID: listenerID, Address: h.addr, TLSConfig: h.o.TLS})
	if err := h.srv.AddListener(tcp); err != nil {
		return fmt.Errorf("hub: listen again on %s: %w", h.addr, err)
	}
	h.srv.Listeners.Serve(listenerID, h.srv.EstablishConnection)
	h.offline = false
	h.log.Info("hub online again", "mqtt", h.addr)
	return nil
}

package hub

import (
	"net/http"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// watsonState is a Watson device's device-management state in the hub.
type watsonState struct{}

func (h *Hub) watsonConnect(cl *mqtt.Client, pk packets.Packet) (*conn, error) {
	return nil, errString("watson: not served yet")
}

func (h *Hub) watsonFilter(c *conn, topic string) bool { return false }

func (h *Hub) watsonPublish(c *conn, pk packets.Packet) (packets.Packet, error) {
	return pk, packets.ErrRejectPacket
}

func (h *Hub) watsonOnline(c *conn) {}

func (h *Hub) watsonRoutes(mux *http.ServeMux) {}

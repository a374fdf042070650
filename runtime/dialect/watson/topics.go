package watson

import (
	"fmt"
	"regexp"
	"strings"
)

// Limits of the platform (PROTOCOLS.md 1.2, 1.4).
const (
	MaxPayload = 131072 // bytes; a larger message costs the connection
	MaxID      = 36     // characters of a type, device or app id
)

var (
	idRe     = regexp.MustCompile(`^[A-Za-z0-9._-]{1,36}$`)
	orgRe    = regexp.MustCompile(`^[a-z0-9]{6}$`)
	customRe = regexp.MustCompile(`^[A-Za-z0-9._-]{1,255}$`)
)

// Quickstart is the organization that needs no registration: no commands,
// no device management, QoS 0 only.
const Quickstart = "quickstart"

// ValidID checks a type or device id: 1 to 36 of A-Z a-z 0-9 . _ -.
func ValidID(what, id string) error {
	if !idRe.MatchString(id) {
		return fmt.Errorf("watson: %s %q: want 1 to %d of A-Z a-z 0-9 . _ -", what, id, MaxID)
	}
	return nil
}

// ValidOrg checks an organization id: six lower-case letters or digits, or
// quickstart.
func ValidOrg(org string) error {
	if org != Quickstart && !orgRe.MatchString(org) {
		return fmt.Errorf("watson: organization %q: want the 6-character id (or quickstart)", org)
	}
	return nil
}

// Identity is a device on the platform: its type and id.
type Identity struct {
	Type, ID string
}

func (i Identity) String() string { return i.Type + "/" + i.ID }

// Command is a command topic, parsed.
type Command struct {
	Device  Identity // zero for the device form (the connection's own identity)
	Command string
	Format  string
}

// ParseCommandTopic reads a command topic: iot-2/cmd/C/fmt/F (device form)
// or iot-2/type/T/id/D/cmd/C/fmt/F (gateway form). Each part is one
// non-empty topic level without wildcards.
func ParseCommandTopic(topic string) (Command, error) {
	p := strings.Split(topic, "/")
	var c Command
	switch {
	case len(p) == 5 && p[0] == "iot-2" && p[1] == "cmd" && p[3] == "fmt":
		c = Command{Command: p[2], Format: p[4]}
	case len(p) == 9 && p[0] == "iot-2" && p[1] == "type" && p[3] == "id" && p[5] == "cmd" && p[7] == "fmt":
		c = Command{Device: Identity{p[2], p[4]}, Command: p[6], Format: p[8]}
	default:
		return Command{}, fmt.Errorf("watson: %q is not a command topic", topic)
	}
	for _, s := range p {
		if s == "" || strings.ContainsAny(s, "+#") {
			return Command{}, fmt.Errorf("watson: command topic %q: empty or wildcard level", topic)
		}
	}
	return c, nil
}

// EventTopic is the topic of an event: device form when dev is zero, else
// gateway form for dev.
func EventTopic(dev Identity, event, format string) string {
	if dev == (Identity{}) {
		return "iot-2/evt/" + event + "/fmt/" + format
	}
	return "iot-2/type/" + dev.Type + "/id/" + dev.ID + "/evt/" + event + "/fmt/" + format
}

// ParseEventTopic reads an event topic of either form, as a local client
// of a gateway may publish it.
func ParseEventTopic(topic string) (dev Identity, event, format string, ok bool) {
	if !strings.HasPrefix(topic, "iot-2/") {
		return Identity{}, "", "", false // most local topics: no split on the forwarding path
	}
	p := strings.Split(topic, "/")
	switch {
	case len(p) == 5 && p[0] == "iot-2" && p[1] == "evt" && p[3] == "fmt":
		dev, event, format = Identity{}, p[2], p[4]
	case len(p) == 9 && p[0] == "iot-2" && p[1] == "type" && p[3] == "id" && p[5] == "evt" && p[7] == "fmt":
		dev, event, format = Identity{p[2], p[4]}, p[6], p[8]
		if ValidID("type", dev.Type) != nil || ValidID("device", dev.ID) != nil {
			return Identity{}, "", "", false
		}
	default:
		return Identity{}, "", "", false
	}
	if event == "" || format == "" || strings.ContainsAny(event+format, "+#") {
		return Identity{}, "", "", false
	}
	return dev, event, format, true
}

// DM topics (PROTOCOLS.md 2.2), without their device part.
const (
	dmRequestPrefix  = "iotdm-1/"     // platform -> device
	dmDevicePrefix   = "iotdevice-1/" // device -> platform
	opResponse       = "response"
	opObserve        = "observe"
	opCancel         = "cancel"
	opDeviceUpdate   = "device/update"
	opReboot         = "mgmt/initiate/device/reboot"
	opFactoryReset   = "mgmt/initiate/device/factory_reset"
	opFwDownload     = "mgmt/initiate/firmware/download"
	opFwUpdate       = "mgmt/initiate/firmware/update"
	opCustomPrefix   = "mgmt/custom/"
	opManage         = "mgmt/manage"
	opUnmanage       = "mgmt/unmanage"
	opLocation       = "device/update/location"
	opAddErrorCode   = "add/diag/errorCodes"
	opClearErrorCode = "clear/diag/errorCodes"
	opAddLog         = "add/diag/log"
	opClearLog       = "clear/diag/log"
	opNotify         = "notify"
)

// DMTopic is a DM request topic from the platform, parsed.
type DMTopic struct {
	Device Identity // zero for the device form
	Op     string   // e.g. "mgmt/initiate/device/reboot", "response", "mgmt/custom/B/A"
}

// ParseDMTopic reads a platform-to-device DM topic: iotdm-1/OP (device
// form) or iotdm-1/type/T/id/D/OP (gateway form).
func ParseDMTopic(topic string) (DMTopic, error) {
	rest, ok := strings.CutPrefix(topic, dmRequestPrefix)
	if !ok || rest == "" {
		return DMTopic{}, fmt.Errorf("watson: %q is not a device-management topic", topic)
	}
	var t DMTopic
	if p := strings.SplitN(rest, "/", 5); len(p) == 5 && p[0] == "type" && p[2] == "id" {
		t.Device = Identity{p[1], p[3]}
		if ValidID("type", t.Device.Type) != nil || ValidID("device", t.Device.ID) != nil {
			return DMTopic{}, fmt.Errorf("watson: %q: bad device type or id", topic)
		}
		rest = p[4]
	}
	rest = strings.TrimSuffix(rest, "/") // the gateway docs show a trailing slash
	if rest == "" || strings.ContainsAny(rest, "+#") {
		return DMTopic{}, fmt.Errorf("watson: %q: no operation", topic)
	}
	t.Op = rest
	return t, nil
}

// dmDeviceTopic is the device-to-platform topic of op for dev (zero: the
// device form).
func dmDeviceTopic(dev Identity, op string) string {
	if dev == (Identity{}) {
		return dmDevicePrefix + op
	}
	return dmDevicePrefix + "type/" + dev.Type + "/id/" + dev.ID + "/" + op
}

// ParseCustomOp reads a custom action operation: mgmt/custom/BUNDLE/ACTION.
func ParseCustomOp(op string) (bundle, action string, ok bool) {
	rest, ok := strings.CutPrefix(op, opCustomPrefix)
	if !ok {
		return "", "", false
	}
	bundle, action, ok = strings.Cut(rest, "/")
	if !ok || !customRe.MatchString(bundle) || !customRe.MatchString(action) {
		return "", "", false
	}
	return bundle, action, true
}

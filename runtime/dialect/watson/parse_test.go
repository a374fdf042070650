package watson

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseTopics(t *testing.T) {
	if c, err := ParseCommandTopic("iot-2/cmd/reboot/fmt/json"); err != nil || c != (Command{Command: "reboot", Format: "json"}) {
		t.Fatalf("%+v %v", c, err)
	}
	if c, err := ParseCommandTopic("iot-2/type/t/id/d/cmd/c/fmt/f"); err != nil || c.Device != (Identity{"t", "d"}) || c.Command != "c" {
		t.Fatalf("%+v %v", c, err)
	}
	for _, bad := range []string{"iot-2/cmd//fmt/json", "iot-2/cmd/c/fmt", "iot-2/cmd/c/fmt/f/x", "iot-2/type/t/id/d/cmd/c/fmt/", "iot-2/evt/c/fmt/f", "iot-2/cmd/+/fmt/json"} {
		if _, err := ParseCommandTopic(bad); err == nil {
			t.Errorf("command topic %q accepted", bad)
		}
	}
	for topic, want := range map[string]DMTopic{
		"iotdm-1/mgmt/initiate/device/reboot":              {Op: "mgmt/initiate/device/reboot"},
		"iotdm-1/type/s/id/s1/mgmt/initiate/device/reboot": {Device: Identity{"s", "s1"}, Op: "mgmt/initiate/device/reboot"},
		"iotdm-1/type/s/id/s1/observe/":                    {Device: Identity{"s", "s1"}, Op: "observe"},
		"iotdm-1/response":                                 {Op: "response"},
	} {
		if got, err := ParseDMTopic(topic); err != nil || got != want {
			t.Errorf("%q: %+v %v", topic, got, err)
		}
	}
	for _, bad := range []string{"iotdm-1/", "iotdm-2/observe", "iotdm-1/type/s:x/id/s1/observe", "iotdm-1/#"} {
		if _, err := ParseDMTopic(bad); err == nil {
			t.Errorf("DM topic %q accepted", bad)
		}
	}
	if b, a, ok := ParseCustomOp("mgmt/custom/example-bundle-v1/blink"); !ok || b != "example-bundle-v1" || a != "blink" {
		t.Errorf("custom op: %q %q %v", b, a, ok)
	}
	if _, _, ok := ParseCustomOp("mgmt/custom/b/a/c"); ok {
		t.Error("custom op with three levels accepted")
	}
	for _, id := range []string{"", strings.Repeat("a", 37), "a:b", "a/b", "a b", "a+"} {
		if ValidID("device", id) == nil {
			t.Errorf("id %q accepted", id)
		}
	}
	if ValidID("device", strings.Repeat("a", 36)) != nil || ValidID("device", "A-z_0.9") != nil {
		t.Error("a valid id refused")
	}
	if ValidOrg("abc123") != nil || ValidOrg("quickstart") != nil || ValidOrg("ABC123") == nil || ValidOrg("abc12") == nil {
		t.Error("organization ids")
	}
}

func TestParseFieldShapes(t *testing.T) {
	for _, d := range []string{
		`{"fields":[{"field":"mgmt.firmware"}]}`, `{"fields":["mgmt.firmware"]}`, `{"field":"mgmt.firmware"}`, `{"data":[{"field":"mgmt.firmware"}]}`,
	} {
		f, err := parseFields(json.RawMessage(d))
		if err != nil || len(f) != 1 || f[0].Field != "mgmt.firmware" {
			t.Errorf("%s: %+v %v", d, f, err)
		}
	}
	for _, d := range []string{``, `null`, `[]`, `{}`, `{"fields":"x"}`, `{"fields":[1]}`, `{"fields":[{"value":1}]}`} {
		if _, err := parseFields(json.RawMessage(d)); err == nil {
			t.Errorf("%s accepted", d)
		}
	}
}

func FuzzParseCommandTopic(f *testing.F) {
	f.Add("iot-2/cmd/c/fmt/json")
	f.Add("iot-2/type/t/id/d/cmd/c/fmt/f")
	f.Fuzz(func(t *testing.T, topic string) {
		c, err := ParseCommandTopic(topic)
		if err == nil && (c.Command == "" || c.Format == "" || strings.ContainsAny(c.Command+c.Format, "/+#")) {
			t.Fatalf("%q: %+v", topic, c)
		}
	})
}

func FuzzParseDMTopic(f *testing.F) {
	f.Add("iotdm-1/type/s/id/s1/mgmt/initiate/firmware/download")
	f.Add("iotdm-1/observe")
	f.Fuzz(func(t *testing.T, topic string) {
		d, err := ParseDMTopic(topic)
		if err == nil && (d.Op == "" || strings.ContainsAny(d.Op, "+#")) {
			t.Fatalf("%q: %+v", topic, d)
		}
	})
}

func FuzzParseEventTopic(f *testing.F) {
	f.Add("iot-2/evt/e/fmt/json")
	f.Add("iot-2/type/t/id/d/evt/e/fmt/f")
	f.Fuzz(func(t *testing.T, topic string) {
		dev, e, fm, ok := ParseEventTopic(topic)
		if ok && EventTopic(dev, e, fm) != topic {
			t.Fatalf("%q parsed and rebuilt as %q", topic, EventTopic(dev, e, fm))
		}
	})
}

// FuzzDMRequest decodes a DM message as the dialect does: the envelope,
// then its fields.
func FuzzDMRequest(f *testing.F) {
	f.Add([]byte(`{"reqId":"r","d":{"fields":[{"field":"mgmt.firmware","value":{"uri":"http://x"}}]}}`))
	f.Add([]byte(`{"reqId":1,"d":{"fields":["a"]}}`))
	f.Add([]byte(`{"d":{"data":[{"field":"x"}]}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var req request
		if json.Unmarshal(b, &req) != nil {
			return
		}
		fields, err := parseFields(req.D)
		if err == nil {
			for _, fl := range fields {
				if fl.Field == "" {
					t.Fatalf("%s: a field without a name", b)
				}
			}
		}
	})
}

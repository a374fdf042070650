package azure

import (
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/runtime/uplink"
)

func TestStatusTable(t *testing.T) {
	for _, c := range []struct {
		s      string
		class  Class
		retry  bool
		reason byte
		action Action
	}{
		{"0001", ClassSuccess, false, 0, Done},
		{"0100", ClassClientError, false, 0x83, Fail},
		{"0101", ClassClientError, false, 0x87, Reauth},
		{"0102", ClassClientError, false, 0x83, Fail},
		{"0104", ClassClientError, false, 0x83, Fail},
		{"0501", ClassClientError, true, 0x97, BackOff},
		{"0502", ClassClientError, true, 0x97, BackOff},
		{"0503", ClassClientError, true, 0x83, Retry},
		{"0504", ClassClientError, true, 0x83, Fail}, // retryable by the bitmap, not retried
		{"0601", ClassServerError, true, 0x83, Retry},
		{"0603", ClassServerError, true, 0x83, Retry},
		{"06A0", ClassServerError, true, 0x83, Retry},
		{"06a2", ClassServerError, true, 0x83, Retry},
	} {
		st, err := ParseStatus(c.s)
		if err != nil {
			t.Fatalf("%s: %v", c.s, err)
		}
		if st.Class() != c.class || st.Retryable() != c.retry || st.Reason() != c.reason || st.Action() != c.action {
			t.Errorf("%s (%s): class %d retryable %v reason %d action %v; want %d %v %d %v", c.s, st.Name(), st.Class(),
				st.Retryable(), st.Reason(), st.Action(), c.class, c.retry, c.reason, c.action)
		}
		if !strings.EqualFold(st.String(), c.s) {
			t.Errorf("%s written as %s", c.s, st)
		}
	}
	for _, bad := range []string{"", "100", "01000", "zzzz", "-100", "0x10"} {
		if _, err := ParseStatus(bad); err == nil {
			t.Errorf("status %q accepted", bad)
		}
	}
}

func TestSASString(t *testing.T) {
	at, exp := time.UnixMilli(1600987195320), time.UnixMilli(1600990795320)
	got := SASString("hub.azure-devices.net", "dev1/mod1", "", at, exp)
	if got != "hub.azure-devices.net\ndev1/mod1\n\n1600987195320\n1600990795320\n" {
		t.Fatalf("%q", got)
	}
}

func TestParseTopic(t *testing.T) {
	for topic, want := range map[string]Kind{
		"$iothub/responses": KindResponse, "$iothub/twin/patch/desired": KindDesired, "$iothub/commands": KindCommand,
		"$iothub/methods/reboot": KindMethod, "$iothub/telemetry": KindUnknown, "$iothub/commands/": KindUnknown,
		"$IOTHUB/commands": KindUnknown,
	} {
		if k, _, _ := ParseTopic(topic); k != want {
			t.Errorf("%q: kind %d, want %d", topic, k, want)
		}
	}
	for _, bad := range []string{"$iothub/methods/", "$iothub/methods/a/b", "$iothub/methods/+"} {
		if _, _, err := ParseTopic(bad); err == nil {
			t.Errorf("%q accepted as a method", bad)
		}
	}
}

func TestParseCommand(t *testing.T) {
	p := func(kv ...string) []uplink.Property {
		var out []uplink.Property
		for i := 0; i < len(kv); i += 2 {
			out = append(out, uplink.Property{Key: kv[i], Value: kv[i+1]})
		}
		return out
	}
	if c, err := ParseCommand(p("sequence-no", "7", "delivery-count", "3", "@command", "setpoint"), "c2d"); err != nil || c != (CommandInfo{7, 3, "setpoint"}) {
		t.Fatalf("%+v %v", c, err)
	}
	if c, err := ParseCommand(p("sequence-no", "7"), "c2d"); err != nil || c != (CommandInfo{7, 1, "c2d"}) {
		t.Fatalf("defaults: %+v %v", c, err)
	}
	for _, bad := range [][]uplink.Property{p(), p("sequence-no", "-1"), p("sequence-no", "1", "delivery-count", "x"),
		p("sequence-no", "1", "@command", "a/b")} {
		if _, err := ParseCommand(bad, "c2d"); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

func FuzzParseTopic(f *testing.F) {
	for _, s := range []string{"$iothub/methods/x", "$iothub/commands", "$iothub/methods/", "$iothub/twin/patch/desired", "a"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, topic string) {
		k, name, err := ParseTopic(topic)
		if k == KindMethod && err == nil && (name == "" || strings.ContainsAny(name, "/+#")) {
			t.Fatalf("%q: bad method name %q accepted", topic, name)
		}
		if k == KindUnknown && err == nil {
			t.Fatalf("%q: unknown without an error", topic)
		}
	})
}

func FuzzParseCommand(f *testing.F) {
	f.Add("1", "1", "setpoint")
	f.Add("18446744073709551615", "", "")
	f.Add("x", "-1", "a/b")
	f.Fuzz(func(t *testing.T, seq, count, name string) {
		props := []uplink.Property{{Key: PropSequenceNo, Value: seq}, {Key: PropDeliveryCount, Value: count}, {Key: CommandProperty, Value: name}}
		c, err := ParseCommand(props, "c2d")
		if err == nil && (c.Name == "" || strings.ContainsAny(c.Name, "/+#")) {
			t.Fatalf("bad name %q accepted", c.Name)
		}
	})
}

func FuzzParseStatus(f *testing.F) {
	f.Add("0603")
	f.Add("ffff")
	f.Fuzz(func(t *testing.T, s string) {
		st, err := ParseStatus(s)
		if err == nil && !strings.EqualFold(st.String(), s) {
			t.Fatalf("%q read as %s", s, st)
		}
	})
}

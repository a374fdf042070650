package router

import "testing"

func TestMatch(t *testing.T) {
	r, err := New([]Rule{
		{Route: "alarms", Match: []string{"plant/+/alarm", "safety/#"}},
		{Route: "telemetry", Match: []string{"#"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		topic string
		route string
		ok    bool
	}{
		{"plant/line1/alarm", "alarms", true},
		{"plant/line1/alarm/x", "telemetry", true},
		{"safety", "alarms", true},
		{"safety/door/3", "alarms", true},
		{"plant/line1/temp", "telemetry", true},
		{"a", "telemetry", true},
		{"/leading/slash", "telemetry", true},
		{"$SYS/broker/load", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.topic, func(t *testing.T) {
			got, ok := r.Match(tc.topic)
			if got != tc.route || ok != tc.ok {
				t.Fatalf("Match(%q) = %q, %v; want %q, %v", tc.topic, got, ok, tc.route, tc.ok)
			}
		})
	}
}

func TestMatchFilters(t *testing.T) {
	tests := []struct {
		filter, topic string
		want          bool
	}{
		{"a/b", "a/b", true},
		{"a/b", "a/c", false},
		{"a/b", "a/b/c", false},
		{"a/+", "a/b", true},
		{"a/+", "a/b/c", false},
		{"a/+", "a", false},
		{"a/+", "a/", true},
		{"a/#", "a", true},
		{"a/#", "a/b/c", true},
		{"+/+", "a/b", true},
		{"+", "$SYS", false},
		{"$SYS/#", "$SYS/x", true},
	}
	for _, tc := range tests {
		r, err := New([]Rule{{Route: "r", Match: []string{tc.filter}}})
		if err != nil {
			t.Fatal(err)
		}
		if _, got := r.Match(tc.topic); got != tc.want {
			t.Errorf("filter %q topic %q: got %v, want %v", tc.filter, tc.topic, got, tc.want)
		}
	}
}

func TestNewRejectsBadRules(t *testing.T) {
	tests := []struct {
		name string
		rule Rule
	}{
		{"empty route", Rule{Match: []string{"#"}}},
		{"no filter", Rule{Route: "r"}},
		{"empty filter", Rule{Route: "r", Match: []string{""}}},
		{"hash not last", Rule{Route: "r", Match: []string{"a/#/b"}}},
		{"partial wildcard", Rule{Route: "r", Match: []string{"a/b+"}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New([]Rule{tc.rule}); err == nil {
				t.Fatal("New accepted a bad rule")
			}
		})
	}
}

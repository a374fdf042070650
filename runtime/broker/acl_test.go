package broker

import (
	"strings"
	"testing"
)

func TestFilterCovers(t *testing.T) {
	tests := []struct {
		allowed, sub string
		want         bool
	}{
		{"devices/a/#", "devices/a/#", true},
		{"devices/a/#", "devices/a", true},
		{"devices/a/#", "devices/a/x/+", true},
		{"devices/a/#", "devices/+/x", false},
		{"devices/a/#", "devices/#", false},
		{"devices/a/#", "#", false},
		{"devices/+/x", "devices/a/x", true},
		{"devices/+/x", "devices/+/x", true},
		{"devices/+/x", "devices/a/#", false},
		{"devices/a", "devices/a/#", false},
		{"devices/a", "devices/a/b", false},
		{"#", "anything/#", true},
		{"#", "$SYS/x", false},
		{"+/x", "$SYS/x", false},
		{"$SYS/#", "$SYS/broker/+", true},
		{"+/x", "+/x", true},
		{"a/+", "+/+", false},
	}
	for _, tc := range tests {
		if got := filterCovers(tc.allowed, tc.sub); got != tc.want {
			t.Errorf("filterCovers(%q, %q) = %v, want %v", tc.allowed, tc.sub, got, tc.want)
		}
	}
}

func TestExpandRefusesWideningValues(t *testing.T) {
	r, err := compileACL(ACL{Publish: []string{"clients/%c/#", "devices/%u/#"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		user, client, topic string
		want                bool
	}{
		{"a", "c1", "clients/c1/x", true},
		{"a", "c1", "devices/a/x", true},
		{"a", "#", "clients/b/x", false},
		{"a", "c/1", "clients/c/1", false},
		{"", "c1", "devices//x", false},
		{"a+", "c1", "devices/a+/x", false},
		{"$a", "c1", "devices/$a/x", false},
	} {
		if got := r.allowPublish(tc.user, tc.client, tc.topic); got != tc.want {
			t.Errorf("user %q client %q publish %q: %v, want %v", tc.user, tc.client, tc.topic, got, tc.want)
		}
	}
}

// FuzzFilterCovers: a subscription that an allowed filter covers matches no
// topic the allowed filter does not; and a topic name is covered exactly
// when it matches.
func FuzzFilterCovers(f *testing.F) {
	f.Add("devices/a/#", "devices/a/+", "devices/a/b")
	f.Add("+/x", "$SYS/x", "$SYS/x")
	f.Add("a/#", "a", "a")
	f.Fuzz(func(t *testing.T, allowed, sub, topic string) {
		if CheckACLFilter(allowed) != nil || strings.Contains(allowed, "%") || CheckACLFilter(sub) != nil ||
			strings.Contains(sub, "%") || topic == "" || strings.ContainsAny(topic, "+#") {
			return
		}
		if filterCovers(allowed, sub) && topicMatches(sub, topic) && !topicMatches(allowed, topic) {
			t.Fatalf("%q covers %q, which matches %q, which %q does not", allowed, sub, topic, allowed)
		}
		if filterCovers(allowed, topic) != topicMatches(allowed, topic) {
			t.Fatalf("topic %q: covered %v, matches %v under %q", topic, filterCovers(allowed, topic), topicMatches(allowed, topic), allowed)
		}
	})
}

// TestSubscribeDollarAndShared: a client id or username beginning with '$'
// matches nothing (a client "$SYS" with "%c/#" must not get "$SYS/#"), and
// a shared subscription is checked by its filter whatever the case of
// "$share", as mochi takes it.
func TestSubscribeDollarAndShared(t *testing.T) {
	r, err := compileACL(ACL{Subscribe: []string{"%c/#", "devices/%u/#"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		user, client, filter string
		want                 bool
	}{
		{"a", "$SYS", "$SYS/#", false},
		{"a", "$SYS", "$SYS/broker/uptime", false},
		{"a", "c1", "c1/#", true},
		{"$a", "c1", "devices/$a/#", false},
		{"a", "c1", "$share/g/devices/a/#", true},
		{"a", "c1", "$SHARE/g/devices/a/#", true},
		{"a", "c1", "$Share/g/devices/b/#", false},
		{"a", "c1", "$SHARE/g", false},
	} {
		if got := r.allowSubscribe(tc.user, tc.client, tc.filter); got != tc.want {
			t.Errorf("user %q client %q subscribe %q: %v, want %v", tc.user, tc.client, tc.filter, got, tc.want)
		}
	}
}

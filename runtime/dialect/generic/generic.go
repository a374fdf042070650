// Package generic is the plain MQTT 5 dialect for any broker or cluster
// (Mosquitto, EMQX, HiveMQ): telemetry is published under a topic prefix,
// with the local topic kept below it.
package generic

import "strings"

// Dialect maps local topics to upstream topics. The zero value forwards
// topics unchanged. It is safe for concurrent use.
type Dialect struct {
	prefix string
}

// New returns a dialect that puts prefix before every local topic, with
// "{device_id}" in prefix replaced by deviceID.
func New(prefix, deviceID string) Dialect {
	return Dialect{prefix: strings.ReplaceAll(prefix, "{device_id}", deviceID)}
}

// TelemetryTopic returns the upstream topic of a local topic.
func (d Dialect) TelemetryTopic(local string) string {
	return d.prefix + local
}

// Prefix returns the expanded topic prefix.
func (d Dialect) Prefix() string { return d.prefix }

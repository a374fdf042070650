package azure

import (
	"crypto/hmac"
	"crypto/sha256"
	"strconv"
	"time"
)

// APIVersion is the IoT Hub MQTT 5 API version Outpost speaks.
const APIVersion = "2020-10-01-preview"

// Authentication methods of the CONNECT.
const (
	AuthSAS  = "SAS"
	AuthX509 = "X509"
)

// SASString is the string a SAS signature signs (PROTOCOLS.md 3.1): host,
// client id, policy, sas-at and sas-expiry, each followed by a newline;
// times in milliseconds since the epoch, an empty policy when the device
// key signs.
func SASString(host, clientID, policy string, at, expiry time.Time) string {
	return host + "\n" + clientID + "\n" + policy + "\n" + ms(at) + "\n" + ms(expiry) + "\n"
}

// Sign returns the Authentication Data of a SAS CONNECT or AUTH: the raw
// HMAC-SHA256 of SASString under key (the decoded shared access key).
func Sign(key []byte, host, clientID, policy string, at, expiry time.Time) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(SASString(host, clientID, policy, at, expiry)))
	return m.Sum(nil)
}

// ms writes t as the API's time type: decimal milliseconds since the epoch.
func ms(t time.Time) string { return strconv.FormatInt(t.UnixMilli(), 10) }

// parseMS reads the API's time type.
func parseMS(s string) (time.Time, error) {
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 {
		return time.Time{}, strconv.ErrSyntax
	}
	return time.UnixMilli(v), nil
}

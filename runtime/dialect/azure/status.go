package azure

import (
	"fmt"
	"strconv"
)

// Status is an IoT Hub MQTT 5 status (PROTOCOLS.md 3.5): 16 bits, written
// as four hex digits in the "status" user property. The high byte holds
// flags: bits 0-1 the class (0 success, 1 client error, 2 server error),
// bit 2 retryable. The low byte is the code.
type Status uint16

// Statuses of the IoT Hub MQTT 5 API.
const (
	StatusNotModified        Status = 0x0001
	StatusBadRequest         Status = 0x0100 // also a command's reject
	StatusNotAuthorized      Status = 0x0101
	StatusNotAllowed         Status = 0x0102
	StatusConflict           Status = 0x0103
	StatusPreconditionFailed Status = 0x0104 // if-version mismatch
	StatusThrottled          Status = 0x0501
	StatusQuotaExceeded      Status = 0x0502
	StatusResourceExhausted  Status = 0x0503
	StatusNotFound           Status = 0x0504
	StatusServerError        Status = 0x0601
	StatusTimeout            Status = 0x0602
	StatusServerBusy         Status = 0x0603 // also a command's abandon
	StatusTargetUnavailable  Status = 0x06A0
	StatusTargetTimeout      Status = 0x06A1
	StatusTargetFailed       Status = 0x06A2
)

var statusNames = map[Status]string{
	StatusNotModified: "Not Modified", StatusBadRequest: "Bad Request", StatusNotAuthorized: "Not Authorized",
	StatusNotAllowed: "Not Allowed", StatusConflict: "Conflict", StatusPreconditionFailed: "Precondition Failed",
	StatusThrottled: "Throttled", StatusQuotaExceeded: "Quota Exceeded", StatusResourceExhausted: "Resource Exhausted",
	StatusNotFound: "Not Found", StatusServerError: "Server Error", StatusTimeout: "Timeout",
	StatusServerBusy: "Server Busy", StatusTargetUnavailable: "Target Unavailable",
	StatusTargetTimeout: "Target Timeout", StatusTargetFailed: "Target Failed",
}

// ParseStatus reads a status property: exactly four hex digits.
func ParseStatus(s string) (Status, error) {
	if len(s) != 4 {
		return 0, fmt.Errorf("azure: status %q: want four hex digits", s)
	}
	v, err := strconv.ParseUint(s, 16, 16)
	if err != nil {
		return 0, fmt.Errorf("azure: status %q: want four hex digits", s)
	}
	return Status(v), nil
}

// String writes s as the status property does: four upper-case hex digits.
func (s Status) String() string { return fmt.Sprintf("%04X", uint16(s)) }

// Name is the status's name in the API's catalogue, or "status XXXX".
func (s Status) Name() string {
	if n, ok := statusNames[s]; ok {
		return n
	}
	return "status " + s.String()
}

// Class is the outcome class of a status.
type Class int

// Classes of a status (bits 0-1 of its high byte).
const (
	ClassSuccess     Class = 0
	ClassClientError Class = 1
	ClassServerError Class = 2
	ClassReserved    Class = 3
)

// Class returns s's outcome class.
func (s Status) Class() Class { return Class(s >> 8 & 3) }

// Retryable reports the retryable flag (bit 2 of the high byte).
func (s Status) Retryable() bool { return s>>8&4 != 0 }

// Reason is the PUBACK reason code that goes with s: 0 for success, 135
// (Not authorized) for Not Authorized, 151 (Quota exceeded) for Throttled
// and Quota Exceeded, 131 (Implementation specific error) for the rest.
func (s Status) Reason() byte {
	switch {
	case s.Class() == ClassSuccess:
		return 0
	case s == StatusNotAuthorized:
		return 0x87
	case s == StatusThrottled || s == StatusQuotaExceeded:
		return 0x97
	}
	return 0x83
}

// Action is what the device does about a failed operation.
type Action int

// Actions, from Status.Action.
const (
	Done    Action = iota // success: nothing to do
	Fail                  // do not retry: log it
	Retry                 // retry after a delay that grows
	BackOff               // throttled: retry after a longer delay
	Reauth                // re-authenticate (new credentials), then retry
)

func (a Action) String() string {
	return [...]string{"done", "fail", "retry", "back off", "re-authenticate"}[a]
}

// Action says how to act on s: success is Done; Throttled and Quota
// Exceeded back off; Not Authorized re-authenticates; other retryable
// statuses retry, except Not Found, which the catalogue flags retryable but
// which a retry cannot fix (PROTOCOLS.md section 5, point 11); the rest
// fail.
func (s Status) Action() Action {
	switch {
	case s.Class() == ClassSuccess:
		return Done
	case s == StatusThrottled || s == StatusQuotaExceeded:
		return BackOff
	case s == StatusNotAuthorized:
		return Reauth
	case s == StatusNotFound:
		return Fail
	case s.Retryable():
		return Retry
	}
	return Fail
}

// Error is a failed operation's status, with the optional reason (for
// humans; never branched on) and trace id.
type Error struct {
	Op      string
	Status  Status
	Reason  string
	TraceID string
}

func (e *Error) Error() string {
	msg := fmt.Sprintf("azure: %s: %s (%s)", e.Op, e.Status.Name(), e.Status)
	if e.Reason != "" {
		msg += ": " + e.Reason
	}
	if e.TraceID != "" {
		msg += " [trace-id " + e.TraceID + "]"
	}
	return msg
}

package payload

import (
	"errors"
	"fmt"
)

// Format is a payload encoding.
type Format int

// Payload formats.
const (
	Unknown   Format = iota
	SenMLJSON        // application/senml+json, CoAP content-format 110
	SenMLCBOR        // application/senml+cbor, CoAP content-format 112
	JSON             // application/json, CoAP content-format 50: {"time": …, "<metric>": <number>, …}
)

func (f Format) String() string {
	switch f {
	case SenMLJSON:
		return "senml+json"
	case SenMLCBOR:
		return "senml+cbor"
	case JSON:
		return "json"
	}
	return "unknown"
}

// Limits bound what one message may cost to decode.
const (
	MaxPayloadBytes = 256 << 10 // larger messages are rejected before decoding
	MaxRecords      = 4096      // SenML records (or plain-JSON fields) per message
)

// Record is one decoded measurement, its name already resolved relative to the
// sending device.
type Record struct {
	Metric string  // e.g. "pressure"
	Value  float64 // numeric value; booleans are 0/1
	// Str is set (HasStr true) for a SenML "vs" string value: the name of an
	// enumerated state, mapped to its index by the caller.
	Str    string
	HasStr bool
	Unit   string // SenML unit ("u" or "bu"), empty if absent
	Time   int64  // absolute unix ns
}

// Reject says why one record of an otherwise usable message was not decoded.
type Reject struct {
	Index  int    // position of the record in the message
	Reason string // counted reason, one of the Reason* constants
	Err    error
}

// Counted reasons for a rejected record or message.
const (
	ReasonMalformed      = "malformed"        // the message cannot be parsed at all
	ReasonTooLarge       = "too_large"        // payload over MaxPayloadBytes
	ReasonTooManyRecords = "too_many_records" // over MaxRecords
	ReasonForeignDevice  = "foreign_device"   // a name that points at another device
	ReasonBadRecord      = "bad_record"       // a record without a usable name/value/time
	// A time that is a number but past what a unix ns can hold. The same
	// reasons (and names) as a time outside ingest.max_past/max_future.
	ReasonTooOld = "too_old" // a negative unix time, a date before 1678
	ReasonTooNew = "too_new" // a time past 2242 (seconds) or 2262 (ms, RFC 3339), which would overflow int64 ns
)

// Error is a whole-message decoding failure; Reason is the counted reason.
type Error struct {
	Reason string
	Err    error
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %v", e.Reason, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

// ErrUnknownFormat is returned for a payload whose format cannot be determined.
var ErrUnknownFormat = errors.New("unknown payload format")

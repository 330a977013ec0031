package payload

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/fxamacker/cbor/v2"
)

// FromContentType maps an MQTT v5 content type (or HTTP Content-Type) to a Format.
func FromContentType(ct string) Format {
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		mt = strings.ToLower(strings.TrimSpace(ct))
	}
	switch mt {
	case "application/senml+json":
		return SenMLJSON
	case "application/senml+cbor":
		return SenMLCBOR
	case "application/json":
		return JSON
	}
	return Unknown
}

// FromCoAP maps a CoAP content-format number to a Format.
func FromCoAP(cf uint16) Format {
	switch cf {
	case 110:
		return SenMLJSON
	case 112:
		return SenMLCBOR
	case 50:
		return JSON
	}
	return Unknown
}

// Sniff guesses the format from the first byte: '[' SenML JSON, '{' plain JSON,
// a CBOR array head SenML CBOR.
func Sniff(b []byte) Format {
	b = bytes.TrimLeft(b, " \t\r\n")
	if len(b) == 0 {
		return Unknown
	}
	switch c := b[0]; {
	case c == '[':
		return SenMLJSON
	case c == '{':
		return JSON
	case c >= 0x80 && c <= 0x9f:
		return SenMLCBOR
	}
	return Unknown
}

// Decode decodes one message of device. The error (an *Error) means nothing in
// the message is usable; otherwise the records that could be decoded are
// returned with a Reject for each one that could not.
func Decode(f Format, b []byte, device string, now time.Time) ([]Record, []Reject, error) {
	if len(b) > MaxPayloadBytes {
		return nil, nil, &Error{Reason: ReasonTooLarge, Err: fmt.Errorf("payload of %d bytes is over the %d byte limit", len(b), MaxPayloadBytes)}
	}
	switch f {
	case SenMLJSON:
		recs, err := parseSenMLJSON(b)
		if err != nil {
			return nil, nil, err
		}
		recs2, rej := resolveSenML(recs, device, now)
		return recs2, rej, nil
	case SenMLCBOR:
		recs, err := parseSenMLCBOR(b)
		if err != nil {
			return nil, nil, err
		}
		recs2, rej := resolveSenML(recs, device, now)
		return recs2, rej, nil
	case JSON:
		return decodePlainJSON(b, now)
	}
	return nil, nil, &Error{Reason: ReasonMalformed, Err: ErrUnknownFormat}
}

// senmlRecord is one SenML record as on the wire (RFC 8428 §4). Pointers tell
// absent from zero.
type senmlRecord struct {
	BaseName    *string  `json:"bn" cbor:"-2,keyasint"`
	BaseTime    *float64 `json:"bt" cbor:"-3,keyasint"`
	BaseUnit    *string  `json:"bu" cbor:"-4,keyasint"`
	BaseValue   *float64 `json:"bv" cbor:"-5,keyasint"`
	BaseSum     *float64 `json:"bs" cbor:"-6,keyasint"`
	BaseVersion *int64   `json:"bver" cbor:"-1,keyasint"`
	Name        *string  `json:"n" cbor:"0,keyasint"`
	Unit        *string  `json:"u" cbor:"1,keyasint"`
	Value       *float64 `json:"v" cbor:"2,keyasint"`
	StringValue *string  `json:"vs" cbor:"3,keyasint"`
	BoolValue   *bool    `json:"vb" cbor:"4,keyasint"`
	Sum         *float64 `json:"s" cbor:"5,keyasint"`
	Time        *float64 `json:"t" cbor:"6,keyasint"`
	UpdateTime  *float64 `json:"ut" cbor:"7,keyasint"`
	DataValue   *string  `json:"vd" cbor:"8,keyasint"`
}

func parseSenMLJSON(b []byte) ([]senmlRecord, error) {
	if n := countTop(b); n > MaxRecords {
		return nil, &Error{Reason: ReasonTooManyRecords, Err: fmt.Errorf("%d records, over the limit of %d", n, MaxRecords)}
	}
	if !utf8.Valid(b) {
		return nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+json: payload is not valid UTF-8")}
	}
	var recs []senmlRecord
	if err := json.Unmarshal(b, &recs); err != nil {
		return nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+json: %w", err)}
	}
	if len(recs) == 0 {
		return nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+json: no records")}
	}
	return recs, nil
}

// countTop counts the top-level elements of a JSON array cheaply (commas at
// depth 1), so a huge array is refused before it is decoded.
func countTop(b []byte) int {
	depth, n, inStr, esc := 0, 0, false, false
	for _, c := range b {
		switch {
		case inStr:
			if esc {
				esc = false
			} else if c == '\\' {
				esc = true
			} else if c == '"' {
				inStr = false
			}
		case c == '"':
			inStr = true
		case c == '[' || c == '{':
			depth++
			if depth == 2 && n == 0 {
				n = 1
			}
		case c == ']' || c == '}':
			depth--
		case c == ',' && depth == 1:
			n++
		}
	}
	return n
}

var cborDec = func() cbor.DecMode {
	dm, err := cbor.DecOptions{
		MaxNestedLevels:  4,
		MaxArrayElements: MaxRecords,
		MaxMapPairs:      32,
		DupMapKey:        cbor.DupMapKeyEnforcedAPF,
		UTF8:             cbor.UTF8RejectInvalid,
		IndefLength:      cbor.IndefLengthAllowed,
	}.DecMode()
	if err != nil {
		panic(err)
	}
	return dm
}()

func parseSenMLCBOR(b []byte) ([]senmlRecord, error) {
	var recs []senmlRecord
	if err := cborDec.Unmarshal(b, &recs); err != nil {
		reason := ReasonMalformed
		if strings.Contains(err.Error(), "exceeded max number of elements") {
			reason = ReasonTooManyRecords
		}
		return nil, &Error{Reason: reason, Err: fmt.Errorf("senml+cbor: %w", err)}
	}
	if len(recs) == 0 {
		return nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+cbor: no records")}
	}
	return recs, nil
}

// relativeLimit: SenML times below 2^28 are relative to now (RFC 8428 §4.5.3).
const relativeLimit = 1 << 28

// resolveSenML applies the base fields (which carry forward to later records)
// and resolves every name relative to device.
func resolveSenML(in []senmlRecord, device string, now time.Time) ([]Record, []Reject) {
	out := make([]Record, 0, len(in))
	var rejects []Reject
	var bn, bu string
	var bt, bv, bs float64
	reject := func(i int, reason string, err error) {
		rejects = append(rejects, Reject{Index: i, Reason: reason, Err: err})
	}
	for i, r := range in {
		if r.BaseVersion != nil && (*r.BaseVersion < 1 || *r.BaseVersion > 10) {
			reject(i, ReasonBadRecord, fmt.Errorf("record %d: unsupported SenML version %d", i, *r.BaseVersion))
			continue
		}
		if r.BaseName != nil {
			bn = *r.BaseName
		}
		if r.BaseTime != nil {
			bt = *r.BaseTime
		}
		if r.BaseUnit != nil {
			bu = *r.BaseUnit
		}
		if r.BaseValue != nil {
			bv = *r.BaseValue
		}
		if r.BaseSum != nil {
			bs = *r.BaseSum
		}
		name := bn
		if r.Name != nil {
			name += *r.Name
		}
		metric, err := metricName(name, device)
		if err != nil {
			reason := ReasonBadRecord
			if err == errForeign {
				reason = ReasonForeignDevice
				err = fmt.Errorf("record %d: name %q points at another device than %s", i, name, device)
			} else {
				err = fmt.Errorf("record %d: %w", i, err)
			}
			reject(i, reason, err)
			continue
		}
		rec := Record{Metric: metric, Unit: bu}
		if r.Unit != nil {
			rec.Unit = *r.Unit
		}
		if err := senmlValue(r, bv, bs, &rec); err != nil {
			reject(i, ReasonBadRecord, fmt.Errorf("record %d (%s): %w", i, metric, err))
			continue
		}
		t := bt
		if r.Time != nil {
			t += *r.Time
		}
		ns, err := senmlTime(t, now)
		if err != nil {
			rejects = append(rejects, rejectTime(i, fmt.Sprintf("record %d (%s)", i, metric), err))
			continue
		}
		rec.Time = ns
		out = append(out, rec)
	}
	return out, rejects
}

// senmlValue sets rec's value from r with the base value and sum in force;
// an error says why r has none CityPulse can store.
func senmlValue(r senmlRecord, bv, bs float64, rec *Record) error {
	switch {
	case r.Value != nil:
		rec.Value = bv + *r.Value
	case r.BoolValue != nil:
		if *r.BoolValue {
			rec.Value = 1
		}
	case r.StringValue != nil:
		rec.Str, rec.HasStr = *r.StringValue, true
	case r.Sum != nil:
		rec.Value = bs + *r.Sum
	case r.DataValue != nil:
		return errors.New("data values (vd) are not supported")
	case r.BaseValue != nil:
		rec.Value = bv
	default:
		return errors.New("no value")
	}
	return nil
}

var errForeign = fmt.Errorf("foreign device")

// metricName resolves a SenML name to a metric of device. Accepted:
// "<metric>", "urn:dev:<device>:<metric>", "<device>/<metric>".
func metricName(name, device string) (string, error) {
	if !utf8.ValidString(name) {
		return "", fmt.Errorf("name is not valid UTF-8")
	}
	m := name
	if rest, ok := strings.CutPrefix(name, "urn:dev:"); ok {
		dev, metric, found := strings.Cut(rest, ":")
		if !found {
			return "", fmt.Errorf("name %q: want urn:dev:<device>:<metric>", name)
		}
		if dev != device {
			return "", errForeign
		}
		m = metric
	} else if dev, metric, found := strings.Cut(name, "/"); found {
		if dev != device {
			return "", errForeign
		}
		m = metric
	}
	if m == "" {
		return "", fmt.Errorf("empty metric name")
	}
	if len(m) > 64 {
		return "", fmt.Errorf("metric name of %d bytes is too long", len(m))
	}
	return m, nil
}

// decodePlainJSON decodes {"time": …, "<metric>": <number|bool|string>, …}.
// time is an integer unix time in ns (> 1e15), ms (> 1e12) or s, a fractional
// unix time in s, or an RFC 3339 string; absent means now.
func decodePlainJSON(b []byte, now time.Time) ([]Record, []Reject, error) {
	if !utf8.Valid(b) {
		return nil, nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("json: payload is not valid UTF-8")}
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var obj map[string]json.RawMessage
	if err := dec.Decode(&obj); err != nil {
		return nil, nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("json: %w", err)}
	}
	if dec.More() {
		return nil, nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("json: trailing data after the object")}
	}
	if len(obj) > MaxRecords {
		return nil, nil, &Error{Reason: ReasonTooManyRecords, Err: fmt.Errorf("%d fields, over the limit of %d", len(obj), MaxRecords)}
	}
	ts := now.UnixNano()
	var timeErr error // a time out of range: every field is rejected with its reason
	if raw, ok := obj["time"]; ok {
		t, err := plainTime(raw)
		var te *timeError
		switch {
		case errors.As(err, &te):
			timeErr = err
		case err != nil:
			return nil, nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("json: time: %w", err)}
		}
		ts = t
		delete(obj, "time")
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := make([]Record, 0, len(keys))
	var rejects []Reject
	for i, k := range keys {
		if k == "" || len(k) > 64 {
			rejects = append(rejects, Reject{Index: i, Reason: ReasonBadRecord, Err: fmt.Errorf("field %q: bad metric name", k)})
			continue
		}
		rec := Record{Metric: k, Time: ts}
		raw := bytes.TrimSpace(obj[k])
		switch {
		case len(raw) == 0:
			rejects = append(rejects, Reject{Index: i, Reason: ReasonBadRecord, Err: fmt.Errorf("field %q: no value", k)})
			continue
		case raw[0] == '"':
			var s string
			_ = json.Unmarshal(raw, &s)
			rec.Str, rec.HasStr = s, true
		case string(raw) == "true":
			rec.Value = 1
		case string(raw) == "false":
		case raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9':
			var v float64
			if err := json.Unmarshal(raw, &v); err != nil {
				rejects = append(rejects, Reject{Index: i, Reason: ReasonBadRecord, Err: fmt.Errorf("field %q: %v", k, err)})
				continue
			}
			rec.Value = v
		default:
			rejects = append(rejects, Reject{Index: i, Reason: ReasonBadRecord, Err: fmt.Errorf("field %q: want a number, boolean or state name, got %.20s", k, raw)})
			continue
		}
		if timeErr != nil {
			rejects = append(rejects, rejectTime(i, fmt.Sprintf("field %q: time", k), timeErr))
			continue
		}
		out = append(out, rec)
	}
	return out, rejects, nil
}

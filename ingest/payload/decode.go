package payload

import (
	"bytes"
	"errors"
	"fmt"
	"mime"
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
		return decodePlainJSON(b, now.UnixNano())
	}
	return nil, nil, &Error{Reason: ReasonMalformed, Err: ErrUnknownFormat}
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
	var wire []senmlWire
	if err := cborDec.Unmarshal(b, &wire); err != nil {
		reason := ReasonMalformed
		if strings.Contains(err.Error(), "exceeded max number of elements") {
			reason = ReasonTooManyRecords
		}
		return nil, &Error{Reason: reason, Err: fmt.Errorf("senml+cbor: %w", err)}
	}
	if len(wire) == 0 {
		return nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+cbor: no records")}
	}
	recs := make([]senmlRecord, len(wire))
	for i := range wire {
		recs[i] = wire[i].record()
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
	for i := range in {
		r := &in[i]
		if r.has&fBVer != 0 && (r.bver < 1 || r.bver > 10) {
			reject(i, ReasonBadRecord, fmt.Errorf("record %d: unsupported SenML version %d", i, r.bver))
			continue
		}
		if r.has&fBN != 0 {
			bn = r.bn
		}
		if r.has&fBT != 0 {
			bt = r.bt
		}
		if r.has&fBU != 0 {
			bu = r.bu
		}
		if r.has&fBV != 0 {
			bv = r.bv
		}
		if r.has&fBS != 0 {
			bs = r.bs
		}
		name := bn
		if r.has&fN != 0 {
			name += r.n
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
		if r.has&fU != 0 {
			rec.Unit = r.u
		}
		if err := senmlValue(r, bv, bs, &rec); err != nil {
			reject(i, ReasonBadRecord, fmt.Errorf("record %d (%s): %w", i, metric, err))
			continue
		}
		t := bt
		if r.has&fT != 0 {
			t += r.t
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
func senmlValue(r *senmlRecord, bv, bs float64, rec *Record) error {
	switch {
	case r.has&fV != 0:
		rec.Value = bv + r.v
	case r.has&fVB != 0:
		if r.vb {
			rec.Value = 1
		}
	case r.has&fVS != 0:
		rec.Str, rec.HasStr = r.vs, true
	case r.has&fS != 0:
		rec.Value = bs + r.s
	case r.has&fVD != 0:
		return errors.New("data values (vd) are not supported")
	case r.has&fBV != 0:
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

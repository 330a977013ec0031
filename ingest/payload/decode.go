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
		return decodeSenMLJSON(b, device, now)
	case SenMLCBOR:
		if recs, rej, ok := decodeSenMLCBOR(b, device, now); ok {
			return recs, rej, nil
		}
		recs, err := parseSenMLCBOR(b) // outside the reader's subset
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
// depth 1, the first element when it is an object or array): the count
// SenML JSON is refused by when it is over MaxRecords.
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

// parseSenMLCBOR decodes a SenML CBOR pack with fxamacker/cbor: the messages
// cborReader leaves to it (tags, nulls, unknown keys, refusals), and the
// reference FuzzSenMLCBORAsStd compares the reader with.
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
	res := resolver{device: device, now: now, out: make([]Record, 0, len(in))}
	for i := range in {
		res.add(&in[i])
	}
	return res.out, res.rejects
}

// resolver resolves the records of one SenML pack in order, as they are
// decoded: base fields carry forward from one record to the next.
type resolver struct {
	device     string
	now        time.Time
	bn, bu     string
	bt, bv, bs float64
	bnDevice   bool // bn is "urn:dev:<device>:" or "<device>/": a name n under it is n
	i          int  // the index of the next record
	out        []Record
	rejects    []Reject
}

// add resolves the next record, appending it to out or a Reject to rejects.
func (s *resolver) add(r *senmlRecord) {
	i := s.i
	s.i++
	if r.has&fBVer != 0 && (r.bver < 1 || r.bver > 10) {
		s.reject(i, ReasonBadRecord, fmt.Errorf("record %d: unsupported SenML version %d", i, r.bver))
		return
	}
	s.base(r)
	metric, err := s.name(r)
	if err != nil {
		reason := ReasonBadRecord
		if err == errForeign {
			reason = ReasonForeignDevice
			err = fmt.Errorf("record %d: name %q points at another device than %s", i, s.fullName(r), s.device)
		} else {
			err = fmt.Errorf("record %d: %w", i, err)
		}
		s.reject(i, reason, err)
		return
	}
	rec := Record{Metric: metric, Unit: s.bu}
	if r.has&fU != 0 {
		rec.Unit = r.u
	}
	if err := senmlValue(r, s.bv, s.bs, &rec); err != nil {
		s.reject(i, ReasonBadRecord, fmt.Errorf("record %d (%s): %w", i, metric, err))
		return
	}
	t := s.bt
	if r.has&fT != 0 {
		t += r.t
	}
	ns, err := senmlTime(t, s.now)
	if err != nil {
		s.rejects = append(s.rejects, rejectTime(i, fmt.Sprintf("record %d (%s)", i, metric), err))
		return
	}
	rec.Time = ns
	s.out = append(s.out, rec)
}

func (s *resolver) reject(i int, reason string, err error) {
	s.rejects = append(s.rejects, Reject{Index: i, Reason: reason, Err: err})
}

// base takes the base fields r has.
func (s *resolver) base(r *senmlRecord) {
	if r.has&fBN != 0 {
		s.bn = r.bn
		s.bnDevice = deviceBase(r.bn, s.device)
	}
	if r.has&fBT != 0 {
		s.bt = r.bt
	}
	if r.has&fBU != 0 {
		s.bu = r.bu
	}
	if r.has&fBV != 0 {
		s.bv = r.bv
	}
	if r.has&fBS != 0 {
		s.bs = r.bs
	}
}

// name resolves the name of r to a metric as metricName(fullName(r))
// does, without joining the base name and n when the base name is the
// device's: the name is then n.
func (s *resolver) name(r *senmlRecord) (string, error) {
	if s.bnDevice && r.has&fN != 0 && r.n != "" && utf8.ValidString(r.n) {
		return metricLen(r.n)
	}
	return metricName(s.fullName(r), s.device)
}

// fullName is the name of r with the base name in force.
func (s *resolver) fullName(r *senmlRecord) string {
	switch {
	case r.has&fN == 0:
		return s.bn
	case s.bn == "":
		return r.n
	}
	return s.bn + r.n
}

// deviceBase tells whether bn is "urn:dev:<device>:" (device without ':')
// or "<device>/" (device without '/' nor the prefix "urn:dev:"): metricName
// then cuts bn+n right after bn.
func deviceBase(bn, device string) bool {
	if len(bn) == len(device)+len("urn:dev::") && strings.HasPrefix(bn, "urn:dev:") && bn[len(bn)-1] == ':' {
		return bn[len("urn:dev:"):len(bn)-1] == device && !strings.Contains(device, ":") && utf8.ValidString(bn)
	}
	return len(bn) == len(device)+1 && bn[len(device)] == '/' && bn[:len(device)] == device &&
		!strings.Contains(device, "/") && !strings.HasPrefix(device, "urn:dev:") && utf8.ValidString(bn)
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
	return metricLen(m)
}

// metricLen returns m if it is a metric name's length.
func metricLen(m string) (string, error) {
	if m == "" {
		return "", fmt.Errorf("empty metric name")
	}
	if len(m) > 64 {
		return "", fmt.Errorf("metric name of %d bytes is too long", len(m))
	}
	return m, nil
}

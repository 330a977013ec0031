package payload

import (
	"bytes"
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"
)

// senmlRecord is one SenML record (RFC 8428 §4) as decoded: has tells which
// fields were present (absent is not zero).
type senmlRecord struct {
	has                     field
	bn, bu, n, u, vs, vd    string
	bt, bv, bs, v, s, t, ut float64
	bver                    int64
	vb                      bool
}

// field is a bit per SenML field.
type field uint16

const (
	fBN field = 1 << iota
	fBT
	fBU
	fBV
	fBS
	fBVer
	fN
	fU
	fV
	fVS
	fVB
	fS
	fT
	fUT
	fVD
)

// senmlWire is a SenML record as the CBOR decoder fills it. Pointers tell
// absent from zero.
type senmlWire struct {
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

// record converts w.
func (w *senmlWire) record() senmlRecord {
	var r senmlRecord
	str := func(p *string, f field, dst *string) {
		if p != nil {
			r.has |= f
			*dst = *p
		}
	}
	num := func(p *float64, f field, dst *float64) {
		if p != nil {
			r.has |= f
			*dst = *p
		}
	}
	str(w.BaseName, fBN, &r.bn)
	str(w.BaseUnit, fBU, &r.bu)
	str(w.Name, fN, &r.n)
	str(w.Unit, fU, &r.u)
	str(w.StringValue, fVS, &r.vs)
	str(w.DataValue, fVD, &r.vd)
	num(w.BaseTime, fBT, &r.bt)
	num(w.BaseValue, fBV, &r.bv)
	num(w.BaseSum, fBS, &r.bs)
	num(w.Value, fV, &r.v)
	num(w.Sum, fS, &r.s)
	num(w.Time, fT, &r.t)
	num(w.UpdateTime, fUT, &r.ut)
	if w.BaseVersion != nil {
		r.has |= fBVer
		r.bver = *w.BaseVersion
	}
	if w.BoolValue != nil {
		r.has |= fVB
		r.vb = *w.BoolValue
	}
	return r
}

// senmlKeys maps the JSON labels (RFC 8428 §4.1) to their fields.
var senmlKeys = [...]struct {
	key string
	f   field
}{
	{"bn", fBN}, {"bt", fBT}, {"bu", fBU}, {"bv", fBV}, {"bs", fBS}, {"bver", fBVer},
	{"n", fN}, {"u", fU}, {"v", fV}, {"vs", fVS}, {"vb", fVB}, {"s", fS}, {"t", fT}, {"ut", fUT}, {"vd", fVD},
}

// senmlField returns the field of a JSON label. Like encoding/json it takes an
// exact match first, else one equal under Unicode case folding ("BN", "ſ").
func senmlField(key []byte) field {
	switch string(key) {
	case "n":
		return fN
	case "v":
		return fV
	case "t":
		return fT
	case "bn":
		return fBN
	case "bt":
		return fBT
	}
	for _, k := range senmlKeys {
		if string(key) == k.key {
			return k.f
		}
	}
	for _, k := range senmlKeys {
		if bytes.EqualFold(key, []byte(k.key)) {
			return k.f
		}
	}
	return 0
}

// decodeSenMLJSON decodes and resolves a SenML JSON pack in one pass.
func decodeSenMLJSON(b []byte, device string, now time.Time) ([]Record, []Reject, error) {
	res := resolver{device: device, now: now, out: make([]Record, 0, min(bytes.Count(b, []byte{'{'}), MaxRecords))}
	r := jsonReader{b: b}
	n := r.senmlArray(&res)
	r.end()
	switch {
	case r.err != nil:
		return nil, nil, senmlError(b, r.err)
	case n > MaxRecords && countTop(b) > MaxRecords: // n - 1 when the first is null
		return nil, nil, senmlError(b, nil)
	case n == 0:
		return nil, nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+json: no records")}
	}
	return res.out, res.rejects, nil
}

// senmlError is the error of a pack the reader refused with err (or that
// has too many records: err nil). The reason does not depend on where the
// reader stopped: as when the records were counted and the UTF-8 checked
// before decoding, too many records come first, then invalid UTF-8.
func senmlError(b []byte, err error) error {
	if n := countTop(b); n > MaxRecords {
		return &Error{Reason: ReasonTooManyRecords, Err: fmt.Errorf("%d records, over the limit of %d", n, MaxRecords)}
	}
	if !utf8.Valid(b) {
		return &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+json: payload is not valid UTF-8")}
	}
	return &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+json: %w", err)}
}

// senmlArray reads the top-level array (or null: no records), handing each
// record to res, and returns the number of records. It fails at the comma
// after record MaxRecords+1: countTop counts more than MaxRecords then too.
func (r *jsonReader) senmlArray(res *resolver) int {
	switch r.peek() {
	case 'n':
		r.literal("null")
		return 0
	case '[':
	default:
		r.typeError("SenML array")
		return 0
	}
	r.i++
	r.push()
	if r.peek() == ']' {
		r.i++
		return 0
	}
	n := 0
	var rec senmlRecord
	for r.err == nil {
		rec = senmlRecord{}
		switch r.peek() {
		case 'n':
			r.literal("null") // a null element is an empty record, as in encoding/json
		case '{':
			r.object(func(key []byte) { r.senmlField(&rec, key) })
		default:
			r.typeError("SenML record")
		}
		if r.err != nil {
			break
		}
		n++
		res.add(&rec)
		if r.peek() == ',' {
			if r.i++; n > MaxRecords {
				r.fail("over %d records", MaxRecords)
			}
			continue
		}
		r.expect(']')
		break
	}
	return n
}

// senmlField reads the value of key into rec; a null leaves the field absent,
// an unknown label is skipped.
func (r *jsonReader) senmlField(rec *senmlRecord, key []byte) {
	f := senmlField(key)
	var ok bool
	switch f {
	case 0:
		r.skip()
		return
	case fBN:
		rec.bn, ok = r.text()
	case fBU:
		rec.bu, ok = r.text()
	case fN:
		rec.n, ok = r.text()
	case fU:
		rec.u, ok = r.text()
	case fVS:
		rec.vs, ok = r.text()
	case fVD:
		rec.vd, ok = r.text()
	case fBT:
		rec.bt, ok = r.float()
	case fBV:
		rec.bv, ok = r.float()
	case fBS:
		rec.bs, ok = r.float()
	case fV:
		rec.v, ok = r.float()
	case fS:
		rec.s, ok = r.float()
	case fT:
		rec.t, ok = r.float()
	case fUT:
		rec.ut, ok = r.float()
	case fBVer:
		rec.bver, ok = r.int()
	case fVB:
		rec.vb, ok = r.bool()
	}
	if ok {
		rec.has |= f
	} else {
		rec.has &^= f // a later null clears an earlier value
	}
}

// int consumes an integer (or null: ok false) as encoding/json decodes it into
// an *int64: a fraction, an exponent or an overflow fails.
func (r *jsonReader) int() (int64, bool) {
	switch c := r.peek(); {
	case c == 'n':
		r.literal("null")
		return 0, false
	case c == '-' || c >= '0' && c <= '9':
		s, _ := r.number()
		if r.err != nil {
			return 0, false
		}
		v, err := strconv.ParseInt(string(s), 10, 64)
		if err != nil {
			r.fail("number %s is not an int64", s)
			return 0, false
		}
		return v, true
	}
	r.typeError("integer")
	return 0, false
}

// bool consumes true or false (or null: ok false).
func (r *jsonReader) bool() (v, ok bool) {
	switch r.peek() {
	case 'n':
		r.literal("null")
		return false, false
	case 't':
		return true, r.literal("true")
	case 'f':
		return false, r.literal("false")
	}
	r.typeError("boolean")
	return false, false
}

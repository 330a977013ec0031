package payload

// The encoding/json decoders this package used before it read JSON itself
// (jsonread.go), and the fxamacker/cbor one it still falls back on for SenML
// CBOR (cborread.go): the reference the fuzz tests compare the new ones with,
// and the baseline of the decode benchmarks.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"
)

// stdDecode is Decode with the encoding/json and fxamacker/cbor decoders.
func stdDecode(f Format, b []byte, device string, now time.Time) ([]Record, []Reject, error) {
	switch f {
	case SenMLJSON:
		recs, err := stdParseSenMLJSON(b)
		if err != nil {
			return nil, nil, err
		}
		recs2, rej := resolveSenML(recs, device, now)
		return recs2, rej, nil
	case JSON:
		return stdDecodePlainJSON(b, now)
	case SenMLCBOR:
		if len(b) > MaxPayloadBytes {
			return Decode(f, b, device, now)
		}
		recs, err := parseSenMLCBOR(b) // fxamacker/cbor, as before cborReader
		if err != nil {
			return nil, nil, err
		}
		recs2, rej := resolveSenML(recs, device, now)
		return recs2, rej, nil
	}
	return Decode(f, b, device, now)
}

func stdParseSenMLJSON(b []byte) ([]senmlRecord, error) {
	if n := countTop(b); n > MaxRecords {
		return nil, &Error{Reason: ReasonTooManyRecords, Err: fmt.Errorf("%d records, over the limit of %d", n, MaxRecords)}
	}
	if !utf8.Valid(b) {
		return nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+json: payload is not valid UTF-8")}
	}
	var wire []senmlWire
	if err := json.Unmarshal(b, &wire); err != nil {
		return nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+json: %w", err)}
	}
	if len(wire) == 0 {
		return nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("senml+json: no records")}
	}
	recs := make([]senmlRecord, len(wire))
	for i := range wire {
		recs[i] = wire[i].record()
	}
	return recs, nil
}

// stdDecodePlainJSON is the encoding/json decoder this package used before
// decodePlainJSON; it decodes {"time": …, "<metric>": <number|bool|string>, …}.
// time is an integer unix time in ns (> 1e15), ms (> 1e12) or s, a fractional
// unix time in s, or an RFC 3339 string; absent means now.
func stdDecodePlainJSON(b []byte, now time.Time) ([]Record, []Reject, error) {
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
		t, err := stdPlainTime(raw)
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

// stdPlainTime is plainTime before it read the bytes itself; it decodes a plain-JSON time to unix ns. A number or date outside
// what unix ns can hold (1678 to 2262) is a *timeError (too_old, too_new),
// never a wrapped-around time.
func stdPlainTime(raw json.RawMessage) (int64, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) > 0 && raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, err
		}
		t, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return 0, fmt.Errorf("want RFC 3339 or a unix time: %w", err)
		}
		switch {
		case t.Before(minNanoTime):
			return 0, &timeError{ReasonTooOld, fmt.Errorf("time %s is before 1678", s)}
		case t.After(maxNanoTime):
			return 0, &timeError{ReasonTooNew, fmt.Errorf("time %s is past the year 2262", s)}
		}
		return t.UnixNano(), nil
	}
	var n json.Number
	if err := json.Unmarshal(raw, &n); err != nil {
		return 0, fmt.Errorf("want RFC 3339 or a unix time, got %.30s", raw)
	}
	if i, err := n.Int64(); err == nil {
		return intTime(i)
	}
	f, err := n.Float64()
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		return 0, fmt.Errorf("unix time %.30s: %w", n, err)
	}
	switch { // f is ±Inf when out of the float range
	case f < 0:
		return 0, &timeError{ReasonTooOld, fmt.Errorf("unix time %.30s is before 1970", n)}
	case f >= maxSeconds:
		return 0, &timeError{ReasonTooNew, fmt.Errorf("unix time %.30s s is past the year 2242", n)}
	}
	return floatSeconds(f), nil
}

package payload

import (
	"bytes"
	"cmp"
	"fmt"
	"slices"
	"unicode/utf8"
)

// plainField is one field of a plain-JSON object: its key and the raw bytes
// of its value.
type plainField struct {
	key string
	raw []byte
}

// decodePlainJSON decodes {"time": …, "<metric>": <number|bool|string>, …}.
// time is an integer unix time in ns (> 1e15), ms (> 1e12) or s, a fractional
// unix time in s, or an RFC 3339 string; absent means now. A key given twice
// counts once, with its last value; records come in key order.
func decodePlainJSON(b []byte, now int64) ([]Record, []Reject, error) {
	var buf [16]plainField // on the stack: most messages have fewer fields
	fields, err := plainFields(b, buf[:0])
	switch {
	case err != nil && !utf8.Valid(b): // the reason it had when UTF-8 was checked first
		return nil, nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("json: payload is not valid UTF-8")}
	case err != nil:
		return nil, nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("json: %w", err)}
	}
	if len(fields) > MaxRecords {
		return nil, nil, &Error{Reason: ReasonTooManyRecords, Err: fmt.Errorf("%d fields, over the limit of %d", len(fields), MaxRecords)}
	}
	ts := now
	var timeErr error // a time out of range: every field is rejected with its reason
	if i, ok := slices.BinarySearchFunc(fields, "time", func(f plainField, k string) int { return cmp.Compare(f.key, k) }); ok {
		t, err := plainTime(fields[i].raw)
		_, outOfRange := err.(*timeError) // as plainTime returns it, unwrapped
		switch {
		case outOfRange:
			timeErr = err
		case err != nil:
			return nil, nil, &Error{Reason: ReasonMalformed, Err: fmt.Errorf("json: time: %w", err)}
		}
		ts = t
		fields = slices.Delete(fields, i, i+1)
	}
	out := make([]Record, 0, len(fields))
	var rejects []Reject
	for i, f := range fields {
		rec, err := plainRecord(f, ts)
		if err != nil {
			rejects = append(rejects, Reject{Index: i, Reason: ReasonBadRecord, Err: err})
			continue
		}
		if timeErr != nil {
			rejects = append(rejects, rejectTime(i, fmt.Sprintf("field %q: time", f.key), timeErr))
			continue
		}
		out = append(out, rec)
	}
	return out, rejects, nil
}

// plainRecord decodes one field's value.
func plainRecord(f plainField, ts int64) (Record, error) {
	k, raw := f.key, f.raw
	if k == "" || len(k) > 64 {
		return Record{}, fmt.Errorf("field %q: bad metric name", k)
	}
	rec := Record{Metric: k, Time: ts}
	switch {
	case raw[0] == '"':
		r := jsonReader{b: raw}
		rec.Str, rec.HasStr = intern(r.str()), true
	case string(raw) == "true":
		rec.Value = 1
	case string(raw) == "false":
	case raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9':
		r := jsonReader{b: raw}
		v, ok := atof(r.number())
		if !ok {
			return Record{}, fmt.Errorf("field %q: number %s does not fit a float64", k, raw)
		}
		rec.Value = v
	default:
		return Record{}, fmt.Errorf("field %q: want a number, boolean or state name, got %.20s", k, raw)
	}
	return rec, nil
}

// plainFields reads the top-level object (or null: no fields) as
// encoding/json's Decoder reads one value into a map: what follows may be
// white space, or a ']' or '}' (the Decoder stops there) and then anything in
// UTF-8. The fields come sorted by key, each key once with its last value,
// appended to fields.
func plainFields(b []byte, fields []plainField) ([]plainField, error) {
	r := jsonReader{b: b}
	switch r.peek() {
	case 'n':
		r.literal("null")
	case '{':
		if n := bytes.Count(b, []byte{':'}); n > cap(fields) {
			fields = make([]plainField, 0, min(n, MaxRecords))
		}
		r.object(func(key []byte) {
			r.ws()
			start := r.i
			r.skip()
			fields = append(fields, plainField{key: intern(key), raw: b[start:r.i]})
		})
	default:
		r.typeError("JSON object")
	}
	if r.err == nil {
		if c := r.peek(); r.i < len(b) && c != ']' && c != '}' {
			r.fail("trailing data after the object")
		} else if !utf8.Valid(b[r.i:]) { // what the reader did not read
			r.fail("not valid UTF-8")
		}
	}
	if r.err != nil {
		return nil, r.err
	}
	// Sort by key keeping the order of equal keys, then keep each key's last.
	slices.SortStableFunc(fields, func(a, b plainField) int { return cmp.Compare(a.key, b.key) })
	out := fields[:0]
	for i, f := range fields {
		if i+1 < len(fields) && fields[i+1].key == f.key {
			continue
		}
		out = append(out, f)
	}
	return out, nil
}

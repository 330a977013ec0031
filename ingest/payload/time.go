package payload

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"
)

// senmlTime converts a SenML time (seconds; relative to now when below 2^28)
// to unix ns, rounded to the microsecond (see floatSeconds). A time past what
// a unix ns can hold is refused as too_new, a negative absolute time as
// too_old; either is a *timeError.
func senmlTime(t float64, now time.Time) (int64, error) {
	if math.IsNaN(t) || math.IsInf(t, 0) {
		return 0, fmt.Errorf("time is not a finite number")
	}
	if math.Abs(t) < relativeLimit {
		return now.UnixNano() + floatSeconds(t), nil
	}
	if t < 0 {
		return 0, &timeError{ReasonTooOld, fmt.Errorf("time %g is before 1970", t)}
	}
	if t >= maxSeconds {
		return 0, &timeError{ReasonTooNew, fmt.Errorf("time %g is past the year 2242", t)}
	}
	return floatSeconds(t), nil
}

// maxSeconds bounds an absolute time in seconds (2^33 s, the year 2242):
// beyond it a time is not a clock but a bug, and near 2262 it would overflow
// int64 ns.
const maxSeconds = 1 << 33

// floatSeconds converts a time in float seconds to ns rounded to the nearest
// microsecond. A float64 near 1.8e9 s is spaced 2^-22 s (238 ns) apart, so the
// digits below the microsecond are the binary representation's error, not
// the device's: 1796194324.271 is stored as 1796194324.27099990844…, and
// rounding to the µs gives back …271000 exactly. (Truncating, or rounding to
// ns and truncating to ms later, puts about half of all ms times 1 ms early.)
func floatSeconds(t float64) int64 {
	sec, frac := math.Modf(t)
	return int64(sec)*1e9 + int64(math.Round(frac*1e6))*1e3
}

// timeError is a time that is a number but outside what can be stored: its
// records are rejected with Reason (too_old or too_new), like a time outside
// ingest.max_past/max_future.
type timeError struct {
	Reason string
	Err    error
}

func (e *timeError) Error() string { return e.Err.Error() }
func (e *timeError) Unwrap() error { return e.Err }

// rejectTime makes the Reject for record i whose time failed with err.
func rejectTime(i int, what string, err error) Reject {
	reason := ReasonBadRecord
	var te *timeError
	if errors.As(err, &te) {
		reason = te.Reason
	}
	return Reject{Index: i, Reason: reason, Err: fmt.Errorf("%s: %w", what, err)}
}

// plainTime decodes a plain-JSON time (the raw bytes of its value) to unix
// ns. A number or date outside what unix ns can hold (1678 to 2262) is a
// *timeError (too_old, too_new), never a wrapped-around time.
func plainTime(raw []byte) (int64, error) {
	if raw[0] == '"' {
		r := jsonReader{b: raw}
		s := string(r.str())
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
	if raw[0] != '-' && (raw[0] < '0' || raw[0] > '9') {
		return 0, fmt.Errorf("want RFC 3339 or a unix time, got %.30s", raw)
	}
	if !bytes.ContainsAny(raw, ".eE") { // else ParseInt fails, making an error
		if i, err := strconv.ParseInt(string(raw), 10, 64); err == nil {
			return intTime(i)
		}
	}
	f, err := strconv.ParseFloat(string(raw), 64)
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		return 0, fmt.Errorf("unix time %.30s: %w", raw, err)
	}
	switch { // f is ±Inf when out of the float range
	case f < 0:
		return 0, &timeError{ReasonTooOld, fmt.Errorf("unix time %.30s is before 1970", raw)}
	case f >= maxSeconds:
		return 0, &timeError{ReasonTooNew, fmt.Errorf("unix time %.30s s is past the year 2242", raw)}
	}
	return floatSeconds(f), nil
}

// intTime scales an integer unix time by its size: ns (> 1e15), ms (> 1e12)
// or s; one that would overflow int64 ns when scaled is too_new.
func intTime(i int64) (int64, error) {
	switch {
	case i > 1e15:
		return i, nil
	case i > 1e12:
		if i > math.MaxInt64/int64(time.Millisecond) {
			return 0, &timeError{ReasonTooNew, fmt.Errorf("unix time %d ms is past the year 2262", i)}
		}
		return i * 1e6, nil
	case i < 0:
		return 0, &timeError{ReasonTooOld, fmt.Errorf("unix time %d is before 1970", i)}
	case i >= maxSeconds:
		return 0, &timeError{ReasonTooNew, fmt.Errorf("unix time %d s is past the year 2242", i)}
	}
	return i * 1e9, nil
}

// The range of time.Time.UnixNano.
var (
	minNanoTime = time.Unix(0, math.MinInt64)
	maxNanoTime = time.Unix(0, math.MaxInt64)
)

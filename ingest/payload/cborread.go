package payload

import (
	"math"
	"time"
	"unicode/utf8"
)

// cborReader reads the plain SenML CBOR subset (RFC 8428 §6) straight from
// the bytes, without reflection: an array (definite or indefinite) of 1 to
// MaxRecords maps whose keys are the SenML integer labels -6..8, each at most
// once, with text strings (definite or in definite chunks) for names, units
// and string values, integers and float16/32/64 for numbers, true/false for
// vb. Anything else (a tag, null, a byte string, an unknown or duplicate key,
// a float16 NaN, an int64 overflow, trailing bytes, a malformed item) makes
// ok false: the message is then decoded by parseSenMLCBOR (fxamacker/cbor),
// which decides how it is refused. Whatever the reader accepts, the old
// decoder accepts with the same records (FuzzSenMLCBORAsStd).
type cborReader struct {
	b  []byte
	i  int
	ok bool
}

// cborMaxMapPairs is cborDec's MaxMapPairs.
const cborMaxMapPairs = 32

// Keys of the SenML fields by integer label: posKeys[k] is label k,
// negKeys[k] label -1-k.
var (
	posKeys = [...]field{fN, fU, fV, fVS, fVB, fS, fT, fUT, fVD}
	negKeys = [...]field{fBVer, fBN, fBT, fBU, fBV, fBS}
)

// decodeSenMLCBOR decodes and resolves a SenML CBOR pack in one pass; ok
// false means the pack is outside the reader's subset (see cborReader).
func decodeSenMLCBOR(b []byte, device string, now time.Time) (recs []Record, rejects []Reject, ok bool) {
	r := cborReader{b: b, ok: true}
	major, n, indef := r.head()
	if !r.ok || major != 4 || !indef && (n == 0 || n > MaxRecords) {
		return nil, nil, false
	}
	hint := n
	if indef {
		hint = uint64(len(b) / 16)
	}
	res := resolver{device: device, now: now, out: make([]Record, 0, min(hint, uint64(len(b)/3+1)))}
	var rec senmlRecord
	k := 0
	for ; indef || k < int(n); k++ {
		if indef && r.i < len(b) && b[r.i] == 0xff {
			r.i++
			break
		}
		if k == MaxRecords {
			return nil, nil, false
		}
		rec = senmlRecord{}
		if r.record(&rec); !r.ok {
			return nil, nil, false
		}
		res.add(&rec)
	}
	if k == 0 || r.i != len(b) {
		return nil, nil, false
	}
	return res.out, res.rejects, true
}

// head reads the head of a data item: its major type, its argument and
// whether it is of indefinite length (ai 31).
func (r *cborReader) head() (major byte, arg uint64, indef bool) {
	if r.i >= len(r.b) {
		r.ok = false
		return 0xff, 0, false
	}
	c := r.b[r.i]
	r.i++
	major, ai := c>>5, c&0x1f
	switch {
	case ai < 24:
		return major, uint64(ai), false
	case ai == 31:
		return major, 0, true
	case ai > 27:
		r.ok = false
		return 0xff, 0, false
	}
	size := 1 << (ai - 24)
	if len(r.b)-r.i < size {
		r.ok = false
		return 0xff, 0, false
	}
	for _, x := range r.b[r.i : r.i+size] {
		arg = arg<<8 | uint64(x)
	}
	r.i += size
	return major, arg, false
}

// record reads one map into rec.
func (r *cborReader) record(rec *senmlRecord) {
	major, n, indef := r.head()
	if major != 5 || !indef && n > cborMaxMapPairs {
		r.ok = false
		return
	}
	for k := 0; r.ok && (indef || k < int(n)); k++ {
		if indef && r.i < len(r.b) && r.b[r.i] == 0xff {
			r.i++
			return
		}
		f := r.key()
		if f == 0 || rec.has&f != 0 {
			r.ok = false
			return
		}
		r.value(rec, f)
		rec.has |= f
	}
}

// key reads a map key: the field of a SenML integer label, 0 for any other.
func (r *cborReader) key() field {
	major, v, indef := r.head()
	switch {
	case indef:
	case major == 0 && v < uint64(len(posKeys)):
		return posKeys[v]
	case major == 1 && v < uint64(len(negKeys)):
		return negKeys[v]
	}
	return 0
}

// value reads the value of field f into rec.
func (r *cborReader) value(rec *senmlRecord, f field) {
	switch f {
	case fBN:
		rec.bn = r.text()
	case fBU:
		rec.bu = r.text()
	case fN:
		rec.n = r.text()
	case fU:
		rec.u = r.text()
	case fVS:
		rec.vs = r.text()
	case fVD:
		rec.vd = r.text()
	case fBT:
		rec.bt = r.float()
	case fBV:
		rec.bv = r.float()
	case fBS:
		rec.bs = r.float()
	case fV:
		rec.v = r.float()
	case fS:
		rec.s = r.float()
	case fT:
		rec.t = r.float()
	case fUT:
		rec.ut = r.float()
	case fBVer:
		rec.bver = r.int()
	case fVB:
		rec.vb = r.bool()
	}
}

// text reads a valid UTF-8 text string, definite or in definite chunks
// (each valid UTF-8 on its own, as fxamacker/cbor checks them).
func (r *cborReader) text() string {
	major, n, indef := r.head()
	switch {
	case major != 3:
		r.ok = false
		return ""
	case indef:
		return r.chunks()
	}
	s := r.bytes(n)
	if !r.ok || !utf8.Valid(s) {
		r.ok = false
		return ""
	}
	return intern(s)
}

// bytes returns the next n bytes.
func (r *cborReader) bytes(n uint64) []byte {
	if n > uint64(len(r.b)-r.i) {
		r.ok = false
		return nil
	}
	s := r.b[r.i : r.i+int(n)]
	r.i += int(n)
	return s
}

// chunks reads the chunks of an indefinite-length text string to its break.
func (r *cborReader) chunks() string {
	var s []byte
	for r.ok {
		if r.i < len(r.b) && r.b[r.i] == 0xff {
			r.i++
			return string(s)
		}
		major, n, indef := r.head()
		if major != 3 || indef {
			break
		}
		c := r.bytes(n)
		if !utf8.Valid(c) {
			break
		}
		s = append(s, c...)
	}
	r.ok = false
	return ""
}

// float reads a number as fxamacker/cbor decodes it into a float64: an
// integer converted, a float16 or float32 widened (a float16 NaN is left to
// it), a float64 as is.
func (r *cborReader) float() float64 {
	if r.i >= len(r.b) {
		r.ok = false
		return 0
	}
	c := r.b[r.i]
	major, v, indef := r.head()
	switch {
	case indef:
	case major == 0:
		return float64(v)
	case major == 1 && v <= math.MaxInt64:
		return float64(int64(-1) ^ int64(v))
	case c == 0xf9:
		if f, ok := float16(uint16(v)); ok {
			return f
		}
	case c == 0xfa:
		return float64(math.Float32frombits(uint32(v)))
	case c == 0xfb:
		return math.Float64frombits(v)
	}
	r.ok = false
	return 0
}

// float16 widens an IEEE half-precision number (exactly: every one is a
// float64); ok is false for a NaN.
func float16(h uint16) (float64, bool) {
	exp, mant := int(h>>10&0x1f), uint64(h&0x3ff)
	var f float64
	switch exp {
	case 0:
		f = math.Ldexp(float64(mant), -24)
	case 0x1f:
		if mant != 0 {
			return 0, false
		}
		f = math.Inf(1)
	default:
		f = math.Float64frombits(uint64(exp-15+1023)<<52 | mant<<42)
	}
	if h&0x8000 != 0 {
		f = math.Copysign(f, -1)
	}
	return f, true
}

// int reads an integer that fits an int64.
func (r *cborReader) int() int64 {
	major, v, indef := r.head()
	switch {
	case indef || v > math.MaxInt64:
	case major == 0:
		return int64(v)
	case major == 1:
		return int64(-1) ^ int64(v)
	}
	r.ok = false
	return 0
}

// bool reads true or false.
func (r *cborReader) bool() bool {
	if r.i < len(r.b) {
		switch r.b[r.i] {
		case 0xf4:
			r.i++
			return false
		case 0xf5:
			r.i++
			return true
		}
	}
	r.ok = false
	return false
}

package payload

import (
	"math"
	"math/bits"
	"strconv"
)

// atof converts a JSON number, its text s and decimal form d as number
// read them, to the float64 strconv.ParseFloat returns, bit for bit; ok is
// false where ParseFloat fails (out of range). Numbers of at most 19
// significant digits and a decimal exponent within ±19 (every sensor reading
// and time seen so far) are converted here, exactly: FuzzAtofAsStrconv
// compares the two.
func atof(s []byte, d decimal) (v float64, ok bool) {
	if v, ok := d.float(); ok {
		return v, true
	}
	v, err := strconv.ParseFloat(string(s), 64)
	return v, err == nil
}

// decimal is a JSON number as m × 10^e10, m its significant digits (without
// leading zeros); long is set when m would have more than 19 digits or the
// exponent more than 4.
type decimal struct {
	m       uint64
	e10, nd int // nd: digits in m
	neg     bool
	long    bool
}

// digits reads the digits from b[i] into d and returns the index after them;
// in a fraction, each one lowers the exponent.
func (d *decimal) digits(b []byte, i int, frac bool) int {
	m, nd, start := d.m, d.nd, i
loop:
	for ; i < len(b); i++ {
		c := b[i] - '0' // wraps around below '0'
		switch {
		case c > 9:
			break loop
		case m == 0 && c == 0: // a leading zero is not a significant digit
		case nd == 19:
			d.long = true
		default:
			m = m*10 + uint64(c)
			nd++
		}
	}
	if frac {
		d.e10 -= i - start
	}
	d.m, d.nd = m, nd
	return i
}

// exponent reads the exponent from b[i] (after the 'e') into d and returns
// the index after it; ok is false when it has no digit (at i).
func (d *decimal) exponent(b []byte, i int) (_ int, ok bool) {
	neg := i < len(b) && b[i] == '-'
	if i < len(b) && (b[i] == '+' || b[i] == '-') {
		i++
	}
	start, x := i, 0
	for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
		x = x*10 + int(b[i]-'0')
		if i-start == 4 {
			d.long = true
		}
	}
	switch {
	case i == start:
		return i, false
	case neg:
		x = -x
	}
	if !d.long {
		d.e10 += x
	}
	return i, true
}

// pow10 are the powers of ten a float64 holds exactly; pow10u those a uint64 does.
var (
	pow10  = [...]float64{1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22}
	pow10u = [...]uint64{1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19}
)

// float converts d when m has at most 19 digits and e10 is small; ok false
// means: ask strconv.
func (d decimal) float() (float64, bool) {
	m, e10 := d.m, d.e10
	var v float64
	switch {
	case d.long:
		return 0, false
	case m == 0:
	case m < 1<<53 && e10 >= -22 && e10 <= 22:
		// Clinger's fast path (strconv's first too): m and 10^|e10| are
		// exact, so the one IEEE operation rounds correctly. The conversion
		// keeps the compiler from fusing it with a later operation.
		if e10 < 0 {
			v = float64(float64(m) / pow10[-e10])
		} else {
			v = float64(float64(m) * pow10[e10])
		}
	case e10 >= 0 && e10 < len(pow10u):
		v = mulPow10(m, e10)
	case e10 < 0 && -e10 < len(pow10u):
		v = divPow10(m, -e10)
	default:
		return 0, false
	}
	if d.neg {
		v = -v
	}
	return v, true
}

// mulPow10 returns m × 10^k correctly rounded (m > 0, k ≤ 19): the 128-bit
// product is exact.
func mulPow10(m uint64, k int) float64 {
	hi, lo := bits.Mul64(m, pow10u[k])
	if hi == 0 {
		s := bits.LeadingZeros64(lo)
		return round53(lo<<s, false, -s)
	}
	s := bits.LeadingZeros64(hi)
	return round53(hi<<s|lo>>(64-s), lo<<s != 0, 64-s)
}

// divPow10 returns m / 10^k correctly rounded (m > 0, 1 ≤ k ≤ 19): with both
// normalised to a top bit of 1, the 128-by-64-bit division gives a 64-bit
// quotient, and the remainder says whether anything is below it.
func divPow10(m uint64, k int) float64 {
	d := pow10u[k]
	lm, ld := bits.LeadingZeros64(m), bits.LeadingZeros64(d)
	mn, dn := m<<lm, d<<ld
	if mn < dn { // mn/dn in (1/2, 1)
		q, r := bits.Div64(mn, 0, dn)
		return round53(q, r != 0, ld-lm-64)
	}
	q, r := bits.Div64(mn>>1, mn<<63, dn) // mn/dn in [1, 2)
	return round53(q, r != 0, ld-lm-63)
}

// round53 returns top × 2^e2 rounded to a float64 (to nearest, ties to even):
// top has its top bit set, sticky says that the exact value is a bit more
// than top × 2^e2. The result must be a normal float64.
func round53(top uint64, sticky bool, e2 int) float64 {
	const half = 1 << 10
	mant, rest := top>>11, top&(2*half-1)
	if rest > half || rest == half && (sticky || mant&1 == 1) {
		mant++
	}
	e2 += 11
	if mant == 1<<53 {
		mant >>= 1
		e2++
	}
	return math.Float64frombits(uint64(e2+52+1023)<<52 | mant&(1<<52-1))
}

package payload

import (
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// sameAsParseFloat fails t unless atof gives what strconv.ParseFloat gives
// for the JSON number s, bit for bit, and fails where it fails. It returns
// whether the fast path converted s.
func sameAsParseFloat(t testing.TB, s string) bool {
	t.Helper()
	want, err := strconv.ParseFloat(s, 64)
	r := jsonReader{b: []byte(s)}
	text, d := r.number()
	if r.err != nil || r.i != len(s) {
		t.Fatalf("%s: not read as a JSON number: %v", s, r.err)
	}
	got, ok := atof(text, d)
	if ok != (err == nil) || math.Float64bits(got) != math.Float64bits(want) {
		t.Fatalf("%s: atof %v (%x, ok %v), strconv %v (%x, %v)", s, got, math.Float64bits(got), ok, want, math.Float64bits(want), err)
	}
	fast, ok := d.float()
	if ok && math.Float64bits(fast) != math.Float64bits(want) {
		t.Fatalf("%s: fast path %v (%x), strconv %v (%x)", s, fast, math.Float64bits(fast), want, math.Float64bits(want))
	}
	return ok
}

// numberText writes m with a decimal point point digits from the right
// (none when 0; "0.000m" when past its digits) and, when form is not 0, an
// exponent exp written as e, E, e+, e-…
func numberText(neg bool, m uint64, point uint8, exp int16, form uint8) string {
	var b strings.Builder
	if neg {
		b.WriteByte('-')
	}
	d := strconv.FormatUint(m, 10)
	switch p := int(point % 40); {
	case p == 0:
		b.WriteString(d)
	case p >= len(d):
		b.WriteString("0.")
		b.WriteString(strings.Repeat("0", p-len(d)))
		b.WriteString(d)
	default:
		b.WriteString(d[:len(d)-p] + "." + d[len(d)-p:])
	}
	if form%4 != 0 {
		b.WriteString([]string{"", "e", "E", "e+"}[form%4])
		if exp < 0 && form%4 == 3 {
			exp = -exp // "e+-1" is no number
		}
		b.WriteString(strconv.Itoa(int(exp)))
	}
	return b.String()
}

// TestAtofAsStrconv converts edge cases and a million random numbers of the
// shapes devices send (up to 19 digits, exponents both ways), requiring
// ParseFloat's bits, and that the fast path took nearly all of them.
func TestAtofAsStrconv(t *testing.T) {
	edges := []string{
		"0", "-0", "0.0", "-0.0", "0e5", "-0E-5", "0.000", "1", "-1", "1E+2", "1e-2", "1.5e1", "10", "100.0100",
		"9007199254740992", "9007199254740993", "9007199254740995", "18014398509481985", "18446744073709551615",
		"18446744073709551616", "9999999999999999999", "99999999999999999999", "0.1", "0.3", "1767225600.1234564",
		"1796194324.271", "412.73452345123456", "1e22", "1e23", "1e-22", "1e-23", "123456789012345678e19",
		"123456789012345678e-19", "1e308", "1.7976931348623157e308", "1.7976931348623159e308", "1e309", "-1e400",
		"5e-324", "2e-324", "1e-400", "4.9406564584124654e-324", "2.2250738585072014e-308", "0.00000000000000000001",
		"1.00000000000000000000000001", "1e0000", "1e00001", "123.456e-0004", "8.98846567431158e307",
		"9223372036854775807", "9223372036854775808", "937500000000000.0625", "937500000000000.1875",
		"4503599627370496.5", "4503599627370497.5", "0.000001e-19",
	}
	for _, s := range edges {
		sameAsParseFloat(t, s)
	}
	rng := rand.New(rand.NewPCG(13, 4))
	fast := 0
	const n = 1_000_000
	for range n {
		m := rng.Uint64() >> rng.IntN(64)
		s := numberText(rng.IntN(2) == 0, m, uint8(rng.IntN(20)), int16(rng.IntN(41)-20), uint8(rng.IntN(8)))
		if sameAsParseFloat(t, s) {
			fast++
		}
	}
	require.Greater(t, fast, n*85/100, "the fast path converts most numbers")
}

func FuzzAtofAsStrconv(f *testing.F) {
	f.Add(false, uint64(17674256001234564), uint8(7), int16(0), uint8(0))
	f.Add(true, uint64(9007199254740993), uint8(0), int16(-3), uint8(1))
	f.Add(false, uint64(1<<64-1), uint8(25), int16(19), uint8(3))
	f.Fuzz(func(t *testing.T, neg bool, m uint64, point uint8, exp int16, form uint8) {
		sameAsParseFloat(t, numberText(neg, m, point, exp, form))
	})
}

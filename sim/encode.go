package sim

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"strconv"

	"github.com/fxamacker/cbor/v2"
)

// Reading is one generated value before encoding.
type Reading struct {
	Name string
	TS   int64 // unix ms
	V    float64
}

// Encode serialises one message in format f: senml-json, senml-cbor or json
// (one object per point: every reading shares the first one's time). SenML
// times are float seconds: the encoder adds 0.4 µs so that the server's
// truncation to ms lands on TS.
func Encode(f string, rs []Reading) ([]byte, error) {
	switch f {
	case "json":
		obj := map[string]any{"time": rs[0].TS}
		for _, r := range rs {
			obj[r.Name] = r.V
		}
		return json.Marshal(obj)
	case "senml-json":
		b := make([]byte, 0, 48*len(rs)+2)
		b = append(b, '[')
		for i, r := range rs {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"n":`...)
			b = strconv.AppendQuote(b, r.Name)
			b = append(b, `,"t":`...)
			b = strconv.AppendFloat(b, float64(r.TS)/1000+4e-7, 'f', 7, 64)
			b = append(b, `,"v":`...)
			b = strconv.AppendFloat(b, r.V, 'g', -1, 64)
			b = append(b, '}')
		}
		return append(b, ']'), nil
	case "senml-cbor":
		return senmlCBOR(rs)
	}
	return nil, fmt.Errorf("unknown format %q", f)
}

// senmlCBOR encodes rs as a CBOR array of SenML records {0: name, 2: value,
// 6: time}, floats as float64, written by hand: encoding maps of interfaces
// through reflection was most of the load generator's message building
// (issue 13). A non-finite value takes the library's way (its half-float
// forms).
func senmlCBOR(rs []Reading) ([]byte, error) {
	n := 9
	for _, r := range rs {
		if math.IsNaN(r.V) || math.IsInf(r.V, 0) {
			recs := make([]map[int]any, len(rs))
			for i, r := range rs {
				recs[i] = map[int]any{0: r.Name, 6: float64(r.TS)/1000 + 4e-7, 2: r.V}
			}
			return cbor.Marshal(recs)
		}
		n += 9 + len(r.Name) + 2*9 + 2
	}
	b := cborHead(make([]byte, 0, n), 4, len(rs))
	for _, r := range rs {
		b = append(b, 0xa3, 0x00) // map of 3; key 0 (name)
		b = cborHead(b, 3, len(r.Name))
		b = append(b, r.Name...)
		b = append(b, 0x02, 0xfb) // key 2 (value), float64
		b = binary.BigEndian.AppendUint64(b, math.Float64bits(r.V))
		b = append(b, 0x06, 0xfb) // key 6 (time), float64
		b = binary.BigEndian.AppendUint64(b, math.Float64bits(float64(r.TS)/1000+4e-7))
	}
	return b, nil
}

// cborHead appends the head of a CBOR item of major type major and length n.
func cborHead(b []byte, major byte, n int) []byte {
	m := major << 5
	switch {
	case n < 24:
		return append(b, m|byte(n))
	case n <= 0xff:
		return append(b, m|24, byte(n))
	case n <= 0xffff:
		return append(b, m|25, byte(n>>8), byte(n))
	case n <= 0xffffffff:
		return binary.BigEndian.AppendUint32(append(b, m|26), uint32(n))
	}
	return binary.BigEndian.AppendUint64(append(b, m|27), uint64(n))
}

// ContentType is the MQTT v5 / CoAP media type of format f.
func ContentType(f string) string {
	switch f {
	case "senml-cbor":
		return "application/senml+cbor"
	case "json":
		return "application/json"
	}
	return "application/senml+json"
}

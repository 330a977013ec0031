package sim

import (
	"encoding/json"
	"fmt"
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
		recs := make([]map[int]any, len(rs))
		for i, r := range rs {
			recs[i] = map[int]any{0: r.Name, 6: float64(r.TS)/1000 + 4e-7, 2: r.V}
		}
		return cbor.Marshal(recs)
	}
	return nil, fmt.Errorf("unknown format %q", f)
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

package sim

import (
	"math"
	"strings"
	"testing"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/require"
)

// The hand-written SenML CBOR encoder decodes to what the reflection-based
// one (cbor.Marshal of the records as maps) decodes to, for short and long
// names and messages, and the values' bits survive.
func TestSenMLCBORMatchesLibrary(t *testing.T) {
	long := strings.Repeat("m", 300)
	for _, tc := range []struct {
		name string
		rs   []Reading
	}{
		{"one", []Reading{{Name: "pressure", TS: 1764662400123, V: 3.25}}},
		{"ten", func() []Reading {
			var rs []Reading
			for i := range 10 {
				rs = append(rs, Reading{Name: "flow", TS: 1764662400000 + int64(i)*4, V: float64(i) * 0.1})
			}
			return rs
		}()},
		{"names of 23, 24, 255, 300 bytes", []Reading{{Name: long[:23], V: 1}, {Name: long[:24], V: math.Copysign(0, -1)}, {Name: long[:255], V: 1e-300}, {Name: long, V: math.MaxFloat64}}},
		{"24 records", make([]Reading, 24)},
		{"300 records", make([]Reading, 300)},
		{"non-finite (library path)", []Reading{{Name: "x", V: math.Inf(1)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			recs := make([]map[int]any, len(tc.rs))
			for i, r := range tc.rs {
				recs[i] = map[int]any{0: r.Name, 6: float64(r.TS)/1000 + 4e-7, 2: r.V}
			}
			want, err := cbor.Marshal(recs)
			require.NoError(t, err)
			got, err := Encode("senml-cbor", tc.rs)
			require.NoError(t, err)
			var w, g []map[int]any
			require.NoError(t, cbor.Unmarshal(want, &w))
			require.NoError(t, cbor.Unmarshal(got, &g))
			require.Equal(t, w, g)
			require.Len(t, got, len(want), "same items, same sizes")
			for i, r := range tc.rs {
				require.Equal(t, math.Float64bits(r.V), math.Float64bits(g[i][2].(float64)))
			}
		})
	}
}

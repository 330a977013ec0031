package payload

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// sameAsStd fails t unless Decode and stdDecode (encoding/json, fxamacker/cbor) agree on b:
// equal records (bit for bit), rejects at the same index for the same reason,
// or both an error with the same reason.
func sameAsStd(t *testing.T, f Format, b []byte) {
	t.Helper()
	got, gotRej, gotErr := Decode(f, b, "pipe-0001", testNow)
	want, wantRej, wantErr := stdDecode(f, b, "pipe-0001", testNow)
	if (gotErr == nil) != (wantErr == nil) {
		t.Fatalf("%q: error %v, reference %v", b, gotErr, wantErr)
	}
	if wantErr != nil {
		var g, w *Error
		if !errors.As(gotErr, &g) || !errors.As(wantErr, &w) || g.Reason != w.Reason {
			t.Fatalf("%q: error %v, reference %v", b, gotErr, wantErr)
		}
		return
	}
	if len(got) != len(want) {
		t.Fatalf("%q: %d records, reference %d:\n%+v\n%+v", b, len(got), len(want), got, want)
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.Metric != w.Metric || math.Float64bits(g.Value) != math.Float64bits(w.Value) || g.Str != w.Str ||
			g.HasStr != w.HasStr || g.Unit != w.Unit || g.Time != w.Time {
			t.Fatalf("%q: record %d is %+v, reference %+v", b, i, g, w)
		}
	}
	if len(gotRej) != len(wantRej) {
		t.Fatalf("%q: %d rejects, reference %d: %v / %v", b, len(gotRej), len(wantRej), gotRej, wantRej)
	}
	for i := range gotRej {
		if gotRej[i].Index != wantRej[i].Index || gotRej[i].Reason != wantRej[i].Reason {
			t.Fatalf("%q: reject %d is %d %s (%v), reference %d %s (%v)", b, i,
				gotRej[i].Index, gotRej[i].Reason, gotRej[i].Err, wantRej[i].Index, wantRej[i].Reason, wantRej[i].Err)
		}
	}
}

// jsonEdgeCases are inputs where a hand-written reader is easily wrong.
var jsonEdgeCases = []string{
	``, ` `, `null`, `null ]`, `null]`, `nul`, `[]`, `[null]`, `[{}]`, `{}`, `{} ]`, `{}]`, `{}}`, `{}x`, `{} {}`, `[1]`, `"x"`, `true`,
	`[{"n":"pressure","v":1}]`, `[{"n":"pressure","v":1}] `, `[{"n":"pressure","v":1}]]`, `[{"n":"pressure","v":1},]`,
	`[{"N":"pressure","V":1}]`, `[{"ſ":1,"n":"flow","bver":1}]`, `[{"n":"pressure","v":1,"v":null}]`,
	`[{"n":"pressure","v":null,"v":2}]`, `[{"n":"pressure","v":"1"}]`, `[{"n":"pressure","v":1e400}]`,
	`[{"n":"pressure","v":1e-400}]`, `[{"n":"pressure","v":-0}]`, `[{"n":"pressure","v":01}]`, `[{"n":"pressure","v":1.}]`,
	`[{"n":"pressure","v":.5}]`, `[{"n":"pressure","v":+1}]`, `[{"n":"pressure","v":1E+2}]`, `[{"n":"pressure","bver":1.0,"v":1}]`,
	`[{"n":"pressure","bver":1e1,"v":1}]`, `[{"n":"pressure","bver":99999999999999999999,"v":1}]`,
	`[{"n":"pres\u0073ure","v":1}]`, `[{"\u006e":"pressure","v":1}]`, `[{"n":"state","vs":"\ud800"}]`,
	`[{"n":"state","vs":"\ud83d\ude00"}]`, `[{"n":"state","vs":"\ud800\u0041"}]`, `[{"n":"state","vs":"\x"}]`,
	`[{"n":"state","vs":"a` + "\t" + `b"}]`, `[{"n":"leak","vb":1}]`, `[{"n":"leak","vb":true}]`, `[{"n":"leak","x":[1,{"a":[]}]}]`,
	`[{"n":"leak","x":[1,]}]`, `[{"n":"leak","x":{"a" 1}}]`, `[{"n":"leak","vb":tru}]`, `[{"n":"leak",}]`, `[{,}]`,
	`{"time":1767225600,"pressure":1}`, `{"time":"2026-01-01T00:00:00Z","pressure":1,"pressure":2}`, `{"time":null,"a":1}`,
	`{"time":true,"a":1}`, `{"time":1e400,"a":1}`, `{"time":-1,"a":1}`, `{"a":null,"b":[1],"c":{"d":2},"e":"on","f":false}`,
	`{"":1,"a":1e999}`, `{"a":1,"a":"x","a":true}`, `{"time":"x","a":1}`, `{"time":"\u0032026-01-01T00:00:00Z","a":1}`,
	`{"a":1}` + "\n", `{"a":1` + strings.Repeat(`,"b":1`, 3) + `}`, strings.Repeat("[", 10001) + strings.Repeat("]", 10001),
	`[{"n":"leak","x":` + strings.Repeat("[", 9998) + strings.Repeat("]", 9998) + `}]`,
	`[{"n":"leak","x":` + strings.Repeat("[", 9999) + strings.Repeat("]", 9999) + `}]`,
}

func TestJSONReaderAgreesWithEncodingJSON(t *testing.T) {
	for _, f := range []Format{SenMLJSON, JSON} {
		for i, in := range jsonEdgeCases {
			t.Run(fmt.Sprintf("%s/%d", f, i), func(t *testing.T) { sameAsStd(t, f, []byte(in)) })
		}
	}
}

// A null element is an empty record (no value), a later null clears a field,
// and keys match case-insensitively, as encoding/json decodes them.
func TestSenMLJSONKeepsEncodingJSONSemantics(t *testing.T) {
	recs, rej, err := Decode(SenMLJSON, []byte(`[null,{"N":"pressure","V":1,"v":2},{"n":"flow","v":1,"v":null}]`), "pipe-0001", testNow)
	require.NoError(t, err)
	require.Len(t, recs, 1)
	require.Equal(t, "pressure", recs[0].Metric)
	require.Equal(t, 2.0, recs[0].Value)
	require.Len(t, rej, 2)
	require.Equal(t, 0, rej[0].Index)
	require.Equal(t, 2, rej[1].Index)
}

func FuzzSenMLJSONAsStd(f *testing.F) {
	fuzzSeeds(f, ".senml.json")
	for _, s := range jsonEdgeCases {
		if len(s) < 1000 { // the deep ones slow the fuzzer down; the test has them
			f.Add([]byte(s))
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) { sameAsStd(t, SenMLJSON, b) })
}

func FuzzPlainJSONAsStd(f *testing.F) {
	fuzzSeeds(f, ".plain.json")
	for _, s := range jsonEdgeCases {
		if len(s) < 1000 { // the deep ones slow the fuzzer down; the test has them
			f.Add([]byte(s))
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) { sameAsStd(t, JSON, b) })
}

// floodSenML is a message as the efficiency benchmark sends it (cmd/loadtest):
// four readings, names and float-second times, no base fields.
func floodSenML() []byte {
	var b []byte
	b = append(b, '[')
	for i, n := range []string{"pressure", "flow", "temperature", "leak"} {
		if i > 0 {
			b = append(b, ',')
		}
		b = fmt.Appendf(b, `{"n":%q,"t":%.7f,"v":%g}`, n, 1767225600.1234564+float64(i), 400.25+float64(i))
	}
	return append(b, ']')
}

// floodSenMLDevice is a flood message as a simulated pipe sends it
// (sim.Encode): the values with their noise, 15 to 17 significant digits.
func floodSenMLDevice() []byte {
	rng := rand.New(rand.NewPCG(13, 13))
	b := []byte{'['}
	for i, m := range []struct {
		n string
		v float64
	}{{"pressure", 412}, {"flow", 95}, {"leak", 0}, {"gas_concentration", 0.5}} {
		if i > 0 {
			b = append(b, ',')
		}
		b = fmt.Appendf(b, `{"n":%q,"t":`, m.n)
		b = strconv.AppendFloat(b, float64(1796194324271+int64(i))/1000+4e-7, 'f', 7, 64)
		b = append(b, `,"v":`...)
		b = strconv.AppendFloat(b, m.v*(1+0.01*rng.NormFloat64()), 'g', -1, 64)
		b = append(b, '}')
	}
	return append(b, ']')
}

// processCPU is the user+system CPU time of this process.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchBoth runs Decode and stdDecode on payload in one run, reporting
// readings decoded per op.
func benchBoth(b *testing.B, f Format, payload []byte) {
	ref := "encoding-json"
	if f == SenMLCBOR {
		ref = "fxamacker"
	}
	for _, c := range []struct {
		name string
		fn   func(Format, []byte, string, time.Time) ([]Record, []Reject, error)
	}{{ref, stdDecode}, {"reader", Decode}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(payload)))
			n := 0
			cpu0 := processCPU(b)
			for b.Loop() {
				recs, _, err := c.fn(f, payload, "pipe-0001", testNow)
				if err != nil || len(recs) == 0 {
					b.Fatal(err, len(recs))
				}
				n += len(recs)
			}
			b.ReportMetric(float64(n)/float64(b.N), "readings/op")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/reading")
			// CPU of the whole process (GC included): on a loaded machine the
			// wall time above says more about the neighbours.
			b.ReportMetric(float64(processCPU(b)-cpu0)/float64(n), "cpu-ns/reading")
		})
	}
}

func BenchmarkDecodeJSONReader(b *testing.B) {
	ten, _ := json.Marshal(tenRecords())
	m := map[string]any{"time": 1767225600}
	for i := 0; i < 10; i++ {
		m["m"+string(rune('a'+i))] = i
	}
	plain, _ := json.Marshal(m)
	b.Run("senml-flood-4", func(b *testing.B) { benchBoth(b, SenMLJSON, floodSenML()) })
	b.Run("senml-flood-4-device", func(b *testing.B) { benchBoth(b, SenMLJSON, floodSenMLDevice()) })
	b.Run("senml-base-10", func(b *testing.B) { benchBoth(b, SenMLJSON, ten) })
	b.Run("plain-10", func(b *testing.B) { benchBoth(b, JSON, plain) })
}

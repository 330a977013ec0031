package payload

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var testNow = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

const goldenDir = "../../testdata/payload"

// cborFixtures are SenML CBOR inputs (RFC 8428 §6 integer labels), written to
// testdata as .senml.cbor files with -update.
var cborFixtures = map[string]any{
	"base-fields.senml.cbor": []map[int]any{
		{-2: "urn:dev:pipe-0001:", -3: 1767225600, -4: "kPa", 0: "pressure", 2: 412.5},
		{0: "pressure", 6: 10, 2: 409},
		{0: "leak", 4: true},
	},
	"state-string.senml.cbor": []map[int]any{{0: "state", 3: "flashing"}},
	// float64 base times whose nearest double is just below the decimal
	"exact-times.senml.cbor": []map[int]any{
		{-2: "urn:dev:pipe-0001:", -3: 1796194324.271, 0: "pressure", 2: 1.0},
		{-3: 1796194324.274, 0: "pressure", 2: 2.0},
		{-3: 1796194324.0, 0: "pressure", 6: 0.277, 2: 3.0},
		{-3: 1796194324.2, 0: "pressure", 6: 0.08, 2: 4.0},
	},
}

type goldenOutput struct {
	Records []Record `json:"records"`
	Rejects []struct {
		Index  int    `json:"index"`
		Reason string `json:"reason"`
		Error  string `json:"error"`
	} `json:"rejects"`
	Error string `json:"error,omitempty"`
}

func formatOf(name string) Format {
	switch {
	case strings.HasSuffix(name, ".senml.json"):
		return SenMLJSON
	case strings.HasSuffix(name, ".senml.cbor"):
		return SenMLCBOR
	case strings.HasSuffix(name, ".plain.json"):
		return JSON
	}
	return Unknown
}

func TestDecodeGolden(t *testing.T) {
	if *update {
		for name, v := range cborFixtures {
			b, err := cbor.Marshal(v)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(goldenDir, name), b, 0o644))
		}
	}
	inputs, err := filepath.Glob(filepath.Join(goldenDir, "*.*.*"))
	require.NoError(t, err)
	n := 0
	for _, in := range inputs {
		f := formatOf(in)
		if f == Unknown {
			continue
		}
		n++
		t.Run(filepath.Base(in), func(t *testing.T) {
			b, err := os.ReadFile(in)
			require.NoError(t, err)
			recs, rejects, err := Decode(f, b, "pipe-0001", testNow)
			var out goldenOutput
			out.Records = recs
			for _, r := range rejects {
				out.Rejects = append(out.Rejects, struct {
					Index  int    `json:"index"`
					Reason string `json:"reason"`
					Error  string `json:"error"`
				}{r.Index, r.Reason, r.Err.Error()})
			}
			if err != nil {
				out.Error = err.Error()
			}
			got, err := json.MarshalIndent(out, "", "  ")
			require.NoError(t, err)
			golden := in + ".golden"
			if *update {
				require.NoError(t, os.WriteFile(golden, append(got, '\n'), 0o644))
			}
			want, err := os.ReadFile(golden)
			require.NoError(t, err, "run go test ./ingest/payload -update to create the golden file")
			require.JSONEq(t, string(want), string(got))
		})
	}
	require.GreaterOrEqual(t, n, 8, "golden inputs present")
}

func TestDecodeResolvesNames(t *testing.T) {
	tests := []struct {
		name    string
		payload string
		metric  string
		reason  string
	}{
		{"a bare metric name", `[{"n":"pressure","v":1}]`, "pressure", ""},
		{"a urn:dev base name of this device", `[{"bn":"urn:dev:pipe-0001:","n":"pressure","v":1}]`, "pressure", ""},
		{"a device/ base name of this device", `[{"bn":"pipe-0001/","n":"pressure","v":1}]`, "pressure", ""},
		{"a urn:dev name of another device is refused", `[{"n":"urn:dev:pipe-0002:pressure","v":1}]`, "", ReasonForeignDevice},
		{"a path name of another device is refused", `[{"bn":"pipe-0002/","n":"pressure","v":1}]`, "", ReasonForeignDevice},
		{"a record without a value is refused", `[{"n":"pressure"}]`, "", ReasonBadRecord},
		{"an unsupported version is refused", `[{"bver":99,"n":"pressure","v":1}]`, "", ReasonBadRecord},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			recs, rejects, err := Decode(SenMLJSON, []byte(tc.payload), "pipe-0001", testNow)
			require.NoError(t, err)
			if tc.reason != "" {
				require.Empty(t, recs)
				require.Len(t, rejects, 1)
				require.Equal(t, tc.reason, rejects[0].Reason)
				return
			}
			require.Empty(t, rejects)
			require.Len(t, recs, 1)
			require.Equal(t, tc.metric, recs[0].Metric)
		})
	}
}

func TestDecodeTimes(t *testing.T) {
	tests := []struct {
		name    string
		f       Format
		payload string
		want    time.Time
	}{
		{"an absent SenML time is now", SenMLJSON, `[{"n":"p","v":1}]`, testNow},
		{"a small SenML time is relative to now", SenMLJSON, `[{"n":"p","v":1,"t":-90}]`, testNow.Add(-90 * time.Second)},
		{"base time plus time", SenMLJSON, `[{"bt":1767225600.5,"n":"p","v":1,"t":1}]`, time.Unix(1767225601, 5e8)},
		{"plain JSON unix seconds", JSON, `{"time":1767225600,"p":1}`, time.Unix(1767225600, 0)},
		{"plain JSON unix milliseconds", JSON, `{"time":1767225600123,"p":1}`, time.Unix(1767225600, 123e6)},
		{"plain JSON unix nanoseconds", JSON, `{"time":1767225600123456789,"p":1}`, time.Unix(1767225600, 123456789)},
		{"plain JSON fractional seconds", JSON, `{"time":1767225600.25,"p":1}`, time.Unix(1767225600, 25e7)},
		{"plain JSON RFC 3339", JSON, `{"time":"2026-01-01T00:00:01.5Z","p":1}`, time.Unix(1767225601, 5e8)},
		{"plain JSON without time is now", JSON, `{"p":1}`, testNow},
		// float seconds are exact to the µs (issue 12): the nearest double of
		// each of these is just below the decimal
		{"SenML base time .271", SenMLJSON, `[{"bt":1796194324.271,"n":"p","v":1}]`, time.UnixMilli(1796194324271)},
		{"SenML time .274", SenMLJSON, `[{"n":"p","v":1,"t":1796194324.274}]`, time.UnixMilli(1796194324274)},
		{"SenML base time plus a fractional time", SenMLJSON, `[{"bt":1796194324.2,"n":"p","v":1,"t":0.077}]`, time.UnixMilli(1796194324277)},
		{"SenML microseconds", SenMLJSON, `[{"bt":1796194324.280123,"n":"p","v":1}]`, time.UnixMicro(1796194324280123)},
		{"a relative SenML time of -1 ms", SenMLJSON, `[{"n":"p","v":1,"t":-0.001}]`, testNow.Add(-time.Millisecond)},
		{"a relative SenML time of -0.3 s", SenMLJSON, `[{"n":"p","v":1,"t":-0.3}]`, testNow.Add(-300 * time.Millisecond)},
		{"plain JSON float seconds .280", JSON, `{"time":1796194324.28,"p":1}`, time.UnixMilli(1796194324280)},
		{"plain JSON RFC 3339 at the last ns", JSON, `{"time":"2262-04-11T23:47:16.854775807Z","p":1}`, time.Unix(0, math.MaxInt64)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			recs, rejects, err := Decode(tc.f, []byte(tc.payload), "pipe-0001", testNow)
			require.NoError(t, err)
			require.Empty(t, rejects)
			require.Len(t, recs, 1)
			require.Equal(t, tc.want.UnixNano(), recs[0].Time)
		})
	}
}

// TestDecodeMillisecondTimesAreExact decodes every millisecond of one second,
// sent as float seconds in each format, and wants each at its exact ms (issue
// 12: about half used to come out 1 ms early once truncated to ms).
func TestDecodeMillisecondTimesAreExact(t *testing.T) {
	const sec = 1796194324
	formats := []struct {
		name   string
		f      Format
		encode func(k int) []byte
	}{
		{"SenML JSON base time", SenMLJSON, func(k int) []byte {
			return fmt.Appendf(nil, `[{"bn":"urn:dev:pipe-0001:","bt":%d.%03d,"n":"pressure","v":1}]`, sec, k)
		}},
		{"SenML JSON base time plus time", SenMLJSON, func(k int) []byte {
			return fmt.Appendf(nil, `[{"bt":%d,"n":"pressure","v":1,"t":0.%03d}]`, sec, k)
		}},
		{"SenML CBOR float64 base time", SenMLCBOR, func(k int) []byte {
			f, err := strconv.ParseFloat(fmt.Sprintf("%d.%03d", sec, k), 64)
			require.NoError(t, err)
			b, err := cbor.Marshal([]map[int]any{{-3: f, 0: "pressure", 2: 1.0}})
			require.NoError(t, err)
			return b
		}},
		{"plain JSON float seconds", JSON, func(k int) []byte {
			return fmt.Appendf(nil, `{"time":%d.%03d,"pressure":1}`, sec, k)
		}},
	}
	for _, tc := range formats {
		t.Run(tc.name, func(t *testing.T) {
			wrong := 0
			for k := range 1000 {
				recs, rejects, err := Decode(tc.f, tc.encode(k), "pipe-0001", testNow)
				require.NoError(t, err)
				require.Empty(t, rejects)
				require.Len(t, recs, 1)
				if recs[0].Time != (sec*1000+int64(k))*1e6 {
					wrong++
				}
			}
			require.Zero(t, wrong, "of 1000 ms times, %d are not exact", wrong)
		})
	}
}

// TestDecodeTimesOutOfRange: a time past what int64 ns holds is refused as
// too_new (or too_old), never wrapped around to some other time.
func TestDecodeTimesOutOfRange(t *testing.T) {
	tests := []struct {
		name    string
		f       Format
		payload string
		reason  string
	}{
		{"ms that overflow ns when scaled (year 2611)", JSON, `{"time":20242937712302,"p":1}`, ReasonTooNew},
		{"the largest ms int64 ns cannot hold", JSON, `{"time":9223372036855,"p":1}`, ReasonTooNew},
		{"RFC 3339 in the year 9999", JSON, `{"time":"9999-12-31T23:59:59Z","p":1}`, ReasonTooNew},
		{"RFC 3339 in the year 1000", JSON, `{"time":"1000-01-01T00:00:00Z","p":1}`, ReasonTooOld},
		{"seconds past 2242", JSON, `{"time":9000000000,"p":1}`, ReasonTooNew},
		{"float seconds past 2242", JSON, `{"time":9000000000.5,"p":1}`, ReasonTooNew},
		{"a time past the float range", JSON, `{"time":1e400,"p":1}`, ReasonTooNew},
		{"a negative unix time", JSON, `{"time":-5,"p":1}`, ReasonTooOld},
		{"a negative float unix time", JSON, `{"time":-1e300,"p":1}`, ReasonTooOld},
		{"a SenML time past 2242", SenMLJSON, `[{"n":"p","v":1,"bt":1e10}]`, ReasonTooNew},
		{"a negative absolute SenML time", SenMLJSON, `[{"n":"p","v":1,"t":-1e9}]`, ReasonTooOld},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			recs, rejects, err := Decode(tc.f, []byte(tc.payload), "pipe-0001", testNow)
			require.NoError(t, err)
			require.Empty(t, recs)
			require.Len(t, rejects, 1)
			require.Equal(t, tc.reason, rejects[0].Reason, rejects[0].Err)
		})
	}
	// A time out of range rejects every field of a plain-JSON message, each
	// counted, and the message stays usable (no whole-message error).
	recs, rejects, err := Decode(JSON, []byte(`{"time":20242937712302,"p":1,"q":2}`), "pipe-0001", testNow)
	require.NoError(t, err)
	require.Empty(t, recs)
	require.Len(t, rejects, 2)
}

func TestDecodeRefusesUnusableMessages(t *testing.T) {
	huge := "[" + strings.Repeat(`{"n":"p","v":1},`, MaxRecords) + `{"n":"p","v":1}]`
	tests := []struct {
		name    string
		f       Format
		payload []byte
		reason  string
	}{
		{"truncated SenML JSON", SenMLJSON, []byte(`[{"n":"p","v":`), ReasonMalformed},
		{"an empty SenML pack", SenMLJSON, []byte(`[]`), ReasonMalformed},
		{"invalid UTF-8", SenMLJSON, []byte("[{\"n\":\"p\xff\",\"v\":1}]"), ReasonMalformed},
		{"too many records", SenMLJSON, []byte(huge), ReasonTooManyRecords},
		{"an oversized payload", JSON, make([]byte, MaxPayloadBytes+1), ReasonTooLarge},
		{"garbage CBOR", SenMLCBOR, []byte{0x9f, 0xff, 0x00}, ReasonMalformed},
		{"a plain JSON array", JSON, []byte(`[1,2]`), ReasonMalformed},
		{"a plain JSON bad time", JSON, []byte(`{"time":"yesterday","p":1}`), ReasonMalformed},
		{"an unknown format", Unknown, []byte(`x`), ReasonMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Decode(tc.f, tc.payload, "pipe-0001", testNow)
			var pe *Error
			require.ErrorAs(t, err, &pe)
			require.Equal(t, tc.reason, pe.Reason)
		})
	}
}

func TestFormatDetection(t *testing.T) {
	require.Equal(t, SenMLJSON, FromContentType("application/senml+json"))
	require.Equal(t, SenMLCBOR, FromContentType("Application/SenML+CBOR"))
	require.Equal(t, JSON, FromContentType("application/json; charset=utf-8"))
	require.Equal(t, Unknown, FromContentType("text/plain"))
	require.Equal(t, SenMLJSON, FromCoAP(110))
	require.Equal(t, SenMLCBOR, FromCoAP(112))
	require.Equal(t, JSON, FromCoAP(50))
	require.Equal(t, Unknown, FromCoAP(0))
	require.Equal(t, SenMLJSON, Sniff([]byte(" \n[{}]")))
	require.Equal(t, JSON, Sniff([]byte(`{"a":1}`)))
	require.Equal(t, SenMLCBOR, Sniff([]byte{0x81, 0xa0}))
	require.Equal(t, Unknown, Sniff(nil))
}

func fuzzSeeds(f *testing.F, suffix string) {
	files, _ := filepath.Glob(filepath.Join(goldenDir, "*"+suffix))
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
}

func fuzzDecode(f *testing.F, format Format) {
	f.Fuzz(func(t *testing.T, b []byte) {
		recs, rejects, err := Decode(format, b, "pipe-0001", testNow)
		if err != nil {
			if recs != nil || rejects != nil {
				t.Fatal("an error comes with no records")
			}
			return
		}
		if len(recs)+len(rejects) > MaxRecords {
			t.Fatalf("%d records over the limit", len(recs)+len(rejects))
		}
		for _, r := range recs {
			if r.Metric == "" {
				t.Fatal("a record without a metric")
			}
		}
		for _, r := range rejects {
			switch r.Reason {
			case ReasonBadRecord, ReasonForeignDevice, ReasonTooOld, ReasonTooNew:
			default:
				t.Fatalf("a record rejected for an uncounted reason %q", r.Reason)
			}
		}
	})
}

// FuzzFloatSeconds checks the float-seconds contract: the result is a whole
// number of µs within half a µs (plus the float's own spacing) of the input,
// and a time that is in range is never refused.
func FuzzFloatSeconds(f *testing.F) {
	for _, s := range []float64{1796194324.271, 1796194324.2799999, 0, 1, -0.001, 1<<28 - 1e-6, 1 << 32, maxSeconds - 1e-6, 1767225600.5} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s float64) {
		if math.IsNaN(s) || math.IsInf(s, 0) {
			if _, err := senmlTime(s, testNow); err == nil {
				t.Fatalf("%v accepted", s)
			}
			return
		}
		ns, err := senmlTime(s, testNow)
		abs := math.Abs(s) >= relativeLimit
		switch {
		case abs && s >= maxSeconds || abs && s < 0:
			var te *timeError
			if !errors.As(err, &te) {
				t.Fatalf("%v: want a too_new/too_old timeError, got %v", s, err)
			}
			return
		case err != nil:
			t.Fatalf("%v refused: %v", s, err)
		}
		if abs {
			if ns%1000 != 0 {
				t.Fatalf("%v -> %d ns: not a whole µs", s, ns)
			}
		} else {
			ns -= testNow.UnixNano()
			if ns%1000 != 0 {
				t.Fatalf("relative %v -> %d ns: not a whole µs", s, ns)
			}
		}
		// the error is at most 0.5 µs plus the float's spacing at s
		if d := math.Abs(float64(ns)/1e9 - s); d > 0.5e-6+2*(math.Nextafter(math.Abs(s), math.Inf(1))-math.Abs(s)) {
			t.Fatalf("%v -> %d ns: off by %g s", s, ns, d)
		}
	})
}

func FuzzDecodeSenMLJSON(f *testing.F) {
	fuzzSeeds(f, ".senml.json")
	fuzzDecode(f, SenMLJSON)
}

func FuzzDecodeSenMLCBOR(f *testing.F) {
	fuzzSeeds(f, ".senml.cbor")
	fuzzDecode(f, SenMLCBOR)
}

func FuzzDecodePlainJSON(f *testing.F) {
	fuzzSeeds(f, ".plain.json")
	fuzzDecode(f, JSON)
}

func benchDecode(b *testing.B, f Format, payload []byte) {
	b.ReportAllocs()
	b.SetBytes(int64(len(payload)))
	for b.Loop() {
		recs, _, err := Decode(f, payload, "pipe-0001", testNow)
		if err != nil || len(recs) != 10 {
			b.Fatal(err, len(recs))
		}
	}
	b.ReportMetric(float64(b.N)*10/b.Elapsed().Seconds(), "readings/s")
}

func tenRecords() []map[string]any {
	var recs []map[string]any
	for i := 0; i < 10; i++ {
		r := map[string]any{"n": "pressure", "v": 400 + i, "t": i}
		if i == 0 {
			r["bn"] = "urn:dev:pipe-0001:"
			r["bt"] = 1767225600
		}
		recs = append(recs, r)
	}
	return recs
}

func BenchmarkDecodeSenMLJSON(b *testing.B) {
	p, _ := json.Marshal(tenRecords())
	benchDecode(b, SenMLJSON, p)
}

func BenchmarkDecodeSenMLCBOR(b *testing.B) {
	var recs []map[int]any
	for i := 0; i < 10; i++ {
		recs = append(recs, map[int]any{-2: "urn:dev:pipe-0001:", -3: 1767225600, 0: "pressure", 2: 400 + i, 6: i})
	}
	p, _ := cbor.Marshal(recs)
	benchDecode(b, SenMLCBOR, p)
}

func BenchmarkDecodePlainJSON(b *testing.B) {
	m := map[string]any{"time": 1767225600}
	for i := 0; i < 10; i++ {
		m["m"+string(rune('a'+i))] = i
	}
	p, _ := json.Marshal(m)
	benchDecode(b, JSON, p)
}

// TestRefusalsAsBeforeDecoding: without the count before decoding, a message
// is refused for the same reason with the same message as when the records
// were counted and the UTF-8 checked first (stdDecode still does): too many
// records wins over any other fault, invalid UTF-8 over bad syntax, wherever
// they are.
func TestRefusalsAsBeforeDecoding(t *testing.T) {
	rec := `{"n":"p","v":1}`
	recs := func(n int) string { return strings.Repeat(rec+",", n-1) + rec }
	tests := []struct {
		name   string
		f      Format
		in     string
		reason string
	}{
		{"MaxRecords+1", SenMLJSON, "[" + recs(MaxRecords+1) + "]", ReasonTooManyRecords},
		{"15,000 records", SenMLJSON, "[" + recs(15000) + "]", ReasonTooManyRecords},
		{"too many, then a syntax error", SenMLJSON, "[" + recs(MaxRecords+1) + ",x]", ReasonTooManyRecords},
		{"a syntax error, then too many", SenMLJSON, "[{x}," + recs(MaxRecords+1) + "]", ReasonTooManyRecords},
		{"invalid UTF-8, then too many", SenMLJSON, "[{\"n\":\"\xff\"}," + recs(MaxRecords+1) + "]", ReasonTooManyRecords},
		{"an object of too many fields", SenMLJSON, "{" + strings.Repeat(`"a":1,`, MaxRecords+1) + `"a":1}`, ReasonTooManyRecords},
		{"too many after the array", SenMLJSON, "[" + rec + "]][[" + strings.Repeat(",", MaxRecords+1), ReasonTooManyRecords},
		{"invalid UTF-8 in a name", SenMLJSON, "[{\"n\":\"p\xc3\",\"v\":1}]", ReasonMalformed},
		{"invalid UTF-8 in an escaped string", SenMLJSON, "[{\"n\":\"p\\n\xc3\",\"v\":1}]", ReasonMalformed},
		{"invalid UTF-8 in a key", SenMLJSON, "[{\"n\xff\":\"p\",\"v\":1}]", ReasonMalformed},
		{"invalid UTF-8 in an unknown field", SenMLJSON, "[{\"n\":\"p\",\"x\":[\"\xed\xa0\x80\"],\"v\":1}]", ReasonMalformed},
		{"a syntax error, then invalid UTF-8", SenMLJSON, "[{\"n\":\"p\",\"v\":1,}, {\"n\":\"\xff\"}]", ReasonMalformed},
		{"invalid UTF-8 outside strings", SenMLJSON, "[{\"n\":\"p\",\"v\":1}\xff]", ReasonMalformed},
		{"plain: invalid UTF-8 in a state", JSON, "{\"a\":\"\xff\"}", ReasonMalformed},
		{"plain: invalid UTF-8 after the ']' that ends it", JSON, "{\"a\":1}]\xff", ReasonMalformed},
		{"plain: a syntax error, then invalid UTF-8", JSON, "{\"a\":1,}\xff", ReasonMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Decode(tc.f, []byte(tc.in), "pipe-0001", testNow)
			_, _, want := stdDecode(tc.f, []byte(tc.in), "pipe-0001", testNow)
			var pe *Error
			require.ErrorAs(t, err, &pe)
			require.Equal(t, tc.reason, pe.Reason)
			if tc.reason == ReasonTooManyRecords || strings.Contains(want.Error(), "UTF-8") {
				require.EqualError(t, err, want.Error())
			}
		})
	}
	// MaxRecords+1 elements of which the first is null are MaxRecords by
	// the count, as before: decoded.
	got, rej, err := Decode(SenMLJSON, []byte("[null,"+recs(MaxRecords)+"]"), "pipe-0001", testNow)
	require.NoError(t, err)
	require.Len(t, got, MaxRecords)
	require.Len(t, rej, 1)
}

// TestBaseNameOfTheDevice: a name under the device's own base name resolves
// without joining the two, to what metricName makes of them joined.
func TestBaseNameOfTheDevice(t *testing.T) {
	tests := []struct{ bn, n, device string }{
		{"urn:dev:pipe-0001:", "pressure", "pipe-0001"},
		{"pipe-0001/", "pressure", "pipe-0001"},
		{"urn:dev:pipe-0001:", "", "pipe-0001"},
		{"urn:dev:pipe-0001:", strings.Repeat("p", 65), "pipe-0001"},
		{"urn:dev:pipe-0001:", "a:b", "pipe-0001"},
		{"pipe-0001/", "a/b", "pipe-0001"},
		{"urn:dev:a:b:", "p", "a:b"},
		{"a/b/", "p", "a/b"},
		{"urn:dev:x/", "p", "urn:dev:x"},
		{"urn:dev:/", "p", "urn:dev:"},
		{"urn/", "p", "urn"},
		{"urn:dev::", "p", ""},
		{"/", "p", ""},
		{"urn:dev:pipe-0002:", "p", "pipe-0001"},
		{"pipe-0001/", "p\xff", "pipe-0001"},
		{"urn:dev:pipe-0001:\xc3", "\xa9", "pipe-0001"},
	}
	for _, tc := range tests {
		sameName(t, tc.bn, tc.n, tc.device)
	}
}

func sameName(t *testing.T, bn, n, device string) {
	t.Helper()
	res := resolver{device: device}
	res.base(&senmlRecord{has: fBN, bn: bn})
	got, gotErr := res.name(&senmlRecord{has: fN, n: n})
	want, wantErr := metricName(bn+n, device)
	if got != want || fmt.Sprint(gotErr) != fmt.Sprint(wantErr) {
		t.Fatalf("bn %q n %q device %q: %q (%v), joined %q (%v)", bn, n, device, got, gotErr, want, wantErr)
	}
}

func FuzzBaseNameOfTheDevice(f *testing.F) {
	f.Add("urn:dev:pipe-0001:", "pressure", "pipe-0001")
	f.Add("pipe-0001/", "pressure", "pipe-0001")
	f.Add("urn:dev:a:b:", "p", "a:b")
	f.Fuzz(func(t *testing.T, bn, n, device string) {
		sameName(t, bn, n, device)
		sameName(t, "urn:dev:"+device+":", n, device)
		sameName(t, device+"/", n, device)
	})
}

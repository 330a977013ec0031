package storage

import (
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

func TestLineProtocolGroupsADevicesReadingsAtOneTime(t *testing.T) {
	rs := []pipeline.Reading{
		rd("pipe-0001", "gulou", "pipe", "pressure", 412.5, t0),
		rd("pipe-0001", "gulou", "pipe", "flow", 33, t0),
		rd("pipe-0001", "gulou", "pipe", "pressure", 409, t0.Add(time.Second)),
		rd("tl-0001", "my district", "traffic_light", "state", 3, t0),
		rd("tl-0001", "my district", "traffic_light", "state", 2, t0), // same metric twice: a new line
	}
	require.Equal(t, []string{
		"pipe,device=pipe-0001,district=gulou pressure=412.5,flow=33 1767225600000000000",
		"pipe,device=pipe-0001,district=gulou pressure=409 1767225601000000000",
		`traffic_light,device=tl-0001,district=my\ district state=3 1767225600000000000`,
		`traffic_light,device=tl-0001,district=my\ district state=2 1767225600000000000`,
	}, lines(rs))
}

// lines is appendLines as one string per line.
func lines(rs []pipeline.Reading) []string {
	buf, ends := appendLines(nil, nil, rs)
	out := make([]string, len(ends))
	from := 0
	for i, end := range ends {
		out[i] = string(buf[from : end-1])
		from = end
	}
	return out
}

// TestLineProtocolAsTheReplacerBuiltLines renders random readings (names
// with commas, spaces, equal signs; extreme values) with appendLines and
// with the strings.Builder, strings.Replacer and FormatFloat renderer it
// replaced, and requires the same lines.
func TestLineProtocolAsTheReplacerBuiltLines(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 13))
	names := []string{"pipe", "traffic light", "a,b", "k=v", "x=,y z", "", "é=ü", `back\slash`}
	values := []float64{0, math.Copysign(0, -1), 1e21, 1e-7, 412.5, math.MaxFloat64, math.SmallestNonzeroFloat64, -3}
	pick := func(s []string) string { return s[rng.IntN(len(s))] }
	for range 200 {
		rs := make([]pipeline.Reading, rng.IntN(20))
		for i := range rs {
			rs[i] = pipeline.Reading{Device: pick(names[:3]), Kind: pick(names), District: pick(names),
				Metric: pick(names), Value: values[rng.IntN(len(values))] * rng.Float64(), Time: rng.Int64N(3) * 1e9}
		}
		require.Equal(t, replacerLines(rs), append([]string{}, lines(rs)...))
	}
}

// replacerLines is the renderer before issue 13's second round.
func replacerLines(rs []pipeline.Reading) []string {
	measurement := strings.NewReplacer(",", `\,`, " ", `\ `)
	tag := strings.NewReplacer(",", `\,`, " ", `\ `, "=", `\=`)
	dst := []string{}
	var sb strings.Builder
	for i := 0; i < len(rs); {
		r := rs[i]
		sb.Reset()
		sb.WriteString(measurement.Replace(r.Kind))
		sb.WriteString(",device=")
		sb.WriteString(tag.Replace(r.Device))
		sb.WriteString(",district=")
		sb.WriteString(tag.Replace(r.District))
		sep := byte(' ')
		j := i
		for ; j < len(rs) && rs[j].Device == r.Device && rs[j].Time == r.Time && !hasMetric(rs[i:j], rs[j].Metric); j++ {
			sb.WriteByte(sep)
			sep = ','
			sb.WriteString(tag.Replace(rs[j].Metric))
			sb.WriteByte('=')
			sb.WriteString(strconv.FormatFloat(rs[j].Value, 'g', -1, 64))
		}
		sb.WriteByte(' ')
		sb.WriteString(strconv.FormatInt(r.Time, 10))
		dst = append(dst, sb.String())
		i = j
	}
	return dst
}

// BenchmarkLineProtocol renders a flood batch: 5,000 readings, 4 metrics of
// 16 devices at a time.
func BenchmarkLineProtocol(b *testing.B) {
	metrics := []string{"pressure", "flow", "leak", "gas_concentration"}
	rs := make([]pipeline.Reading, 0, 5000)
	for i := 0; len(rs) < 5000; i++ {
		for _, m := range metrics {
			rs = append(rs, rd(fmt.Sprintf("pipe-%04d", i%16), "gulou", "pipe", m, float64(i)*1.37, t0.Add(time.Duration(i/16)*time.Millisecond)))
		}
	}
	var buf []byte
	var ends []int
	for _, c := range []struct {
		name   string
		render func() int // lines rendered
	}{
		{"replacer", func() int { return len(replacerLines(rs)) }},
		{"append", func() int { buf, ends = appendLines(buf[:0], ends[:0], rs); _ = string(buf); return len(ends) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			lines := 0
			for b.Loop() {
				lines += c.render()
			}
			b.ReportMetric(float64(lines)/float64(b.N), "lines/op")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(rs)), "ns/reading")
		})
	}
}

// fakeWriteAPI answers /api/v2/write: lines containing "bad" make the whole
// request fail with 400 (as InfluxDB does for a type conflict), and the first
// `throttle` requests get 429 with Retry-After.
type fakeWriteAPI struct {
	mu       sync.Mutex
	lines    []string
	requests int
	throttle int
}

func (f *fakeWriteAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.requests++
	if f.throttle > 0 {
		f.throttle--
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(http.StatusTooManyRequests)
		return
	}
	if strings.Contains(string(b), "bad") {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_, _ = w.Write([]byte(`{"code":"invalid","message":"field type conflict"}`))
		return
	}
	f.lines = append(f.lines, strings.Split(strings.TrimSpace(string(b)), "\n")...)
	w.WriteHeader(http.StatusNoContent)
}

func newTestInflux(t *testing.T, f *fakeWriteAPI) (*Influx, string) {
	t.Helper()
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	cfg := DefaultInflux()
	cfg.URL = srv.URL
	dead := filepath.Join(t.TempDir(), "influx.lp")
	x, err := OpenInflux(cfg, dead, nil, nil)
	require.NoError(t, err)
	t.Cleanup(x.Close)
	return x, dead
}

func TestABadLineIsBisectedIntoTheDeadLetterFile(t *testing.T) {
	f := &fakeWriteAPI{}
	x, dead := newTestInflux(t, f)
	var rs []pipeline.Reading
	for i := 0; i < 16; i++ {
		metric := "pressure"
		if i == 11 {
			metric = "bad"
		}
		rs = append(rs, rd("pipe-0001", "gulou", "pipe", metric, float64(i), t0.Add(time.Duration(i)*time.Second)))
	}
	require.NoError(t, x.Write(context.Background(), pipeline.Batch{Readings: rs}))
	require.Len(t, f.lines, 15, "every good line is written")
	b, err := os.ReadFile(dead)
	require.NoError(t, err)
	require.Contains(t, string(b), "pipe,device=pipe-0001,district=gulou bad=11 ")
	require.Contains(t, string(b), "field type conflict")
	require.LessOrEqual(t, f.requests, 1+2*4, "bisection costs O(log n) requests per bad line")
}

func TestThrottlingHonoursRetryAfterThenFails(t *testing.T) {
	f := &fakeWriteAPI{throttle: 1}
	x, _ := newTestInflux(t, f)
	var slept time.Duration
	x.sleep = func(_ context.Context, d time.Duration) bool { slept = d; return true }
	err := x.Write(context.Background(), pipeline.Batch{Readings: fixture().Readings})
	require.Error(t, err, "the pipeline retries the batch")
	require.Equal(t, 7*time.Second, slept)
	require.NoError(t, x.Write(context.Background(), pipeline.Batch{Readings: fixture().Readings}))
}

func TestInfluxConfigValidateNamesTheKey(t *testing.T) {
	c := DefaultInflux()
	require.NoError(t, c.Validate(), "a disabled sink needs no URL")
	c.Enabled = true
	require.ErrorContains(t, c.Validate(), "storage.influx.url")
}

// BenchmarkInfluxWrite writes batches of 5000 readings (10 metrics of 500
// devices at one time, so 500 lines) to a real store at
// $CITYPULSE_BENCH_INFLUX_URL (e.g. a local VictoriaMetrics); skipped without it.
func BenchmarkInfluxWrite(b *testing.B) {
	u := os.Getenv("CITYPULSE_BENCH_INFLUX_URL")
	if u == "" {
		b.Skip("set CITYPULSE_BENCH_INFLUX_URL to a store that speaks the InfluxDB v2 write API")
	}
	cfg := DefaultInflux()
	cfg.URL = u
	x, err := OpenInflux(cfg, filepath.Join(b.TempDir(), "dead.lp"), nil, nil)
	require.NoError(b, err)
	defer x.Close()
	metrics := []string{"pressure", "flow", "leak", "gas_concentration", "temperature", "m5", "m6", "m7", "m8", "m9"}
	rs := make([]pipeline.Reading, 0, 5000)
	n := 0
	b.ReportAllocs()
	for b.Loop() {
		rs = rs[:0]
		at := t0.Add(time.Duration(n) * time.Second)
		for d := 0; d < 500; d++ {
			for _, m := range metrics {
				rs = append(rs, rd(fmt.Sprintf("pipe-%04d", d), "gulou", "pipe", m, float64(n%1000), at))
			}
		}
		n++
		require.NoError(b, x.Write(context.Background(), pipeline.Batch{Readings: rs}))
	}
	b.ReportMetric(float64(n*5000)/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64(n*500)/b.Elapsed().Seconds(), "lines/s")
}

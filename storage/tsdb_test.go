package storage

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/citypulse/citypulse/pipeline"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func open(t *testing.T, dir string) (*TSDB, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	db, err := OpenTSDB(dir, DefaultTSDB(), nil, reg)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	return db, reg
}

func rd(dev, district, kind, metric string, v float64, at time.Time) pipeline.Reading {
	return pipeline.Reading{Device: dev, District: district, Kind: kind, Metric: metric, Value: v, Time: at.UnixNano()}
}

func fixture() pipeline.Batch {
	return pipeline.Batch{Readings: []pipeline.Reading{
		rd("pipe-0001", "gulou", "pipe", "pressure", 412.5, t0),
		rd("pipe-0001", "gulou", "pipe", "pressure", 409, t0.Add(10*time.Second)),
		rd("pipe-0002", "xuanwu", "pipe", "pressure", 388, t0.Add(10*time.Second)),
		rd("tl-0001", "gulou", "traffic_light", "state", 3, t0.Add(5*time.Second)),
	}}
}

func get(t *testing.T, srv *httptest.Server, path string, params url.Values) (int, string) {
	t.Helper()
	resp, err := http.Get(srv.URL + path + "?" + params.Encode())
	require.NoError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func serve(t *testing.T, db *TSDB) *httptest.Server {
	mux := http.NewServeMux()
	NewAPI(db, APIOptions{}).Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func at(t time.Time) string { return fmt.Sprint(float64(t.UnixMilli()) / 1000) }

func TestQueryAPIAnswersInThePrometheusShape(t *testing.T) {
	db, _ := open(t, t.TempDir())
	require.NoError(t, db.Write(context.Background(), fixture()))
	srv := serve(t, db)

	tests := []struct {
		name, path string
		params     url.Values
		golden     string
	}{
		{"an instant query returns a vector", "/api/v1/query",
			url.Values{"query": {`pipe_pressure`}, "time": {at(t0.Add(time.Minute))}}, "query_vector.json"},
		{"a range selector returns a matrix", "/api/v1/query",
			url.Values{"query": {`pipe_pressure{device="pipe-0001"}[1m]`}, "time": {at(t0.Add(30 * time.Second))}}, "query_matrix.json"},
		{"a range query steps over time", "/api/v1/query_range",
			url.Values{"query": {`min by (district) (pipe_pressure)`}, "start": {at(t0)}, "end": {at(t0.Add(20 * time.Second))}, "step": {"10s"}}, "query_range.json"},
		{"a scalar", "/api/v1/query", url.Values{"query": {`1+1`}, "time": {at(t0)}}, "query_scalar.json"},
		{"series by matcher", "/api/v1/series", url.Values{"match[]": {`{district="gulou"}`}}, "series.json"},
		{"label names", "/api/v1/labels", nil, "labels.json"},
		{"label values", "/api/v1/label/device/values", nil, "label_values.json"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, body := get(t, srv, tc.path, tc.params)
			require.Equal(t, http.StatusOK, code, body)
			golden := "../testdata/storage/" + tc.golden
			if *update {
				var v any
				require.NoError(t, json.Unmarshal([]byte(body), &v))
				b, _ := json.MarshalIndent(v, "", "  ")
				require.NoError(t, os.WriteFile(golden, append(b, '\n'), 0o644))
			}
			want, err := os.ReadFile(golden)
			require.NoError(t, err, "run go test ./storage -update")
			require.JSONEq(t, string(want), body)
		})
	}
}

func TestQueryAPIErrors(t *testing.T) {
	db, _ := open(t, t.TempDir())
	srv := serve(t, db)
	tests := []struct {
		name, path string
		params     url.Values
		code       int
		errType    string
	}{
		{"a syntax error is bad data", "/api/v1/query", url.Values{"query": {"sum("}}, 400, "bad_data"},
		{"a bad time is bad data", "/api/v1/query", url.Values{"query": {"1"}, "time": {"yesterday"}}, 400, "bad_data"},
		{"a zero step is bad data", "/api/v1/query_range", url.Values{"query": {"1"}, "start": {"0"}, "end": {"10"}, "step": {"0"}}, 400, "bad_data"},
		{"series needs match[]", "/api/v1/series", nil, 400, "bad_data"},
		{"a bad matcher is bad data", "/api/v1/series", url.Values{"match[]": {"{"}}, 400, "bad_data"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, body := get(t, srv, tc.path, tc.params)
			require.Equal(t, tc.code, code, body)
			var r struct{ Status, ErrorType, Error string }
			require.NoError(t, json.Unmarshal([]byte(body), &r))
			require.Equal(t, "error", r.Status)
			require.Equal(t, tc.errType, r.ErrorType)
			require.NotEmpty(t, r.Error)
		})
	}
}

func count(t *testing.T, db *TSDB, q string, ts time.Time) string {
	t.Helper()
	srv := serve(t, db)
	// RFC 3339: exact to the ns, whatever the query API does with float seconds
	_, body := get(t, srv, "/api/v1/query", url.Values{"query": {q}, "time": {ts.UTC().Format(time.RFC3339Nano)}})
	var r struct {
		Data struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &r), body)
	if len(r.Data.Result) == 0 {
		return "none"
	}
	return r.Data.Result[0].Value[1].(string)
}

func TestReplayingABatchStoresEachSampleOnce(t *testing.T) {
	db, reg := open(t, t.TempDir())
	require.NoError(t, db.Write(context.Background(), fixture()))
	require.NoError(t, db.Write(context.Background(), fixture()), "a replay after a crash must not fail")
	require.Equal(t, "2", count(t, db, `count_over_time(pipe_pressure{device="pipe-0001"}[1h])`, t0.Add(time.Minute)))
	require.Zero(t, testutil.ToFloat64(mustVec(t, reg)), "identical samples are not rejections")
}

func mustVec(t *testing.T, reg *prometheus.Registry) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() == "citypulse_storage_tsdb_samples_rejected_total" {
			for _, m := range mf.GetMetric() {
				total += m.GetCounter().GetValue()
			}
		}
	}
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "x"})
	c.Add(total)
	return c
}

func TestLateReadingsWithinTheWindowAreKeptAndOlderOnesCounted(t *testing.T) {
	db, reg := open(t, t.TempDir())
	ctx := context.Background()
	require.NoError(t, db.Write(ctx, pipeline.Batch{Readings: []pipeline.Reading{rd("pipe-0001", "gulou", "pipe", "pressure", 1, t0)}}))
	late := pipeline.Batch{Readings: []pipeline.Reading{
		rd("pipe-0001", "gulou", "pipe", "pressure", 2, t0.Add(-time.Hour)),      // within the 7-day window
		rd("pipe-0001", "gulou", "pipe", "pressure", 3, t0.Add(-200*time.Hour)),  // beyond it
		rd("pipe-0002", "gulou", "pipe", "pressure", 4, t0.Add(-30*time.Minute)), // a new series, late
	}}
	require.NoError(t, db.Write(ctx, late), "a too-old sample is skipped, not a failed batch")
	require.Equal(t, "2", count(t, db, `count_over_time(pipe_pressure{device="pipe-0001"}[3h])`, t0.Add(time.Minute)))
	require.Equal(t, "1", count(t, db, `count_over_time(pipe_pressure{device="pipe-0002"}[3h])`, t0.Add(time.Minute)))
	require.Equal(t, float64(1), testutil.ToFloat64(mustVec(t, reg)))
}

func TestDataSurvivesAReopen(t *testing.T) {
	dir := t.TempDir()
	db, _ := open(t, dir)
	require.NoError(t, db.Write(context.Background(), fixture()))
	require.NoError(t, db.Close())
	require.NoError(t, db.Close(), "Close is idempotent")
	db2, _ := open(t, dir)
	require.Equal(t, "409", count(t, db2, `pipe_pressure{device="pipe-0001"}`, t0.Add(time.Minute)))
}

// BenchmarkTSDBWrite appends batches of 1000 readings spread over 100,000 series.
func BenchmarkTSDBWrite(b *testing.B) {
	reg := prometheus.NewRegistry()
	db, err := OpenTSDB(b.TempDir(), DefaultTSDB(), nil, reg)
	require.NoError(b, err)
	defer db.Close()
	const series = 100_000
	devs := make([]string, series/5)
	for i := range devs {
		devs[i] = fmt.Sprintf("pipe-%06d", i)
	}
	metrics := []string{"pressure", "flow", "leak", "gas_concentration", "temperature"}
	batch := pipeline.Batch{Readings: make([]pipeline.Reading, 1000)}
	start := time.Now()
	n := 0
	b.ReportAllocs()
	for b.Loop() {
		for i := range batch.Readings {
			s := n % series
			batch.Readings[i] = pipeline.Reading{Device: devs[s/5], District: "gulou", Kind: "pipe", Metric: metrics[s%5],
				Value: float64(n), Time: start.Add(time.Duration(n/series) * time.Second).UnixNano()}
			n++
		}
		if err := db.Write(context.Background(), batch); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/reading")
}

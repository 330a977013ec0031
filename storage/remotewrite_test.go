package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/golang/snappy"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/prometheus/prompb"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

func TestWriteRequestsAreBoundedAndKeepEverySampleInTimeOrder(t *testing.T) {
	var rs []pipeline.Reading
	for i := 9; i >= 0; i-- { // newest first: a series' samples must be sent oldest first
		rs = append(rs, rd("pipe-0001", "gulou", "pipe", "pressure", float64(i), t0.Add(time.Duration(i)*time.Second)))
		rs = append(rs, rd(fmt.Sprintf("pipe-%04d", 100+i), "gulou", "pipe", "flow", float64(i), t0))
	}
	tests := []struct {
		name                string
		maxSamples, maxByte int
		wantRequests        int
	}{
		{"one request when it fits", 1000, 1 << 20, 1},
		{"cut by sample count", 3, 1 << 20, 7},
		{"cut by bytes", 1000, 1024, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reqs := buildWriteRequests(rs, tc.maxSamples, tc.maxByte)
			if tc.wantRequests > 0 {
				require.Len(t, reqs, tc.wantRequests)
			} else {
				require.Greater(t, len(reqs), 1)
			}
			total := 0
			var pressure []float64
			for _, req := range reqs {
				require.LessOrEqual(t, countSamples(req), tc.maxSamples)
				raw, err := req.Marshal()
				require.NoError(t, err)
				require.LessOrEqual(t, len(raw), tc.maxByte)
				total += countSamples(req)
				for _, ts := range req.Timeseries {
					require.Equal(t, "__name__", ts.Labels[0].Name, "labels sorted by name")
					if ts.Labels[0].Value == "pipe_pressure" {
						for _, s := range ts.Samples {
							pressure = append(pressure, s.Value)
						}
					}
				}
			}
			require.Equal(t, len(rs), total)
			require.Equal(t, []float64{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, pressure)
		})
	}
}

func TestRemoteWriteClassifiesTheStoresAnswer(t *testing.T) {
	tests := []struct {
		name       string
		status     int
		retryAfter string
		permanent  bool
		slept      time.Duration
		result     string
	}{
		{"accepted", 204, "", false, 0, "ok"},
		{"throttled with Retry-After", 429, "7", false, 7 * time.Second, "throttled"},
		{"server error", 503, "", false, 0, "throttled"},
		{"Retry-After capped", 503, "3600", false, time.Minute, "throttled"},
		{"bad data", 400, "", true, 0, "bad_data"},
		{"unprocessable", 422, "", true, 0, "bad_data"},
		{"wrong token: retried, the journal keeps the backlog", 401, "", false, 0, "refused"},
		{"wrong path", 404, "", false, 0, "refused"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.Copy(io.Discard, r.Body)
				if tc.retryAfter != "" {
					w.Header().Set("Retry-After", tc.retryAfter)
				}
				w.WriteHeader(tc.status)
			}))
			defer srv.Close()
			cfg := DefaultRemoteWrite()
			cfg.URL = srv.URL + "/api/v1/write"
			cfg.MaxRetryAfter = time.Minute
			w, err := OpenRemoteWrite(cfg, nil, nil)
			require.NoError(t, err)
			var slept time.Duration
			w.sleep = func(_ context.Context, d time.Duration) bool { slept = d; return true }
			err = w.Write(context.Background(), fixture())
			require.Equal(t, tc.status/100 != 2, err != nil, "%v", err)
			require.Equal(t, tc.permanent, errors.Is(err, pipeline.ErrPermanent), "%v", err)
			require.Equal(t, tc.slept, slept)
			require.Equal(t, 1.0, testutil.ToFloat64(w.m.requests.WithLabelValues(tc.result)))
		})
	}
}

func TestRemoteWriteConfigValidateNamesTheKey(t *testing.T) {
	c := DefaultRemoteWrite()
	require.NoError(t, c.Validate(), "a disabled sink needs no URL")
	c.Enabled = true
	require.ErrorContains(t, c.Validate(), "storage.remote_write.url")
	c.URL = "http://127.0.0.1:8428/api/v1/write"
	require.NoError(t, c.Validate())
	c.MaxSamplesPerRequest = 0
	require.ErrorContains(t, c.Validate(), "storage.remote_write.max_samples_per_request")
}

// startVictoriaMetrics runs the real VictoriaMetrics on a free loopback port
// and returns its address.
func startVictoriaMetrics(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("starts VictoriaMetrics: skipped under -short")
	}
	bin, err := exec.LookPath("victoria-metrics")
	if err != nil {
		t.Skip("victoria-metrics not installed: run `make deps` (Debian package victoria-metrics)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(bin, "-storageDataPath="+t.TempDir(), "-httpListenAddr="+addr, "-loggerLevel=ERROR",
		"-retentionPeriod=100y")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 30*time.Second, 50*time.Millisecond, "VictoriaMetrics did not become healthy")
	return addr
}

// exportVM reads every series back: labels (as {k="v",...} sorted) → ms
// timestamps and values.
func exportVM(t *testing.T, addr string) map[string][][2]any {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/internal/force_flush")
	require.NoError(t, err)
	resp.Body.Close()
	resp, err = http.Get("http://" + addr + "/api/v1/export?match[]=" + url.QueryEscape(`{__name__=~".+"}`))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	out := map[string][][2]any{}
	dec := json.NewDecoder(resp.Body)
	for {
		var line struct {
			Metric     map[string]string
			Values     []float64
			Timestamps []int64
		}
		if err := dec.Decode(&line); err == io.EOF {
			break
		}
		require.NoError(t, err)
		var kv []string
		for k, v := range line.Metric {
			kv = append(kv, fmt.Sprintf("%s=%q", k, v))
		}
		sort.Strings(kv)
		key := "{" + strings.Join(kv, ",") + "}"
		for i := range line.Values {
			out[key] = append(out[key], [2]any{line.Timestamps[i], line.Values[i]})
		}
	}
	return out
}

func TestRemoteWriteToVictoriaMetricsStoresExactSeriesValuesAndMillis(t *testing.T) {
	addr := startVictoriaMetrics(t)
	cfg := DefaultRemoteWrite()
	cfg.URL = "http://" + addr + "/api/v1/write"
	cfg.MaxSamplesPerRequest = 2 // the batch goes in three requests
	w, err := OpenRemoteWrite(cfg, nil, nil)
	require.NoError(t, err)

	base := time.Now().Add(-time.Hour).Truncate(time.Minute)
	ms := base.UnixMilli()
	batch := pipeline.Batch{Readings: []pipeline.Reading{
		rd("pipe-0001", "gulou", "pipe", "pressure", 409.25, base.Add(10*time.Second+1400*time.Microsecond)),
		rd("pipe-0001", "gulou", "pipe", "pressure", 412.5, base.Add(1600*time.Microsecond)),
		rd("tl-0001", "my district", "traffic_light", "state", 3, base.Add(5*time.Second+500*time.Microsecond)),
		{Kind: "city", Metric: "pressure_mean", District: "gulou", Value: -0.125, Time: base.Add(time.Minute).UnixNano()},
		rd("pipe-0002", "xuanwu", "pipe", "pressure", 1e-9, base.Add(999_999*time.Nanosecond)),
	}}
	require.NoError(t, w.Write(context.Background(), batch))
	require.NoError(t, w.Write(context.Background(), batch), "a resent batch is absorbed")
	require.Equal(t, 6.0, testutil.ToFloat64(w.m.requests.WithLabelValues("ok")))

	var got map[string][][2]any
	want := map[string][][2]any{
		`{__name__="pipe_pressure",device="pipe-0001",district="gulou",kind="pipe"}`:                    {{ms + 2, 412.5}, {ms + 10_001, 409.25}},
		`{__name__="pipe_pressure",device="pipe-0002",district="xuanwu",kind="pipe"}`:                   {{ms + 1, 1e-9}},
		`{__name__="traffic_light_state",device="tl-0001",district="my district",kind="traffic_light"}`: {{ms + 5001, 3.0}},
		`{__name__="city_pressure_mean",district="gulou"}`:                                              {{ms + 60_000, -0.125}},
	}
	require.Eventually(t, func() bool {
		got = exportVM(t, addr)
		return len(got) == len(want) && len(got[`{__name__="pipe_pressure",device="pipe-0001",district="gulou",kind="pipe"}`]) >= 2
	}, 30*time.Second, 200*time.Millisecond)
	for k, samples := range got {
		got[k] = dedupSamples(samples)
	}
	require.Equal(t, want, got)
}

// dedupSamples drops repeated (ms, value) pairs: VictoriaMetrics without
// -dedup.minScrapeInterval keeps both copies of a resent sample.
func dedupSamples(s [][2]any) [][2]any {
	var out [][2]any
	for _, x := range s {
		if len(out) == 0 || out[len(out)-1] != x {
			out = append(out, x)
		}
	}
	return out
}

// A refusal of one request's samples must not drop the other requests of the
// batch: they are sent, and only the refused samples are counted as dropped.
func TestRemoteWriteRefusalDropsOnlyTheRefusedRequest(t *testing.T) {
	var requests, refusedSamples, storedSamples int
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		wr := decodeWriteRequest(t, r)
		requests++
		if requests == 2 {
			refusedSamples += countSamples(wr)
			http.Error(w, "out of bounds", http.StatusBadRequest)
			return
		}
		storedSamples += countSamples(wr)
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	cfg := DefaultRemoteWrite()
	cfg.URL = srv.URL + "/api/v1/write"
	cfg.MaxSamplesPerRequest = 1
	w, err := OpenRemoteWrite(cfg, nil, nil)
	require.NoError(t, err)
	b := fixture()
	err = w.Write(context.Background(), b)
	require.ErrorIs(t, err, pipeline.ErrPermanent)
	var refused *RefusedError
	require.ErrorAs(t, err, &refused)
	require.Greater(t, requests, 2, "the requests after the refused one are still sent")
	require.Equal(t, refusedSamples, refused.Dropped())
	require.Equal(t, len(b.Readings), storedSamples+refusedSamples, "every sample was sent once")
}

func decodeWriteRequest(t *testing.T, r *http.Request) *prompb.WriteRequest {
	t.Helper()
	body, err := io.ReadAll(r.Body)
	require.NoError(t, err)
	raw, err := snappy.Decode(nil, body)
	require.NoError(t, err)
	var wr prompb.WriteRequest
	require.NoError(t, wr.Unmarshal(raw))
	return &wr
}

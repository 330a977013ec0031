package storage

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
)

// runaway is the query from issue 12: four of these ran for 11+ minutes under
// a 2-minute timeout and took the server from 75 MB to 1.9 GB.
const runaway = `max_over_time(max_over_time(vector(1)[30d:1s])[30d:1s])`

// slowQuery takes many minutes (2.6e9 steps of a subquery) but holds nothing
// (no step has a sample), and the engine looks at its context at each step. It
// must not be step-invariant: the engine evaluates such an expression (vector(1)
// > 2, say) once and copies it over the steps without looking at the context.
const slowQuery = `count_over_time((vector(time()) < 0)[30000d:1s])`

type queryAnswer struct {
	code      int
	Status    string `json:"status"`
	ErrorType string `json:"errorType"`
	Error     string `json:"error"`
}

// ask runs an instant query with a client that gives up after wait.
func ask(t *testing.T, ctx context.Context, base, q string) (queryAnswer, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", base+"/api/v1/query?query="+url.QueryEscape(q), nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return queryAnswer{}, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var a queryAnswer
	require.NoError(t, json.Unmarshal(b, &a), string(b))
	a.code = resp.StatusCode
	return a, nil
}

func queryServer(t *testing.T, opts APIOptions) (*API, *prometheus.Registry, string) {
	t.Helper()
	db, _ := open(t, t.TempDir())
	reg := prometheus.NewRegistry()
	opts.Registerer = reg
	api := NewQueryAPI(db.DB(), opts)
	mux := http.NewServeMux()
	api.Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		srv.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		require.NoError(t, api.Wait(ctx), "evaluations must stop once their requests are gone")
	})
	return api, reg, srv.URL
}

// With the default limits the runaway query is refused before it runs: its
// subqueries would evaluate 6.7e12 samples on one series.
func TestARunawaySubqueryIsRefusedBeforeItRuns(t *testing.T) {
	_, reg, base := queryServer(t, APIOptions{Timeout: 2 * time.Minute, MaxSamples: 50_000_000})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // well within the 2m timeout
	defer cancel()
	a, err := ask(t, ctx, base, runaway)
	require.NoError(t, err, "no answer within a minute: the query ran")
	require.Equal(t, http.StatusUnprocessableEntity, a.code)
	require.Equal(t, "execution", a.ErrorType)
	require.Contains(t, a.Error, "query_max_samples")
	require.Equal(t, 1.0, counter(t, reg, "citypulse_query_failed_total", "too_many_samples"))

	// a subquery within the bound still runs
	a, err = ask(t, ctx, base, `max_over_time(vector(1)[1h:1m])`)
	require.NoError(t, err)
	require.Equal(t, "success", a.Status, a.Error)
}

// counter reads a counter with one label from the registry.
func counter(t *testing.T, reg *prometheus.Registry, name, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if mf.GetName() == name && len(m.GetLabel()) == 1 && m.GetLabel()[0].GetValue() == value {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("%s{%q} not found", name, value)
	return 0
}

// The timeout ends a slow query: the answer is the timeout error at the
// deadline, and the evaluation stops (the cleanup waits for it). The cost
// check is lifted here so that the query runs. (The runaway query is not used
// here: its one step of 6.7e12 samples never looks at the context, so only
// the cost check stops it; with that check lifted it would keep its slot for
// hours, which is why query_max_samples must not be set that high.)
func TestTheQueryTimeoutIsEnforced(t *testing.T) {
	timeout := time.Second
	if s := os.Getenv("CITYPULSE_TEST_QUERY_TIMEOUT"); s != "" { // make test-long: 2m, the default
		d, err := time.ParseDuration(s)
		require.NoError(t, err)
		timeout = d
	}
	_, reg, base := queryServer(t, APIOptions{Timeout: timeout, MaxSamples: 1 << 62})
	ctx, cancel := context.WithTimeout(context.Background(), timeout+10*time.Second)
	defer cancel()
	start := time.Now()
	a, err := ask(t, ctx, base, slowQuery)
	require.NoError(t, err, "no answer within the timeout and 10s")
	t.Logf("the slow query answered %q after %v (timeout %v)", a.Error, time.Since(start).Round(time.Millisecond), timeout)
	require.Equal(t, http.StatusServiceUnavailable, a.code)
	require.Equal(t, "timeout", a.ErrorType)
	require.Equal(t, 1.0, counter(t, reg, "citypulse_query_failed_total", "timeout"))
}

// gauge reads a gauge from the registry.
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("%s not found", name)
	return 0
}

// Queries over query_max_concurrency wait in line; a client that goes away
// ends its query, waiting or running.
func TestQueriesWaitInLineAndADroppedClientCancels(t *testing.T) {
	_, reg, base := queryServer(t, APIOptions{Timeout: 5 * time.Minute, MaxSamples: 1 << 62, MaxConcurrency: 1})
	waitGauge := func(name string, want float64) {
		t.Helper()
		require.Eventually(t, func() bool { return gauge(t, reg, name) == want }, 30*time.Second, 10*time.Millisecond,
			"%s never became %v", name, want)
	}
	canceled := func() float64 {
		return counter(t, reg, "citypulse_query_failed_total", "canceled")
	}
	ctxA, dropA := context.WithCancel(context.Background())
	defer dropA()
	errA := make(chan error, 1)
	go func() { _, err := ask(t, ctxA, base, runaway); errA <- err }()
	waitGauge("citypulse_query_running", 1)

	ctxB, dropB := context.WithCancel(context.Background())
	defer dropB()
	errB := make(chan error, 1)
	go func() { _, err := ask(t, ctxB, base, `vector(1)`); errB <- err }()
	waitGauge("citypulse_query_queued", 1)

	dropB()
	require.Error(t, <-errB)
	waitGauge("citypulse_query_queued", 0)
	require.Eventually(t, func() bool { return canceled() == 1 }, 30*time.Second, 10*time.Millisecond, "the waiting query was not canceled")

	dropA()
	require.Error(t, <-errA)
	require.Eventually(t, func() bool { return canceled() == 2 }, 30*time.Second, 10*time.Millisecond, "the running query was not canceled")
	// the engine notices the end of the context between series only: the
	// evaluation stops a while after the answer
	require.Eventually(t, func() bool { return gauge(t, reg, "citypulse_query_running") == 0 }, 3*time.Minute, 50*time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, err := ask(t, ctx, base, `vector(1)`)
	require.NoError(t, err)
	require.Equal(t, "success", a.Status, "the slot is free again")
}

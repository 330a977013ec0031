package storage

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

func newProxyServer(t *testing.T, o QueryProxyOptions) (*QueryProxy, *httptest.Server) {
	t.Helper()
	if o.Timeout == 0 {
		o.Timeout, o.MaxConcurrency, o.MaxAnswerBytes = 10*time.Second, 2, 1<<20
	}
	p, err := NewQueryProxy(o)
	require.NoError(t, err)
	mux := http.NewServeMux()
	p.Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return p, srv
}

func getBody(t *testing.T, u string, hdr ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	require.NoError(t, err)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// Readings written by remote write to a real VictoriaMetrics are answered by
// the proxy exactly as the store answers them: the cluster's query API.
func TestQueryProxyAnswersFromVictoriaMetrics(t *testing.T) {
	addr := startVictoriaMetrics(t)
	cfg := DefaultRemoteWrite()
	cfg.Enabled, cfg.URL = true, "http://"+addr+"/api/v1/write"
	require.Equal(t, "http://"+addr, cfg.QueryBase(), "the query base comes from the write URL")
	w, err := OpenRemoteWrite(cfg, nil, nil)
	require.NoError(t, err)
	require.NoError(t, w.Write(context.Background(), fixture()))
	resp, err := http.Get("http://" + addr + "/internal/force_flush")
	require.NoError(t, err)
	resp.Body.Close()

	_, srv := newProxyServer(t, QueryProxyOptions{URL: cfg.QueryBase()})
	at := url.QueryEscape(t0.Add(10 * time.Second).Format(time.RFC3339))
	q := "/api/v1/query?query=" + url.QueryEscape(`pipe_pressure{device="pipe-0001"}`) + "&time=" + at
	require.Eventually(t, func() bool {
		code, body := getBody(t, srv.URL+q)
		return code == http.StatusOK && strings.Contains(body, `"409"`)
	}, 30*time.Second, 200*time.Millisecond, "the proxy answers the stored value")
	code, direct := getBody(t, "http://"+addr+q)
	require.Equal(t, http.StatusOK, code)
	_, proxied := getBody(t, srv.URL+q)
	require.JSONEq(t, direct, proxied, "the store's answer, unchanged")
	bad := "/api/v1/query?query=" + url.QueryEscape("sum((")
	wantCode, _ := getBody(t, "http://"+addr+bad)
	code, body := getBody(t, srv.URL+bad)
	require.Equal(t, wantCode, code, body)
	require.Contains(t, body, `"status":"error"`, "the store's error passes through")
}

// The caller's token never reaches the store (the store's own does); busy
// slots, an unreachable store and an answer too large are errors, counted.
func TestQueryProxyBounds(t *testing.T) {
	release := make(chan struct{})
	var gotAuth []string
	store := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth = append(gotAuth, r.Header.Get("Authorization"))
		switch r.URL.Query().Get("query") {
		case "slow":
			<-release
		case "big":
			_, _ = w.Write([]byte(strings.Repeat("x", 4096)))
			return
		}
		_, _ = w.Write([]byte(`{"status":"success","data":{"resultType":"vector","result":[]}}`))
	}))
	defer store.Close()
	p, srv := newProxyServer(t, QueryProxyOptions{URL: store.URL, BearerToken: "store-token", Timeout: 10 * time.Second,
		MaxConcurrency: 1, MaxAnswerBytes: 1024})

	code, _ := getBody(t, srv.URL+"/api/v1/query?query=up", "Authorization", "Bearer caller-token")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, []string{"Bearer store-token"}, gotAuth)

	done := make(chan struct{})
	go func() { defer close(done); getBody(t, srv.URL+"/api/v1/query?query=slow") }()
	require.Eventually(t, func() bool { return len(p.slots) == 1 }, 10*time.Second, 5*time.Millisecond)
	code, body := getBody(t, srv.URL+"/api/v1/query?query=up")
	require.Equal(t, http.StatusServiceUnavailable, code, body)
	close(release)
	<-done

	resp, err := http.Get(srv.URL + "/api/v1/query?query=big")
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	require.Error(t, err, "an answer past the bound is cut off, never passed on short")

	store.Close()
	code, _ = getBody(t, srv.URL+"/api/v1/query?query=up")
	require.Equal(t, http.StatusBadGateway, code)
	for result, n := range map[string]float64{"ok": 2, "busy": 1, "too_large": 1, "unreachable": 1} {
		require.Equal(t, n, testutil.ToFloat64(p.results.WithLabelValues(result)), result)
	}
}

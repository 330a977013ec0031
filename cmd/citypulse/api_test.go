package main

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// API tests against the server value (see inproc_test.go), moved from the
// subprocess tests with the same assertions.

func TestDevicesCanBeAddedAtRuntimeWithTheAdminToken(t *testing.T) {
	skipShort(t)
	const token = "admin-token-0123456789"
	s := newInproc(t, "http: {admin_token: "+token+"}\n")
	s.run()

	add := func(tok string) int {
		req, _ := http.NewRequest("POST", s.url+"/api/v1/devices",
			strings.NewReader(`{"id":"lot-0009","kind":"parking","district":"jianye","interval":"30s","secret":"secret-lot-0009"}`))
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	require.Equal(t, http.StatusUnauthorized, add(""))
	require.Equal(t, http.StatusUnauthorized, add("wrong-token-0123456789"))
	require.Equal(t, http.StatusCreated, add(token))

	c, err := mqttConnect(s.mqtt, "lot-0009", "secret-lot-0009", false)
	require.NoError(t, err, "a device added at runtime can connect at once")
	publish(t, c, "devices/lot-0009/readings", 1, []byte(`{"available_spot_number":41,"total_spot_number":120}`))
	c.Disconnect(100)
	eventually(t, 10*time.Second, func() error {
		v, err := latest(t, s.httpHost(), `parking_available_spot_number{device="lot-0009",district="jianye"}`)
		if err == nil && v != 41 {
			err = fmt.Errorf("got %v", v)
		}
		return err
	})
	list := get(t, s.url+"/api/v1/devices")
	require.Contains(t, list, "lot-0009")
	require.NotContains(t, list, "secret-")

	// The change survives a restart.
	s.stop()
	s = buildInproc(t, s.cfg)
	s.run()
	require.Contains(t, get(t, s.url+"/api/v1/devices"), "lot-0009")
	labels := get(t, s.url+"/api/v1/label/device/values")
	require.Contains(t, labels, "lot-0009", "the store kept its data over the restart")
	names := strings.Split(get(t, s.url+"/api/v1/label/__name__/values"), ",")
	sort.Strings(names)
	require.NotEmpty(t, names)
}

func TestArchiveExportThroughTheServer(t *testing.T) {
	skipShort(t)
	s := newInproc(t, "storage:\n  archive:\n    enabled: true\n")
	s.run()
	c, err := mqttConnect(s.mqtt, "pipe-0001", "secret-pipe-0001", false)
	require.NoError(t, err)
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`[{"n":"pressure","v":433.5,"t":-60}]`))
	c.Disconnect(100)
	eventually(t, 10*time.Second, func() error {
		body := get(t, s.url+"/api/v1/export?kind=pipe&format=csv")
		if !strings.Contains(body, ",pipe-0001,gulou,pressure,433.5,kPa,") {
			return fmt.Errorf("export: %q", body)
		}
		return nil
	})
	coarse := get(t, s.url+"/api/v1/export?kind=pipe&format=csv&coarsen=district")
	require.Contains(t, coarse, ",gulou,pressure,433.5,433.5,433.5,1")
	require.NotContains(t, coarse, "pipe-0001")
}

// The server value answers in the API's shapes before and while it runs.
func TestTheHTTPAPIShapes(t *testing.T) {
	const admin = "admin-token-shapes-000001"
	s := newInproc(t, "http: {admin_token: "+admin+"}\n")
	code, body := s.do("GET", "/readyz", "", "")
	require.Equal(t, http.StatusServiceUnavailable, code, "not ready before Run: %s", body)
	s.run()
	for _, tt := range []struct {
		name, method, path, token string
		code                      int
		contains                  string
	}{
		{"liveness", "GET", "/healthz", "", http.StatusOK, "ok"},
		{"readiness while running", "GET", "/readyz", "", http.StatusOK, "ready"},
		{"the sinks in the envelope", "GET", "/api/v1/sinks", "", http.StatusOK, `{"status":"success","data":[{"name":"tsdb"`},
		{"a device in the envelope, without its secret", "GET", "/api/v1/devices/pipe-0001", "", http.StatusOK,
			`{"status":"success","data":{"id":"pipe-0001","kind":"pipe","district":"gulou","interval":"10s"}}`},
		{"an unknown device is an error envelope", "GET", "/api/v1/devices/pipe-9999", "", http.StatusNotFound, `{"status":"error","error":"unknown device pipe-9999"}`},
		{"a query in the Prometheus shape", "GET", "/api/v1/query?query=vector(1)", "", http.StatusOK, `"resultType":"vector"`},
		{"a bad query is bad_data", "GET", "/api/v1/query?query=rate(", "", http.StatusBadRequest, `{"status":"error","errorType":"bad_data"`},
		{"the rules", "GET", "/api/v1/rules", "", http.StatusOK, `"name":"citypulse","rules":[{"state":"inactive","name":"burst_main"`},
		{"the export needs the archive", "GET", "/api/v1/export", "", http.StatusNotFound, "storage.archive.enabled"},
		{"a reload with the admin token", "POST", "/-/reload", admin, http.StatusOK, "reloaded"},
		{"the dashboard", "GET", "/", "", http.StatusOK, "<html"},
		{"the metrics", "GET", "/metrics", "", http.StatusOK, "citypulse_http_connections"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, body := s.do(tt.method, tt.path, tt.token, "")
			require.Equal(t, tt.code, code, body)
			require.Contains(t, body, tt.contains)
		})
	}
	s.stop()
}

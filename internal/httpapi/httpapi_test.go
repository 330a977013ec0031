package httpapi

import (
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestTheEnvelope(t *testing.T) {
	tests := []struct {
		name  string
		write func(http.ResponseWriter)
		code  int
		body  string
	}{
		{"data", func(w http.ResponseWriter) { WriteData(w, http.StatusOK, []string{"a"}) }, 200, `{"status":"success","data":["a"]}`},
		{"empty data is kept", func(w http.ResponseWriter) { WriteData(w, http.StatusCreated, map[string]any{}) }, 201, `{"status":"success","data":{}}`},
		{"an error with a type", func(w http.ResponseWriter) { WriteError(w, http.StatusBadRequest, "bad_data", "no") }, 400,
			`{"status":"error","errorType":"bad_data","error":"no"}`},
		{"an error without a type", func(w http.ResponseWriter) { WriteError(w, http.StatusNotFound, "", "unknown device x") }, 404,
			`{"status":"error","error":"unknown device x"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			tt.write(rec)
			require.Equal(t, tt.code, rec.Code)
			require.Equal(t, "application/json", rec.Header().Get("Content-Type"))
			require.Equal(t, tt.body+"\n", rec.Body.String())
		})
	}
}

func TestLimitBody(t *testing.T) {
	h := LimitBody(10, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		buf := make([]byte, 100)
		n, err := r.Body.Read(buf)
		for err == nil {
			var m int
			m, err = r.Body.Read(buf[n:])
			n += m
		}
		if _, ok := err.(*http.MaxBytesError); ok {
			http.Error(w, "too large", http.StatusRequestEntityTooLarge)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	for _, tt := range []struct {
		name   string
		body   string
		length int64
		want   int
	}{
		{"within the limit", "0123456789", 10, http.StatusNoContent},
		{"over it by its length", "0123456789a", 11, http.StatusRequestEntityTooLarge},
		{"over it without a length (chunked)", "0123456789a", -1, http.StatusRequestEntityTooLarge},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("POST", "/", strings.NewReader(tt.body))
			r.ContentLength = tt.length
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, r)
			require.Equal(t, tt.want, rec.Code)
		})
	}
}

func TestLimitListenerGivesPlacesBack(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	ln := LimitListener(inner, ConnLimits{Total: 2, PerHost: 2}, reg)
	defer ln.Close()
	accepted := make(chan net.Conn, 10)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", inner.Addr().String())
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		return c
	}
	dial()
	dial()
	a, b := <-accepted, <-accepted
	third := dial()
	_ = third.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = third.Read(make([]byte, 1))
	require.Error(t, err, "a third connection is closed by the server")
	require.Equal(t, 1.0, testutil.ToFloat64(refused(reg, "total")))

	require.NoError(t, a.Close())
	_ = a.Close() // twice: the place is given back once
	dial()
	c := <-accepted
	require.Equal(t, 2.0, gaugeValue(t, reg), "a closed connection gave its place back, once")
	b.Close()
	c.Close()
	ln.Close()
	<-done
}

func refused(reg *prometheus.Registry, reason string) prometheus.Collector {
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "x"})
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if mf.GetName() == "citypulse_http_connections_refused_total" && m.GetLabel()[0].GetValue() == reason {
				c.Add(m.GetCounter().GetValue())
			}
		}
	}
	return c
}

func gaugeValue(t *testing.T, reg *prometheus.Registry) float64 {
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() == "citypulse_http_connections" {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatal("citypulse_http_connections not found")
	return 0
}

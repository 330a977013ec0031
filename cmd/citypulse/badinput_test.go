package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// rejects scrapes citypulse_readings_rejected_total by reason.
func rejects(t *testing.T, httpAddr string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, line := range strings.Split(get(t, "http://"+httpAddr+"/metrics"), "\n") {
		rest, ok := strings.CutPrefix(line, `citypulse_readings_rejected_total{reason="`)
		if !ok {
			continue
		}
		reason, val, _ := strings.Cut(rest, `"} `)
		f, err := strconv.ParseFloat(val, 64)
		require.NoError(t, err)
		out[reason] = f
	}
	return out
}

// Hostile payloads through the real broker: each is refused with its counted
// reason, none crashes the server or reaches the store, and a good reading
// still goes through afterwards.
func TestBadInputIsBoundedAndCounted(t *testing.T) {
	skipShort(t)
	s := newProc(t, "")
	s.start()
	defer s.stop()

	manyNames := func(n int) []byte {
		var b strings.Builder
		b.WriteByte('[')
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"n":"invented_metric_%d","v":1}`, i)
		}
		b.WriteByte(']')
		return []byte(b.String())
	}
	huge := manyNames(5000)
	nested := []byte(strings.Repeat("[", 100_000) + strings.Repeat("]", 100_000))
	oversized := []byte(`[{"n":"pressure","v":1,"vs":"` + strings.Repeat("x", 257<<10) + `"}]`)
	tests := []struct {
		name   string
		body   []byte
		reason string
		count  float64
	}{
		{"oversized payload", oversized, "too_large", 1},
		{"deeply nested JSON", nested, "malformed", 1},
		{"huge SenML array", huge, "too_many_records", 1},
		{"invalid UTF-8", []byte("[{\"n\":\"pres\xffsure\",\"v\":1}]"), "malformed", 1},
		{"absurd timestamp, far future", []byte(`[{"n":"pressure","v":1,"t":8000000000}]`), "too_new", 1},
		{"absurd timestamp, year 1970", []byte(`[{"n":"pressure","v":1,"t":300000000}]`), "too_old", 1},
		{"time out of any range", []byte(`[{"n":"pressure","v":1,"t":1e300}]`), "too_new", 1}, // past what int64 ns holds
		{"NaN in CBOR", mustCBOR(t, []map[int]any{{0: "pressure", 2: math.NaN()}}), "not_finite", 1},
		{"+Inf in CBOR", mustCBOR(t, []map[int]any{{0: "pressure", 2: math.Inf(1)}}), "not_finite", 1},
		{"out of physical range", []byte(`[{"n":"pressure","v":-40}]`), "out_of_range", 1},
		{"cardinality bomb: 4,000 invented metric names", manyNames(4000), "unknown_metric", 4000},
		{"another device's name", []byte(`[{"n":"urn:dev:pipe-0002:pressure","v":1}]`), "foreign_device", 1},
	}
	c, err := mqttConnect(s.mqtt, "pipe-0001", "secret-pipe-0001", false)
	require.NoError(t, err)
	defer c.Disconnect(50)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := rejects(t, s.http)
			publish(t, c, "devices/pipe-0001/readings", 1, tt.body)
			after := rejects(t, s.http)
			require.Equal(t, tt.count, after[tt.reason]-before[tt.reason], "reason %s; all: %v", tt.reason, after)
		})
	}

	t.Run("an unknown device cannot connect, and is counted", func(t *testing.T) {
		before := rejects(t, s.http)
		_, err := mqttConnect(s.mqtt, "pipe-9999", "whatever", false)
		require.Error(t, err)
		require.Positive(t, rejects(t, s.http)["unknown_device"]+rejects(t, s.http)["unauthorized"]-
			before["unknown_device"]-before["unauthorized"])
	})
	t.Run("a packet over the broker's limit drops the connection, not the server", func(t *testing.T) {
		c2, err := mqttConnect(s.mqtt, "pipe-0002", "secret-pipe-0002", false)
		require.NoError(t, err)
		tok := c2.Publish("devices/pipe-0002/readings", 1, false, make([]byte, 2<<20))
		tok.WaitTimeout(5 * time.Second)
		require.Eventually(t, func() bool { return !c2.IsConnectionOpen() }, 5*time.Second, 10*time.Millisecond)
	})

	// the store holds none of it: no invented series, and pipe-0001 has only
	// the good reading that follows
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`[{"n":"pressure","v":412}]`))
	eventually(t, 10*time.Second, func() error {
		v, err := latest(t, s.http, `pipe_pressure{device="pipe-0001"}`)
		if err == nil && v != 412 {
			err = fmt.Errorf("got %v", v)
		}
		return err
	})
	names := get(t, "http://"+s.http+"/api/v1/label/__name__/values")
	require.NotContains(t, names, "invented", "no series from invented metric names")
	series := get(t, "http://"+s.http+`/api/v1/series?match[]={device="pipe-0001"}`)
	require.Equal(t, 1, strings.Count(series, `"__name__"`), "one series for pipe-0001: %s", series)
}

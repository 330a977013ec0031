package main

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"math"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestMillisecondReadingsKeepTheirExactTimes (issue 12): one device sends
// 1,000 readings 1 ms apart (a pressure-transient logger at 1 kHz) over MQTT
// as SenML packs with float-second base times; all 1,000 must be in the store,
// in the archive export and in a real InfluxDB 1.8, each at its exact ms with
// its own value.
func TestMillisecondReadingsKeepTheirExactTimes(t *testing.T) {
	skipShort(t)
	influx := startInfluxDB18(t)
	s := newProc(t, "storage:\n  archive:\n    enabled: true\n"+
		"  influx:\n    enabled: true\n    url: http://"+influx+"\n    bucket: citypulse\n")
	s.start()
	defer s.stop()
	c, err := mqttConnect(s.mqtt, "pipe-0001", "secret-pipe-0001", false)
	require.NoError(t, err)
	defer c.Disconnect(100)

	const n, pack = 1000, 100
	base := time.Now().Add(-time.Minute).Truncate(time.Second).UnixMilli() + 271
	value := func(k int) float64 { return 100 + float64(k)/10 }
	for p := 0; p < n; p += pack {
		var b strings.Builder
		ms := base + int64(p)
		fmt.Fprintf(&b, `[{"bn":"urn:dev:pipe-0001:","bt":%d.%03d,"n":"pressure","v":%g}`, ms/1000, ms%1000, value(p))
		for j := 1; j < pack; j++ {
			fmt.Fprintf(&b, `,{"n":"pressure","t":%.3f,"v":%g}`, float64(j)/1000, value(p+j))
		}
		b.WriteByte(']')
		publish(t, c, "devices/pipe-0001/readings", 1, []byte(b.String()))
	}

	// want[ms] is the value sent for that ms
	want := make(map[int64]float64, n)
	for k := range n {
		want[base+int64(k)] = value(k)
	}
	exact := func(got map[int64]float64) (int, int) {
		ok := 0
		for ms, v := range want {
			if g, found := got[ms]; found && g == v {
				ok++
			}
		}
		return ok, len(got)
	}
	evalAt := time.UnixMilli(base + 10_000).UTC().Format(time.RFC3339Nano)
	var stored map[int64]float64
	eventually(t, 20*time.Second, func() error {
		stored = map[int64]float64{}
		res := queryAt(t, s.http, `pipe_pressure{device="pipe-0001"}[1m]`, evalAt)
		for _, r := range res {
			for _, v := range r.Values {
				ms := int64(math.Round(v[0].(float64) * 1000))
				f, err := strconv.ParseFloat(v[1].(string), 64)
				require.NoError(t, err)
				stored[ms] = f
			}
		}
		if ok, got := exact(stored); ok != n {
			return fmt.Errorf("TSDB: %d of %d readings at their exact ms (%d samples)", ok, n, got)
		}
		return nil
	})
	ok, got := exact(stored)
	t.Logf("TSDB: %d of %d readings sent 1 ms apart are stored at their exact ms (%d samples)", ok, n, got)

	// The archive export (CSV, RFC 3339 times with ns).
	from := time.UnixMilli(base - 1000).UTC().Format(time.RFC3339)
	to := time.UnixMilli(base + 10_000).UTC().Format(time.RFC3339)
	var archived map[int64]float64
	eventually(t, 20*time.Second, func() error {
		body := get(t, "http://"+s.http+"/api/v1/export?kind=pipe&format=csv&from="+from+"&to="+to)
		rows, err := csv.NewReader(strings.NewReader(body)).ReadAll()
		if err != nil {
			return err
		}
		archived = map[int64]float64{}
		for _, r := range rows[1:] {
			at, err := time.Parse(time.RFC3339Nano, r[0])
			require.NoError(t, err)
			require.Zero(t, at.UnixNano()%1e6, "archived at %s: not a whole ms", r[0])
			v, err := strconv.ParseFloat(r[4], 64)
			require.NoError(t, err)
			archived[at.UnixMilli()] = v
		}
		if ok, got := exact(archived); ok != n {
			return fmt.Errorf("archive: %d of %d readings at their exact ms (%d rows)", ok, n, got)
		}
		return nil
	})
	ok, got = exact(archived)
	t.Logf("archive export: %d of %d readings at their exact ms (%d rows)", ok, n, got)

	// InfluxDB, written with ns line protocol, read back in ns.
	var points map[int64]float64
	eventually(t, 30*time.Second, func() error {
		q := `SELECT pressure FROM pipe WHERE device='pipe-0001'`
		body := get(t, "http://"+influx+"/query?db=citypulse&epoch=ns&q="+url.QueryEscape(q))
		var r struct {
			Results []struct {
				Series []struct{ Values [][]json.Number }
			}
		}
		if err := json.Unmarshal([]byte(body), &r); err != nil {
			return err
		}
		points = map[int64]float64{}
		for _, res := range r.Results {
			for _, sr := range res.Series {
				for _, v := range sr.Values {
					ns, err := v[0].Int64()
					require.NoError(t, err)
					require.Zero(t, ns%1e6, "InfluxDB has a point at %d ns: not a whole ms", ns)
					f, err := v[1].Float64()
					require.NoError(t, err)
					points[ns/1e6] = f
				}
			}
		}
		if ok, got := exact(points); ok != n {
			return fmt.Errorf("InfluxDB: %d of %d readings at their exact ms (%d points)", ok, n, got)
		}
		return nil
	})
	ok, got = exact(points)
	t.Logf("InfluxDB 1.8: %d of %d readings at their exact ms (%d points)", ok, n, got)
	require.Zero(t, sinkRefused(t, s.http, "tsdb")["duplicate"], "no reading was taken for another's duplicate")
}

// startInfluxDB18 runs a real InfluxDB 1.8 with a citypulse database until
// the test ends and returns its address.
func startInfluxDB18(t *testing.T) string {
	t.Helper()
	st := newInfluxDB18(t)
	st.start()
	t.Cleanup(st.stop)
	createInfluxDB(t, st.addr)
	return st.addr
}

// queryAt runs an instant query at an RFC 3339 time (the API takes float
// seconds through a float64, which can land a ms early).
func queryAt(t *testing.T, httpAddr, q, at string) []promResult {
	t.Helper()
	body := get(t, "http://"+httpAddr+"/api/v1/query?query="+url.QueryEscape(q)+"&time="+url.QueryEscape(at))
	var r struct {
		Status string `json:"status"`
		Data   struct {
			Result []promResult `json:"result"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &r), body)
	require.Equal(t, "success", r.Status, body)
	return r.Data.Result
}

// sinkRefused returns a sink's refused counts from GET /api/v1/sinks.
func sinkRefused(t *testing.T, httpAddr, sink string) map[string]uint64 {
	t.Helper()
	var r struct {
		Data []struct {
			Name    string            `json:"name"`
			Refused map[string]uint64 `json:"refused"`
		} `json:"data"`
	}
	body := get(t, "http://"+httpAddr+"/api/v1/sinks")
	require.NoError(t, json.Unmarshal([]byte(body), &r), body)
	for _, s := range r.Data {
		if s.Name == sink {
			require.NotNil(t, s.Refused, "sink %s reports no refusals: %s", sink, body)
			return s.Refused
		}
	}
	t.Fatalf("no sink %s in %s", sink, body)
	return nil
}

// TestTimesOutOfRangeAndDuplicatesAreCounted: a time past what the store can
// hold is too_new (not stored near now, not too_old), and a second value at
// the same ms is counted duplicate in /api/v1/sinks; the first value stays.
func TestTimesOutOfRangeAndDuplicatesAreCounted(t *testing.T) {
	skipShort(t)
	s := newProc(t, "")
	s.start()
	defer s.stop()
	c, err := mqttConnect(s.mqtt, "pipe-0001", "secret-pipe-0001", false)
	require.NoError(t, err)
	defer c.Disconnect(100)

	before := rejects(t, s.http)
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`{"time":20242937712302,"pressure":901}`))
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`{"time":"9999-12-31T23:59:59Z","pressure":902}`))
	eventually(t, 10*time.Second, func() error {
		if got := rejects(t, s.http)["too_new"] - before["too_new"]; got != 2 {
			return fmt.Errorf("too_new: %v, want 2", got)
		}
		return nil
	})
	require.Equal(t, before["too_old"], rejects(t, s.http)["too_old"], "a far-future time is not too_old")

	at := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	ms := func(d time.Duration) string { return strconv.FormatInt(at.Add(d).UnixMilli(), 10) }
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`{"time":`+ms(0)+`,"pressure":400}`))
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`{"time":`+ms(0)+`,"pressure":401}`)) // another value, same ms
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`{"time":`+ms(0)+`,"pressure":400}`)) // a re-send: no duplicate
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`{"time":`+ms(time.Millisecond)+`,"pressure":402}`))
	eventually(t, 10*time.Second, func() error {
		if d := sinkRefused(t, s.http, "tsdb")["duplicate"]; d != 1 {
			return fmt.Errorf("duplicate: %d, want 1", d)
		}
		return nil
	})
	res := query(t, s.http, `pipe_pressure{device="pipe-0001"}[5m]`)
	require.Len(t, res, 1)
	var vals []string
	for _, v := range res[0].Values {
		vals = append(vals, v[1].(string))
	}
	require.Equal(t, []string{"400", "402"}, vals, "the first value at a ms stays; nothing of the far-future times was stored")
	require.Equal(t, 1.0, metricValue(t, s.http, `citypulse_storage_tsdb_samples_rejected_total{reason="duplicate"}`))
}

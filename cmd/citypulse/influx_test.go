package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/internal/servers"
)

// store is a real InfluxDB-compatible server run by a test.
type store struct {
	t     *testing.T
	name  string
	args  []string
	addr  string
	cmd   *exec.Cmd
	logs  *syncBuffer
	ready func() error
}

func (s *store) start() {
	s.t.Helper()
	s.cmd = exec.Command(s.args[0], s.args[1:]...)
	s.logs = &syncBuffer{}
	s.cmd.Stdout, s.cmd.Stderr = s.logs, s.logs
	require.NoError(s.t, s.cmd.Start())
	eventually(s.t, 60*time.Second, s.ready)
}

// stop stops the store with SIGTERM. (Not SIGKILL: VictoriaMetrics answers
// 204 before a write leaves its in-memory buffer, so killing it loses what it
// had acknowledged, which no client can detect; InfluxDB 1.8 survives either.)
func (s *store) stop() {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		<-done
	}
}

func requireBinary(t *testing.T, name, hint string) string {
	t.Helper()
	p, err := servers.LookBinary(name)
	if err != nil {
		t.Fatalf("%v (%s)", err, hint)
	}
	return p
}

// httpOK returns nil when GET u answers 2xx.
var httpOK = servers.HTTPOK

// runOutage publishes 3 × n readings over MQTT for pipe-0001, stopping the store
// after the first n and restarting it after the second n, then waits until
// count() sees every reading exactly once.
func runOutage(t *testing.T, st *store, influxCfg string, count func() (int, int, error)) {
	s := newProc(t, influxCfg)
	s.start()
	defer s.stop()
	c, err := mqttConnect(s.mqtt, "pipe-0001", "secret-pipe-0001", false)
	require.NoError(t, err)
	defer c.Disconnect(100)
	base := time.Now().Add(-time.Hour).Truncate(time.Second)
	const n = 200
	seq := 0
	send := func() {
		for i := 0; i < n; i++ {
			publish(t, c, "devices/pipe-0001/readings", 1,
				fmt.Appendf(nil, `{"time":%d,"pressure":%d}`, base.Add(time.Duration(seq)*time.Second).UnixNano(), 100+seq%500))
			seq++
		}
	}
	send()
	st.stop()
	outage := time.Now()
	send() // acknowledged from the journal while the store is down
	// unrelated work does not stall: the embedded store has them already
	eventually(t, 10*time.Second, func() error {
		v, err := latest(t, s.http, `count_over_time(pipe_pressure{device="pipe-0001"}[3h])`)
		if err == nil && v != 2*n {
			err = fmt.Errorf("embedded store has %v of %d while %s is down", v, 2*n, st.name)
		}
		return err
	})
	down := 3 * time.Second
	if v := os.Getenv("CITYPULSE_TEST_OUTAGE"); v != "" { // make test-long: minutes
		var err error
		down, err = time.ParseDuration(v)
		require.NoError(t, err)
	}
	time.Sleep(time.Until(outage.Add(down)))
	st.start()
	send()
	var got, dups int
	eventually(t, 60*time.Second, func() error {
		var err error
		got, dups, err = count()
		if err == nil && got != 3*n {
			err = fmt.Errorf("%s has %d of %d readings", st.name, got, 3*n)
		}
		return err
	})
	t.Logf("%s: %d readings published, store down for %v mid-ingest: %d stored, %d duplicated",
		st.name, 3*n, time.Since(outage).Round(time.Second), got, dups)
	require.Zero(t, dups)
	status := get(t, "http://"+s.http+"/api/v1/sinks")
	require.Contains(t, status, `"name":"influx"`)
}

func TestInfluxSinkAgainstVictoriaMetrics(t *testing.T) {
	skipShort(t)
	bin := requireBinary(t, "victoria-metrics", "it installs the Debian package victoria-metrics")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
	st := &store{t: t, name: "VictoriaMetrics", addr: addr, args: servers.VictoriaMetricsArgs(bin, t.TempDir(), addr)}
	st.ready = func() error { return httpOK("http://" + addr + "/health") }
	st.start()
	defer st.stop()
	runOutage(t, st, fmt.Sprintf("storage:\n  influx:\n    enabled: true\n    url: http://%s\n    batch: {max_readings: 50, max_bytes: 0, max_age: 100ms}\n", addr),
		func() (int, int, error) {
			if err := httpOK("http://" + addr + "/internal/force_flush"); err != nil {
				return 0, 0, err
			}
			resp, err := http.Get("http://" + addr + "/api/v1/export?match[]=" + url.QueryEscape(`pipe_pressure{device="pipe-0001",district="gulou"}`))
			if err != nil {
				return 0, 0, err
			}
			defer resp.Body.Close()
			seen := map[int64]int{}
			dec := json.NewDecoder(resp.Body)
			for {
				var line struct{ Timestamps []int64 }
				if err := dec.Decode(&line); err == io.EOF {
					break
				} else if err != nil {
					return 0, 0, err
				}
				for _, ts := range line.Timestamps {
					seen[ts]++
				}
			}
			dups := 0
			for _, k := range seen {
				dups += k - 1
			}
			return len(seen), dups, nil
		})
}

func TestInfluxSinkAgainstInfluxDB18(t *testing.T) {
	skipShort(t)
	st := newInfluxDB18(t)
	addr := st.addr
	st.start()
	defer st.stop()
	createInfluxDB(t, addr)

	runOutage(t, st, fmt.Sprintf("storage:\n  influx:\n    enabled: true\n    url: http://%s\n    bucket: citypulse\n    batch: {max_readings: 50, max_bytes: 0, max_age: 100ms}\n", addr),
		func() (int, int, error) {
			// InfluxDB keys a point by measurement, tags and time: a resent point
			// overwrites itself, so count() is the number of distinct readings.
			q := `SELECT count(pressure) FROM pipe WHERE device='pipe-0001' AND district='gulou'`
			resp, err := http.Get("http://" + addr + "/query?db=citypulse&q=" + url.QueryEscape(q))
			if err != nil {
				return 0, 0, err
			}
			defer resp.Body.Close()
			var r struct {
				Results []struct {
					Series []struct{ Values [][]any }
				}
			}
			if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
				return 0, 0, err
			}
			if len(r.Results) == 0 || len(r.Results[0].Series) == 0 {
				return 0, 0, fmt.Errorf("no data yet")
			}
			return int(r.Results[0].Series[0].Values[0][1].(float64)), 0, nil
		})
}

// newInfluxDB18 prepares a real InfluxDB 1.8 (go install'd) on free loopback
// ports with its own directories; start it with start.
func newInfluxDB18(t *testing.T) *store {
	t.Helper()
	bin := requireBinary(t, "influxd", "it runs go install github.com/influxdata/influxdb/cmd/influxd@v1.8.10")
	dir := t.TempDir()
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
	rpc := fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
	conf := filepath.Join(dir, "influxdb.conf")
	require.NoError(t, os.WriteFile(conf, fmt.Appendf(nil, `reporting-disabled = true
bind-address = %q
[meta]
  dir = %q
[data]
  dir = %q
  wal-dir = %q
  query-log-enabled = false
[http]
  bind-address = %q
  log-enabled = false
[logging]
  level = "error"
`, rpc, filepath.Join(dir, "meta"), filepath.Join(dir, "data"), filepath.Join(dir, "wal"), addr), 0o644))
	st := &store{t: t, name: "InfluxDB 1.8", addr: addr, args: []string{bin, "run", "-config", conf}}
	st.ready = func() error { return httpOK("http://" + addr + "/ping") }
	return st
}

// createInfluxDB creates the citypulse database on the InfluxDB 1.8 at addr.
func createInfluxDB(t *testing.T, addr string) {
	t.Helper()
	resp, err := http.PostForm("http://"+addr+"/query", url.Values{"q": {"CREATE DATABASE citypulse"}})
	require.NoError(t, err)
	resp.Body.Close()
}

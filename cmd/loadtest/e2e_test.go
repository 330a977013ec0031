package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cmd/internal/servertest"
	"github.com/citypulse/citypulse/sim"
)

// The integration tests run the real citypulse binary and drive it with the
// harness in-process (execute) or through its CLI (mainCode).

var serverBin string

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "loadtest-e2e")
	if err != nil {
		panic(err)
	}
	if !testing.Short() {
		if serverBin, err = servertest.Build(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts the real server; run without -short (make test)")
	}
}

const (
	adminToken  = "loadtest-admin-token"
	readToken   = "loadtest-read-token"
	hookSecret  = "loadtest-webhook-secret"
	serverTempl = `data_dir: {{data}}
http: {admin_token: %s, read_token: %s}
devices: {file: %s}
vitals: {interval: 1s, file: %s}
rules:
  file: %s
  tick: 200ms
  notify:
    receivers:
      - {name: loadtest, type: webhook, url: "http://%s/hook", secret: %s, timeout: 2s}
    allow_hosts: ["127.0.0.1"]
    retry_min: 50ms
    retry_max: 1s
`
)

// startServer runs citypulse with the load-test rules, its webhook receiver at
// hook and devicesFile as its fleet.
func startServer(t *testing.T, hook, devicesFile string) *servertest.Server {
	t.Helper()
	root := servertest.Root()
	if devicesFile == "" {
		devicesFile = filepath.Join(t.TempDir(), "devices.yaml")
		require.NoError(t, os.WriteFile(devicesFile, []byte("devices: []\n"), 0o600))
	}
	cfg := fmt.Sprintf(serverTempl, adminToken, readToken, devicesFile, filepath.Join(root, "configs/vitals.yaml"),
		filepath.Join(root, "configs/loadtest/rules.yaml"), hook, hookSecret)
	s := servertest.New(t, serverBin)
	s.SetConfig(cfg)
	s.Start()
	return s
}

// testScenario is the smoke scenario shortened for a test and pointed at s.
func testScenario(t *testing.T, s *servertest.Server, hook string) Scenario {
	t.Helper()
	sc, err := LoadScenario(filepath.Join(servertest.Root(), "configs/loadtest/smoke.yaml"))
	require.NoError(t, err)
	sc.Target = Target{MQTT: s.MQTT, CoAP: s.CoAP, HTTP: s.HTTP, AdminToken: adminToken, ReadToken: readToken, Provision: true}
	sc.Measure.Webhook, sc.Measure.WebhookSecret = hook, hookSecret
	sc.Duration = 12 * time.Second
	sc.Incidents = []Incident{
		{Incident: sim.Incident{Type: "burst_main", At: 2 * time.Second, Every: 4 * time.Second, Lasts: 2 * time.Second}, Alert: "burst_main", Per: "device"},
		{Incident: sim.Incident{Type: "dark_junction", At: 3 * time.Second, Lasts: 4 * time.Second}, Alert: "dark_junction", Per: "device"},
		{Incident: sim.Incident{Type: "substation_trip", At: 3 * time.Second, Lasts: 6 * time.Second}, Alert: "district_power_outage", Per: "district"},
		{Incident: sim.Incident{Type: "car_park_filling", At: 4 * time.Second, Lasts: 5 * time.Second}, Alert: "district_parking_full", Per: "district"},
	}
	sc.Hostile.OfflineAt, sc.Hostile.OfflineFor = 4*time.Second, 3*time.Second
	sc.Hostile.ReconnectStormAt = 6 * time.Second
	require.NoError(t, sc.Validate())
	return sc
}

func quietLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// requireClean checks what every run against a healthy server must show.
func requireClean(t *testing.T, rep Report) {
	t.Helper()
	var sum bytes.Buffer
	printSummary(&sum, rep)
	t.Logf("\n%s", sum.String())
	require.Equal(t, "pass", rep.Verdict, rep.ExitReason)
	require.True(t, rep.Store.Checked)
	require.Zero(t, rep.Store.Lost, "acknowledged readings lost")
	require.Zero(t, rep.Store.Duplicated)
	require.Zero(t, rep.Store.Unexpected)
	require.Positive(t, rep.Store.Acked)
	require.Equal(t, rep.Store.Acked, rep.Store.Found-rep.Store.UnackedStored, "every acknowledged reading is in the store")
	require.Positive(t, rep.Ack.Count)
	require.Positive(t, rep.Queryable.Count, "sampled readings became queryable")
	require.Positive(t, rep.Totals.Malformed)
	require.Empty(t, rep.Alerts.Unexplained, "an alert no injected incident explains is a false alarm")
	rejected := 0
	for _, n := range rep.Rejects {
		rejected += n
	}
	require.LessOrEqual(t, rejected, int(rep.Totals.Malformed), "no reject the harness did not cause")
	require.GreaterOrEqual(t, rejected, int(rep.Totals.Malformed-rep.Totals.MalformedUnanswered),
		"the server counted a reject for every malformed message it answered")
}

func TestRunMQTTAgainstServer(t *testing.T) {
	skipShort(t)
	hook := fmt.Sprintf("127.0.0.1:%d", servertest.FreePort(t, "tcp"))
	s := startServer(t, hook, "")
	sc := testScenario(t, s, hook)
	rep, err := execute(t.Context(), sc, quietLog(t), nil)
	require.NoError(t, err)
	requireClean(t, rep)
	require.Positive(t, rep.Totals.Duplicates)
	require.Positive(t, rep.Totals.Late)
	require.Positive(t, rep.Totals.Backfilled)
	require.Equal(t, int64(rep.Fleet.Devices), rep.Totals.Reconnects, "every connection dropped in the storm")
	require.Zero(t, rep.Alerts.BadSignature)
	require.Equal(t, rep.Alerts.Expected, rep.Alerts.Matched, "every injected incident raised its alert: %+v", rep.Alerts)
	for _, name := range []string{"burst_main", "dark_junction", "district_power_outage", "district_parking_full"} {
		require.Positive(t, rep.Alerts.ByAlert[name].Count, name)
	}
	s.Stop()
}

func TestRunCoAPAgainstServer(t *testing.T) {
	skipShort(t)
	hook := fmt.Sprintf("127.0.0.1:%d", servertest.FreePort(t, "tcp"))
	s := startServer(t, hook, "")
	for _, tc := range []struct {
		name  string
		dtls  bool
		conns int
	}{{"udp", false, 10}, {"dtls", true, 0}} {
		t.Run(tc.name, func(t *testing.T) {
			sc := testScenario(t, s, hook)
			sc.Transport.Protocol, sc.Transport.DTLS, sc.Transport.Connections = "coap", tc.dtls, tc.conns
			if tc.dtls {
				sc.Target.CoAP = s.DTLS
				sc.Format = "senml-cbor"
			}
			sc.Duration = 6 * time.Second
			sc.Incidents = sc.Incidents[:1]
			sc.Hostile.ReconnectStormAt = 0
			rep, err := execute(t.Context(), sc, quietLog(t), nil)
			require.NoError(t, err)
			requireClean(t, rep)
			require.Equal(t, rep.Alerts.Expected, rep.Alerts.Matched, "%+v", rep.Alerts)
		})
	}
	s.Stop()
}

// A server that dies and comes back without its data (a lost disk, a pod
// rescheduled without its volume) loses what it acknowledged: the checker
// must catch it and the CLI must exit non-zero.
func TestCheckerCatchesLoss(t *testing.T) {
	skipShort(t)
	dir := t.TempDir()
	hook := fmt.Sprintf("127.0.0.1:%d", servertest.FreePort(t, "tcp"))
	scPath := filepath.Join(dir, "loss.yaml")
	require.NoError(t, os.WriteFile(scPath, []byte(`name: loss
seed: 9
fleet: {districts: 2, per_district: {pipe: 5, power: 5}, prefix: loss, unique: false, interval: 1s}
transport: {protocol: mqtt, qos: 1, in_flight: 8}
target: {provision: false}
rate: 400
duration: 6s
settle: 5s
measure: {queryable_sample: 0, check: true}
`), 0o600))
	var devs bytes.Buffer
	require.Equal(t, 0, mainCode(t.Context(), []string{"devices", "--scenario", scPath}, &devs, os.Stderr))
	devFile := filepath.Join(dir, "devices.yaml")
	require.NoError(t, os.WriteFile(devFile, devs.Bytes(), 0o600))
	s := startServer(t, hook, devFile)
	t.Setenv("LOADTEST_READ_TOKEN", readToken)

	out := filepath.Join(dir, "report.json")
	var stdout, stderr bytes.Buffer
	done := make(chan int, 1)
	go func() { // the harness runs in the background; the test drives the server
		done <- mainCode(context.Background(), []string{"run", "--scenario", scPath, "--quiet", "--json", out,
			"--mqtt", s.MQTT, "--http", s.HTTP, "--coap", s.CoAP}, &stdout, &stderr)
	}()
	time.Sleep(2 * time.Second)
	s.Kill()
	// the same server on the same ports, but with an empty data dir
	cfg, err := os.ReadFile(filepath.Join(s.Dir, "citypulse.yaml"))
	require.NoError(t, err)
	s.SetConfig(string(bytes.Replace(cfg, []byte("data_dir: "), []byte("data_dir: {{data}}\n# was: "), 1)))
	s.Start()
	code := <-done
	t.Logf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	require.Equal(t, 1, code, "a run that lost acknowledged readings exits 1")
	var rep Report
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &rep))
	require.Equal(t, "fail", rep.Verdict)
	require.Positive(t, rep.Store.Lost, "the readings acknowledged by the first server are gone")
	require.Contains(t, stdout.String(), "acknowledged readings lost")
	s.Stop()
}

// envOr reads a knob of the long tests (make test-long sets them).
func envOr(t *testing.T, name string, def float64) float64 {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	f, err := strconv.ParseFloat(v, 64)
	require.NoError(t, err, name)
	return f
}

// Bad input at rate: malformed messages mixed with good traffic. The server
// stays up, every malformed message is counted by reason, nothing good is
// lost, and the good messages' ack latency is printed against a baseline run
// (a figure, not an assertion: these machines are shared and noisy). Quick
// form 1,000 malformed/s for 10 s; make test-long: 10,000/s for 60 s.
func TestBadInputAtRate(t *testing.T) {
	skipShort(t)
	good := envOr(t, "LOADTEST_GOOD_RATE", 500)
	bad := envOr(t, "LOADTEST_BAD_RATE", 1000)
	dur := time.Duration(envOr(t, "LOADTEST_BAD_SECONDS", 10)) * time.Second
	hook := fmt.Sprintf("127.0.0.1:%d", servertest.FreePort(t, "tcp"))
	s := startServer(t, hook, "")
	run := func(malformed float64) Report {
		sc := testScenario(t, s, hook)
		sc.Incidents = nil
		sc.Hostile = Hostile{Malformed: malformed}
		sc.Rate = good / (1 - malformed)
		sc.Duration = dur
		sc.Transport.InFlight = 64
		rep, err := execute(t.Context(), sc, quietLog(t), nil)
		require.NoError(t, err)
		require.Equal(t, "pass", rep.Verdict, rep.ExitReason)
		return rep
	}
	base := run(0)
	mixed := run(bad / (good + bad))
	requireClean(t, mixed)
	t.Logf("bad input at rate: %.0f malformed msg/s (%d sent) with %.0f good msg/s for %v", float64(mixed.Totals.Malformed)/mixed.Duration,
		mixed.Totals.Malformed, float64(mixed.Totals.Messages)/mixed.Duration, dur)
	t.Logf("good ack latency: baseline p50 %.2f ms p99 %.2f ms; with bad input p50 %.2f ms p99 %.2f ms; ratio p50 %.2fx p99 %.2fx",
		ms(base.Ack.P50), ms(base.Ack.P99), ms(mixed.Ack.P50), ms(mixed.Ack.P99),
		float64(mixed.Ack.P50)/float64(max(1, base.Ack.P50)), float64(mixed.Ack.P99)/float64(max(1, base.Ack.P99)))
	t.Logf("server rejects by reason: %v", mixed.Rejects)
	s.Stop()
}

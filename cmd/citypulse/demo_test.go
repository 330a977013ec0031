package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cmd/internal/servertest"
	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/internal/servers"
	"github.com/citypulse/citypulse/signals"
	"github.com/citypulse/citypulse/sim"
)

// demoProc is one run of `citypulse demo` with the tokens its banner printed.
type demoProc struct {
	*servers.Proc
	http        string
	read, admin string
	tmp         string // the process's TMPDIR, where its data dir goes
}

// startDemo runs `citypulse demo` on free loopback ports with the first
// incident (a burst main) at first, lasting lasts, and reads the banner.
func startDemo(t *testing.T, first, lasts time.Duration) *demoProc {
	t.Helper()
	a, err := servertest.FreeAddrs()
	require.NoError(t, err)
	root := servertest.Root()
	d := &demoProc{http: a.HTTP, tmp: t.TempDir()}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CITYPULSE_") && !strings.HasPrefix(kv, "TMPDIR=") {
			env = append(env, kv)
		}
	}
	env = append(env, "TMPDIR="+d.tmp, // the embedded defaults name configs/ relative to the repository root
		"CITYPULSE_RULES_FILE="+filepath.Join(root, "configs/rules.yaml"), "CITYPULSE_VITALS_FILE="+filepath.Join(root, "configs/vitals.yaml"))
	args := []string{binPath, "demo", "--seed", "7", "--first-incident", first.String(), "--incident-lasts", lasts.String(),
		"--mqtt-addr", a.MQTT, "--coap-addr", a.CoAP, "--dtls-addr", a.DTLS, "--http-addr", a.HTTP}
	logs := &servertest.SyncBuffer{}
	d.Proc, err = servers.StartProc("citypulse demo", args, env, logs, func() error { return servers.HTTPOK("http://" + a.HTTP + "/readyz") }, 60*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() {
		d.Kill()
		if t.Failed() {
			t.Logf("demo output:\n%s", d.Logs())
		}
	})
	token := func(role string) string {
		m := regexp.MustCompile(role + ` token +(demo-[0-9a-f]{24})\n`).FindStringSubmatch(d.Logs())
		require.NotNil(t, m, "the banner prints the %s token:\n%s", role, d.Logs())
		return m[1]
	}
	d.read, d.admin = token("read"), token("admin")
	require.NotEqual(t, d.read, d.admin)
	require.Contains(t, d.Logs(), "http://"+a.HTTP+"/#token=demo-", "the banner prints the dashboard's address")
	return d
}

// get fetches path with the read token and returns the body of a 200.
func (d *demoProc) get(path string) (string, error) {
	req, err := http.NewRequest(http.MethodGet, "http://"+d.http+path, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+d.read)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s %s", path, resp.Status, b)
	}
	return string(b), err
}

// count is the number of series of the instant query q (a count() query's value).
func (d *demoProc) count(q string) (string, error) {
	body, err := d.get("/api/v1/query?query=" + url.QueryEscape("count("+q+")"))
	if err != nil {
		return "", err
	}
	var r struct {
		Data struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		return "", err
	}
	if len(r.Data.Result) == 0 {
		return "0", nil
	}
	return fmt.Sprint(r.Data.Result[0].Value[1]), nil
}

// alertEvents follows the operations stream and sends its alert events.
func (d *demoProc) alertEvents(t *testing.T, ctx context.Context) <-chan map[string]any {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+d.http+"/api/v1/events", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+d.read)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	out := make(chan map[string]any, 1024)
	go func() {
		defer resp.Body.Close()
		defer close(out)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		name := ""
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event: "):
				name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: ") && name == "alert":
				var ev map[string]any
				if json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &ev) == nil {
					select {
					case out <- ev:
					case <-ctx.Done():
						return
					}
				}
			}
		}
	}()
	return out
}

// The demo city goes live within 30 s (every simulated device of the five
// kinds has a value in the query API, every district its vital signs), its first incident (a burst main at
// 5 s, lasting 45 s) raises mains_pressure_low for the burst main, which
// resolves once the main is mended; SIGINT stops the demo cleanly and its
// temporary data dir goes with it.
func TestDemoCityGoesLiveAndItsIncidentAlertsFireAndResolve(t *testing.T) {
	skipShort(t)
	start := time.Now()
	d := startDemo(t, 5*time.Second, 45*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	events := d.alertEvents(t, ctx)

	// every device of the demo city: six districts x (10 mains, 8 meters,
	// 4 probes, 12 junctions, 16 bays)
	want := map[string]string{"pipe_pressure": "60", "power_active_power": "48", "water_level": "24",
		"traffic_light_state": "72", "parking_occupied": "96", "parking_available_spot_number": "24",
		// and the vital signs the dashboard's district cards show: six districts and the city
		"city_pipe_pressure_min": "7", "city_power_load_kw": "7", "city_parking_occupancy_ratio": "7"}
	eventually(t, 30*time.Second-time.Since(start), func() error {
		for series, n := range want {
			got, err := d.count(series)
			if err != nil {
				return err
			}
			if got != n {
				return fmt.Errorf("%s: %s devices live, want %s", series, got, n)
			}
		}
		return nil
	})
	t.Logf("every device live %v after start", time.Since(start).Round(100*time.Millisecond))
	metrics, err := d.get("/metrics")
	require.NoError(t, err)
	require.Regexp(t, `citypulse_demo_reports_total\{result="published"\} [1-9]`, metrics)
	require.Regexp(t, `citypulse_mqtt_clients 324\n`, metrics, "every device on its own connection")

	const burst = "demo-pipe-gulou-0000" // seed 7's first incident: the first main of the first district
	firing := map[string]bool{}
	for {
		select {
		case ev, ok := <-events:
			require.True(t, ok, "the stream ended before the alert resolved")
			labels, _ := ev["labels"].(map[string]any)
			if labels["alertname"] != "mains_pressure_low" || labels["device"] != burst {
				continue
			}
			fp, _ := ev["fingerprint"].(string)
			switch ev["kind"] {
			case "firing":
				firing[fp] = true
				t.Logf("mains_pressure_low for %s fired %v after start", burst, time.Since(start).Round(100*time.Millisecond))
				continue
			case "resolved":
				require.True(t, firing[fp], "resolved before it fired: %v", ev)
				t.Logf("... and resolved %v after start", time.Since(start).Round(100*time.Millisecond))
			default:
				continue
			}
		case <-ctx.Done():
			t.Fatalf("mains_pressure_low for %s did not fire and resolve within 5 minutes", burst)
		}
		break
	}
	// The demo logs the end of the incident after it sent the readings that
	// resolve it: the line may come after the resolved event.
	over := `msg="demo city: incident over" component=demo-city incident="burst_main in gulou ` + burst
	require.Eventually(t, func() bool { return strings.Contains(d.Logs(), over) }, time.Minute, 50*time.Millisecond,
		"the demo logs the incident's end")

	require.NoError(t, d.Cmd.Process.Signal(syscall.SIGINT))
	for deadline := time.Now().Add(30 * time.Second); !d.Exited(); time.Sleep(50 * time.Millisecond) {
		require.True(t, time.Now().Before(deadline), "SIGINT stops the demo within 30 s")
	}
	require.NoError(t, d.Stop(time.Second), "a clean exit (status 0)")
	require.Contains(t, d.Logs(), "citypulse stopped cleanly")
	left, err := os.ReadDir(d.tmp)
	require.NoError(t, err)
	require.Empty(t, left, "the demo removes its temporary data dir")
}

// The demo's device list is the city's fleet and loads as any device list;
// every role without a token gets a fresh one, a configured token is kept.
func TestDemoConfig(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.HTTP.ReadToken = "my-own-read-token-0001"
	fleet := sim.NewFleet(sim.DemoSpec(3))
	tmp, err := prepareDemoConfig(&cfg, fleet, false)
	require.NoError(t, err)
	require.Empty(t, tmp, "the user's data dir is no temporary one")
	list, err := devices.LoadFile(cfg.Devices.File)
	require.NoError(t, err)
	require.Len(t, list, len(fleet))
	for i, d := range list {
		require.Equal(t, fleet[i].Registration(), d)
	}
	require.Equal(t, "my-own-read-token-0001", cfg.HTTP.ReadToken)
	require.Regexp(t, `^demo-[0-9a-f]{24}$`, cfg.HTTP.OperatorToken)
	require.Regexp(t, `^demo-[0-9a-f]{24}$`, cfg.HTTP.AdminToken)
	require.NotEqual(t, cfg.HTTP.OperatorToken, cfg.HTTP.AdminToken)

	// The green-wave view has the demo's corridors: every district's main
	// road, its junctions in order, distances from their locations.
	cs, err := signals.LoadCorridors(cfg.Signals.File)
	require.NoError(t, err)
	require.Len(t, cs, 6)
	for _, c := range cs {
		require.True(t, strings.HasSuffix(c.Name, "-main-road"), c.Name)
		require.GreaterOrEqual(t, len(c.Junctions), 2)
		for _, j := range c.Junctions[1:] {
			require.Positive(t, j.Distance, "%s: %s", c.Name, j.Device)
			require.Less(t, j.Distance, 5000.0, "%s: %s", c.Name, j.Device)
		}
	}
}

func TestDemoRefuses(t *testing.T) {
	ok := demoOptions{firstIncident: time.Second, lasts: time.Minute}
	tests := []struct {
		name string
		cfg  func(*Config)
		o    demoOptions
		want string
	}{
		{"no embedded broker", func(c *Config) { c.Ingest.MQTT.Enabled = false }, ok, "embedded MQTT broker"},
		{"incidents too short", func(*Config) {}, demoOptions{lasts: time.Second}, "--incident-lasts"},
		{"an incident before the start", func(*Config) {}, demoOptions{firstIncident: -time.Second, lasts: time.Minute}, "--first-incident"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.DataDir = t.TempDir()
			tt.cfg(&cfg)
			_, err := newDemo(cfg, tt.o, false, io.Discard)
			require.ErrorContains(t, err, tt.want)
		})
	}
}

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/citypulse/citypulse/cmd/internal/servertest"
	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/internal/servers"
	"github.com/citypulse/citypulse/sim"
)

// `loadtest efficiency` is the end-to-end efficiency benchmark (issue 13):
// it floods a real citypulse with QoS 1 messages and reports readings per
// CPU-second of the citypulse process, from just before the flood until the
// store holds every reading, and the drain time after publishing ended.
//
//	external: mosquitto ← flood; citypulse subscribes (external-broker mode),
//	          embedded TSDB, default rules and vitals, InfluxDB sink to
//	          VictoriaMetrics; done when VictoriaMetrics has every reading
//	embedded: citypulse's own broker ← flood; done when its query API
//	          counts every reading
//
// With --baseline it runs a second binary in the same invocation, the two
// alternating, and prints the ratio.

// effOptions are the knobs of one invocation.
type effOptions struct {
	bin, baseline string
	modes         []string
	messages      int
	devices       int
	readings      int
	window        int
	rounds        int
	configs       string
	drainTimeout  time.Duration
	keep          bool
	verbose       bool
	// profile, when set, is a directory: a CPU profile of the measured
	// binary's first run in each mode (/debug/pprof/profile from the flood's
	// start for profileFor) is written there.
	profile    string
	profileFor time.Duration
}

func parseEffFlags(args []string, stderr io.Writer) (effOptions, error) {
	fs := flag.NewFlagSet("efficiency", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o effOptions
	fs.StringVar(&o.bin, "citypulse", "bin/citypulse", "the citypulse binary measured")
	fs.StringVar(&o.baseline, "baseline", "", "a second citypulse binary (the previous release), run alternately; prints the ratio")
	modes := fs.String("modes", "external,embedded", "comma-separated: external (mosquitto + VictoriaMetrics), embedded")
	fs.IntVar(&o.messages, "messages", 200000, "QoS 1 messages per run")
	fs.IntVar(&o.devices, "devices", 16, "devices, one connection each")
	fs.IntVar(&o.readings, "readings", 4, "readings per message")
	fs.IntVar(&o.window, "window", 64, "unacknowledged messages per connection")
	fs.IntVar(&o.rounds, "rounds", 1, "runs of each binary in each mode")
	fs.StringVar(&o.configs, "configs", "configs", "directory holding vitals.yaml and rules.yaml (the defaults)")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 5*time.Minute, "give up when the store lacks readings this long after publishing ended")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary data directories")
	fs.BoolVar(&o.verbose, "v", false, "debug logging")
	fs.StringVar(&o.profile, "profile", "", "directory: write a CPU profile of the measured binary's first run in each mode (<mode>.pprof)")
	fs.DurationVar(&o.profileFor, "profile-seconds", 8*time.Second, "length of that profile, from the flood's start")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %v", fs.Args())
	}
	o.modes = strings.Split(*modes, ",")
	return o, o.validate()
}

func (o effOptions) validate() error {
	var errs []error
	for _, m := range o.modes {
		if m != "external" && m != "embedded" {
			errs = append(errs, fmt.Errorf("--modes: %q is neither external nor embedded", m))
		}
	}
	if o.devices < 1 || o.devices > 1000 {
		errs = append(errs, fmt.Errorf("--devices %d: want 1..1000", o.devices))
	}
	if o.messages < o.devices || o.messages > 10_000_000 {
		errs = append(errs, fmt.Errorf("--messages %d: want %d (one per device)..10,000,000", o.messages, o.devices))
	}
	if o.readings < 1 || o.readings > 100 {
		errs = append(errs, fmt.Errorf("--readings %d: want 1..100", o.readings))
	}
	if o.window < 1 || o.window > 65534 {
		errs = append(errs, fmt.Errorf("--window %d: want 1..65534", o.window))
	}
	if o.rounds < 1 || o.rounds > 100 {
		errs = append(errs, fmt.Errorf("--rounds %d: want 1..100", o.rounds))
	}
	if o.profile != "" && (o.profileFor < time.Second || o.profileFor > 5*time.Minute) {
		errs = append(errs, fmt.Errorf("--profile-seconds %s: want 1s..5m", o.profileFor))
	}
	if o.drainTimeout <= 0 {
		errs = append(errs, errors.New("--drain-timeout: want > 0 (every run stops by itself)"))
	}
	for _, f := range []string{o.bin, o.baseline, filepath.Join(o.configs, "vitals.yaml"), filepath.Join(o.configs, "rules.yaml")} {
		if _, err := os.Stat(f); f != "" && err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// effRun is the outcome of one run of one binary in one mode.
type effRun struct {
	Mode, Binary string
	Baseline     bool // the run of --baseline (which may be the same file)
	Round        int
	Readings     int64
	CPU          time.Duration // citypulse, from just before the flood to the store holding every reading
	Flood        time.Duration // first publish to last PUBACK
	Drain        time.Duration // last PUBACK to the store holding every reading
	GenCPU       time.Duration // the harness during the flood (the generator)
	BrokerCPU    time.Duration // mosquitto over the same span (external mode)
	Polls        int           // count queries until the store had every reading
	Verified     string
}

// PerCPUSecond is readings per CPU-second of the citypulse process.
func (r effRun) PerCPUSecond() float64 {
	return float64(r.Readings) / max(r.CPU.Seconds(), 0.01)
}

func cmdEfficiency(ctx context.Context, args []string, stdout, stderr io.Writer) (int, error) {
	o, err := parseEffFlags(args, stderr)
	if err != nil {
		return exitSetup, err
	}
	runs, err := runEfficiency(ctx, o, logger(stderr, o.verbose), stdout)
	printEfficiency(stdout, o, runs)
	if err != nil {
		fmt.Fprintln(stdout, "FAIL:", err)
		return 1, nil
	}
	return 0, nil
}

// effEnv holds what the runs of one invocation share: the temporary
// directory and the external servers.
type effEnv struct {
	o       effOptions
	log     *slog.Logger
	dir     string
	broker  *servers.Proc
	mqtt    string // mosquitto host:port
	vm      *servers.Proc
	vmAddr  string
	runs    int
	configs string // absolute
}

// runEfficiency runs every binary in every mode o.rounds times, the binaries
// alternating (ABBA), and stops every process it started, also on error or
// interrupt.
func runEfficiency(ctx context.Context, o effOptions, log *slog.Logger, progress io.Writer) (runs []effRun, err error) {
	e := &effEnv{o: o, log: log}
	if e.configs, err = filepath.Abs(o.configs); err != nil {
		return nil, err
	}
	if e.dir, err = os.MkdirTemp("", "citypulse-efficiency-"); err != nil {
		return nil, err
	}
	defer func() {
		err = errors.Join(err, e.close())
	}()
	bins := []string{o.bin}
	if o.baseline != "" {
		bins = append(bins, o.baseline)
	}
	for round := range o.rounds {
		for _, mode := range o.modes {
			for i := range bins {
				k := i
				if round%2 == 1 {
					k = len(bins) - 1 - i
				}
				bin := bins[k]
				r, err := e.run(ctx, bin, mode, round)
				r.Baseline = k == 1
				if err != nil {
					return runs, fmt.Errorf("%s mode, %s, round %d: %w", mode, bin, round+1, err)
				}
				fmt.Fprintf(progress, "  %-8s %-28s %10.0f readings/CPU-s  drain %5.2f s\n", mode, bin, r.PerCPUSecond(), r.Drain.Seconds())
				runs = append(runs, r)
			}
		}
	}
	return runs, nil
}

func (e *effEnv) close() error {
	var errs []error
	for _, p := range []*servers.Proc{e.broker, e.vm} {
		if p != nil {
			if err := p.Stop(30 * time.Second); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if e.o.keep {
		e.log.Info("kept the data directories", "dir", e.dir)
	} else {
		errs = append(errs, os.RemoveAll(e.dir))
	}
	return errors.Join(errs...)
}

// external starts mosquitto and VictoriaMetrics once per invocation.
func (e *effEnv) external() error {
	if e.broker != nil {
		return nil
	}
	var err error
	if e.broker, e.mqtt, err = servers.StartMosquitto(e.dir); err != nil {
		return err
	}
	e.vm, e.vmAddr, err = servers.StartVictoriaMetrics(filepath.Join(e.dir, "victoria-metrics"))
	return err
}

// effScenario is the flood as a load-test scenario: devices pipe sensors in
// one district, readings per message, run-unique device ids.
func (e *effEnv) effScenario(prefix string) Scenario {
	sc := DefaultScenario()
	sc.Name, sc.Seed = "efficiency", 13
	sc.Fleet = Fleet{Districts: 1, PerDistrict: map[devices.Kind]int{devices.KindPipe: e.o.devices},
		Prefix: prefix, Interval: 10 * time.Second, Noise: 0.01}
	sc.ReadingsPerMessage, sc.Format, sc.Rate = e.o.readings, "senml-json", 0
	sc.MaxMessages = int64(e.o.messages)
	return sc
}

// prepare generates every message of the run before the clock starts: the
// fleet's readings (one point every 4 ms per device, starting a minute ago)
// and the PUBLISH packets that carry them.
func prepare(r *runner, messages int) []*floodConn {
	start := time.Now().Add(-time.Minute)
	conns := make([]*floodConn, len(r.fleet))
	for i, dev := range r.fleet {
		n := messages / len(r.fleet)
		if i < messages%len(r.fleet) {
			n++
		}
		fc := &floodConn{dev: dev, packets: make([][]byte, 0, n), msgs: make([]*pubMsg, 0, n)}
		topic := "devices/" + dev.ID + "/readings"
		for k := range n {
			m, body, err := r.build(dev, start, sim.Conditions{}, false)
			if err != nil {
				panic(err) // senml-json encoding of finite values cannot fail
			}
			fc.packets = append(fc.packets, publishPacket(topic, packetID(k), body))
			fc.msgs = append(fc.msgs, m)
		}
		conns[i] = fc
	}
	return conns
}

const effConfig = `data_dir: %s
log: {level: warn}
devices: {file: %s}
vitals: {file: %s}
rules: {file: %s}
http: {admin_token: %s}
ingest:
  rate_limit: {readings_per_second: 0}   # a flood is not a misbehaving device
%s`

// writeConfig writes the run's devices file and config; the probe device
// (external mode) is registered too.
func (e *effEnv) writeConfig(dir, mode string, fleet []*simDevice, probe *simDevice) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	all := fleet
	if probe != nil {
		all = append(append([]*simDevice{}, fleet...), probe)
	}
	devFile := filepath.Join(dir, "devices.yaml")
	if err := os.WriteFile(devFile, devicesYAML(all, 10*time.Second), 0o600); err != nil {
		return "", err
	}
	extra := ""
	if mode == "external" {
		extra = fmt.Sprintf(`  mqtt: {enabled: false}
  external: {enabled: true, url: "tcp://%s"}
storage:
  influx: {enabled: true, url: "http://%s"}
`, e.mqtt, e.vmAddr)
	}
	cfg := fmt.Sprintf(effConfig, filepath.Join(dir, "data"), devFile, filepath.Join(e.configs, "vitals.yaml"),
		filepath.Join(e.configs, "rules.yaml"), effAdminToken, extra)
	path := filepath.Join(dir, "citypulse.yaml")
	return path, os.WriteFile(path, []byte(cfg), 0o600)
}

// run is one measured run: start citypulse, flood it, wait until the store
// has every reading, verify each reading in the store(s), stop it.
func (e *effEnv) run(ctx context.Context, bin, mode string, round int) (effRun, error) {
	res := effRun{Mode: mode, Binary: bin, Round: round + 1}
	if mode == "external" {
		if err := e.external(); err != nil {
			return res, err
		}
	}
	e.runs++
	prefix := fmt.Sprintf("eff%d", e.runs)
	r := newRunner(e.effScenario(prefix), e.log)
	conns := prepare(r, e.o.messages)
	sent := r.indexSent()
	for _, fc := range conns {
		res.Readings += int64(len(fc.dev.readings))
	}
	var probe *simDevice
	if mode == "external" {
		id := "probe-" + prefix // outside the fleet's prefix: not counted
		probe = &simDevice{Device: &sim.Device{ID: id, Kind: devices.KindPipe, Secret: sim.Secret(13, id)}}
	}
	cfg, err := e.writeConfig(filepath.Join(e.dir, prefix), mode, r.fleet, probe)
	if err != nil {
		return res, err
	}
	addrs, err := servertest.FreeAddrs()
	if err != nil {
		return res, err
	}
	cp, err := servertest.StartCityPulse(bin, cfg, addrs, nil, nil)
	if err != nil {
		return res, err
	}
	defer cp.Kill() // on error; a clean run has stopped it already
	cpAPI := newAPI(Target{HTTP: addrs.HTTP})
	store, storeName, target := cpAPI, "citypulse", addrs.MQTT
	if mode == "external" {
		store, storeName, target = newAPI(Target{HTTP: e.vmAddr}), "VictoriaMetrics", e.mqtt
		store.digits = 12
		if err := waitSubscribed(ctx, cpAPI, e.mqtt, probe); err != nil {
			return res, fmt.Errorf("%w\ncitypulse log:\n%s", err, cp.Logs())
		}
	}

	cpu0, err1 := servers.CPUTime(cp.Pid())
	gen0, err2 := servers.CPUTime(os.Getpid())
	brk0 := e.brokerCPU(mode)
	if err := errors.Join(err1, err2); err != nil {
		return res, err
	}
	t0 := time.Now()
	profiled := e.profile(ctx, addrs.HTTP, bin, mode, round)
	fr, err := flood(ctx, target, conns, e.o.window)
	gen1, _ := servers.CPUTime(os.Getpid())
	res.GenCPU, res.Flood = gen1-gen0, fr.End.Sub(t0)
	if err != nil {
		return res, fmt.Errorf("%w\ncitypulse log:\n%s", err, cp.Logs())
	}
	// Embedded: complete when the TSDB sink's counter covers every reading
	// (polled every 20 ms; the count query confirms it). External: when
	// VictoriaMetrics counts them all (each poll flushes its buffers).
	gate, every, gated := sinkWrote(cpAPI, res.Readings), 20*time.Millisecond, true
	if mode == "external" {
		gate, every, gated = vmFlush(store), 100*time.Millisecond, false
	}
	countAt := time.UnixMilli(sent.maxTS + 1000)
	var done time.Time
	if res.Polls, done, err = waitCount(ctx, store, gate, countQuery(r.fleet, prefix), countAt, res.Readings, every, gated, e.o.drainTimeout); err != nil {
		return res, fmt.Errorf("%s: %w", storeName, err)
	}
	cpu1, err := servers.CPUTime(cp.Pid())
	if err != nil {
		return res, err
	}
	res.Drain = done.Sub(fr.End)
	res.CPU = cpu1 - cpu0
	res.BrokerCPU = e.brokerCPU(mode) - brk0

	// off the clock: every reading, with its time and value, in each store
	stores := map[string]*api{"citypulse TSDB": cpAPI}
	if mode == "external" {
		stores["VictoriaMetrics"] = store
		// The clock stopped when VictoriaMetrics had every reading; the
		// embedded TSDB, another sink with its own cursor, may be behind.
		if _, _, err := waitCount(ctx, cpAPI, sinkWrote(cpAPI, res.Readings), countQuery(r.fleet, prefix), countAt, res.Readings, 100*time.Millisecond, true, e.o.drainTimeout); err != nil {
			return res, fmt.Errorf("citypulse TSDB: %w", err)
		}
	}
	if res.Verified, err = verify(ctx, r, sent, stores); err != nil {
		return res, err
	}
	if err := <-profiled; err != nil {
		return res, err
	}
	return res, cp.Stop(30 * time.Second)
}

// effAdminToken lets the harness fetch /debug/pprof/profile (--profile).
const effAdminToken = "efficiency-admin-token"

// profile fetches a CPU profile of citypulse at httpAddr, from now for
// --profile-seconds, into --profile/<mode>.pprof when this is the measured
// binary's first run in mode; the channel yields the outcome (nil at once
// when there is nothing to do).
func (e *effEnv) profile(ctx context.Context, httpAddr, bin, mode string, round int) <-chan error {
	done := make(chan error, 1)
	if e.o.profile == "" || round != 0 || bin != e.o.bin {
		done <- nil
		return done
	}
	a := newAPI(Target{HTTP: httpAddr, AdminToken: effAdminToken})
	a.hc.Timeout = e.o.profileFor + time.Minute
	path := fmt.Sprintf("/debug/pprof/profile?seconds=%d", int(e.o.profileFor.Seconds()))
	go func() {
		done <- func() error {
			resp, err := a.do(ctx, http.MethodGet, path, a.admin, nil, "")
			if err != nil {
				return fmt.Errorf("profile: %w", err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("profile: %s", resp.Status)
			}
			if err := os.MkdirAll(e.o.profile, 0o755); err != nil {
				return err
			}
			f, err := os.Create(filepath.Join(e.o.profile, mode+".pprof"))
			if err != nil {
				return err
			}
			_, err = io.Copy(f, resp.Body)
			return errors.Join(err, f.Close())
		}()
	}()
	return done
}

// verify checks every generated reading in each store (by name) and says
// what it found.
func verify(ctx context.Context, r *runner, sent sentIndex, stores map[string]*api) (string, error) {
	var found []string
	for _, name := range slices.Sorted(maps.Keys(stores)) {
		c := r.checkOnce(ctx, stores[name], sent)
		if err := c.complete(); err != nil {
			return "", fmt.Errorf("%s: %w", name, err)
		}
		f := fmt.Sprintf("%s %d/%d", name, c.Found, c.Expected)
		if c.Duplicated > 0 {
			f += fmt.Sprintf(" (+%d duplicates)", c.Duplicated)
		}
		found = append(found, f)
	}
	return strings.Join(found, ", "), nil
}

// complete returns an error unless the store holds every generated reading,
// each acknowledged, and nothing else. A duplicate is no error: an
// at-least-once sink may resend a batch whose answer it lost, and
// VictoriaMetrics deduplicates in the background; the report shows it.
func (c StoreCheck) complete() error {
	switch {
	case c.Error != "":
		return errors.New(c.Error)
	case c.Expected == 0:
		return errors.New("no readings generated")
	case c.Acked != c.Expected || c.Found != c.Expected || c.Lost+c.Unexpected > 0:
		return fmt.Errorf("%d readings sent, %d acknowledged, %d stored: %d lost, %d duplicated, %d unexpected; e.g. %s",
			c.Expected, c.Acked, c.Found, c.Lost+c.UnackedMissing, c.Duplicated, c.Unexpected, strings.Join(c.Examples, "; "))
	}
	return nil
}

func (e *effEnv) brokerCPU(mode string) time.Duration {
	if mode != "external" || e.broker == nil {
		return 0
	}
	d, _ := servers.CPUTime(e.broker.Pid())
	return d
}

// waitSubscribed publishes a probe reading through the broker until
// citypulse has accepted one: then its subscription is in place.
func waitSubscribed(ctx context.Context, cp *api, broker string, probe *simDevice) error {
	deadline := time.Now().Add(30 * time.Second)
	for ctx.Err() == nil {
		body := fmt.Appendf(nil, `[{"n":"pressure","v":400}]`)
		fc := &floodConn{dev: probe, packets: [][]byte{publishPacket("devices/"+probe.ID+"/readings", 1, body)}, msgs: []*pubMsg{{status: new(atomic.Uint32)}}}
		if _, err := flood(ctx, broker, []*floodConn{fc}, 1); err != nil {
			return err
		}
		got, err := cp.metric(ctx, `citypulse_external_mqtt_messages_total{result="accepted"}`)
		if err == nil && got >= 1 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("citypulse did not receive a probe through %s within 30s (last: %v, %v)", broker, got, err)
		}
		sleepCtx(ctx, 200*time.Millisecond)
	}
	return ctx.Err()
}

// waitCount polls every 100 ms until query q on store at time at counts want
// samples (or more); still fewer after timeout is an error. gate
// runs before each count and may hold it back: the count query costs the
// server measured in embedded mode, a /metrics counter much less.
// waitCount polls every interval until the count query q at at reaches
// want, querying only while gate is open. done is when the store was seen
// complete: a gated wait, the start of the gate check that opened (the gate
// says every reading was written: the query only confirms it); otherwise
// the end of the query that counted them all.
func waitCount(ctx context.Context, store *api, gate func(context.Context) (bool, error), q string, at time.Time, want int64,
	every time.Duration, gated bool, timeout time.Duration) (polls int, done time.Time, err error) {
	deadline := time.Now().Add(timeout)
	var got float64
	for ctx.Err() == nil {
		checked := time.Now()
		var open bool
		if open, err = gate(ctx); err == nil && open {
			polls++
			got, err = store.instant(ctx, q, at)
			if err == nil && int64(got) >= want { // more: duplicates, which the check counts
				if !gated {
					checked = time.Now()
				}
				return polls, checked, nil
			}
		}
		if time.Now().After(deadline) {
			return polls, time.Time{}, fmt.Errorf("only %.0f of %d readings after %v (last error: %v)", got, want, timeout, err)
		}
		sleepCtx(ctx, every)
	}
	return polls, time.Time{}, context.Cause(ctx)
}

// countQuery counts the samples of the run's devices, metric by metric (a
// selector over several names would meet series that differ only in their
// name once count_over_time drops it).
func countQuery(fleet []*simDevice, prefix string) string {
	var terms []string
	for kind, metrics := range kindMetrics(fleet) {
		for _, m := range metrics {
			terms = append(terms, fmt.Sprintf(`(sum(count_over_time(%s_%s{device=~"%s-.*"}[1h])) or vector(0))`, kind, m, prefix))
		}
	}
	slices.Sort(terms)
	return strings.Join(terms, " + ")
}

// vmFlush makes what VictoriaMetrics buffered searchable.
func vmFlush(vm *api) func(context.Context) (bool, error) {
	return func(context.Context) (bool, error) {
		return true, servers.HTTPOK(vm.base + "/internal/force_flush")
	}
}

// sinkWrote opens once citypulse's embedded store reports at least want
// readings written (vitals roll-ups count there too).
func sinkWrote(cp *api, want int64) func(context.Context) (bool, error) {
	return func(ctx context.Context) (bool, error) {
		n, err := cp.metric(ctx, `citypulse_sink_readings_written_total{sink="tsdb"}`)
		return int64(n) >= want, err
	}
}

// printEfficiency prints every run, then per mode the median of each binary
// and, with a baseline, the ratio candidate/baseline (median of the ratios of
// the runs of one round, which ran back to back).
func printEfficiency(w io.Writer, o effOptions, runs []effRun) {
	fmt.Fprintf(w, "end-to-end efficiency: %d QoS 1 messages x %d readings from %d devices per run; CPU = utime+stime of the citypulse pid (/proc/<pid>/stat), flood start to store complete\n",
		o.messages, o.readings, o.devices)
	fmt.Fprintf(w, "%-8s %5s %-28s %14s %10s %8s %8s %10s %10s %5s  %s\n", "mode", "round", "binary", "readings/CPU-s",
		"cpu s", "flood s", "drain s", "gen cpu s", "mqtt cpu s", "polls", "verified")
	for _, r := range runs {
		name := r.Binary
		if r.Baseline {
			name += " (baseline)"
		}
		fmt.Fprintf(w, "%-8s %5d %-28s %14.0f %10.2f %8.2f %8.2f %10.2f %10.2f %5d  %s\n", r.Mode, r.Round, name, r.PerCPUSecond(),
			r.CPU.Seconds(), r.Flood.Seconds(), r.Drain.Seconds(), r.GenCPU.Seconds(), r.BrokerCPU.Seconds(), r.Polls, r.Verified)
	}
	for _, mode := range o.modes {
		by := map[bool][]effRun{}
		for _, r := range runs {
			if r.Mode == mode {
				by[r.Baseline] = append(by[r.Baseline], r)
			}
		}
		for k, bin := range []string{o.bin, o.baseline} {
			if rs := by[k == 1]; len(rs) > 0 {
				fmt.Fprintf(w, "%-8s %-34s median %8.0f readings/CPU-s, drain %.2f s, generator %.2f µs CPU/message (%d runs)\n", mode, bin,
					median(rs, func(r effRun) float64 { return r.PerCPUSecond() }), median(rs, func(r effRun) float64 { return r.Drain.Seconds() }),
					median(rs, func(r effRun) float64 { return float64(r.GenCPU.Microseconds()) / float64(o.messages) }), len(rs))
			}
		}
		cand, base := by[false], by[true]
		if o.baseline == "" || len(cand) == 0 || len(cand) != len(base) {
			continue
		}
		var eff, drain []float64
		for i := range cand {
			eff = append(eff, cand[i].PerCPUSecond()/base[i].PerCPUSecond())
			drain = append(drain, cand[i].Drain.Seconds()/max(base[i].Drain.Seconds(), 0.001))
		}
		fmt.Fprintf(w, "%-8s ratio %s / %s: readings/CPU-s %.2fx, drain time %.2fx (median of %d rounds; per round %s)\n", mode, o.bin, o.baseline,
			medianOf(eff), medianOf(drain), len(eff), fmtRatios(eff))
	}
}

func median(rs []effRun, f func(effRun) float64) float64 {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	return medianOf(v)
}

func medianOf(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func fmtRatios(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf("%.2fx", x)
	}
	return strings.Join(parts, " ")
}

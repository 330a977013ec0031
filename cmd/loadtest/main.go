// Command loadtest simulates a city's sensor fleet against a CityPulse server
// (or any MQTT broker or CoAP endpoint), measures publish→ack,
// publish→queryable and incident→webhook latency, and checks that nothing
// acknowledged was lost.
//
//	loadtest run --scenario configs/loadtest/smoke.yaml [--json out.json] [--html out.html] [--compare old.json]
//	loadtest find-max --scenario configs/loadtest/throughput.yaml [--p99 50ms]
//	loadtest compare old.json new.json
//	loadtest devices --scenario configs/loadtest/smoke.yaml > devices.yaml
//	loadtest efficiency [--citypulse bin/citypulse] [--baseline bin/citypulse-prev] [--messages 200000]
//
// Exit status: 0 pass, 1 the run failed its checks (an acknowledged reading
// lost, a duplicate or unexpected sample, a bad webhook signature), 2 the run
// could not be set up.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := mainCode(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `usage: loadtest <command> [flags]

commands:
  run       simulate the scenario's fleet, measure, check the store, report
  find-max  ramp the rate until p99 or errors cross a limit; report the sustainable rate
  compare   print the deltas between two JSON reports: compare old.json new.json
  devices   print the scenario's fleet as a CityPulse devices file
  efficiency  run citypulse (and a baseline) under a QoS 1 flood; report readings per CPU-second and drain time

run 'loadtest <command> -h' for its flags`

// exitSetup is the exit status when a run cannot even start.
const exitSetup = 2

func mainCode(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return exitSetup
	}
	var err error
	code := 0
	switch args[0] {
	case "run":
		code, err = cmdRun(ctx, args[1:], stdout, stderr)
	case "efficiency":
		code, err = cmdEfficiency(ctx, args[1:], stdout, stderr)
	case "find-max":
		code, err = cmdFindMax(ctx, args[1:], stdout, stderr)
	case "compare":
		if len(args) != 3 {
			err = errors.New("usage: loadtest compare old.json new.json")
			break
		}
		var old, cur Report
		if old, err = readReport(args[1]); err == nil {
			if cur, err = readReport(args[2]); err == nil {
				compare(stdout, old, cur)
			}
		}
	case "devices":
		fs := flag.NewFlagSet("devices", flag.ContinueOnError)
		fs.SetOutput(stderr)
		path := fs.String("scenario", "", "scenario file")
		if err = fs.Parse(args[1:]); err == nil {
			var sc Scenario
			if sc, err = LoadScenario(*path); err == nil {
				_, err = stdout.Write(devicesYAML(buildFleet(sc), sc.Fleet.Interval))
			}
		}
	case "-h", "--help", "help":
		fmt.Fprintln(stdout, usage)
	default:
		err = fmt.Errorf("unknown command %q\n%s", args[0], usage)
	}
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stderr, "loadtest:", err)
		}
		return exitSetup
	}
	return code
}

// runFlags are the common knobs; each overrides the scenario when set.
type runFlags struct {
	fs       *flag.FlagSet
	scenario string
	jsonOut  string
	htmlOut  string
	compare  string
	quiet    bool
	verbose  bool
	// cpuprofile profiles the harness itself (is the load generator the bottleneck?)
	cpuprofile string
	// curve, when set, prints the timeline folded into windows this wide;
	// curveCSV saves them
	curve    time.Duration
	curveCSV string
}

func newRunFlags(name string, stderr io.Writer) (*runFlags, func(*Scenario)) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := &runFlags{fs: fs}
	fs.StringVar(&f.scenario, "scenario", "", "scenario YAML (configs/loadtest/*.yaml); defaults apply without one")
	fs.StringVar(&f.jsonOut, "json", "", "write the JSON report here")
	fs.StringVar(&f.htmlOut, "html", "", "write the self-contained HTML report here")
	fs.StringVar(&f.compare, "compare", "", "print the deltas against this earlier JSON report")
	fs.BoolVar(&f.quiet, "quiet", false, "no live progress line")
	fs.BoolVar(&f.verbose, "v", false, "debug logging")
	fs.StringVar(&f.cpuprofile, "cpuprofile", "", "write the harness's own CPU profile here")
	rate := fs.Float64("rate", -1, "target messages/s over the fleet (0 = open loop)")
	dur := fs.Duration("duration", 0, "run length")
	maxMsg := fs.Int64("max-messages", -1, "stop after this many messages")
	proto := fs.String("protocol", "", "mqtt or coap")
	qos := fs.Int("qos", -1, "MQTT QoS (0 or 1)")
	format := fs.String("format", "", "senml-json, senml-cbor or json")
	rpm := fs.Int("readings-per-message", 0, "readings per message")
	conns := fs.Int("connections", -1, "connections (0 = one per device)")
	inflight := fs.Int("in-flight", 0, "unacknowledged messages per connection")
	perKind := fs.Int("per-district", -1, "devices of each kind per district (all kinds)")
	districts := fs.Int("districts", 0, "districts")
	dtls := fs.Bool("dtls", false, "CoAP over DTLS-PSK")
	non := fs.Bool("non", false, "CoAP NON requests instead of CON")
	mqttAddr := fs.String("mqtt", "", "MQTT broker host:port")
	coapAddr := fs.String("coap", "", "CoAP endpoint host:port")
	httpAddr := fs.String("http", "", "CityPulse HTTP API host:port (empty in the scenario: bare broker)")
	webhook := fs.String("webhook", "", "address of the harness's webhook receiver")
	noCheck := fs.Bool("no-check", false, "skip the store check")
	apply := func(sc *Scenario) {
		set := map[string]bool{}
		fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
		if set["rate"] {
			sc.Rate = *rate
		}
		if set["duration"] {
			sc.Duration = *dur
		}
		if set["max-messages"] {
			sc.MaxMessages = *maxMsg
		}
		if *proto != "" {
			sc.Transport.Protocol = *proto
		}
		if set["qos"] {
			sc.Transport.QoS = byte(*qos)
		}
		if *format != "" {
			sc.Format = *format
		}
		if *rpm > 0 {
			sc.ReadingsPerMessage = *rpm
		}
		if set["connections"] {
			sc.Transport.Connections = *conns
		}
		if *inflight > 0 {
			sc.Transport.InFlight = *inflight
		}
		if set["per-district"] {
			for k := range sc.Fleet.PerDistrict {
				sc.Fleet.PerDistrict[k] = *perKind
			}
		}
		if *districts > 0 {
			sc.Fleet.Districts = *districts
		}
		if set["dtls"] {
			sc.Transport.DTLS = *dtls
		}
		if set["non"] {
			sc.Transport.Confirmable = !*non
		}
		if *mqttAddr != "" {
			sc.Target.MQTT = *mqttAddr
		}
		if *coapAddr != "" {
			sc.Target.CoAP = *coapAddr
		}
		if set["http"] {
			sc.Target.HTTP = *httpAddr
		}
		if set["webhook"] {
			sc.Measure.Webhook = *webhook
		}
		if *noCheck {
			sc.Measure.Check = false
		}
		if v := os.Getenv("LOADTEST_ADMIN_TOKEN"); v != "" {
			sc.Target.AdminToken = v
		}
		if v := os.Getenv("LOADTEST_READ_TOKEN"); v != "" {
			sc.Target.ReadToken = v
		}
		if v := os.Getenv("LOADTEST_WEBHOOK_SECRET"); v != "" {
			sc.Measure.WebhookSecret = v
		}
		if sc.Target.HTTP == "" {
			sc.Measure.Check, sc.Target.Provision, sc.Measure.QueryableSample, sc.Fleet.Unique = false, false, 0, false
		}
	}
	return f, apply
}

// writeCurve prints and saves the windowed rate when asked to.
func (f *runFlags) writeCurve(stdout io.Writer, rep Report) error {
	if f.curve == 0 && f.curveCSV == "" {
		return nil
	}
	width := f.curve
	if width == 0 {
		width = 10 * time.Second
	}
	ws := curve(rep.Timeline, width)
	if f.curve != 0 {
		printCurve(stdout, ws)
	}
	if f.curveCSV != "" {
		return writeCurveCSV(f.curveCSV, ws)
	}
	return nil
}

func (f *runFlags) load(args []string, apply func(*Scenario)) (Scenario, error) {
	if err := f.fs.Parse(args); err != nil {
		return Scenario{}, err
	}
	if f.fs.NArg() > 0 {
		return Scenario{}, fmt.Errorf("unexpected arguments %v", f.fs.Args())
	}
	sc, err := LoadScenario(f.scenario)
	if err != nil {
		return sc, err
	}
	apply(&sc)
	if err := sc.Validate(); err != nil {
		return sc, fmt.Errorf("scenario %s:\n%w", sc.Name, err)
	}
	return sc, nil
}

func logger(stderr io.Writer, verbose bool) *slog.Logger {
	lvl := slog.LevelInfo
	if verbose {
		lvl = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
}

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) (int, error) {
	f, apply := newRunFlags("run", stderr)
	f.fs.DurationVar(&f.curve, "curve", 0, "print the rate over the run in windows this wide (e.g. 10s)")
	f.fs.StringVar(&f.curveCSV, "curve-csv", "", "write the windowed rate (--curve, default 10s) as CSV here")
	sc, err := f.load(args, apply)
	if err != nil {
		return exitSetup, err
	}
	if f.cpuprofile != "" {
		pf, err := os.Create(f.cpuprofile)
		if err != nil {
			return exitSetup, err
		}
		defer pf.Close()
		if err := pprof.StartCPUProfile(pf); err != nil {
			return exitSetup, err
		}
		defer pprof.StopCPUProfile()
	}
	var progress io.Writer
	if !f.quiet {
		progress = stderr
	}
	rep, err := execute(ctx, sc, logger(stderr, f.verbose), progress)
	if err != nil {
		return exitSetup, err
	}
	printSummary(stdout, rep)
	if err := f.writeCurve(stdout, rep); err != nil {
		return exitSetup, err
	}
	if f.jsonOut != "" {
		if err := writeJSON(f.jsonOut, rep); err != nil {
			return exitSetup, err
		}
	}
	if f.htmlOut != "" {
		out, err := os.Create(f.htmlOut)
		if err != nil {
			return exitSetup, err
		}
		err = writeHTML(out, rep)
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return exitSetup, err
		}
	}
	if f.compare != "" {
		old, err := readReport(f.compare)
		if err != nil {
			return exitSetup, err
		}
		compare(stdout, old, rep)
	}
	if rep.Verdict != "pass" {
		return 1, nil
	}
	return 0, nil
}

// execute runs one scenario end to end: provision, drive the fleet, probe,
// check the store, collect alerts.
func execute(ctx context.Context, sc Scenario, log *slog.Logger, progress io.Writer) (Report, error) {
	r := newRunner(sc, log)
	r.progress = progress
	var a *api
	var before map[string]float64
	if sc.Target.HTTP != "" {
		a = newAPI(sc.Target)
		if sc.Target.Provision {
			added, existing, err := a.provision(ctx, r.fleet, sc.Fleet.Interval)
			if err != nil {
				return Report{}, err
			}
			log.Info("fleet provisioned", "added", added, "existing", existing)
		}
		var err error
		if before, err = a.rejects(ctx); err != nil {
			log.Warn("cannot read the server's reject counters", "err", err)
		}
	}
	bg, stopBG := context.WithCancel(ctx)
	defer stopBG()
	var bgDone []chan struct{}
	goBG := func(f func(context.Context)) {
		ch := make(chan struct{})
		bgDone = append(bgDone, ch)
		go func() { defer close(ch); f(bg) }()
	}
	if sc.Measure.Webhook != "" {
		rc, err := newReceiver(sc.Measure.Webhook, sc.Measure.WebhookSecret, r.alerts, log)
		if err != nil {
			return Report{}, err
		}
		goBG(func(ctx context.Context) {
			if err := rc.Run(ctx); err != nil {
				log.Error("webhook receiver", "err", err)
			}
		})
	}
	if a != nil && sc.Measure.QueryableSample > 0 {
		for range 4 {
			goBG(func(ctx context.Context) { r.probeLoop(ctx, a) })
		}
	}
	if err := r.Run(ctx); err != nil {
		return Report{}, err
	}
	store := StoreCheck{Examples: []string{}}
	if a != nil && sc.Measure.Check {
		store = r.check(ctx, a)
	}
	// give the alerts of the last incidents until the end of settle
	deadline := r.end.Add(sc.Settle)
	for ctx.Err() == nil && time.Now().Before(deadline) {
		rep := r.alerts.report()
		if rep.Matched == rep.Expected && len(r.probes) == 0 {
			break
		}
		sleepCtx(ctx, 100*time.Millisecond)
	}
	stopBG()
	for _, ch := range bgDone {
		<-ch
	}
	if a != nil && sc.Fleet.Unique {
		if err := a.deprovision(context.WithoutCancel(ctx), r.fleet); err != nil {
			log.Warn("cannot remove the run's devices", "err", err)
		}
	}
	var rejects map[string]int
	if a != nil {
		if after, err := a.rejects(context.WithoutCancel(ctx)); err == nil {
			rejects = map[string]int{}
			for k, v := range after {
				if d := int(v - before[k]); d != 0 {
					rejects[k] = d
				}
			}
		}
	}
	return r.report(store, rejects), nil
}

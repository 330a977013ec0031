package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"gopkg.in/yaml.v3"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/signals"
	"github.com/citypulse/citypulse/sim"
)

// demoOptions are the demo city's own knobs (flags of `citypulse demo`); the
// server under it takes the ordinary config.
type demoOptions struct {
	seed          int64         // 0: a random one (device secrets differ every run)
	firstIncident time.Duration // when the first incident (a burst main) starts
	lasts         time.Duration // how long an incident lasts
}

func (o *demoOptions) register(fs *flag.FlagSet) {
	fs.Int64Var(&o.seed, "seed", 0, "seed of the simulated city (device secrets, places, noise); 0: a random one")
	fs.DurationVar(&o.firstIncident, "first-incident", 75*time.Second, "when the first incident (a burst main) starts")
	fs.DurationVar(&o.lasts, "incident-lasts", 2*time.Minute, "how long an incident lasts; the next starts half as long after it ends")
}

func (o demoOptions) validate() error {
	if o.firstIncident < 0 || o.lasts < 10*time.Second {
		return fmt.Errorf("demo: --first-incident (%v) must be >= 0 and --incident-lasts (%v) at least 10s", o.firstIncident, o.lasts)
	}
	return nil
}

// demo is the server on its config together with a simulated city whose
// devices connect to the embedded MQTT broker with their own credentials, so
// that every reading takes a field device's path: authentication, decoding
// and validation, the journal, the stores, the roll-ups and the rules.
type demo struct {
	s      *server
	spec   sim.Spec
	city   *sim.City
	pub    *mqttFleet
	tokens demoTokens
	tmpDir string // removed by Run when it returns; "" when the data dir is the user's
}

// demoTokens are the HTTP tokens of the three roles.
type demoTokens struct{ Read, Operator, Admin string }

// prepareDemoConfig completes cfg for the demo: the devices file of the
// simulated city in the data dir (a fresh temporary one unless tmp is false)
// and a random token for each role the config leaves without one.
func prepareDemoConfig(cfg *Config, fleet []*sim.Device, tmp bool) (tmpDir string, err error) {
	if tmp {
		if tmpDir, err = os.MkdirTemp("", "citypulse-demo-"); err != nil {
			return "", err
		}
		cfg.DataDir = tmpDir
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return tmpDir, err
	}
	var f devices.File
	for _, d := range fleet {
		f.Devices = append(f.Devices, d.Registration())
	}
	b, err := yaml.Marshal(f)
	if err != nil {
		return tmpDir, err
	}
	cfg.Devices.File = filepath.Join(cfg.DataDir, "demo-devices.yaml")
	head := "# The demo city's devices, written by `citypulse demo` (secrets derived from its seed).\n"
	if err := os.WriteFile(cfg.Devices.File, append([]byte(head), b...), 0o600); err != nil {
		return tmpDir, err
	}
	if cfg.Signals.Enabled && cfg.Signals.File == "" {
		if cfg.Signals.File, err = writeDemoCorridors(cfg.DataDir, fleet); err != nil {
			return tmpDir, err
		}
	}
	for _, t := range []*string{&cfg.HTTP.ReadToken, &cfg.HTTP.OperatorToken, &cfg.HTTP.AdminToken} {
		if *t == "" {
			*t = randomToken()
		}
	}
	return tmpDir, cfg.Validate()
}

// writeDemoCorridors writes the green-wave corridors of the demo city: each
// district's main road, its junctions in order, each distance measured
// between the junctions' locations; it returns the file's path.
func writeDemoCorridors(dir string, fleet []*sim.Device) (string, error) {
	roads := map[string][]*sim.Device{}
	var names []string
	for _, d := range fleet {
		if d.Kind != devices.KindTrafficLight || d.Group == "" || d.Location == nil {
			continue
		}
		if roads[d.Group] == nil {
			names = append(names, d.Group)
		}
		roads[d.Group] = append(roads[d.Group], d)
	}
	var f struct {
		Corridors []signals.Corridor `yaml:"corridors"`
	}
	for _, name := range names {
		js := roads[name]
		slices.SortFunc(js, func(a, b *sim.Device) int { return a.Index - b.Index })
		c := signals.Corridor{Name: name, Speed: 50}
		for i, d := range js {
			st := signals.Stop{Device: d.ID}
			if i > 0 {
				st.Distance = math.Round(metres(*js[i-1].Location, *d.Location))
			}
			c.Junctions = append(c.Junctions, st)
		}
		if len(c.Junctions) >= 2 {
			f.Corridors = append(f.Corridors, c)
		}
	}
	b, err := yaml.Marshal(f)
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "demo-corridors.yaml")
	return path, os.WriteFile(path, append([]byte("# The demo city's corridors, written by `citypulse demo`.\n"), b...), 0o600)
}

// metres is the distance between two nearby points (equirectangular: exact
// enough within a city).
func metres(a, b devices.Location) float64 {
	const r = 6371e3
	lat := (a.Lat + b.Lat) / 2 * math.Pi / 180
	dx := (b.Lon - a.Lon) * math.Pi / 180 * math.Cos(lat) * r
	dy := (b.Lat - a.Lat) * math.Pi / 180 * r
	return math.Hypot(dx, dy)
}

func randomToken() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return "demo-" + hex.EncodeToString(b)
}

// newDemo builds the demo city and the server under it; it starts nothing.
// With tmp, the data go to a temporary directory that Run removes.
func newDemo(cfg Config, o demoOptions, tmp bool, logOut io.Writer) (_ *demo, err error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	if !cfg.Ingest.MQTT.Enabled || cfg.Ingest.MQTT.Addr == "" {
		return nil, errors.New("demo: the simulated devices connect to the embedded MQTT broker: set ingest.mqtt.enabled and ingest.mqtt.addr")
	}
	if o.seed == 0 {
		o.seed = time.Now().UnixNano()
	}
	d := &demo{spec: sim.DemoSpec(o.seed)}
	defer func() {
		if err != nil && d.tmpDir != "" {
			os.RemoveAll(d.tmpDir)
		}
	}()
	// the same spec gives the city the same devices (ids, secrets) as the list
	if d.tmpDir, err = prepareDemoConfig(&cfg, sim.NewFleet(d.spec), tmp); err != nil {
		return nil, err
	}
	d.tokens = demoTokens{Read: cfg.HTTP.ReadToken, Operator: cfg.HTTP.OperatorToken, Admin: cfg.HTTP.AdminToken}
	if d.s, err = newServer(cfg, logOut); err != nil {
		return nil, err
	}
	d.city = sim.NewCity(sim.CityOptions{Spec: d.spec, Incidents: sim.DemoIncidents(o.firstIncident, o.lasts),
		Noise: 0.01, Logger: d.s.log.With("component", "demo-city"), Registerer: d.s.reg})
	d.pub = &mqttFleet{addr: dialable(d.s.mqttAddr, "127.0.0.1"), conns: map[string]*deviceConn{}}
	return d, nil
}

// dialable is a listen address as a client on this machine dials it: local
// (127.0.0.1 or localhost) for an unspecified host (":1883").
func dialable(a net.Addr, local string) string {
	host, port, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = local
	}
	return net.JoinHostPort(host, port)
}

// Run runs the server and the city until ctx is done or the server stops,
// then disconnects the devices and removes a temporary data dir.
func (d *demo) Run(ctx context.Context) error {
	if d.tmpDir != "" {
		defer os.RemoveAll(d.tmpDir)
	}
	cityCtx, stopCity := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		// The broker's socket is bound: devices that connect before it
		// serves wait in its backlog, their reports queued by the client.
		_ = d.city.Run(cityCtx, d.pub, time.Now)
		d.pub.Close()
	})
	err := d.s.Run(ctx)
	stopCity()
	wg.Wait()
	return err
}

// Banner is what the demo prints on start: the dashboard's address, the
// tokens, where the data go and when the incidents come.
func (d *demo) Banner(o demoOptions) string {
	url := "http://" + dialable(d.s.HTTPAddr(), "localhost") + "/"
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nCityPulse demo city: %d simulated devices of all five kinds in %d districts (%s),\n",
		len(d.city.Devices()), len(d.spec.Districts), strings.Join(d.spec.Districts, ", "))
	fmt.Fprintf(&sb, "each an MQTT client of the embedded broker at %s with its own credentials.\n\n", d.pub.addr)
	fmt.Fprintf(&sb, "  dashboard       %s#token=%s\n", url, d.tokens.Operator)
	fmt.Fprintf(&sb, "  read token      %s\n  operator token  %s\n  admin token     %s\n", d.tokens.Read, d.tokens.Operator, d.tokens.Admin)
	fmt.Fprintf(&sb, "  try             curl -H 'Authorization: Bearer %s' '%sapi/v1/alerts'\n", d.tokens.Read, url)
	if d.tmpDir != "" {
		fmt.Fprintf(&sb, "  data            %s (removed on exit; --data-dir DIR keeps it)\n", d.tmpDir)
	} else {
		fmt.Fprintf(&sb, "  data            %s\n", d.s.cfg.DataDir)
	}
	in := sim.DemoIncidents(o.firstIncident, o.lasts)
	fmt.Fprintf(&sb, "  incidents       a burst main at %v, a dark junction at %v, a district power cut at %v,\n"+
		"                  car parks filling up at %v; again every %v, each time in another district\n\n",
		in[0].At, in[1].At, in[2].At, in[3].At, in[0].Every)
	sb.WriteString("Live values show within seconds, the first alert within seconds of the first incident. Stop with Ctrl-C.\n\n")
	return sb.String()
}

// mqttFleet publishes each simulated device's reports on its own MQTT
// connection (username = device id, password = its secret), opened on its
// first report, QoS 1: Publish returns once the broker acknowledged, that is
// once the readings are journaled.
type mqttFleet struct {
	addr  string
	mu    sync.Mutex
	conns map[string]*deviceConn
}

// deviceConn is one device's connection; mu serialises opening it.
type deviceConn struct {
	mu sync.Mutex
	c  paho.Client
}

// client is d's connection, opened (and waited for) on first use; a failed
// attempt is tried again on the device's next report.
func (f *mqttFleet) client(ctx context.Context, d *sim.Device) (paho.Client, error) {
	f.mu.Lock()
	dc, ok := f.conns[d.ID]
	if !ok {
		dc = &deviceConn{}
		f.conns[d.ID] = dc
	}
	f.mu.Unlock()
	dc.mu.Lock()
	defer dc.mu.Unlock()
	if dc.c != nil {
		return dc.c, nil
	}
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + f.addr).
		SetClientID(d.ID).SetUsername(d.ID).SetPassword(d.Secret).
		SetAutoReconnect(true).SetMaxReconnectInterval(5 * time.Second).SetConnectTimeout(10 * time.Second))
	if err := wait(ctx, c.Connect()); err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	dc.c = c
	return c, nil
}

// wait waits for tok, ctx or 30 s, whichever comes first.
func wait(ctx context.Context, tok paho.Token) error {
	t := time.NewTimer(30 * time.Second)
	defer t.Stop()
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return errors.New("no answer from the broker within 30s")
	}
}

// Publish sends one report of d and waits for the broker's PUBACK.
func (f *mqttFleet) Publish(ctx context.Context, d *sim.Device, body []byte) error {
	c, err := f.client(ctx, d)
	if err != nil {
		return err
	}
	return wait(ctx, c.Publish("devices/"+d.ID+"/readings", 1, false, body))
}

// Close disconnects every device, in parallel.
func (f *mqttFleet) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	var wg sync.WaitGroup
	for _, dc := range f.conns {
		dc.mu.Lock()
		if c := dc.c; c != nil {
			wg.Go(func() { c.Disconnect(100) })
		}
		dc.mu.Unlock()
	}
	wg.Wait()
	f.conns = map[string]*deviceConn{}
}

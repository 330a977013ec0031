package sim

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/devices"
)

// Publisher hands one encoded report (SenML JSON) of d to the server and
// returns once the server has it or the error says why not.
type Publisher interface {
	Publish(ctx context.Context, d *Device, body []byte) error
}

// CityOptions configure a City.
type CityOptions struct {
	Spec      Spec
	Incidents []Incident
	// Noise is the relative standard deviation of sensor noise.
	Noise float64
	// InFlight bounds the reports being published at once (default 16).
	InFlight int
	Logger   *slog.Logger
	// Registerer, when set, gets citypulse_demo_reports_total{result}.
	Registerer prometheus.Registerer
}

// City is a fleet reporting at its declared intervals, with incidents on a
// schedule: Due says what is reported at a moment, Run publishes it on a clock.
type City struct {
	o       CityOptions
	fleet   []*Device
	perKind map[devices.Kind]int
	start   time.Time
	next    []time.Time  // each device's next report
	last    []Conditions // the conditions of each device's last report
	active  map[string]bool

	mu        sync.Mutex // guards incidents: Inject may add one while Run runs
	incidents []Incident

	sent, failed atomic.Int64
	reports      *prometheus.CounterVec
}

// Report is one message of a device: every metric at one time.
type Report struct {
	Device   *Device
	At       time.Time
	Readings []Reading
	// Event says the report is due to a change (an incident started or
	// ended for the device), as a device reports an alarm at once, not on
	// its interval; its next report comes an interval later.
	Event bool
}

// NewCity builds the city's fleet; it starts nothing.
func NewCity(o CityOptions) *City {
	if o.InFlight <= 0 {
		o.InFlight = 16
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	c := &City{o: o, fleet: NewFleet(o.Spec), perKind: o.Spec.PerDistrict, active: map[string]bool{},
		incidents: append([]Incident(nil), o.Incidents...),
		reports: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "citypulse_demo_reports_total",
			Help: "Reports of the simulated city handed to the server, by result (published, failed)."}, []string{"result"})}
	if o.Registerer != nil {
		o.Registerer.MustRegister(c.reports)
	}
	return c
}

// Devices is the fleet, in a stable order.
func (c *City) Devices() []*Device { return c.fleet }

// Start sets the start of the run: every device sends its first report within
// its interval or 3 s, whichever is shorter, so the city is live at once.
func (c *City) Start(now time.Time) {
	c.start = now
	rng := rand.New(rand.NewPCG(uint64(c.o.Spec.Seed), 0x57a7))
	c.next = make([]time.Time, len(c.fleet))
	c.last = make([]Conditions, len(c.fleet))
	for i, d := range c.fleet {
		c.next[i] = now.Add(time.Duration(rng.Float64() * float64(min(d.Interval, 3*time.Second))))
	}
}

// Inject adds an incident to the schedule, e.g. one that starts now: its At
// counts from the start of the run.
func (c *City) Inject(in Incident) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.incidents = append(c.incidents, in)
}

// Elapsed is the time since the start of the run at now.
func (c *City) Elapsed(now time.Time) time.Duration { return now.Sub(c.start) }

// schedule is a snapshot of the incidents.
func (c *City) schedule() []Incident {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.incidents[:len(c.incidents):len(c.incidents)]
}

// Conditions are the incidents that hold for d el into the run.
func (c *City) Conditions(d *Device, el time.Duration) Conditions {
	var cond Conditions
	for _, in := range c.schedule() {
		if _, ok := in.Hits(d, el, len(c.o.Spec.Districts), c.perKind[d.Kind]); ok {
			cond.Apply(in.Type)
		}
	}
	return cond
}

// Due returns the reports due at now, in fleet order, and schedules each
// device's next one an interval later (never bursting to catch up). A device
// for which an incident started or ended reports at once (an Event); one
// whose substation tripped sends nothing.
func (c *City) Due(now time.Time) []Report {
	el := now.Sub(c.start)
	var out []Report
	for i, d := range c.fleet {
		cond := c.Conditions(d, el)
		event := cond != c.last[i] && !cond.Trip
		if now.Before(c.next[i]) && !event {
			continue
		}
		if c.next[i] = c.next[i].Add(d.Interval); event || !c.next[i].After(now) {
			c.next[i] = now.Add(d.Interval)
		}
		c.last[i] = cond
		if cond.Trip {
			continue
		}
		rs := make([]Reading, len(d.Metrics))
		for j, m := range d.Metrics {
			rs[j] = Reading{Name: m.Name, TS: now.UnixMilli(), V: d.Value(m, now, c.o.Noise, cond)}
		}
		out = append(out, Report{Device: d, At: now, Readings: rs, Event: event})
	}
	return out
}

// Active names the incident occurrences that hold el into the run, as
// "<type> in <district>" (with the devices hit when it hits a few).
func (c *City) Active(el time.Duration) []string {
	var out []string
	for _, in := range c.schedule() {
		k, di, ok := in.Occurrence(el, len(c.o.Spec.Districts))
		if !ok {
			continue
		}
		s := fmt.Sprintf("%s in %s", in.Type, c.o.Spec.Districts[di])
		if in.Devices > 0 {
			for _, d := range c.fleet {
				if _, hit := in.Hits(d, el, len(c.o.Spec.Districts), c.perKind[d.Kind]); hit {
					s += " " + d.ID
				}
			}
		}
		out = append(out, fmt.Sprintf("%s (#%d)", s, k+1))
	}
	return out
}

// Stats are the reports published and those that failed so far.
func (c *City) Stats() (sent, failed int64) { return c.sent.Load(), c.failed.Load() }

// Run starts the city at clock() and publishes its reports through pub until
// ctx is done; it returns when every publish it started has returned. Failed
// publishes are counted and logged every 10 s (the device's next report comes
// as usual).
func (c *City) Run(ctx context.Context, pub Publisher, clock func() time.Time) error {
	c.Start(clock())
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, c.o.InFlight)
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	var lastErr atomic.Value
	warned, warnedAt := int64(0), c.start
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		now := clock()
		c.noteIncidents(now.Sub(c.start))
		for _, r := range c.Due(now) {
			body, err := Encode("senml-json", r.Readings)
			if err != nil {
				return err
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return nil
			}
			wg.Go(func() {
				defer func() { <-sem }()
				if err := pub.Publish(ctx, r.Device, body); err != nil {
					if ctx.Err() == nil {
						lastErr.Store(fmt.Sprintf("%s: %v", r.Device.ID, err))
						c.failed.Add(1)
						c.reports.WithLabelValues("failed").Inc()
					}
					return
				}
				c.sent.Add(1)
				c.reports.WithLabelValues("published").Inc()
			})
		}
		if f := c.failed.Load(); f > warned && now.Sub(warnedAt) >= 10*time.Second {
			c.o.Logger.Warn("demo city: reports not published", "count", f-warned, "last_error", lastErr.Load())
			warned, warnedAt = f, now
		}
	}
}

// noteIncidents logs the incidents that start and end.
func (c *City) noteIncidents(el time.Duration) {
	now := map[string]bool{}
	for _, a := range c.Active(el) {
		now[a] = true
		if !c.active[a] {
			c.o.Logger.Info("demo city: incident started", "incident", a)
		}
	}
	for a := range c.active {
		if !now[a] {
			c.o.Logger.Info("demo city: incident over", "incident", a)
		}
	}
	c.active = now
}

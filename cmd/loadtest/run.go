package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/sim"
)

// pubMsg is one publish of readings[first:first+n] of dev.
type pubMsg struct {
	dev   *simDevice
	first int
	n     int
	// probe, when set, is the series selector and time of its first reading,
	// polled on the query API once acknowledged (set by the owner goroutine
	// before the publish, read by the ack callback).
	probe   string
	probeTS int64
	// occ holds the incident occurrences (index in the scenario → occurrence)
	// this message's readings belong to; an alert's latency counts from the
	// moment the first such message is handed to the transport.
	occ    map[int]int
	status *atomic.Uint32 // in the device's outcomeLog
}

const (
	msgPending uint32 = iota
	msgAcked
	msgFailed
)

// runner drives one run of a scenario.
type runner struct {
	sc    Scenario
	log   *slog.Logger
	fleet []*simDevice
	dial  dialer
	// progress is where the live progress line goes (nil: none).
	progress io.Writer

	start time.Time
	end   time.Time

	sent, acked, failed, unackedOK  atomic.Int64
	readingsSent, readingsAcked     atomic.Int64
	dupSent, oooSent, lateSent      atomic.Int64
	malformedSent, backfilled       atomic.Int64
	malformedLost                   atomic.Int64
	malformedRefused, probesDropped atomic.Int64
	reconnects                      atomic.Int64
	retransmits, midWaits           atomic.Int64

	errMu  sync.Mutex
	errors map[string]int64

	ack, second Histogram
	queryable   Histogram
	probes      chan probe

	tlMu     sync.Mutex
	timeline []Second

	alerts *alertBook
}

// Second is one second of the run in the timeline.
type Second struct {
	T        int     `json:"t"` // seconds since start
	Messages int64   `json:"messages"`
	Readings int64   `json:"readings"`
	Acked    int64   `json:"acked"`
	Errors   int64   `json:"errors"`
	AckP50   float64 `json:"ack_p50_ms"`
	AckP99   float64 `json:"ack_p99_ms"`
	AckMax   float64 `json:"ack_max_ms"`
}

func newRunner(sc Scenario, log *slog.Logger) *runner {
	if sc.Fleet.Unique {
		sc.Fleet.Prefix += "-" + strconv.FormatInt(time.Now().UnixMilli()%(36*36*36*36*36*36), 36)
	}
	return &runner{sc: sc, log: log, fleet: buildFleet(sc), dial: dialerFor(sc), errors: map[string]int64{},
		probes: make(chan probe, 1024), alerts: newAlertBook()}
}

func (r *runner) countErr(err error) {
	reason := err.Error()
	var ce coapError
	if errors.As(err, &ce) {
		reason = ce.Error()
	}
	if len(reason) > 80 {
		reason = reason[:80]
	}
	r.errMu.Lock()
	r.errors[reason]++
	r.errMu.Unlock()
}

// partition spreads the fleet over the connections: one per device, or
// round-robin over sc.Transport.Connections.
func (r *runner) partition() [][]*simDevice {
	n := r.sc.Transport.Connections
	if n == 0 || n >= len(r.fleet) {
		out := make([][]*simDevice, len(r.fleet))
		for i, d := range r.fleet {
			out[i] = []*simDevice{d}
		}
		return out
	}
	out := make([][]*simDevice, n)
	for i, d := range r.fleet {
		out[i%n] = append(out[i%n], d)
	}
	return out
}

// incidentAt says which incidents hold for dev at el into the run, and the
// occurrence number of each that does.
func (r *runner) incidentAt(dev *simDevice, el time.Duration) (sim.Conditions, map[int]int) {
	var st sim.Conditions
	var occ map[int]int
	for i, in := range r.sc.Incidents {
		k, ok := in.Hits(dev.Device, el, r.sc.Fleet.Districts, r.sc.Fleet.PerDistrict[dev.Kind])
		if !ok {
			continue
		}
		st.Apply(in.Type)
		if occ == nil {
			occ = map[int]int{}
		}
		occ[i] = k
	}
	return st, occ
}

// build generates the next message of dev: ReadingsPerMessage readings,
// cycling over its metrics; a new point (timestamp) starts whenever the
// metrics wrap. Late messages are stamped LateBy in the past.
func (r *runner) build(dev *simDevice, now time.Time, in sim.Conditions, late bool) (*pubMsg, []byte, error) {
	k := r.sc.ReadingsPerMessage
	status, num := dev.outcomes.next()
	m := &pubMsg{dev: dev, first: len(dev.readings), n: k, status: status}
	enc := dev.enc[:0] // scratch of the device's connection goroutine
	var ts int64
	clock := now.Add(dev.skew)
	for i := range k {
		if i == 0 || dev.cursor == 0 {
			if late {
				ts = max(clock.Add(-r.sc.Hostile.LateBy).UnixMilli()/grid*grid+1, dev.lateTS+grid)
				dev.lateTS = ts
			} else {
				ts = max(clock.UnixMilli()/grid*grid, dev.lastTS+grid)
				dev.lastTS = ts
			}
		}
		mi := dev.cursor
		met := dev.Metrics[mi]
		dev.cursor = (mi + 1) % len(dev.Metrics)
		v := dev.Value(met, r.shapeTime(clock), r.sc.Fleet.Noise, in)
		dev.readings = append(dev.readings, sentReading{ts: ts, value: v, metric: uint8(mi), msg: num})
		enc = append(enc, sim.Reading{Name: met.Name, TS: ts, V: v})
		if r.sc.Format == "json" && dev.cursor == 0 {
			break // plain JSON carries one point per message
		}
	}
	m.n = len(enc)
	dev.enc = enc
	body, err := sim.Encode(r.sc.Format, enc)
	return m, body, err
}

// shapeTime is the moment of the daily shapes whose values a device sends at
// t: fleet.time_of_day on the run's first day, plus the time since the start.
func (r *runner) shapeTime(t time.Time) time.Time {
	y, m, d := r.start.Date()
	return time.Date(y, m, d, 0, 0, 0, 0, r.start.Location()).Add(r.sc.Fleet.TimeOfDay + t.Sub(r.start))
}

// publish sends m (or, for a duplicate, sends it again) and records the outcome.
func (r *runner) publish(ctx context.Context, c conn, m *pubMsg, body []byte) {
	t0 := time.Now()
	var noted []string // the incident occurrences m carries (alerts.go)
	for idx, k := range m.occ {
		if key := r.alerts.expect(r.sc.Incidents[idx], idx, k, m.dev, t0); key != "" {
			noted = append(noted, key)
		}
	}
	withdraw := func() {
		for _, key := range noted {
			r.alerts.withdraw(key)
		}
	}
	err := c.send(ctx, m.dev, body, func(acked bool, err error) {
		lat := time.Since(t0)
		switch {
		case err != nil:
			r.failed.Add(1)
			r.countErr(err)
			m.status.CompareAndSwap(msgPending, msgFailed)
			withdraw()
		case acked:
			r.ack.Record(lat)
			r.second.Record(lat)
			if m.status.Swap(msgAcked) != msgAcked {
				r.acked.Add(1)
				r.readingsAcked.Add(int64(m.n))
			}
			if m.probe != "" {
				r.enqueueProbe(m, t0)
			}
		default:
			r.unackedOK.Add(1)
		}
	})
	switch {
	case err == nil:
		r.sent.Add(1)
		r.readingsSent.Add(int64(m.n))
		return
	case ctx.Err() == nil: // not sent, and not because the run ended
		r.failed.Add(1)
		r.countErr(err)
		m.status.CompareAndSwap(msgPending, msgFailed)
	}
	withdraw()
}

// sendMalformed publishes garbage; the server must refuse or count it.
func (r *runner) sendMalformed(ctx context.Context, c conn, dev *simDevice, i int) {
	body, _ := malformed(i)
	err := c.send(ctx, dev, body, func(acked bool, err error) {
		var ce coapError
		switch {
		case errors.As(err, &ce):
			r.malformedRefused.Add(1) // the server answered with an error code
		case err != nil:
			r.malformedLost.Add(1) // no answer (the connection dropped): it may not have arrived
		}
	})
	if err == nil { // handed over (not cut off by the end of the run)
		r.malformedSent.Add(1)
	}
}

// connLoop drives the devices of one connection until ctx ends or the
// message budget is spent.
func (r *runner) connLoop(ctx context.Context, c conn, devs []*simDevice, rate float64, budget *atomic.Int64, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	h := r.sc.Hostile
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(time.Second) / rate)
	}
	next := time.Now().Add(time.Duration(rng.Float64() * float64(interval)))
	stormed := h.ReconnectStormAt <= 0
	type held struct {
		m    *pubMsg
		body []byte
	}
	var swap *held
	backlog := map[*simDevice][]held{}
	for i := 0; ctx.Err() == nil; i++ {
		if interval > 0 {
			next = next.Add(interval)
			if d := time.Until(next); d > 0 {
				sleepCtx(ctx, d)
				if ctx.Err() != nil {
					break
				}
			} else if d < -time.Second {
				next = time.Now() // far behind: do not burst to catch up
			}
		}
		now := time.Now()
		el := now.Sub(r.start)
		if !stormed && el >= h.ReconnectStormAt {
			stormed = true
			r.reconnects.Add(1)
			if err := c.reconnect(ctx); err != nil {
				r.countErr(err)
			}
		}
		dev := devs[i%len(devs)]
		in, occ := r.incidentAt(dev, el)
		if in.Trip {
			continue // a tripped substation's meters are silent
		}
		if budget.Add(-1) < 0 {
			break
		}
		if dev.offline && el >= h.OfflineAt && el < h.OfflineAt+h.OfflineFor {
			m, body, err := r.build(dev, now, in, false)
			if err != nil {
				r.countErr(err)
				continue
			}
			backlog[dev] = append(backlog[dev], held{m, body})
			continue
		}
		if b := backlog[dev]; len(b) > 0 { // back online: backfill first
			delete(backlog, dev)
			for _, x := range b {
				r.backfilled.Add(1)
				r.publish(ctx, c, x.m, x.body)
			}
		}
		if h.Malformed > 0 && rng.Float64() < h.Malformed {
			r.sendMalformed(ctx, c, dev, i)
			continue
		}
		late := h.Late > 0 && rng.Float64() < h.Late
		m, body, err := r.build(dev, now, in, late)
		if err != nil {
			r.countErr(err)
			continue
		}
		if late {
			r.lateSent.Add(1)
		} else {
			if r.sc.Measure.QueryableSample > 0 && rng.Float64() < r.sc.Measure.QueryableSample {
				rd := dev.readings[m.first]
				m.probe = fmt.Sprintf(`%s_%s{device=%q}`, dev.Kind, dev.Metrics[rd.metric].Name, dev.ID)
				m.probeTS = rd.ts
			}
		}
		m.occ = occ
		if swap == nil && h.OutOfOrder > 0 && rng.Float64() < h.OutOfOrder {
			swap = &held{m, body} // sent after the next one
			r.oooSent.Add(1)
			continue
		}
		r.publish(ctx, c, m, body)
		if swap != nil {
			r.publish(ctx, c, swap.m, swap.body)
			swap = nil
		}
		if h.Duplicates > 0 && rng.Float64() < h.Duplicates {
			r.dupSent.Add(1)
			r.publish(ctx, c, m, body)
		}
	}
	// the run ends: what is held still goes out, so that every generated
	// reading has been offered
	if swap != nil {
		r.publish(context.WithoutCancel(ctx), c, swap.m, swap.body)
	}
	for _, b := range backlog {
		for _, x := range b {
			r.backfilled.Add(1)
			r.publish(context.WithoutCancel(ctx), c, x.m, x.body)
		}
	}
}

// tick samples the run once a second for the timeline and the progress line.
func (r *runner) tick(t int, prev *[4]int64) {
	cur := [4]int64{r.sent.Load(), r.readingsSent.Load(), r.acked.Load(), r.failed.Load()}
	s := Second{T: t, Messages: cur[0] - prev[0], Readings: cur[1] - prev[1], Acked: cur[2] - prev[2], Errors: cur[3] - prev[3],
		AckP50: ms(r.second.Quantile(0.5)), AckP99: ms(r.second.Quantile(0.99)), AckMax: ms(r.second.Quantile(1))}
	r.second.Reset()
	*prev = cur
	r.tlMu.Lock()
	r.timeline = append(r.timeline, s)
	r.tlMu.Unlock()
	if r.progress != nil {
		total := r.sc.Duration.Seconds()
		frac := min(1, float64(t)/total)
		bar := int(frac * 30)
		fmt.Fprintf(r.progress, "\r[%-30s] %3.0f%%  %7d msg/s  %8d readings/s  errors %d  ack p99 %.1f ms   ",
			strings.Repeat("=", bar), frac*100, s.Messages, s.Readings, cur[3], s.AckP99)
	}
}

func ms(us int64) float64 { return float64(us) / 1000 }

// Run drives the fleet for the scenario's duration (or message budget) and
// returns when every connection has its outcomes.
func (r *runner) Run(ctx context.Context) error {
	groups := r.partition()
	conns := make([]conn, len(groups))
	// dial in parallel: a thousand sequential DTLS handshakes take long
	// enough for the server to count the first devices silent
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(32)
	for i, devs := range groups {
		g.Go(func() error {
			c, err := r.dial(gctx, r.sc, devs, i)
			conns[i] = c
			return err
		})
	}
	if err := g.Wait(); err != nil {
		for _, c := range conns {
			if c != nil {
				c.close()
			}
		}
		return err
	}
	budget := &atomic.Int64{}
	budget.Store(1 << 62)
	if r.sc.MaxMessages > 0 {
		budget.Store(r.sc.MaxMessages)
	}
	runCtx, cancel := context.WithTimeout(ctx, r.sc.Duration)
	defer cancel()
	r.start = time.Now()
	r.alerts.started(r.start)
	var wg sync.WaitGroup
	for i, g := range groups {
		rate := 0.0
		if r.sc.Rate > 0 {
			rate = r.sc.Rate * float64(len(g)) / float64(len(r.fleet))
		}
		wg.Go(func() {
			r.connLoop(runCtx, conns[i], g, rate, budget, uint64(r.sc.Seed)+uint64(i))
		})
	}
	for i, in := range r.sc.Incidents {
		if in.Type == "substation_trip" && in.Alert != "" {
			wg.Go(func() { r.alerts.scheduleSilence(runCtx, r.start, in, i, r.sc.Fleet.Districts) })
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var prev [4]int64
	for sec := 1; ; sec++ {
		select {
		case <-t.C:
			r.tick(sec, &prev)
			continue
		case <-done:
		}
		break
	}
	for _, c := range conns {
		c.close()
		if rc, ok := c.(*rawCoAPConn); ok {
			r.retransmits.Add(rc.retransmissions())
			r.midWaits.Add(rc.messageIDWaits())
		}
	}
	r.end = time.Now()
	r.alerts.stopped(r.end)
	if r.progress != nil {
		fmt.Fprintln(r.progress)
	}
	return nil
}

// errorList is the counted errors, largest first.
func (r *runner) errorList() []CountedError {
	r.errMu.Lock()
	defer r.errMu.Unlock()
	out := make([]CountedError, 0, len(r.errors))
	for k, v := range r.errors {
		out = append(out, CountedError{Error: k, Count: v})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Count != out[j].Count {
			return out[i].Count > out[j].Count
		}
		return out[i].Error < out[j].Error
	})
	return out
}

// CountedError is one kind of error and how often it happened.
type CountedError struct {
	Error string `json:"error"`
	Count int64  `json:"count"`
}

// kindMetrics lists the kind-metric series names the fleet writes.
func kindMetrics(fleet []*simDevice) map[devices.Kind][]string {
	seen := map[devices.Kind]map[string]bool{}
	for _, d := range fleet {
		if seen[d.Kind] == nil {
			seen[d.Kind] = map[string]bool{}
		}
		for _, m := range d.Metrics {
			seen[d.Kind][m.Name] = true
		}
	}
	out := map[devices.Kind][]string{}
	for k, ms := range seen {
		for m := range ms {
			out[k] = append(out[k], m)
		}
		sort.Strings(out[k])
	}
	return out
}

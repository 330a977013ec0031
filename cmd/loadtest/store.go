package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// api talks to a CityPulse HTTP API: device provisioning, the Prometheus
// query API and /metrics.
type api struct {
	base  string
	read  string
	admin string
	hc    *http.Client
	// digits is how many significant digits the store keeps of a value (0:
	// all, as CityPulse's TSDB; VictoriaMetrics keeps 12).
	digits int
}

func newAPI(t Target) *api {
	return &api{base: "http://" + t.HTTP, read: t.ReadToken, admin: t.AdminToken, hc: &http.Client{Timeout: 60 * time.Second}}
}

func (a *api) do(ctx context.Context, method, path, token string, body io.Reader, ctype string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, a.base+path, body)
	if err != nil {
		return nil, err
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	return a.hc.Do(req)
}

// provision registers the fleet; devices that exist already are left alone.
func (a *api) provision(ctx context.Context, fleet []*simDevice, interval time.Duration) (added, existing int, err error) {
	for _, d := range fleet {
		b, _ := json.Marshal(map[string]string{"id": d.ID, "kind": string(d.Kind), "district": districtName(d.District),
			"interval": interval.String(), "secret": d.Secret})
		resp, err := a.do(ctx, http.MethodPost, "/api/v1/devices", a.admin, bytes.NewReader(b), "application/json")
		if err != nil {
			return added, existing, fmt.Errorf("provision %s: %w", d.ID, err)
		}
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusCreated:
			added++
		case http.StatusConflict:
			existing++
		default:
			return added, existing, fmt.Errorf("provision %s: %s: %s", d.ID, resp.Status, strings.TrimSpace(string(msg)))
		}
	}
	return added, existing, nil
}

// deprovision removes the fleet again, so that its silence after the run
// raises no deadman or fleet alerts and the registry does not grow run by run.
func (a *api) deprovision(ctx context.Context, fleet []*simDevice) error {
	for _, d := range fleet {
		resp, err := a.do(ctx, http.MethodDelete, "/api/v1/devices/"+url.PathEscape(d.ID), a.admin, nil, "")
		if err != nil {
			return fmt.Errorf("remove %s: %w", d.ID, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusNotFound {
			return fmt.Errorf("remove %s: %s", d.ID, resp.Status)
		}
	}
	return nil
}

// sample is one stored sample: unix ms and value.
type sample struct {
	ts int64
	v  float64
}

// query evaluates q at time at with the Prometheus query API (CityPulse's or
// VictoriaMetrics') and decodes the answer's data into data.
func (a *api) query(ctx context.Context, q string, at time.Time, data any) error {
	form := url.Values{"query": {q}, "time": {strconv.FormatFloat(float64(at.UnixMilli())/1000, 'f', 3, 64)}}
	resp, err := a.do(ctx, http.MethodPost, "/api/v1/query", a.read, strings.NewReader(form.Encode()), "application/x-www-form-urlencoded")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	out := struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   any    `json:"data"`
	}{Data: data}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return fmt.Errorf("query %s: %s: %w", q, resp.Status, err)
	}
	if out.Status != "success" {
		return fmt.Errorf("query %s: %s: %s", q, resp.Status, out.Error)
	}
	return nil
}

// rangeQuery evaluates a range-vector selector at time at and returns the raw
// samples per device.
func (a *api) rangeQuery(ctx context.Context, q string, at time.Time) (map[string][]sample, error) {
	var data struct {
		ResultType string `json:"resultType"`
		Result     []struct {
			Metric map[string]string `json:"metric"`
			Values [][2]any          `json:"values"`
		} `json:"result"`
	}
	if err := a.query(ctx, q, at, &data); err != nil {
		return nil, err
	}
	res := map[string][]sample{}
	for _, s := range data.Result {
		dev := s.Metric["device"]
		for _, v := range s.Values {
			t, _ := v[0].(float64)
			str, _ := v[1].(string)
			f, err := strconv.ParseFloat(str, 64)
			if err != nil {
				return nil, fmt.Errorf("query %s: sample value %q: %w", q, str, err)
			}
			res[dev] = append(res[dev], sample{ts: int64(t*1000 + 0.5), v: f})
		}
	}
	return res, nil
}

// sameValue reports whether the store's value got is the value sent, to the
// digits the store keeps.
func (a *api) sameValue(sent, got float64) bool {
	if a.digits == 0 || sent == got {
		return sent == got
	}
	return math.Abs(sent-got) <= math.Abs(sent)*math.Pow(10, float64(1-a.digits))
}

// scrape reads /metrics and calls f with each sample line.
func (a *api) scrape(ctx context.Context, f func(line string)) error {
	resp, err := a.do(ctx, http.MethodGet, "/metrics", a.read, nil, "")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/metrics: %s", resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f(sc.Text())
	}
	return sc.Err()
}

// rejects scrapes citypulse_readings_rejected_total by reason.
func (a *api) rejects(ctx context.Context) (map[string]float64, error) {
	out := map[string]float64{}
	const prefix = `citypulse_readings_rejected_total{reason="`
	err := a.scrape(ctx, func(line string) {
		rest, ok := strings.CutPrefix(line, prefix)
		if !ok {
			return
		}
		reason, val, ok := strings.Cut(rest, `"} `)
		if !ok {
			return
		}
		f, err := strconv.ParseFloat(val, 64)
		if err == nil {
			out[reason] = f
		}
	})
	return out, err
}

// metric scrapes the value of one series of /metrics, written as it appears
// there (name{labels}); absent is 0.
func (a *api) metric(ctx context.Context, series string) (float64, error) {
	var v float64
	var perr error
	err := a.scrape(ctx, func(line string) {
		if val, ok := strings.CutPrefix(line, series+" "); ok {
			v, perr = strconv.ParseFloat(val, 64)
		}
	})
	return v, errors.Join(err, perr)
}

// instant evaluates q at time at and returns the value of its single sample
// (0 when the result is empty).
func (a *api) instant(ctx context.Context, q string, at time.Time) (float64, error) {
	var data struct {
		Result []struct {
			Value [2]any `json:"value"`
		} `json:"result"`
	}
	if err := a.query(ctx, q, at, &data); err != nil {
		return 0, err
	}
	switch len(data.Result) {
	case 0:
		return 0, nil
	case 1:
	default:
		return 0, fmt.Errorf("query %s: %d series, want one", q, len(data.Result))
	}
	str, _ := data.Result[0].Value[1].(string)
	return strconv.ParseFloat(str, 64)
}

// probe is a reading whose arrival in the store the harness times.
type probe struct {
	series string // selector of the device's series
	ts     int64
	sentAt time.Time
}

func (r *runner) enqueueProbe(m *pubMsg, sentAt time.Time) {
	p := probe{series: m.probe, ts: m.probeTS, sentAt: sentAt}
	select {
	case r.probes <- p:
	default:
		r.probesDropped.Add(1)
	}
}

// probeLoop polls the query API for each probe until its reading is visible,
// timing publish -> queryable.
func (r *runner) probeLoop(ctx context.Context, a *api) {
	for {
		var p probe
		select {
		case <-ctx.Done():
			return
		case p = <-r.probes:
		}
		// the 10 ms before the reading (its series holds one point per 4 ms
		// grid step there at most): the answer is a sample or three, not the
		// series' two minutes (issue 13: at 20k requests/s those were
		// thousands of samples decoded every poll)
		at := time.UnixMilli(p.ts)
		q := p.series + "[10ms]"
		deadline := p.sentAt.Add(30 * time.Second)
		for ctx.Err() == nil {
			got, err := a.rangeQuery(ctx, q, at)
			if err == nil && hasSample(got, p.ts) {
				r.queryable.Record(time.Since(p.sentAt))
				break
			}
			if time.Now().After(deadline) {
				r.countErr(fmt.Errorf("probe: reading not queryable within 30s"))
				break
			}
			sleepCtx(ctx, r.sc.Measure.QueryablePoll)
		}
	}
}

func hasSample(got map[string][]sample, ts int64) bool {
	for _, ss := range got {
		for _, s := range ss {
			if s.ts == ts {
				return true
			}
		}
	}
	return false
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// StoreCheck is the verdict on what reached the store.
type StoreCheck struct {
	Checked bool `json:"checked"`
	// Expected are the generated readings; Acked those in an acknowledged message.
	Expected int64 `json:"expected"`
	Acked    int64 `json:"acked"`
	Found    int64 `json:"found"`
	// Lost are acknowledged readings missing from the store: any fails the run.
	Lost int64 `json:"lost"`
	// UnackedMissing are missing readings that were never acknowledged (QoS 0,
	// refused, cut off): not a loss, a measurement.
	UnackedMissing int64 `json:"unacked_missing"`
	UnackedStored  int64 `json:"unacked_stored"`
	// Duplicated are extra samples for one (device, seq); Unexpected are
	// samples no simulated device sent (or with another value).
	Duplicated  int64    `json:"duplicated"`
	Unexpected  int64    `json:"unexpected"`
	Examples    []string `json:"examples"`
	SettledIn   float64  `json:"settled_in_s"`
	Error       string   `json:"error,omitempty"`
	QueriesMade int      `json:"queries"`
}

// sentIndex finds a generated reading by device and (metric, timestamp); it
// is built once per check, not once per settle retry. Per device and metric
// the readings are a slice sorted by timestamp (16 bytes a reading: a 330 s
// run at 20,000 CoAP requests/s generates 66 M readings, too many for maps).
type sentIndex struct {
	byID         map[string]*simDevice
	idx          map[*simDevice][][]sentKey // [metric index], by ts
	minTS, maxTS int64
}

// sentKey is one reading in the index: its timestamp and its position in the
// device's readings.
type sentKey struct {
	ts int64
	i  int
}

func (r *runner) indexSent() sentIndex {
	x := sentIndex{byID: map[string]*simDevice{}, idx: map[*simDevice][][]sentKey{}, minTS: 1 << 62}
	for _, d := range r.fleet {
		x.byID[d.ID] = d
		per := make([][]sentKey, len(d.Metrics))
		n := make([]int, len(d.Metrics))
		for _, rd := range d.readings {
			n[rd.metric]++
		}
		for mi := range per {
			per[mi] = make([]sentKey, 0, n[mi]) // exact: no slack from growing
		}
		for i, rd := range d.readings {
			per[rd.metric] = append(per[rd.metric], sentKey{rd.ts, i})
			x.minTS, x.maxTS = min(x.minTS, rd.ts), max(x.maxTS, rd.ts)
		}
		for _, ks := range per {
			// normal and late readings each come in time order: nearly sorted
			slices.SortFunc(ks, func(a, b sentKey) int { return cmp.Compare(a.ts, b.ts) })
		}
		x.idx[d] = per
	}
	return x
}

// find returns the index in d.readings of d's reading of metric mi at ts.
func (x sentIndex) find(d *simDevice, mi int, ts int64) (int, bool) {
	per := x.idx[d]
	if mi < 0 || mi >= len(per) {
		return 0, false
	}
	j, ok := slices.BinarySearchFunc(per[mi], ts, func(k sentKey, t int64) int { return cmp.Compare(k.ts, t) })
	if !ok {
		return 0, false
	}
	return per[mi][j].i, true
}

// check compares every generated reading with the store, retrying until
// nothing acknowledged is missing or settle runs out.
func (r *runner) check(ctx context.Context, a *api) StoreCheck {
	t0 := time.Now()
	deadline := t0.Add(r.sc.Settle)
	sent := r.indexSent()
	for {
		c := r.checkOnce(ctx, a, sent)
		c.SettledIn = time.Since(t0).Seconds()
		if (c.Error == "" && c.Lost == 0) || time.Now().After(deadline) || ctx.Err() != nil {
			return c
		}
		sleepCtx(ctx, time.Second)
	}
}

func (r *runner) checkOnce(ctx context.Context, a *api, sent sentIndex) StoreCheck {
	c := StoreCheck{Checked: true, Examples: []string{}}
	if sent.maxTS == 0 {
		return c
	}
	at := time.UnixMilli(sent.maxTS + 1000)
	window := time.Duration(sent.maxTS-sent.minTS+2000) * time.Millisecond
	// seen[device][reading index] counts the samples that match it
	seen := map[*simDevice][]uint16{}
	for _, d := range r.fleet {
		seen[d] = make([]uint16, len(d.readings))
	}
	example := func(format string, args ...any) {
		if len(c.Examples) < 10 {
			c.Examples = append(c.Examples, fmt.Sprintf(format, args...))
		}
	}
	for kind, metrics := range kindMetrics(r.fleet) {
		for _, metric := range metrics {
			for d := range r.sc.Fleet.Districts {
				q := fmt.Sprintf(`%s_%s{device=~"%s-.*",district=%q}[%dms]`, kind, metric, r.sc.Fleet.Prefix, districtName(d), window.Milliseconds())
				got, err := a.rangeQuery(ctx, q, at)
				c.QueriesMade++
				if err != nil {
					c.Error = err.Error()
					return c
				}
				for id, samples := range got {
					dev := sent.byID[id]
					if dev == nil {
						c.Unexpected += int64(len(samples))
						example("unexpected series of device %s", id)
						continue
					}
					mi := metricIndex(dev, metric)
					for _, s := range samples {
						i, ok := sent.find(dev, mi, s.ts)
						if !ok {
							c.Unexpected++
							example("unexpected sample %s %s @%d = %g", id, metric, s.ts, s.v)
							continue
						}
						if !a.sameValue(dev.readings[i].value, s.v) {
							c.Unexpected++
							example("sample %s %s @%d = %g, sent %g", id, metric, s.ts, s.v, dev.readings[i].value)
							continue
						}
						seen[dev][i]++
					}
				}
			}
		}
	}
	for _, d := range r.fleet {
		for i, rd := range d.readings {
			c.Expected++
			acked := d.outcomes.load(rd.msg) == msgAcked
			if acked {
				c.Acked++
			}
			n := seen[d][i]
			switch {
			case n > 0:
				c.Found++
				c.Duplicated += int64(n - 1)
				if !acked {
					c.UnackedStored++
				}
			case acked:
				c.Lost++
				example("lost: %s %s @%d (acknowledged)", d.ID, d.Metrics[rd.metric].Name, rd.ts)
			default:
				c.UnackedMissing++
			}
		}
	}
	return c
}

func metricIndex(d *simDevice, name string) int {
	for i, m := range d.Metrics {
		if m.Name == name {
			return i
		}
	}
	return -1
}

// devicesYAML renders the fleet as a CityPulse devices file.
func devicesYAML(fleet []*simDevice, interval time.Duration) []byte {
	var b bytes.Buffer
	b.WriteString("# generated by loadtest devices; secrets derive from the scenario seed\ndevices:\n")
	for _, d := range fleet {
		fmt.Fprintf(&b, "  - {id: %s, kind: %s, district: %s, interval: %s, secret: %q}\n", d.ID, d.Kind, districtName(d.District), interval, d.Secret)
	}
	return b.Bytes()
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/citypulse/citypulse/notifier"
)

// alertBook pairs the incidents the harness injected with the alerts the
// server sent to its webhook receiver.
type alertBook struct {
	mu       sync.Mutex
	expected map[string]*expectation // alert|who|occurrence
	latest   map[string]string       // alert|who -> key of the latest occurrence
	hists    map[string]*Histogram   // per alertname: incident -> webhook
	all      Histogram
	received int64
	firing   int64
	resolved int64
	repeats  int64            // firing notifications for an occurrence already seen
	other    map[string]int64 // firing alerts no injected incident explains, by alertname
	outside  map[string]int64 // the same, received outside the run (see outsideGrace)
	start    time.Time        // the fleet started sending (zero: not yet)
	end      time.Time        // the fleet stopped sending (zero: not yet)
	badSig   int64
}

// outsideGrace: an unexplained alert received before start+outsideGrace or
// after end+outsideGrace is put down to a fleet that was not sending, not
// counted as a false alarm of the run: silence rules fire for this fleet
// once the run's end made it silent (factor × interval later, 3 s in the
// smoke scenario), or for an earlier run's fleet on the same server, whose
// notifications the server may still be retrying (up to its retry_max, 1 s
// in the tests) when this run's receiver opens.
const outsideGrace = time.Second

// expectation is one incident occurrence the server owes an alert for, as
// long as one of the messages that carried it may have reached the server:
// refs counts those messages, less the ones that were never sent or failed.
type expectation struct {
	at      time.Time
	matched bool
	refs    int
}

// owed reports whether the expectation counts in the report.
func (e *expectation) owed() bool { return e.matched || e.refs > 0 }

func newAlertBook() *alertBook {
	return &alertBook{expected: map[string]*expectation{}, latest: map[string]string{}, hists: map[string]*Histogram{},
		other: map[string]int64{}, outside: map[string]int64{}}
}

// started records that the fleet started sending at t.
func (b *alertBook) started(t time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.start = t
}

// stopped records that the fleet stopped sending at t.
func (b *alertBook) stopped(t time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.end = t
}

// outsideRun reports whether t is outside the run, with outsideGrace. The
// caller holds b.mu.
func (b *alertBook) outsideRun(t time.Time) bool {
	return b.start.IsZero() || t.Before(b.start.Add(outsideGrace)) || (!b.end.IsZero() && t.After(b.end.Add(outsideGrace)))
}

// note books a message (or a silence) carrying occurrence occ of alert for
// who, sent at at, and returns its key for withdraw. The latency counts from
// the first message that may have reached the server.
func (b *alertBook) note(alert, who string, occ int, at time.Time) string {
	key := fmt.Sprintf("%s|%s|%d", alert, who, occ)
	b.mu.Lock()
	defer b.mu.Unlock()
	e := b.expected[key]
	if e == nil {
		e = &expectation{at: at}
		b.expected[key] = e
		b.latest[alert+"|"+who] = key
	} else if !e.owed() {
		e.at = at // the messages before this one never arrived
	}
	e.refs++
	return key
}

// withdraw takes back a message noted under key that was never sent (the
// run ended first) or that failed: the server owes no alert for a reading it
// did not take, unless another message of the occurrence reached it.
func (b *alertBook) withdraw(key string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.expected[key]; e != nil && e.refs > 0 {
		e.refs--
	}
}

// expect books a message carrying an incident reading of occurrence k for
// dev (see note) and returns its key ("": the incident raises no alert).
// Per-device alerts match the device, district alerts (fleet rules,
// roll-ups) the district.
func (b *alertBook) expect(in Incident, idx, k int, dev *simDevice, at time.Time) string {
	if in.Alert == "" {
		return ""
	}
	who := "device=" + dev.ID
	if in.Per == "district" {
		who = "district=" + districtName(dev.District)
	}
	return b.note(in.Alert, who, idx*1_000_000+k, at)
}

// scheduleSilence records substation trips as they start: the devices go
// silent, so there is no reading to time the alert from.
func (b *alertBook) scheduleSilence(ctx context.Context, start time.Time, in Incident, idx, districts int) {
	for k := 0; ; k++ {
		at := start.Add(in.At + time.Duration(k)*in.Every)
		t := time.NewTimer(time.Until(at))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		b.note(in.Alert, "district="+districtName(k%districts), idx*1_000_000+k, at)
		if in.Every == 0 {
			return
		}
	}
}

// webhookMessage is the part of an Alertmanager v4 webhook the harness reads.
type webhookMessage struct {
	Alerts []struct {
		Status string            `json:"status"`
		Labels map[string]string `json:"labels"`
	} `json:"alerts"`
}

// receive books one webhook arriving at t.
func (b *alertBook) receive(msg webhookMessage, t time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.received++
	for _, a := range msg.Alerts {
		if a.Status != "firing" {
			b.resolved++
			continue
		}
		b.firing++
		name := a.Labels["alertname"]
		key, ok := b.latest[name+"|district="+a.Labels["district"]]
		if dev := a.Labels["device"]; dev != "" {
			key, ok = b.latest[name+"|device="+dev]
		}
		e := b.expected[key]
		switch {
		case (!ok || e == nil) && b.outsideRun(t):
			b.outside[name]++
		case !ok || e == nil:
			b.other[name]++
		case e.matched:
			b.repeats++
		default:
			e.matched = true
			lat := t.Sub(e.at)
			h := b.hists[name]
			if h == nil {
				h = &Histogram{}
				b.hists[name] = h
			}
			h.Record(lat)
			b.all.Record(lat)
		}
	}
}

// AlertReport is what the receiver saw.
type AlertReport struct {
	Webhooks     int64              `json:"webhooks"`
	Firing       int64              `json:"firing"`
	Resolved     int64              `json:"resolved"`
	Matched      int64              `json:"matched"`
	Expected     int64              `json:"expected"`
	Repeats      int64              `json:"repeats"`
	Unexplained  map[string]int64   `json:"unexplained"`
	OutsideRun   map[string]int64   `json:"outside_run"` // unexplained, but received while the fleet was not sending
	BadSignature int64              `json:"bad_signature"`
	Latency      Summary            `json:"latency"`
	ByAlert      map[string]Summary `json:"by_alert"`
}

func (b *alertBook) report() AlertReport {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := AlertReport{Webhooks: b.received, Firing: b.firing, Resolved: b.resolved, Repeats: b.repeats,
		Unexplained: maps.Clone(b.other), OutsideRun: maps.Clone(b.outside), BadSignature: b.badSig, Latency: b.all.Summary(), ByAlert: map[string]Summary{}}
	for _, e := range b.expected {
		if !e.owed() {
			continue
		}
		r.Expected++
		if e.matched {
			r.Matched++
		}
	}
	for name, h := range b.hists {
		r.ByAlert[name] = h.Summary()
	}
	return r
}

// receiver is the harness's signed-webhook endpoint.
type receiver struct {
	book   *alertBook
	secret string
	log    *slog.Logger
	srv    *http.Server
	ln     net.Listener
}

func newReceiver(addr, secret string, book *alertBook, log *slog.Logger) (*receiver, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("webhook receiver: %w", err)
	}
	rc := &receiver{book: book, secret: secret, log: log, ln: ln}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /hook", rc.hook)
	rc.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return rc, nil
}

func (rc *receiver) hook(w http.ResponseWriter, r *http.Request) {
	at := time.Now()
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if err := notifier.VerifySignature(rc.secret, r.Header.Get("X-CityPulse-Signature"), body, at, 5*time.Minute); err != nil {
		rc.book.mu.Lock()
		rc.book.badSig++
		rc.book.mu.Unlock()
		rc.log.Warn("webhook with a bad signature", "err", err)
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	var msg webhookMessage
	if err := json.Unmarshal(body, &msg); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	rc.book.receive(msg, at)
	w.WriteHeader(http.StatusOK)
}

// Run serves until ctx ends.
func (rc *receiver) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- rc.srv.Serve(rc.ln) }()
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = rc.srv.Shutdown(sctx)
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

package notifier

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/citypulse/citypulse/internal/backoff"
)

// deliverLoop delivers one receiver's notifications, up to
// deliveriesPerReceiver at once, until ctx is done; what is undelivered then
// stays on disk for the next start.
func (o *Outbox) deliverLoop(ctx context.Context, r ReceiverConfig, q *rqueue) {
	slots := make(chan struct{}, deliveriesPerReceiver)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		p := q.next()
		for p == nil {
			select {
			case <-ctx.Done():
				return
			case <-q.wake:
			}
			p = q.next()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if o.deliver(ctx, r, p) {
				o.finished(p.e.Event)
			}
			q.done(p)
			<-slots
		}()
	}
}

// deliver sends one notification until it is delivered, refused (4xx), too
// old (max_age) or ctx is done, retrying with exponential backoff and jitter.
// It reports whether the receiver is done with it (delivered or dead).
func (o *Outbox) deliver(ctx context.Context, r ReceiverConfig, p *pending) bool {
	b := backoff.Backoff{Min: o.cfg.RetryMin, Max: o.cfg.RetryMax}
	e := p.e
	first := e.Attempts == 0
	if !p.queued.IsZero() {
		o.m.stages.WithLabelValues(stageWait).Observe(o.now().Sub(p.queued).Seconds())
	}
	for {
		e.Attempts++
		start := o.now()
		status, err := o.send(ctx, r, e.Event)
		switch {
		case err == nil && status/100 == 2:
			if first {
				o.m.stages.WithLabelValues(stageHTTP).Observe(o.now().Sub(start).Seconds())
			}
			o.m.deliveries.WithLabelValues("ok").Inc()
			o.m.latency.Observe(o.now().Sub(e.Event.At).Seconds())
			_ = os.Remove(p.path)
			o.observe(r, e, resultDelivered)
			return true
		case err == nil && status/100 == 4 && status != http.StatusTooManyRequests && status != http.StatusRequestTimeout:
			o.m.deliveries.WithLabelValues("rejected").Inc()
			e.LastErr = fmt.Sprintf("HTTP %d (not retried)", status)
			o.log.Error("notify: receiver refused a notification; it is kept in the dead letters", "receiver", r.Name, "status", status, "alert", e.Event.Labels["alertname"])
			o.moveDead(r, p.path, e)
			o.observe(r, e, resultRefused)
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		first = false
		o.m.deliveries.WithLabelValues("retry").Inc()
		if err != nil {
			e.LastErr = err.Error()
		} else {
			e.LastErr = "HTTP " + strconv.Itoa(status)
		}
		if o.now().Sub(e.Queued) > o.cfg.MaxAge {
			o.log.Error("notify: undelivered for longer than rules.notify.max_age; moved to the dead letters", "receiver", r.Name, "err", e.LastErr)
			o.moveDead(r, p.path, e)
			o.observe(r, e, resultDead)
			return true
		}
		o.observe(r, e, resultRetrying)
		_ = o.write(p.path, e) // keep the attempt count and error for the API
		wait := b.Next()
		o.log.Warn("notify: delivery failed; retrying", "receiver", r.Name, "attempt", e.Attempts, "err", e.LastErr, "backoff", wait)
		if !backoff.Sleep(ctx, wait) {
			return false
		}
	}
}

// Delivery results (Delivery.Result).
const (
	resultDelivered = "delivered"
	resultRetrying  = "retrying"
	resultRefused   = "refused"
	resultDead      = "dead"
)

// observe tells the observer how an attempt went.
func (o *Outbox) observe(r ReceiverConfig, e Entry, result string) {
	if o.obs == nil {
		return
	}
	d := Delivery{Receiver: r.Name, Event: e.Event, Result: result, Attempts: e.Attempts, At: o.now()}
	if result != resultDelivered {
		d.Err = e.LastErr
	}
	o.obs.Delivered(d)
}

// send delivers one event to one receiver and returns the HTTP status.
func (o *Outbox) send(ctx context.Context, r ReceiverConfig, ev Event) (int, error) {
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	target, body, err := encode(r, ev, o.cfg.ExternalURL)
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "CityPulse")
	req.Header.Set("Idempotency-Key", ev.Key)
	if r.Secret != "" {
		req.Header.Set("X-CityPulse-Signature", Signature(r.Secret, o.now(), body))
	}
	resp, err := o.client.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	return resp.StatusCode, nil
}

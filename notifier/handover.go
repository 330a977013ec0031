package notifier

import (
	"os"
	"slices"
)

// In cluster mode a notification belongs to the partition of its alert, and
// is sent by that partition's owner only. The cluster keeps the pending ones
// with the partition's state and needs two things of the outbox: to hear when
// every receiver is done with an event (OnDone: then it forgets it), and to
// forget a partition's events when the partition moves to another node
// (Forget: the new owner sends them; the Idempotency-Key makes a repeat of one
// already sent harmless).

// OnDone sets f to be called once every receiver is done with an event
// (delivered, or moved to the dead letters), from a delivery goroutine. Set
// it before Run; nil for none.
func (o *Outbox) OnDone(f func(ev Event)) {
	o.mu.Lock()
	o.done = f
	if o.remaining == nil {
		o.remaining = map[string]int{}
	}
	o.mu.Unlock()
}

// expect counts one more receiver entry of ev (the caller holds o.mu).
func (o *Outbox) expect(ev Event) {
	if o.remaining != nil {
		o.remaining[ev.Key]++
	}
}

// finished records that one receiver is done with ev, and calls the OnDone
// function when it was the last.
func (o *Outbox) finished(ev Event) {
	o.mu.Lock()
	f := o.done
	last := false
	if n, ok := o.remaining[ev.Key]; ok {
		if n <= 1 {
			delete(o.remaining, ev.Key)
			last = true
		} else {
			o.remaining[ev.Key] = n - 1
		}
	}
	o.mu.Unlock()
	if last && f != nil {
		f(ev)
	}
}

// Forget drops the events match picks that are queued or waiting for a
// receiver (a delivery in flight finishes), and removes their files; it
// returns how many receiver entries it dropped. OnDone is not called for them.
func (o *Outbox) Forget(match func(ev Event) bool) int {
	n := 0
	o.mu.Lock()
	o.queue = slices.DeleteFunc(o.queue, func(qe queued) bool {
		if match(qe.ev) {
			n++
			return true
		}
		return false
	})
	o.mu.Unlock()
	for _, q := range o.queues {
		q.mu.Lock()
		var gone []*pending
		q.items = slices.DeleteFunc(q.items, func(p *pending) bool {
			if match(p.e.Event) {
				gone = append(gone, p)
				return true
			}
			return false
		})
		q.mu.Unlock()
		for _, p := range gone {
			_ = os.Remove(p.path)
			o.mu.Lock()
			if c, ok := o.remaining[p.e.Event.Key]; ok {
				if c <= 1 {
					delete(o.remaining, p.e.Event.Key)
				} else {
					o.remaining[p.e.Event.Key] = c - 1
				}
			}
			o.mu.Unlock()
			n++
		}
	}
	return n
}

package notifier

import "time"

// Event kinds: what happened to the alert (package rules raises them, under
// the same names).
const (
	KindFiring   = "firing"
	KindResolved = "resolved"
	KindRepeat   = "repeat"   // still firing, re-notified
	KindFlapping = "flapping" // too many transitions: one notice instead of a storm
)

// Event is one notification: an alert and what happened to it.
type Event struct {
	Kind        string            `json:"kind"` // KindFiring, KindResolved, KindRepeat, KindFlapping
	At          time.Time         `json:"at"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	StartsAt    time.Time         `json:"starts_at"`
	// ActiveAt is when the alert went pending (before it fired, or at once).
	ActiveAt    time.Time `json:"active_at,omitzero"`
	EndsAt      time.Time `json:"ends_at"` // set when resolved
	Fingerprint string    `json:"fingerprint"`
	// Key identifies the (alert, transition): the receiver's idempotency key.
	Key string `json:"key"`
}

func (ev Event) status() string {
	if ev.Kind == KindResolved {
		return "resolved"
	}
	return "firing"
}

// Delivery is how one attempt to deliver an event to one receiver went.
type Delivery struct {
	Receiver string
	Event    Event
	Result   string // "delivered", "retrying", "refused" (4xx) or "dead" (too old)
	Attempts int
	Err      string
	At       time.Time
}

// DeliveryObserver learns how deliveries go (the alert history); it must not
// block (the delivery workers call it).
type DeliveryObserver interface {
	Delivered(d Delivery)
}

package notifier

import (
	"context"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// OnDone is called once per event, when the last receiver has it: one
// receiver answers 500 twice first, so the two receivers finish apart.
func TestOnDoneOnceEveryReceiverHasTheEvent(t *testing.T) {
	r0, r1 := newReceiver(t), newReceiver(t)
	r1.fail.Store(2)
	o, err := NewOutbox(testNotify(r0, r1), t.TempDir(), OutboxOptions{})
	require.NoError(t, err)
	var mu sync.Mutex
	var done []string
	o.OnDone(func(ev Event) {
		mu.Lock()
		done = append(done, ev.Key)
		mu.Unlock()
	})
	stop := runOutbox(t, o)
	defer stop()
	o.Enqueue(event(KindFiring))
	waitUntil(t, "both receivers have it", func() bool { return r0.count() == 1 && r1.count() == 1 })
	waitUntil(t, "OnDone", func() bool { mu.Lock(); defer mu.Unlock(); return len(done) == 1 })
	require.Equal(t, []string{"fp-pipe-0042-firing"}, done)
	require.Equal(t, 3, int(r1.requests.Load()), "OnDone waited for r1's third attempt")
}

// Forget drops the events it picks from the receivers' queues and from disk;
// the others are delivered.
func TestForgetDropsAPartitionsEvents(t *testing.T) {
	rcv := newReceiver(t)
	rcv.fail.Store(1 << 30) // nothing gets through while the events are queued
	dir := t.TempDir()
	o, err := NewOutbox(testNotify(rcv), dir, OutboxOptions{})
	require.NoError(t, err)
	var mu sync.Mutex
	var done []string
	o.OnDone(func(ev Event) { mu.Lock(); done = append(done, ev.Key); mu.Unlock() })
	stop := runOutbox(t, o)
	defer stop()
	a, b := event(KindFiring), event(KindFiring)
	b.Key, b.Fingerprint = "fp-pipe-0043-firing", "fp-pipe-0043"
	c := event(KindResolved) // a's alert: waits behind a's delivery in flight
	o.Enqueue(a)
	o.Enqueue(b)
	o.Enqueue(c)
	files := func() int { m, _ := filepath.Glob(filepath.Join(dir, "pending", "r0", "*.json")); return len(m) }
	waitUntil(t, "three pending files", func() bool { return files() == 3 })
	waitUntil(t, "two deliveries in flight", func() bool { return rcv.requests.Load() >= 2 })
	q := o.queues["r0"]
	waitUntil(t, "c queued", func() bool { q.mu.Lock(); defer q.mu.Unlock(); return len(q.items) == 1 })
	// c waits in the queue (a is in flight): forgotten; a and b are in flight: not.
	require.Equal(t, 1, o.Forget(func(ev Event) bool { return ev.Fingerprint == "fp-pipe-0042" }))
	require.Equal(t, 2, files())
	rcv.fail.Store(0)
	waitUntil(t, "a and b delivered", func() bool { return rcv.count() == 2 })
	waitUntil(t, "OnDone for a and b", func() bool { mu.Lock(); defer mu.Unlock(); return len(done) == 2 })
	require.ElementsMatch(t, []string{a.Key, b.Key}, done)
	require.Zero(t, files())
}

func runOutbox(t *testing.T, o *Outbox) func() {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- o.Run(ctx) }()
	return func() { cancel(); require.NoError(t, <-done) }
}

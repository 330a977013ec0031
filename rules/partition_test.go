package rules

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/pipeline"
)

// memJournal keeps the recorded transitions in memory, as the cluster's
// state log would in JetStream.
type memJournal struct {
	mu   sync.Mutex
	recs []JournalRecord
}

func (j *memJournal) Record(_ context.Context, recs []JournalRecord) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.recs = append(j.recs, recs...)
	return nil
}

func (j *memJournal) states(owner string) [][]byte {
	j.mu.Lock()
	defer j.mu.Unlock()
	var out [][]byte
	for _, r := range j.recs {
		if r.Owner == owner {
			out = append(out, r.State)
		}
	}
	return out
}

// pressure is pipe-0001's pressure reading measured and received at t0+at.
func pressure(dev string, v float64, at time.Duration) []pipeline.Reading {
	return []pipeline.Reading{reading(dev, "pipe", "gulou", "pressure", v, t0.Add(at))}
}

// A burst main fires on node A; A dies after the transition was journaled;
// node B imports the partition's state (no snapshot, the journal only) and
// resolves the alert once, without firing it again, even when the reading
// that raised it is delivered to B again.
func TestPartitionStateMovesWithTheAlert(t *testing.T) {
	rule := "{name: burst_main, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 60s}"
	j := &memJournal{}
	recA := &recorder{}
	a := NewEngine(Default(), []*Rule{mustRule(t, rule)}, EngineOptions{Shards: 2, Notifier: recA, Journal: j})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	for i := 0; i <= 10; i++ {
		v := 400.0
		if i == 10 {
			v = 300
		}
		a.Observe(a.shardOf("pipe-0001"), pressure("pipe-0001", v, time.Duration(i)*10*time.Second))
		a.Observe(a.shardOf("pipe-0002"), pressure("pipe-0002", 400, time.Duration(i)*10*time.Second))
	}
	fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
	defer fcancel()
	require.NoError(t, a.Flush(fctx))
	require.Equal(t, []string{"burst_main:firing"}, recA.kinds())
	cancel() // A is gone
	require.NoError(t, <-done)

	recB := &recorder{}
	b := NewEngine(Default(), []*Rule{mustRule(t, rule)}, EngineOptions{Shards: 3, Notifier: recB})
	n, err := b.ImportState(nil, j.states("pipe-0001"))
	require.NoError(t, err)
	require.Equal(t, 1, n)
	for i := 10; i <= 17; i++ { // 100 s again (redelivered), then on
		b.Observe(b.shardOf("pipe-0001"), pressure("pipe-0001", 300, time.Duration(i)*10*time.Second))
	}
	require.Equal(t, []string{"burst_main:resolved"}, recB.kinds())
}

// An export holds the selected owners' alerts and last-seen times only; an
// import of it restores them; DropState forgets them.
func TestExportImportDropBySelector(t *testing.T) {
	rule := "{name: low, type: threshold, select: {kind: pipe, metric: pressure}, below: 150}"
	a := NewEngine(Default(), []*Rule{mustRule(t, rule)}, EngineOptions{Shards: 4, Notifier: &recorder{}})
	for _, d := range []string{"pipe-1", "pipe-2", "pipe-3"} {
		a.Observe(a.shardOf(d), pressure(d, 100, 0))
	}
	require.Equal(t, 3, a.count(Firing))
	sel := func(owner string) bool { return owner == "pipe-1" || owner == "pipe-3" }
	snap, err := a.ExportState(sel)
	require.NoError(t, err)

	b := NewEngine(Default(), []*Rule{mustRule(t, rule)}, EngineOptions{Shards: 2, Notifier: &recorder{}})
	n, err := b.ImportState(snap, nil)
	require.NoError(t, err)
	require.Equal(t, 2, n)
	require.Equal(t, 2, b.count(Firing))
	_, seen := b.shardFor("pipe-3").lastSeen["pipe-3"]
	require.True(t, seen)

	require.Equal(t, 2, a.DropState(sel))
	require.Equal(t, 1, a.count(Firing))
	_, seen = a.shardFor("pipe-1").lastSeen["pipe-1"]
	require.False(t, seen)

	_, err = b.ImportState(nil, [][]byte{[]byte("{torn")})
	require.Error(t, err)
}

// With an ownership predicate, deadman rules judge only owned devices; nil
// owns every device (one machine).
func TestDeadmanJudgesOwnedDevicesOnly(t *testing.T) {
	rule := "{name: silent, type: deadman, select: {kind: pipe}, factor: 2}"
	list := fixedDevices{
		{ID: "pipe-1", Kind: "pipe", District: "gulou", Interval: 10 * time.Second},
		{ID: "pipe-2", Kind: "pipe", District: "gulou", Interval: 10 * time.Second},
	}
	for _, tc := range []struct {
		name string
		owns func(string) bool
		want int
	}{
		{"without a predicate every silent device fires", nil, 2},
		{"with one only the owned device fires", func(d string) bool { return d == "pipe-2" }, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			e := NewEngine(Default(), []*Rule{mustRule(t, rule)}, EngineOptions{Shards: 2, Notifier: rec, Devices: list})
			e.SetOwns(tc.owns)
			e.started = t0
			e.Tick(t0.Add(time.Minute))
			require.Len(t, rec.kinds(), tc.want)
		})
	}
}

type fixedDevices []devices.Device

func (f fixedDevices) List() []devices.Device { return f }

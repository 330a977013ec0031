package rules

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/citypulse/citypulse/notifier"
)

// Cluster mode moves a partition of the devices from one node to another. The
// engine does not know partitions: it is told which alert owners (devices,
// and districts for district-wide alerts) it owns by a predicate, and it
// exports, imports and forgets the state of the owners a selector picks.

// Journal records transitions durably before they are notified: in cluster
// mode, a log in JetStream that the next owner of a partition replays. Record
// is called from Run (never from a shard loop), in transition order.
type Journal interface {
	Record(ctx context.Context, recs []JournalRecord) error
}

// JournalRecord is one transition: whose alert it is (a device, or the
// district of a district alert), the alert's state right after it in the
// transition-log encoding (ImportState reads it back), and its notification.
type JournalRecord struct {
	Owner string
	State []byte
	Event notifier.Event
}

// journalTimeout bounds one Record call; on an error the transitions are
// notified all the same (as when the local transition log cannot be written).
const journalTimeout = 10 * time.Second

// SetOwns tells the engine which owners it judges: deadman rules only owned
// devices on the tick, FleetCounts only owned devices, and JudgeFleet only
// when FleetOwner is owned. A predicate also means cluster mode: the tick
// judges no fleet rule (a node knows a sample of each district only), the
// elected node does with JudgeFleet. nil (the default) owns everything:
// one-machine mode. Readings are evaluated whatever the predicate says (a
// node is only given its own partitions' readings).
func (e *Engine) SetOwns(owns func(owner string) bool) {
	if owns == nil {
		e.owns.Store(nil)
		return
	}
	e.owns.Store(&owns)
}

// owned reports whether the engine judges owner on the tick.
func (e *Engine) owned(owner string) bool {
	f := e.owns.Load()
	return f == nil || (*f)(owner)
}

// ownerOf is whose alert k is: its device, or FleetOwner for the district
// alerts of fleet rules.
func ownerOf(k alertKey) string {
	if k.Device != "" {
		return k.Device
	}
	return FleetOwner
}

// ExportState encodes the alerts whose owner sel picks, and when those
// devices were last seen, in the snapshot's encoding (rules-state.json).
func (e *Engine) ExportState(sel func(owner string) bool) ([]byte, error) {
	f := stateFile{Alerts: []persisted{}, LastSeen: map[string]time.Time{}}
	for _, s := range e.shards {
		s.mu.Lock()
		for _, a := range s.alerts {
			if sel(ownerOf(a.key)) {
				f.Alerts = append(f.Alerts, persisted{Key: a.key, State: a.state.clone()})
			}
		}
		for d, t := range s.lastSeen {
			if sel(d) {
				f.LastSeen[d] = t
			}
		}
		s.mu.Unlock()
	}
	return json.Marshal(f)
}

// ImportState restores an export (nil: none) and then the transitions
// recorded since, in order (JournalRecord.State). It replaces the alerts it
// names and returns how many records it applied (alerts of the snapshot and
// transitions); a transition that does not parse is an error (nothing after
// it is applied).
func (e *Engine) ImportState(snapshot []byte, transitions [][]byte) (int, error) {
	n := 0
	if len(snapshot) > 0 {
		var f stateFile
		if err := json.Unmarshal(snapshot, &f); err != nil {
			return 0, fmt.Errorf("import alert state: %w", err)
		}
		e.apply(f)
		n = len(f.Alerts)
	}
	for i, b := range transitions {
		var rec logRecord
		if err := json.Unmarshal(b, &rec); err != nil || rec.Key.Rule == "" {
			return n, fmt.Errorf("import alert state: transition %d of %d does not parse: %v", i+1, len(transitions), err)
		}
		e.putAlert(rec.Key, rec.State)
		n++
	}
	return n, nil
}

// DropState forgets the alerts and last-seen times of the owners sel picks
// (a partition handed to another node); it returns the alerts dropped.
func (e *Engine) DropState(sel func(owner string) bool) int {
	n := 0
	for _, s := range e.shards {
		s.mu.Lock()
		for k := range s.alerts {
			if sel(ownerOf(k)) {
				delete(s.alerts, k)
				n++
			}
		}
		for d := range s.lastSeen {
			if sel(d) {
				delete(s.lastSeen, d)
			}
		}
		s.ver++
		s.mu.Unlock()
	}
	return n
}

// Flush waits until every transition raised before the call is recorded (in
// the transition log and the journal) and handed to the notifier, or ctx is
// done. Cluster mode calls it before acknowledging a batch of readings: a
// batch acknowledged is never delivered again, so the transitions it caused
// must be in the journal first. Run must be running (it records).
func (e *Engine) Flush(ctx context.Context) error {
	if e.statePath == "" && e.journal == nil {
		return nil // notified at once
	}
	target := e.seq.Load()
	for {
		e.flushMu.Lock()
		ch := e.flushed
		e.flushMu.Unlock()
		if e.logged.Load() >= target {
			return nil
		}
		select {
		case e.saveSoon <- struct{}{}:
		default:
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("flush alert transitions: %w", ctx.Err())
		}
	}
}

// markLogged records that the transitions up to seq are logged and wakes the
// Flush calls.
func (e *Engine) markLogged(seq uint64) {
	e.logged.Store(seq)
	e.flushMu.Lock()
	close(e.flushed)
	e.flushed = make(chan struct{})
	e.flushMu.Unlock()
}

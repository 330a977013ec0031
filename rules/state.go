package rules

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/citypulse/citypulse/internal/durable"
	"github.com/citypulse/citypulse/notifier"
)

// The engine persists its alerts in two files: a snapshot of every alert
// (rules-state.json, replaced every few seconds) and a transition log beside
// it (rules-state.log), one line appended per transition before it is
// notified. A restart loads the snapshot and replays the log's newer lines.

// heldTransition is a notification and its log record (the alert's state
// right after the transition, encoded in the shard loop that owns it).
type heldTransition struct {
	ev     notifier.Event
	record []byte
	seq    uint64
	owner  string // whose alert: see ownerOf
}

// logRecord is one line of the transition log.
type logRecord struct {
	Seq   uint64   `json:"seq"`
	Key   alertKey `json:"key"`
	State State    `json:"state"`
}

type persisted struct {
	Key   alertKey `json:"key"`
	State State    `json:"state"`
}

type stateFile struct {
	// Seq is the last transition number the snapshot holds; the transition
	// log's records after it are replayed on top.
	Seq      uint64               `json:"seq"`
	Alerts   []persisted          `json:"alerts"`
	LastSeen map[string]time.Time `json:"last_seen"`
}

// save writes the alert states (and when devices were last seen), so that a
// restart neither forgets a firing alert nor notifies it again.
func (e *Engine) save() error {
	if e.statePath == "" {
		return nil
	}
	var f stateFile
	// Read before the scan: every transition numbered up to here changed its
	// alert (under the shard lock) before it was numbered, so the scan sees it.
	f.Seq = e.seq.Load()
	f.LastSeen = map[string]time.Time{}
	for _, s := range e.shards {
		s.mu.Lock()
		for _, a := range s.alerts {
			f.Alerts = append(f.Alerts, persisted{Key: a.key, State: a.state.clone()})
		}
		for d, t := range s.lastSeen {
			f.LastSeen[d] = t
		}
		s.mu.Unlock()
	}
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	// Run created the directory when it opened the transition log.
	if err := durable.WriteFile(e.statePath, b, 0o644, e.fsyncEach); err != nil {
		return err
	}
	// The snapshot holds every logged transition (Run logs the held ones
	// before it saves, and only Run writes either file).
	if e.tlog != nil {
		if err := e.tlog.Truncate(0); err != nil {
			return fmt.Errorf("truncate the transition log: %w", err)
		}
	}
	return nil
}

func (e *Engine) logPath() string { return strings.TrimSuffix(e.statePath, ".json") + ".log" }

// openLog creates the state directory and opens the transition log for
// appending.
func (e *Engine) openLog() (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(e.statePath), 0o755); err != nil {
		return nil, err
	}
	lf, err := os.OpenFile(e.logPath(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open the transition log: %w", err)
	}
	// A torn last line (a crash mid-write) must not swallow the next record.
	if st, err := lf.Stat(); err == nil && st.Size() > 0 {
		if _, err := lf.Write([]byte{'\n'}); err != nil {
			lf.Close()
			return nil, fmt.Errorf("open the transition log: %w", err)
		}
	}
	return lf, nil
}

// logAndNotify appends the held transitions to the transition log (one
// write(2), fsynced by the policy), then hands them to the notifier. If the
// log cannot be written they are notified all the same: an alert that might
// repeat after a crash beats an alert never sent.
func (e *Engine) logAndNotify() error {
	e.heldMu.Lock()
	held := e.held
	e.held = nil
	e.heldMu.Unlock()
	if len(held) == 0 {
		return nil
	}
	var err error
	if e.tlog != nil {
		var buf []byte
		for _, h := range held {
			buf = append(append(buf, h.record...), '\n')
		}
		if _, err = e.tlog.Write(buf); err == nil && e.fsyncEach {
			err = e.tlog.Sync()
		}
		if err != nil {
			err = fmt.Errorf("write the transition log: %w", err)
		}
	}
	if e.journal != nil {
		err = errors.Join(err, e.record(held))
	}
	for _, h := range held {
		e.notifier.Enqueue(h.ev)
	}
	e.markLogged(held[len(held)-1].seq)
	return err
}

// record hands the held transitions to the journal.
func (e *Engine) record(held []heldTransition) error {
	recs := make([]JournalRecord, len(held))
	for i, h := range held {
		recs[i] = JournalRecord{Owner: h.owner, State: h.record, Event: h.ev}
	}
	ctx, cancel := context.WithTimeout(context.Background(), journalTimeout)
	defer cancel()
	if err := e.journal.Record(ctx, recs); err != nil {
		e.m.journalErrs.Add(float64(len(recs)))
		return fmt.Errorf("record %d alert transitions in the journal: %w", len(recs), err)
	}
	return nil
}

// load restores the states saved by save.
func (e *Engine) load() error {
	if e.statePath == "" {
		return nil
	}
	b, err := os.ReadFile(e.statePath)
	if errors.Is(err, os.ErrNotExist) {
		b, err = []byte(`{}`), nil
	}
	if err != nil {
		return err
	}
	var f stateFile
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("alert state %s is damaged (%v); starting without it", e.statePath, err)
	}
	e.apply(f)
	e.seq.Store(f.Seq)
	return nil
}

// putAlert restores one alert into the shard that owns its device (or, for
// district alerts, its district).
func (e *Engine) putAlert(k alertKey, st State) {
	owner := k.Device
	if owner == "" {
		owner = k.District
	}
	s := e.shardFor(owner)
	s.mu.Lock()
	s.alerts[k] = &alert{key: k, state: st}
	s.ver++
	s.mu.Unlock()
}

// Restore loads the saved alert states (the snapshot, then the transition log
// on top); what cannot be read is logged and left out. Call it before the
// first Observe (serve does, before the pipeline starts); Run calls it if no
// one did. It runs once.
func (e *Engine) Restore() { e.restored.Do(e.restore) }

func (e *Engine) restore() {
	if err := e.load(); err != nil {
		e.log.Warn("rules: "+err.Error(), "file", e.statePath)
	}
	if e.statePath == "" {
		return
	}
	f, err := os.Open(e.logPath())
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		e.log.Warn("rules: cannot read the transition log", "err", err)
		return
	}
	defer f.Close()
	applied, skipped := e.replayLog(f)
	if skipped > 0 {
		e.log.Warn("rules: the transition log has damaged or torn lines; replayed the others",
			"file", e.logPath(), "applied", applied, "skipped_lines", skipped)
	}
}

// replayLog applies the transition log's records newer than the snapshot, in
// order. A line that does not parse (a write torn by a crash, or damage) is
// skipped and counted; empty lines are ignored.
func (e *Engine) replayLog(r io.Reader) (applied, skipped int) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	snap := e.seq.Load()
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var rec logRecord
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil || rec.Key.Rule == "" {
			skipped++
			continue
		}
		if rec.Seq <= snap {
			continue
		}
		e.putAlert(rec.Key, rec.State)
		if rec.Seq > e.seq.Load() {
			e.seq.Store(rec.Seq)
		}
		applied++
	}
	if sc.Err() != nil {
		skipped++
	}
	return applied, skipped
}

// apply puts a state file's alerts and devices' last-seen times into the
// engine.
func (e *Engine) apply(f stateFile) {
	for _, p := range f.Alerts {
		e.putAlert(p.Key, p.State)
	}
	for d, t := range f.LastSeen {
		s := e.shardFor(d)
		s.mu.Lock()
		s.lastSeen[d] = t
		s.mu.Unlock()
	}
}

package silence

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/citypulse/citypulse/internal/durable"
)

// Matcher selects alerts by one label, as Alertmanager's matchers do: equal or
// not, to a value or a regular expression (anchored).
type Matcher struct {
	Name    string `json:"name"`
	Value   string `json:"value"`
	IsRegex bool   `json:"isRegex"`
	IsEqual bool   `json:"isEqual"`
	re      *regexp.Regexp
}

func (m *Matcher) compile() error {
	if m.Name == "" {
		return errors.New("a matcher needs a label name")
	}
	if m.IsRegex {
		re, err := regexp.Compile("^(?:" + m.Value + ")$")
		if err != nil {
			return fmt.Errorf("matcher %s: %w", m.Name, err)
		}
		m.re = re
	}
	return nil
}

func (m *Matcher) matches(labels map[string]string) bool {
	v := labels[m.Name]
	ok := v == m.Value
	if m.re != nil {
		ok = m.re.MatchString(v)
	}
	return ok == m.IsEqual
}

// Silence mutes matching alerts' notifications from StartsAt to EndsAt.
type Silence struct {
	ID        string    `json:"id"`
	Matchers  []Matcher `json:"matchers"`
	StartsAt  time.Time `json:"startsAt"`
	EndsAt    time.Time `json:"endsAt"`
	CreatedBy string    `json:"createdBy"`
	Comment   string    `json:"comment"`
}

// Active says whether s mutes at t.
func (s Silence) Active(t time.Time) bool { return !t.Before(s.StartsAt) && t.Before(s.EndsAt) }

// Matches says whether every matcher of s takes labels.
func (s Silence) Matches(labels map[string]string) bool {
	for i := range s.Matchers {
		if !s.Matchers[i].matches(labels) {
			return false
		}
	}
	return len(s.Matchers) > 0
}

// Ack records that someone has taken one firing of an alert in hand. It holds
// for that firing only (StartsAt): when the alert resolves and fires again, it
// needs a new one.
type Ack struct {
	Fingerprint string    `json:"fingerprint"`
	StartsAt    time.Time `json:"startsAt"`
	By          string    `json:"by"`
	Comment     string    `json:"comment"`
	At          time.Time `json:"at"`
}

// Limits on what operators may store.
const (
	MaxSilences    = 1000
	MaxMatchers    = 16
	MaxTextLen     = 512
	MaxSilenceSpan = 90 * 24 * time.Hour
)

// state is the file's layout.
type state struct {
	Silences []Silence `json:"silences"`
	Acks     []Ack     `json:"acks"`
}

// Store keeps silences and acknowledgements, persisted to one file (Open)
// or, in cluster mode, in a Replica every node watches (NewReplicated).
// Readers (the gate in the shard loop, the API) see an immutable snapshot and
// never wait for a change being written; a change takes effect only once it
// is saved.
type Store struct {
	path    string  // one machine: the file
	replica Replica // cluster mode: the shared bucket
	now     func() time.Time
	mu      sync.Mutex            // serialises changes and their saves
	snap    atomic.Pointer[state] // the saved state; never modified in place
	ended   map[string]bool       // replica keys of ended silences, to delete (under mu)
}

// Open loads the store from path (absent: empty). Expired silences are dropped.
func Open(path string, now func() time.Time) (*Store, error) {
	if now == nil {
		now = time.Now
	}
	s := &Store{path: path, now: now}
	var st state
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("read silences: %w", err)
	default:
		if err := json.Unmarshal(b, &st); err != nil {
			return nil, fmt.Errorf("parse silences %s: %w", path, err)
		}
	}
	for i := range st.Silences {
		for j := range st.Silences[i].Matchers {
			if err := st.Silences[i].Matchers[j].compile(); err != nil {
				return nil, fmt.Errorf("silences %s: %w", path, err)
			}
		}
	}
	st.Silences = unexpired(st.Silences, now())
	s.snap.Store(&st)
	return s, nil
}

// change applies f to a copy of the state, saves it (the whole file, or
// the items f returns to the replica), and only then makes it the state: a
// change that could not be saved has no effect.
func (s *Store) change(f func(st *state) ([]item, error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.snap.Load()
	now := s.now()
	st := state{Silences: unexpired(slices.Clone(old.Silences), now), Acks: slices.Clone(old.Acks)}
	items, err := f(&st)
	if err != nil {
		return err
	}
	if s.replica == nil {
		err = s.save(&st)
	} else {
		err = s.write(items)
	}
	if err != nil {
		return err
	}
	if s.replica != nil {
		// the ended silences leave the bucket too (best effort: a reader
		// skips them anyway, and Prune tries again)
		s.noteEnded(old.Silences, now)
		_, _ = s.pruneLocked()
	}
	s.snap.Store(&st)
	return nil
}

// validate checks a silence an operator asks for.
func validate(sl *Silence, now time.Time) error {
	if len(sl.Matchers) == 0 || len(sl.Matchers) > MaxMatchers {
		return fmt.Errorf("a silence needs 1 to %d matchers", MaxMatchers)
	}
	for i := range sl.Matchers {
		if err := sl.Matchers[i].compile(); err != nil {
			return err
		}
		if len(sl.Matchers[i].Value) > MaxTextLen {
			return fmt.Errorf("matcher %s: value longer than %d bytes", sl.Matchers[i].Name, MaxTextLen)
		}
	}
	if sl.CreatedBy == "" || len(sl.CreatedBy) > MaxTextLen || sl.Comment == "" || len(sl.Comment) > MaxTextLen {
		return fmt.Errorf("createdBy and comment are required (at most %d bytes each): say who and why", MaxTextLen)
	}
	if sl.StartsAt.IsZero() {
		sl.StartsAt = now
	}
	if !sl.EndsAt.After(sl.StartsAt) || !sl.EndsAt.After(now) || sl.EndsAt.Sub(sl.StartsAt) > MaxSilenceSpan {
		return fmt.Errorf("endsAt must be after startsAt and now, and within %v of startsAt", MaxSilenceSpan)
	}
	return nil
}

// Add stores a new silence and returns it with its id. A *ValidationError
// says the silence was refused; any other error, that it could not be saved.
func (s *Store) Add(sl Silence) (Silence, error) {
	if err := validate(&sl, s.now()); err != nil {
		return Silence{}, &ValidationError{err}
	}
	var id [8]byte
	_, _ = rand.Read(id[:])
	sl.ID = hex.EncodeToString(id[:])
	err := s.change(func(st *state) ([]item, error) {
		if len(st.Silences) >= MaxSilences {
			return nil, &ValidationError{fmt.Errorf("%d silences already: expire some first", MaxSilences)}
		}
		st.Silences = append(st.Silences, sl)
		return []item{silenceItem(sl)}, nil
	})
	if err != nil {
		return Silence{}, err
	}
	return sl, nil
}

// ValidationError is a change refused for what it asked, not for the disk.
type ValidationError struct{ Err error }

func (e *ValidationError) Error() string { return e.Err.Error() }
func (e *ValidationError) Unwrap() error { return e.Err }

// ErrNotFound says there is no such silence.
var ErrNotFound = errors.New("no such silence")

// Expire ends a silence now.
func (s *Store) Expire(id string) error {
	return s.change(func(st *state) ([]item, error) {
		for i, sl := range st.Silences {
			if sl.ID == id {
				st.Silences = slices.Delete(st.Silences, i, i+1)
				return []item{{key: silenceKey(id)}}, nil
			}
		}
		return nil, ErrNotFound
	})
}

// Silences lists the silences not yet ended, soonest end first.
func (s *Store) Silences() []Silence {
	out := unexpired(slices.Clone(s.snap.Load().Silences), s.now())
	sort.Slice(out, func(i, j int) bool { return out[i].EndsAt.Before(out[j].EndsAt) })
	return out
}

// Silenced returns the id of an active silence that matches labels. It reads
// the snapshot only: the shard loop may call it.
func (s *Store) Silenced(labels map[string]string) (string, bool) {
	now := s.now()
	for _, sl := range s.snap.Load().Silences {
		if sl.Active(now) && sl.Matches(labels) {
			return sl.ID, true
		}
	}
	return "", false
}

// Acknowledge records an ack for an alert (replacing an earlier one).
func (s *Store) Acknowledge(a Ack) (Ack, error) {
	if a.Fingerprint == "" || len(a.Fingerprint) > 64 || a.By == "" || len(a.By) > MaxTextLen || len(a.Comment) > MaxTextLen {
		return Ack{}, &ValidationError{fmt.Errorf("an ack needs the alert's fingerprint and who (at most %d bytes)", MaxTextLen)}
	}
	a.At = s.now()
	err := s.change(func(st *state) ([]item, error) {
		st.Acks = append(removeAck(st.Acks, a.Fingerprint), a)
		items := []item{ackItem(a)}
		if n := len(st.Acks) - MaxSilences; n > 0 {
			for _, old := range st.Acks[:n] {
				items = append(items, item{key: ackKey(old.Fingerprint)})
			}
			st.Acks = st.Acks[n:]
		}
		return items, nil
	})
	return a, err
}

// Acked returns the ack of the firing of fingerprint that started at startsAt.
func (s *Store) Acked(fingerprint string, startsAt time.Time) (Ack, bool) {
	for _, a := range s.snap.Load().Acks {
		if a.Fingerprint == fingerprint && a.StartsAt.Equal(startsAt) {
			return a, true
		}
	}
	return Ack{}, false
}

// Acks returns the acknowledgements by fingerprint.
func (s *Store) Acks() map[string]Ack {
	acks := s.snap.Load().Acks
	m := make(map[string]Ack, len(acks))
	for _, a := range acks {
		m[a.Fingerprint] = a
	}
	return m
}

func removeAck(as []Ack, fp string) []Ack {
	out := as[:0]
	for _, a := range as {
		if a.Fingerprint != fp {
			out = append(out, a)
		}
	}
	return out
}

// unexpired keeps the silences that have not ended at now (in place).
func unexpired(ss []Silence, now time.Time) []Silence {
	out := ss[:0]
	for _, sl := range ss {
		if now.Before(sl.EndsAt) {
			out = append(out, sl)
		}
	}
	return out
}

// save writes st durably (temporary file, fsync, rename, fsync of the
// directory): an operator's silence is acknowledged only once a crash cannot
// undo it.
func (s *Store) save(st *state) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	if err := durable.WriteFile(s.path, b, 0o600, true); err != nil {
		return fmt.Errorf("save silences %s: %w", s.path, err)
	}
	return nil
}

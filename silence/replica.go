package silence

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Replica is where a cluster keeps the store's items so that every node sees
// them: a key-value bucket that every node watches (clusterstate.Silences).
// The store writes each change through it and takes the change at once; the
// changes made at other nodes come back through Apply and Replace. A replica
// that may not take writes (a standby site's mirror) returns an error
// wrapping ErrReadOnly.
type Replica interface {
	Put(ctx context.Context, key string, value []byte) error
	Delete(ctx context.Context, key string) error
}

// ErrReadOnly says the store cannot be changed here (a standby site's copy).
var ErrReadOnly = errors.New("silences are read-only here")

// replicaTimeout bounds one write to the replica; in cluster mode it outlasts
// a stream leader election (see clusterstate's changeTimeout).
const replicaTimeout = 20 * time.Second

// Keys of the items in a replica: "silence.<id>" and "ack.<fingerprint in
// base64url>" (a bucket's keys take only [-/_=.a-zA-Z0-9]).
const (
	silencePrefix = "silence."
	ackPrefix     = "ack."
)

func silenceKey(id string) string { return silencePrefix + id }
func ackKey(fp string) string     { return ackPrefix + base64.RawURLEncoding.EncodeToString([]byte(fp)) }

// NewReplicated returns an empty store kept in r (cluster mode): Replace
// loads what r holds, Apply takes each later change.
func NewReplicated(r Replica, now func() time.Time) *Store {
	if now == nil {
		now = time.Now
	}
	s := &Store{replica: r, now: now}
	s.snap.Store(&state{})
	return s
}

// item is one change of a store kept in a replica: value nil deletes key.
type item struct {
	key   string
	value []byte
}

func silenceItem(sl Silence) item {
	b, _ := json.Marshal(sl) // a Silence always marshals
	return item{key: silenceKey(sl.ID), value: b}
}

func ackItem(a Ack) item {
	b, _ := json.Marshal(a)
	return item{key: ackKey(a.Fingerprint), value: b}
}

// write makes the changes durable in the replica, in order.
func (s *Store) write(items []item) error {
	ctx, cancel := context.WithTimeout(context.Background(), replicaTimeout)
	defer cancel()
	for _, it := range items {
		var err error
		if it.value == nil {
			err = s.replica.Delete(ctx, it.key)
		} else {
			err = s.replica.Put(ctx, it.key, it.value)
		}
		if err != nil {
			return fmt.Errorf("save silences: %w", err)
		}
	}
	return nil
}

// Apply takes one change read from the replica (value nil: the key was
// deleted). A value that cannot be read is an error and changes nothing.
func (s *Store) Apply(key string, value []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.snap.Load()
	st := state{Silences: slices0(old.Silences), Acks: slices0(old.Acks)}
	if err := st.apply(key, value); err != nil {
		return err
	}
	now := s.now()
	s.noteEnded(st.Silences, now)
	st.Silences = unexpired(st.Silences, now)
	s.snap.Store(&st)
	return nil
}

// Replace makes the store hold exactly items (key → value), as read from the
// replica when a watch (re)starts. Items that cannot be read are skipped and
// returned as one error.
func (s *Store) Replace(items map[string][]byte) error {
	var st state
	var errs []error
	for k, v := range items {
		if err := st.apply(k, v); err != nil {
			errs = append(errs, err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	s.noteEnded(st.Silences, now)
	st.Silences = unexpired(st.Silences, now)
	s.snap.Store(&st)
	return errors.Join(errs...)
}

// maxEnded bounds the ended silences remembered for deletion; past it the
// others are found again when the bucket is next read whole (Replace).
const maxEnded = 4 * MaxSilences

// noteEnded remembers the replica keys of the silences in ss that have ended
// at now. s.mu is held.
func (s *Store) noteEnded(ss []Silence, now time.Time) {
	for _, sl := range ss {
		if now.Before(sl.EndsAt) {
			continue
		}
		if s.ended == nil {
			s.ended = map[string]bool{}
		}
		if len(s.ended) < maxEnded {
			s.ended[silenceKey(sl.ID)] = true
		}
	}
}

// Prune deletes the silences that have ended from the replica, so that a
// bucket does not keep every silence ever made; it returns how many it
// deleted. A store kept in a file needs none (every save leaves the ended
// ones out). A replica that refuses (a standby site's mirror) keeps them for
// a later Prune.
func (s *Store) Prune() (int, error) {
	if s.replica == nil {
		return 0, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.noteEnded(s.snap.Load().Silences, s.now())
	return s.pruneLocked()
}

// pruneLocked deletes the remembered ended silences from the replica. s.mu is held.
func (s *Store) pruneLocked() (int, error) {
	n := 0
	for key := range s.ended {
		if err := s.write([]item{{key: key}}); err != nil {
			return n, err
		}
		delete(s.ended, key)
		n++
	}
	return n, nil
}

// apply sets or deletes the item under key in st.
func (st *state) apply(key string, value []byte) error {
	switch {
	case strings.HasPrefix(key, silencePrefix):
		id := strings.TrimPrefix(key, silencePrefix)
		st.Silences = removeSilence(st.Silences, id)
		if value == nil {
			return nil
		}
		var sl Silence
		if err := json.Unmarshal(value, &sl); err != nil || sl.ID != id {
			return fmt.Errorf("silence under key %s: unreadable or another id (%v)", key, err)
		}
		for j := range sl.Matchers {
			if err := sl.Matchers[j].compile(); err != nil {
				return fmt.Errorf("silence under key %s: %w", key, err)
			}
		}
		st.Silences = append(st.Silences, sl)
	case strings.HasPrefix(key, ackPrefix):
		fp, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(key, ackPrefix))
		if err != nil {
			return fmt.Errorf("ack under key %s: %w", key, err)
		}
		st.Acks = removeAck(st.Acks, string(fp))
		if value == nil {
			return nil
		}
		var a Ack
		if err := json.Unmarshal(value, &a); err != nil || a.Fingerprint != string(fp) {
			return fmt.Errorf("ack under key %s: unreadable or another alert (%v)", key, err)
		}
		st.Acks = append(st.Acks, a)
	default:
		return fmt.Errorf("unknown key %s in the silences' bucket", key)
	}
	return nil
}

func removeSilence(ss []Silence, id string) []Silence {
	out := ss[:0]
	for _, sl := range ss {
		if sl.ID != id {
			out = append(out, sl)
		}
	}
	return out
}

// slices0 copies s (nil stays nil): a snapshot is never modified in place.
func slices0[T any](s []T) []T { return append([]T(nil), s...) }

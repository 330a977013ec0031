package silence

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// memReplica is a replica in memory (the real one, a JetStream bucket, is
// tested in clusterstate); readOnly makes it refuse as a standby's does.
type memReplica struct {
	mu       sync.Mutex
	items    map[string][]byte
	readOnly bool
}

func (m *memReplica) Put(_ context.Context, k string, v []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.readOnly {
		return ErrReadOnly
	}
	m.items[k] = v
	return nil
}

func (m *memReplica) Delete(_ context.Context, k string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.readOnly {
		return ErrReadOnly
	}
	delete(m.items, k)
	return nil
}

// What one store writes to its replica, another store loads (Replace) and
// follows (Apply); bad items are refused without changing anything; a
// read-only replica makes a change fail with 503 at the API.
func TestAReplicatedStoreFollowsItsReplica(t *testing.T) {
	clock := func() time.Time { return t0 }
	r := &memReplica{items: map[string][]byte{}}
	a := NewReplicated(r, clock)
	sl, err := a.Add(Silence{Matchers: []Matcher{{Name: "district", Value: "gul.*", IsRegex: true, IsEqual: true}},
		EndsAt: t0.Add(time.Hour), CreatedBy: "ops-anna", Comment: "main repair"})
	require.NoError(t, err)
	_, err = a.Acknowledge(Ack{Fingerprint: "fp/1+x", StartsAt: t0, By: "ops-anna"})
	require.NoError(t, err)
	require.Len(t, r.items, 2)
	for k := range r.items {
		require.Regexp(t, `^(silence|ack)\.[-_=.a-zA-Z0-9]+$`, k, "a key-value bucket's key")
	}

	b := NewReplicated(r, clock)
	require.NoError(t, b.Replace(r.items))
	id, ok := b.Silenced(map[string]string{"district": "gulou"})
	require.True(t, ok)
	require.Equal(t, sl.ID, id)
	_, ok = b.Acked("fp/1+x", t0)
	require.True(t, ok)

	for _, c := range []struct {
		name, key string
		value     []byte
	}{
		{"an unknown key", "other.x", []byte(`{}`)},
		{"unreadable JSON", "silence." + sl.ID, []byte(`{`)},
		{"a silence under another id's key", "silence.other", r.items["silence."+sl.ID]},
		{"a bad regex", "silence.z", []byte(`{"id":"z","matchers":[{"name":"a","value":"(","isRegex":true}]}`)},
	} {
		t.Run("refuses "+c.name, func(t *testing.T) {
			require.Error(t, b.Apply(c.key, c.value))
			require.Len(t, b.Silences(), 1, "nothing changed")
		})
	}
	require.NoError(t, a.Expire(sl.ID))
	require.NoError(t, b.Apply("silence."+sl.ID, nil))
	require.Empty(t, b.Silences())

	r.readOnly = true
	mux := http.NewServeMux()
	pass := func(h http.Handler) http.Handler { return h }
	b.Register(mux, pass, pass)
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("POST", "/api/v1/silences", strings.NewReader(
		`{"matchers":[{"name":"district","value":"gulou","isEqual":true}],"endsAt":"`+t0.Add(time.Hour).Format(time.RFC3339)+`","createdBy":"bo","comment":"x"}`)))
	require.Equal(t, http.StatusServiceUnavailable, rec.Code, rec.Body.String())
	require.Empty(t, b.Silences(), "a change that could not be saved has no effect")
}

// The silences that have ended leave the replica: those read ended from it
// (Replace, Apply), and those that ended while held. A replica that refuses
// keeps them for a later Prune. A store kept in a file has nothing to prune.
func TestPruneDeletesTheEndedSilencesFromTheReplica(t *testing.T) {
	now := t0
	clock := func() time.Time { return now }
	r := &memReplica{items: map[string][]byte{}}
	a := NewReplicated(r, clock)
	short := Silence{Matchers: []Matcher{{Name: "district", Value: "gulou", IsEqual: true}},
		EndsAt: t0.Add(time.Minute), CreatedBy: "ops-anna", Comment: "short"}
	long := short
	long.EndsAt, long.Comment = t0.Add(time.Hour), "long"
	s1, err := a.Add(short)
	require.NoError(t, err)
	s2, err := a.Add(long)
	require.NoError(t, err)
	require.Len(t, r.items, 2)

	n, err := a.Prune()
	require.NoError(t, err)
	require.Zero(t, n, "nothing has ended")

	now = t0.Add(2 * time.Minute) // the short one has ended while held
	r.readOnly = true
	_, err = a.Prune()
	require.ErrorIs(t, err, ErrReadOnly)
	require.Contains(t, r.items, "silence."+s1.ID, "kept while the replica refuses")
	r.readOnly = false
	n, err = a.Prune()
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.NotContains(t, r.items, "silence."+s1.ID)
	require.Contains(t, r.items, "silence."+s2.ID)

	// Another node reads the bucket after the long one has ended too.
	now = t0.Add(2 * time.Hour)
	b := NewReplicated(r, clock)
	require.NoError(t, b.Replace(map[string][]byte{"silence." + s2.ID: r.items["silence."+s2.ID]}))
	require.Empty(t, b.Silences())
	n, err = b.Prune()
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.Empty(t, r.items)

	// One applied already ended is deleted too.
	ended, err := json.Marshal(Silence{ID: "e1", Matchers: short.Matchers, EndsAt: t0, CreatedBy: "x", Comment: "y"})
	require.NoError(t, err)
	r.items["silence.e1"] = ended
	require.NoError(t, b.Apply("silence.e1", ended))
	n, err = b.Prune()
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.Empty(t, r.items)

	f, err := Open(t.TempDir()+"/silences.json", clock)
	require.NoError(t, err)
	n, err = f.Prune()
	require.NoError(t, err)
	require.Zero(t, n)
}

package silence

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

var t0 = time.Date(2026, 12, 1, 8, 0, 0, 0, time.UTC)

func TestMatchers(t *testing.T) {
	labels := map[string]string{"alertname": "burst_main", "district": "gulou", "severity": "critical"}
	cases := []struct {
		name string
		ms   []Matcher
		want bool
	}{
		{"equal matches", []Matcher{{Name: "district", Value: "gulou", IsEqual: true}}, true},
		{"every matcher must match", []Matcher{{Name: "district", Value: "gulou", IsEqual: true}, {Name: "severity", Value: "warning", IsEqual: true}}, false},
		{"not-equal", []Matcher{{Name: "district", Value: "xuanwu", IsEqual: false}}, true},
		{"a regex is anchored", []Matcher{{Name: "alertname", Value: "burst", IsRegex: true, IsEqual: true}}, false},
		{"a regex", []Matcher{{Name: "alertname", Value: "burst_.*|gas_leak", IsRegex: true, IsEqual: true}}, true},
		{"a missing label is the empty value", []Matcher{{Name: "device", Value: "", IsEqual: true}}, true},
		{"no matchers match nothing", nil, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := Silence{Matchers: c.ms}
			for i := range s.Matchers {
				require.NoError(t, s.Matchers[i].compile())
			}
			require.Equal(t, c.want, s.Matches(labels))
		})
	}
}

func TestSilencesPersistAndExpireOnTheirOwn(t *testing.T) {
	path := filepath.Join(t.TempDir(), "silences.json")
	now := t0
	clock := func() time.Time { return now }
	s, err := Open(path, clock)
	require.NoError(t, err)
	sl, err := s.Add(Silence{Matchers: []Matcher{{Name: "district", Value: "gulou", IsEqual: true}},
		EndsAt: t0.Add(time.Hour), CreatedBy: "ops-anna", Comment: "main repair in Gulou"})
	require.NoError(t, err)
	require.NotEmpty(t, sl.ID)
	_, err = s.Acknowledge(Ack{Fingerprint: "abc", StartsAt: t0.Add(-time.Minute), By: "ops-anna", Comment: "crew sent"})
	require.NoError(t, err)

	reopened, err := Open(path, clock)
	require.NoError(t, err)
	id, ok := reopened.Silenced(map[string]string{"district": "gulou"})
	require.True(t, ok, "the silence survives a restart")
	require.Equal(t, sl.ID, id)
	require.Equal(t, "ops-anna", reopened.Silences()[0].CreatedBy)
	_, ok = reopened.Acked("abc", t0.Add(-time.Minute))
	require.True(t, ok, "the ack survives a restart")
	_, ok = reopened.Acked("abc", t0.Add(time.Minute))
	require.False(t, ok, "an ack holds for one firing only")

	now = t0.Add(time.Hour)
	_, ok = reopened.Silenced(map[string]string{"district": "gulou"})
	require.False(t, ok, "the silence ended on its own")
	require.Empty(t, reopened.Silences())
}

func TestSilenceValidation(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "s.json"), func() time.Time { return t0 })
	require.NoError(t, err)
	m := []Matcher{{Name: "district", Value: "gulou", IsEqual: true}}
	cases := []struct {
		name string
		sl   Silence
		want string
	}{
		{"no matchers", Silence{EndsAt: t0.Add(time.Hour), CreatedBy: "a", Comment: "b"}, "matchers"},
		{"a bad regex", Silence{Matchers: []Matcher{{Name: "x", Value: "(", IsRegex: true}}, EndsAt: t0.Add(time.Hour), CreatedBy: "a", Comment: "b"}, "matcher x"},
		{"no author", Silence{Matchers: m, EndsAt: t0.Add(time.Hour), Comment: "b"}, "createdBy"},
		{"no reason", Silence{Matchers: m, EndsAt: t0.Add(time.Hour), CreatedBy: "a"}, "comment"},
		{"already over", Silence{Matchers: m, EndsAt: t0.Add(-time.Hour), CreatedBy: "a", Comment: "b"}, "endsAt"},
		{"longer than 90 days", Silence{Matchers: m, EndsAt: t0.Add(91 * 24 * time.Hour), CreatedBy: "a", Comment: "b"}, "endsAt"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := s.Add(c.sl)
			require.ErrorContains(t, err, c.want)
		})
	}
}

type recorder []map[string]string

func (r *recorder) Enqueue(ev map[string]string) { *r = append(*r, ev) }

func TestGateHoldsBackSilencedNotifications(t *testing.T) {
	now := t0
	s, err := Open(filepath.Join(t.TempDir(), "s.json"), func() time.Time { return now })
	require.NoError(t, err)
	_, err = s.Add(Silence{Matchers: []Matcher{{Name: "district", Value: "gulou", IsEqual: true}},
		EndsAt: t0.Add(time.Hour), CreatedBy: "a", Comment: "b"})
	require.NoError(t, err)
	var sent recorder
	g := NewGate(s, GateFuncs[map[string]string]{
		Labels:   func(ev map[string]string) map[string]string { return ev },
		Key:      func(ev map[string]string) string { return ev["alert"] },
		Resolved: func(ev map[string]string) bool { return ev["kind"] == "resolved" },
	}, &sent, prometheus.NewRegistry())
	g.Enqueue(map[string]string{"alert": "a", "district": "gulou", "kind": "firing"})
	g.Enqueue(map[string]string{"alert": "b", "district": "xuanwu", "kind": "firing"})
	g.Enqueue(map[string]string{"alert": "a", "district": "gulou", "kind": "resolved"})
	g.Enqueue(map[string]string{"alert": "c", "district": "gulou", "kind": "firing"})
	require.Equal(t, recorder{{"alert": "b", "district": "xuanwu", "kind": "firing"}, {"alert": "a", "district": "gulou", "kind": "resolved"}}, sent,
		"a silenced firing is held back; a resolution always passes")
	require.Equal(t, 2.0, testutil.ToFloat64(g.suppressed))

	require.Zero(t, g.Release(), "nothing is released while the silence holds")
	now = t0.Add(time.Hour + time.Second)
	require.Equal(t, 1, g.Release(), "the silence expired: the alert still firing is notified, the resolved one is not")
	require.Equal(t, map[string]string{"alert": "c", "district": "gulou", "kind": "firing"}, sent[len(sent)-1])
	require.Zero(t, g.Release(), "sent once")
	require.Equal(t, 1.0, testutil.ToFloat64(g.released))
}

// A change that cannot be saved has no effect and is no bad request.
func TestAFailedSaveChangesNothing(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "missing-dir", "s.json"), func() time.Time { return t0 })
	require.NoError(t, err)
	_, err = s.Add(Silence{Matchers: []Matcher{{Name: "district", Value: "gulou", IsEqual: true}},
		EndsAt: t0.Add(time.Hour), CreatedBy: "a", Comment: "b"})
	require.Error(t, err)
	var ve *ValidationError
	require.False(t, errors.As(err, &ve), "a disk failure is not the operator's mistake")
	require.Equal(t, http.StatusInternalServerError, codeOf(err))
	_, silenced := s.Silenced(map[string]string{"district": "gulou"})
	require.False(t, silenced, "the silence that was not saved is not in force")
	require.Empty(t, s.Silences())
}

func TestAPI(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "s.json"), func() time.Time { return t0 })
	require.NoError(t, err)
	guard := func(token string) func(http.Handler) http.Handler {
		return func(next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Header.Get("Authorization") != "Bearer "+token && r.Header.Get("Authorization") != "Bearer op" {
					http.Error(w, "unauthorized", http.StatusUnauthorized)
					return
				}
				next.ServeHTTP(w, r)
			})
		}
	}
	mux := http.NewServeMux()
	s.Register(mux, guard("read"), guard("op"))
	do := func(method, path, token, body string) (int, string) {
		req := httptest.NewRequest(method, path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, req)
		return rec.Code, rec.Body.String()
	}
	good := `{"matchers":[{"name":"district","value":"gulou","isEqual":true}],"endsAt":"2026-12-01T09:00:00Z","createdBy":"ops-anna","comment":"repair"}`
	code, _ := do("POST", "/api/v1/silences", "read", good)
	require.Equal(t, http.StatusUnauthorized, code, "the read token may not silence")
	code, body := do("POST", "/api/v1/silences", "op", good)
	require.Equal(t, http.StatusOK, code, body)
	code, _ = do("POST", "/api/v1/silences", "op", good+"{}")
	require.Equal(t, http.StatusBadRequest, code, "trailing data is refused")
	code, _ = do("POST", "/api/v1/silences", "op", `{"matchers":[],"bogus":1}`)
	require.Equal(t, http.StatusBadRequest, code, "unknown fields are refused")
	code, _ = do("POST", "/api/v1/silences", "op", `{"comment":"`+strings.Repeat("x", maxBody)+`"}`)
	require.Equal(t, http.StatusBadRequest, code, "a body over the limit is refused")
	code, body = do("GET", "/api/v1/silences", "read", "")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "ops-anna")
	id := s.Silences()[0].ID
	code, _ = do("DELETE", "/api/v1/silences/"+id, "op", "")
	require.Equal(t, http.StatusOK, code)
	code, _ = do("DELETE", "/api/v1/silences/"+id, "op", "")
	require.Equal(t, http.StatusNotFound, code)
	code, body = do("POST", "/api/v1/acks", "op", `{"fingerprint":"abc","startsAt":"2026-12-01T07:59:00Z","by":"ops-anna","comment":"crew sent"}`)
	require.Equal(t, http.StatusOK, code, body)
	_, ok := s.Acked("abc", t0.Add(-time.Minute))
	require.True(t, ok)
}

package pipeline

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestMillisRoundsToTheNearestMs(t *testing.T) {
	tests := []struct {
		ns, ms int64
	}{
		{1796194324270999908, 1796194324271}, // the float 1796194324.271, in ns
		{1796194324271000000, 1796194324271},
		{1796194324271499999, 1796194324271},
		{1796194324271500000, 1796194324272}, // a half rounds up (away from zero)
		{1796194324271999999, 1796194324272},
		{0, 0},
		{499_999, 0},
		{-499_999, 0},
		{-500_000, -1},
		{-1_700_000, -2},
	}
	for _, tc := range tests {
		require.Equal(t, tc.ms, Millis(tc.ns), "Millis(%d)", tc.ns)
	}
}

// refusingSink refuses every other reading, as a store refusing duplicates.
type refusingSink struct{ collectSink }

func (s *refusingSink) Refused() map[string]uint64 {
	return map[string]uint64{"duplicate": uint64(len(s.readings()) / 2)}
}

// TestStatusShowsWhatASinkRefused: a sink that reports refusals has them in
// its status (GET /api/v1/sinks), one that does not has none.
func TestStatusShowsWhatASinkRefused(t *testing.T) {
	ref := &refusingSink{collectSink{name: "store"}}
	plain := &collectSink{name: "plain"}
	r := start(t, t.TempDir(), testConfig(), ref, plain)
	defer r.stop(t)
	rs := []Reading{reading("pipe-0001", 1), reading("pipe-0001", 2), reading("pipe-0001", 3), reading("pipe-0001", 4)}
	require.NoError(t, r.p.Submit(context.Background(), rs))
	waitFor(t, "both sinks", func() bool { return len(ref.readings()) == 4 && len(plain.readings()) == 4 })
	st := r.p.Status()
	require.Equal(t, map[string]uint64{"duplicate": 2}, st[0].Refused)
	require.Nil(t, st[1].Refused)
	b, err := json.Marshal(st)
	require.NoError(t, err)
	require.Contains(t, string(b), `"refused":{"duplicate":2}`)
	require.Equal(t, 1, strings.Count(string(b), `"refused"`), "a sink without refusals shows none")
}

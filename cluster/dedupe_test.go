package cluster

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

func r(dev, metric string, t int64, v float64) pipeline.Reading {
	return pipeline.Reading{Device: dev, Metric: metric, Time: t, Value: v}
}

func TestDedupeDropsRepeatsAndRestoresPerDeviceOrder(t *testing.T) {
	tests := []struct {
		name       string
		batches    [][]pipeline.Reading
		want       [][]pipeline.Reading
		dups, late float64
	}{
		{
			name:    "a redelivered batch after the newer one is dropped whole",
			batches: [][]pipeline.Reading{{r("a", "p", 1, 1), r("a", "p", 2, 2)}, {r("a", "p", 3, 3)}, {r("a", "p", 1, 1), r("a", "p", 2, 2)}},
			want:    [][]pipeline.Reading{{r("a", "p", 1, 1), r("a", "p", 2, 2)}, {r("a", "p", 3, 3)}, {}},
			dups:    2,
		},
		{
			name:    "readings handed over together are put back in time order per device",
			batches: [][]pipeline.Reading{{r("b", "p", 5, 5), r("a", "p", 3, 3), r("b", "p", 4, 4), r("a", "p", 1, 1), r("a", "p", 2, 2)}},
			want:    [][]pipeline.Reading{{r("a", "p", 1, 1), r("a", "p", 2, 2), r("a", "p", 3, 3), r("b", "p", 4, 4), r("b", "p", 5, 5)}},
		},
		{
			name:    "another metric at the same time is not a duplicate",
			batches: [][]pipeline.Reading{{r("a", "p", 1, 1), r("a", "flow", 1, 9), r("a", "p", 1, 1)}},
			want:    [][]pipeline.Reading{{r("a", "p", 1, 1), r("a", "flow", 1, 9)}},
			dups:    1,
		},
		{
			name:    "a new reading older than one passed on is kept and counted late",
			batches: [][]pipeline.Reading{{r("a", "p", 5, 5)}, {r("a", "p", 4, 4)}},
			want:    [][]pipeline.Reading{{r("a", "p", 5, 5)}, {r("a", "p", 4, 4)}},
			late:    1,
		},
		{
			name:    "another device's identical key is not a duplicate",
			batches: [][]pipeline.Reading{{r("a", "p", 1, 1)}, {r("b", "p", 1, 1)}},
			want:    [][]pipeline.Reading{{r("a", "p", 1, 1)}, {r("b", "p", 1, 1)}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := NewMetrics(nil)
			d, err := NewDedupe(8, 100, m)
			require.NoError(t, err)
			for i, b := range tc.batches {
				got := d.Filter(append([]pipeline.Reading(nil), b...))
				require.Equal(t, tc.want[i], append([]pipeline.Reading{}, got...), "batch %d", i)
			}
			require.Equal(t, tc.dups, testutil.ToFloat64(m.duplicates))
			require.Equal(t, tc.late, testutil.ToFloat64(m.late))
		})
	}
}

func TestDedupeMemoryIsBounded(t *testing.T) {
	d, err := NewDedupe(4, 10, nil)
	require.NoError(t, err)
	for i := range 6 {
		d.Filter([]pipeline.Reading{r("a", "p", int64(i), 0)})
	}
	require.Len(t, d.device("a").keys, 4, "a device keeps its last window keys")
	require.Len(t, d.Filter([]pipeline.Reading{r("a", "p", 0, 0)}), 1, "a key older than the window passes again")
	require.Empty(t, d.Filter([]pipeline.Reading{r("a", "p", 5, 0)}), "a key within the window is dropped")

	for i := range 100 {
		d.Filter([]pipeline.Reading{r(string(rune('A'+i)), "p", 1, 0)})
		require.LessOrEqual(t, len(d.cur)+len(d.prev), 10)
	}
}

func TestNewDedupeRejectsAZeroWindow(t *testing.T) {
	_, err := NewDedupe(0, 10, nil)
	require.Error(t, err)
}

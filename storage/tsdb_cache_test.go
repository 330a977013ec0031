package storage

import (
	"context"
	"fmt"
	"github.com/citypulse/citypulse/internal/bymetric"
	"math"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

// stored returns every sample in db, by series (its labels' string).
func stored(t *testing.T, db *TSDB) map[string][]float64 {
	t.Helper()
	q, err := db.DB().Querier(math.MinInt64, math.MaxInt64)
	require.NoError(t, err)
	defer q.Close()
	out := map[string][]float64{}
	ss := q.Select(context.Background(), true, nil, labels.MustNewMatcher(labels.MatchRegexp, "__name__", ".+"))
	for ss.Next() {
		s := ss.At()
		it := s.Iterator(nil)
		for it.Next() == chunkenc.ValFloat {
			_, v := it.At()
			out[s.Labels().String()] = append(out[s.Labels().String()], v)
		}
	}
	require.NoError(t, ss.Err())
	return out
}

// The series cache looks a device up once per run of its readings and its
// metrics in a short list tried where the last one was found: a device with
// more metrics than the list (a district's roll-ups) written in changing
// orders, a device written in two districts in turn and one under two kinds
// in turn, must each store every sample in its own series, and the cache
// hold each series once.
func TestSeriesCacheManyMetricsAndAMovedDevice(t *testing.T) {
	metrics := make([]string, 3*bymetric.ShortList)
	for i := range metrics {
		metrics[i] = fmt.Sprintf("m%02d", i)
	}
	orders := []func(i int) int{
		func(i int) int { return i },
		func(i int) int { return len(metrics) - 1 - i },
		func(i int) int { return (i * 7) % len(metrics) },
	}
	db, _ := open(t, t.TempDir())
	want := map[string][]float64{}
	for round, order := range orders {
		var b pipeline.Batch
		at := t0.Add(time.Duration(round) * time.Second)
		for i := range metrics {
			m := order(i)
			b.Readings = append(b.Readings, rd("city", "gulou", "city", metrics[m], float64(100*round+m), at))
			name := fmt.Sprintf(`{__name__="city_%s", district="gulou"}`, metrics[m])
			want[name] = append(want[name], float64(100*round+m))
		}
		for k, district := range []string{"gulou", "xuanwu", "gulou", "xuanwu"} {
			v := float64(1000*round + k)
			b.Readings = append(b.Readings, rd("pipe-1", district, "pipe", "pressure", v, at.Add(time.Duration(k)*time.Millisecond)))
			name := fmt.Sprintf(`{__name__="pipe_pressure", device="pipe-1", district="%s", kind="pipe"}`, district)
			want[name] = append(want[name], v)
		}
		for k, kind := range []string{"pipe", "water", "pipe", "water"} { // re-registered as another kind
			v := float64(1000*round + k)
			b.Readings = append(b.Readings, rd("dev-2", "gulou", kind, "pressure", v, at.Add(time.Duration(k)*time.Millisecond)))
			name := fmt.Sprintf(`{__name__="%s_pressure", device="dev-2", district="gulou", kind="%s"}`, kind, kind)
			want[name] = append(want[name], v)
		}
		require.NoError(t, db.Write(context.Background(), b))
	}
	require.Equal(t, want, stored(t, db))
	require.Equal(t, len(metrics)+4, db.cache(0).series, "each series cached once")
}

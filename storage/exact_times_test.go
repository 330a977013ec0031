package storage

import (
	"context"
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/ingest/payload"
	"github.com/citypulse/citypulse/pipeline"
)

// exactTimeInputs are device payloads (testdata/payload) whose times are
// .271, .274, .277 and .280 past 1796194324 s, in every time encoding: float
// seconds (SenML JSON, SenML CBOR, plain JSON), ms and ns integers.
var exactTimeInputs = []struct {
	file   string
	format payload.Format
}{
	{"exact-times.senml.json", payload.SenMLJSON},
	{"exact-times.senml.cbor", payload.SenMLCBOR},
	{"exact-float-seconds.plain.json", payload.JSON},
	{"exact-ms.plain.json", payload.JSON},
	{"exact-ns.plain.json", payload.JSON},
}

var exactMillis = map[int64]bool{1796194324271: true, 1796194324274: true, 1796194324277: true, 1796194324280: true}

// exactTimeReadings decodes the inputs as the ingest handler does; each file
// is its own device, so no two readings share a series and a time.
func exactTimeReadings(t *testing.T) []pipeline.Reading {
	t.Helper()
	var rs []pipeline.Reading
	for _, in := range exactTimeInputs {
		b, err := os.ReadFile(filepath.Join("../testdata/payload", in.file))
		require.NoError(t, err)
		recs, rejects, err := payload.Decode(in.format, b, "pipe-0001", t0)
		require.NoError(t, err)
		require.Empty(t, rejects)
		dev := strings.ReplaceAll(strings.TrimPrefix(in.file, "exact-"), ".", "-")
		for _, rec := range recs {
			rs = append(rs, pipeline.Reading{Device: dev, District: "gulou", Kind: "pipe", Metric: rec.Metric,
				Value: rec.Value, Time: rec.Time, Received: time.UnixMilli(1796194325000).UnixNano()})
		}
	}
	require.Len(t, rs, 12)
	return rs
}

// TestExactTimesInEverySink: readings sent with ms times (issue 12) are at
// their exact ms in the TSDB, the InfluxDB line protocol and the Parquet
// archive; the golden file lists what each sink holds.
func TestExactTimesInEverySink(t *testing.T) {
	rs := exactTimeReadings(t)
	ctx := context.Background()
	got := map[string][]string{}

	// The TSDB, read back through the query API (raw samples of a range selector).
	db, _ := open(t, t.TempDir())
	require.NoError(t, db.Write(ctx, pipeline.Batch{Readings: rs}))
	require.Equal(t, map[string]uint64{"duplicate": 0, "too_old": 0}, db.Refused())
	_, body := get(t, serve(t, db), "/api/v1/query", url.Values{"query": {`{kind="pipe"}[1m]`}, "time": {"1796194330"}})
	var res struct {
		Data struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Values [][2]any          `json:"values"`
			} `json:"result"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &res), body)
	n := 0
	for _, s := range res.Data.Result {
		for _, v := range s.Values {
			ts := strconv.FormatFloat(v[0].(float64), 'f', 3, 64)
			ms, err := strconv.ParseInt(strings.ReplaceAll(ts, ".", ""), 10, 64)
			require.NoError(t, err)
			require.True(t, exactMillis[ms], "TSDB: %s %s at %s", s.Metric["device"], s.Metric["__name__"], ts)
			got["tsdb"] = append(got["tsdb"], s.Metric["device"]+" "+s.Metric["__name__"]+" "+ts+" "+v[1].(string))
			n++
		}
	}
	require.Equal(t, len(rs), n, "every reading is a sample in the TSDB")

	// The line protocol the InfluxDB sink sends (ns precision).
	f := &fakeWriteAPI{}
	x, _ := newTestInflux(t, f)
	require.NoError(t, x.Write(ctx, pipeline.Batch{Readings: rs}))
	for _, line := range f.lines {
		ns, err := strconv.ParseInt(line[strings.LastIndexByte(line, ' ')+1:], 10, 64)
		require.NoError(t, err)
		require.True(t, ns%1e6 == 0 && exactMillis[ns/1e6], "line protocol: %s", line)
	}
	got["line_protocol"] = f.lines

	// The Parquet archive, read back with the Arrow reader.
	dir := t.TempDir()
	a := openArchive(t, dir)
	require.NoError(t, a.Write(ctx, pipeline.Batch{Readings: rs}))
	require.NoError(t, a.SealAll())
	rows := readAllParquet(t, dir)
	require.Len(t, rows, len(rs))
	for _, r := range rows {
		require.True(t, r.time%1e6 == 0 && exactMillis[r.time/1e6], "Parquet: %s %s at %d ns", r.device, r.metric, r.time)
		got["parquet"] = append(got["parquet"], r.device+" "+r.metric+" "+time.Unix(0, r.time).UTC().Format(time.RFC3339Nano))
	}

	b, err := json.MarshalIndent(got, "", "  ")
	require.NoError(t, err)
	golden := "../testdata/storage/exact_times.json"
	if *update {
		require.NoError(t, os.WriteFile(golden, append(b, '\n'), 0o644))
	}
	want, err := os.ReadFile(golden)
	require.NoError(t, err, "run go test ./storage -update")
	require.JSONEq(t, string(want), string(b))
}

// TestTheTSDBRoundsToTheNearestMs: a time a few ns short of a ms (a float
// time, a µs clock) is stored at that ms, never truncated to the one before.
func TestTheTSDBRoundsToTheNearestMs(t *testing.T) {
	db, _ := open(t, t.TempDir())
	base := time.UnixMilli(1796194324000)
	cases := []struct {
		name   string
		ns     time.Duration // past base
		wantMs int64         // past base
	}{
		{"a float .271 decoded to ns", 270_999_908, 271},
		{"1 ns short of a ms", 273_999_999, 274},
		{"just under half a ms", 276_499_999, 276},
		{"half a ms rounds up", 278_500_000, 279},
		{"an exact ms", 280 * time.Millisecond, 280},
	}
	var rs []pipeline.Reading
	for i, c := range cases {
		rs = append(rs, rd("pipe-"+strconv.Itoa(i), "gulou", "pipe", "pressure", float64(i), base.Add(c.ns)))
	}
	require.NoError(t, db.Write(context.Background(), pipeline.Batch{Readings: rs}))
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			at := base.Add(time.Duration(c.wantMs) * time.Millisecond)
			q := `count_over_time(pipe_pressure{device="pipe-` + strconv.Itoa(i) + `"}[1ms])`
			require.Equal(t, "1", count(t, db, q, at), "stored at +%d ms", c.wantMs)
		})
	}
}

// TestADifferentValueAtTheSameMsIsCountedDuplicate: the store keeps one value
// per series and ms; a second, different one is refused and counted, whether
// it comes in the same batch or a later one, and an identical one is not.
func TestADifferentValueAtTheSameMsIsCountedDuplicate(t *testing.T) {
	ctx := context.Background()
	ms := func(k int) time.Time { return t0.Add(time.Duration(k) * time.Millisecond) }
	p := func(v float64, at time.Time) pipeline.Reading {
		return rd("pipe-0001", "gulou", "pipe", "pressure", v, at)
	}
	tests := []struct {
		name    string
		batches [][]pipeline.Reading
		dup     uint64
		want    string // the value stored at +1 ms
		total   string // samples stored
	}{
		{"in one batch", [][]pipeline.Reading{{p(1, ms(0)), p(2, ms(1)), p(3, ms(1))}}, 1, "2", "2"},
		{"in the next batch", [][]pipeline.Reading{{p(1, ms(0)), p(2, ms(1))}, {p(3, ms(1))}}, 1, "2", "2"},
		{"a few µs apart, the same ms", [][]pipeline.Reading{{p(2, ms(1)), p(3, ms(1).Add(300*time.Microsecond))}}, 1, "2", "1"},
		{"an identical replay is no duplicate", [][]pipeline.Reading{{p(2, ms(1)), p(2, ms(1))}, {p(2, ms(1))}}, 0, "2", "1"},
		{"late, in a later batch", [][]pipeline.Reading{{p(1, ms(0)), p(2, ms(1)), p(3, ms(2))}, {p(9, ms(1))}}, 1, "2", "3"},
		{"late, in the same batch", [][]pipeline.Reading{{p(1, ms(0)), p(2, ms(1)), p(3, ms(2)), p(9, ms(1))}}, 1, "2", "3"},
		{"late, in the same batch as the first of the series", [][]pipeline.Reading{{p(2, ms(1)), p(3, ms(2)), p(9, ms(1))}}, 1, "2", "2"},
		{"late and identical is no duplicate", [][]pipeline.Reading{{p(1, ms(0)), p(2, ms(1)), p(3, ms(2))}, {p(2, ms(1)), p(1, ms(0))}}, 0, "2", "3"},
		{"late at a new ms is stored", [][]pipeline.Reading{{p(2, ms(1)), p(3, ms(2))}, {p(1, ms(0))}}, 0, "2", "3"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			db, reg := open(t, t.TempDir())
			for _, b := range tc.batches {
				require.NoError(t, db.Write(ctx, pipeline.Batch{Readings: b}))
			}
			require.Equal(t, tc.dup, db.Refused()["duplicate"])
			require.Equal(t, float64(tc.dup), metricSum(t, reg, "citypulse_storage_tsdb_samples_rejected_total"))
			require.Equal(t, tc.want, count(t, db, `pipe_pressure`, ms(1)))
			require.Equal(t, "1", count(t, db, `count_over_time(pipe_pressure[1ms])`, ms(1)), "one sample at the ms")
			require.Equal(t, tc.total, count(t, db, `count_over_time(pipe_pressure[10ms])`, ms(2)))
		})
	}
}

func metricSum(t *testing.T, reg interface {
	Gather() ([]*dto.MetricFamily, error)
}, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				total += m.GetCounter().GetValue()
			}
		}
	}
	return total
}

// TestALateDuplicateAfterAReopenIsCounted: the series' latest time comes from
// the store when the sink first sees it after a start, so a late second value
// is refused then too.
func TestALateDuplicateAfterAReopenIsCounted(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ms := func(k int) time.Time { return t0.Add(time.Duration(k) * time.Millisecond) }
	p := func(v float64, at time.Time) pipeline.Reading {
		return rd("pipe-0001", "gulou", "pipe", "pressure", v, at)
	}
	db, _ := open(t, dir)
	require.NoError(t, db.Write(ctx, pipeline.Batch{Readings: []pipeline.Reading{p(1, ms(0)), p(2, ms(1)), p(3, ms(2))}}))
	require.NoError(t, db.Close())

	db, _ = open(t, dir)
	require.NoError(t, db.Write(ctx, pipeline.Batch{Readings: []pipeline.Reading{p(9, ms(1)), p(3, ms(2)), p(1, ms(0))}}))
	require.Equal(t, uint64(1), db.Refused()["duplicate"], "the late 9 at +1 ms; the identical re-sends are no-ops")
	require.Equal(t, "2", count(t, db, `pipe_pressure`, ms(1)))
	require.NoError(t, db.Write(ctx, pipeline.Batch{Readings: []pipeline.Reading{p(8, ms(2)), p(4, ms(3))}}))
	require.Equal(t, uint64(2), db.Refused()["duplicate"], "another value at the latest ms")
	require.Equal(t, "3", count(t, db, `pipe_pressure`, ms(2)))
	require.Equal(t, "4", count(t, db, `count_over_time(pipe_pressure[10ms])`, ms(3)))
}

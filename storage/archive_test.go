package storage

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/apache/arrow/go/v15/arrow"
	"github.com/apache/arrow/go/v15/arrow/memory"
	"github.com/apache/arrow/go/v15/parquet/file"
	"github.com/apache/arrow/go/v15/parquet/pqarrow"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

// archiveFixture: two kinds, two hours, 3 devices.
func archiveFixture() []pipeline.Reading {
	var rs []pipeline.Reading
	for i := 0; i < 120; i++ {
		at := t0.Add(time.Duration(i) * time.Minute) // 00:00 .. 01:59
		r := rd(fmt.Sprintf("pipe-%04d", i%2), []string{"gulou", "xuanwu"}[i%2], "pipe", "pressure", float64(300+i), at)
		r.Received = at.Add(time.Second).UnixNano()
		rs = append(rs, r)
		if i%10 == 0 {
			p := rd("bay-0001", "gulou", "parking", "occupied", float64(i/10%2), at)
			p.Received = r.Received
			rs = append(rs, p)
		}
	}
	return rs
}

func openArchive(t *testing.T, dir string) *Archive {
	t.Helper()
	a, err := OpenArchive(dir, DefaultArchive(), nil, nil)
	require.NoError(t, err)
	a.now = func() time.Time { return t0.Add(time.Hour) } // neither hour is due yet
	return a
}

// readAllParquet reads every archive file with the Arrow reader, checking the
// column types, and returns the rows.
func readAllParquet(t *testing.T, dir string) []row {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "kind=*", "date=*", "*.parquet"))
	require.NoError(t, err)
	var out []row
	for _, f := range files {
		pf, err := file.OpenParquetFile(f, false)
		require.NoError(t, err)
		fr, err := pqarrow.NewFileReader(pf, pqarrow.ArrowReadProperties{}, memory.DefaultAllocator)
		require.NoError(t, err)
		sc, err := fr.Schema()
		require.NoError(t, err)
		require.Equal(t, arrow.TIMESTAMP, sc.Field(0).Type.ID())
		require.Equal(t, arrow.Nanosecond, sc.Field(0).Type.(*arrow.TimestampType).Unit)
		require.Equal(t, arrow.FLOAT64, sc.Field(4).Type.ID())
		require.Equal(t, "unit", sc.Field(5).Name)
		pf.Close()
		rows, err := readParquet(context.Background(), f)
		require.NoError(t, err)
		out = append(out, rows...)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].time != out[j].time {
			return out[i].time < out[j].time
		}
		return out[i].device < out[j].device
	})
	return out
}

func TestArchiveWritesHourlyPartitionsReadableByArrow(t *testing.T) {
	dir := t.TempDir()
	a := openArchive(t, dir)
	rs := archiveFixture()
	require.NoError(t, a.Write(context.Background(), pipeline.Batch{Readings: rs}))
	require.NoError(t, a.SealAll())
	require.NoError(t, a.Close())

	for _, p := range []string{
		"kind=pipe/date=2026-01-01/hour=00.parquet", "kind=pipe/date=2026-01-01/hour=01.parquet",
		"kind=parking/date=2026-01-01/hour=00.parquet", "kind=parking/date=2026-01-01/hour=01.parquet",
	} {
		require.FileExists(t, filepath.Join(dir, p))
	}
	got := readAllParquet(t, dir)
	require.Len(t, got, len(rs), "every reading is archived once")
	for _, r := range got {
		require.Equal(t, r.time+int64(time.Second), r.received)
	}
}

func TestArchiveKeepsPendingRowsOverACrash(t *testing.T) {
	dir := t.TempDir()
	a := openArchive(t, dir)
	rs := archiveFixture()
	require.NoError(t, a.Write(context.Background(), pipeline.Batch{Readings: rs}))
	// No Close: the process dies. The pipeline replays the batch after restart.
	b := openArchive(t, dir)
	require.NoError(t, b.Write(context.Background(), pipeline.Batch{Readings: rs}))
	require.NoError(t, b.SealAll())
	require.Len(t, readAllParquet(t, dir), len(rs), "replayed rows are deduplicated at sealing")
}

func TestAReadingForASealedHourGoesToAPartFile(t *testing.T) {
	dir := t.TempDir()
	a := openArchive(t, dir)
	require.NoError(t, a.Write(context.Background(), pipeline.Batch{Readings: archiveFixture()}))
	require.NoError(t, a.SealAll())
	late := rd("pipe-0009", "gulou", "pipe", "pressure", 1, t0.Add(5*time.Minute))
	require.NoError(t, a.Write(context.Background(), pipeline.Batch{Readings: []pipeline.Reading{late}}))
	require.NoError(t, a.SealAll())
	require.FileExists(t, filepath.Join(dir, "kind=pipe/date=2026-01-01/hour=00.part-1.parquet"))
	require.Len(t, readAllParquet(t, dir), len(archiveFixture())+1)
}

func TestDueHoursAreSealedWhileWriting(t *testing.T) {
	dir := t.TempDir()
	a := openArchive(t, dir)
	require.NoError(t, a.Write(context.Background(), pipeline.Batch{Readings: archiveFixture()}))
	a.now = func() time.Time { return t0.Add(2*time.Hour + a.cfg.Grace + time.Minute) } // both hours ended over Grace ago
	a.lastCheck = time.Time{}
	require.NoError(t, a.Write(context.Background(), pipeline.Batch{Readings: []pipeline.Reading{rd("pipe-0001", "gulou", "pipe", "pressure", 1, t0.Add(90*time.Minute))}}))
	require.FileExists(t, filepath.Join(dir, "kind=pipe/date=2026-01-01/hour=01.parquet"), "sealed without SealAll or Close")
	require.FileExists(t, filepath.Join(dir, "kind=pipe/date=2026-01-01/hour=00.parquet"))
	require.NoError(t, a.Close())
}

func exportGet(t *testing.T, a *Archive, query string) (int, []byte) {
	t.Helper()
	srv := httptest.NewServer(a.ExportHandler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/api/v1/export?" + query)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func TestExport(t *testing.T) {
	dir := t.TempDir()
	a := openArchive(t, dir)
	require.NoError(t, a.Write(context.Background(), pipeline.Batch{Readings: archiveFixture()}))
	require.NoError(t, a.SealAll())
	// Fresh, still-pending rows are exported too.
	require.NoError(t, a.Write(context.Background(), pipeline.Batch{Readings: []pipeline.Reading{rd("pipe-0000", "gulou", "pipe", "pressure", 999, t0.Add(3*time.Minute+time.Second))}}))
	span := fmt.Sprintf("from=%d&to=%d", t0.Unix(), t0.Add(10*time.Minute).Unix())

	t.Run("csv for one district matches the golden file", func(t *testing.T) {
		code, body := exportGet(t, a, "kind=pipe&district=gulou&format=csv&"+span)
		require.Equal(t, http.StatusOK, code, string(body))
		golden := "../testdata/archive/export_gulou.csv"
		if *update {
			require.NoError(t, os.WriteFile(golden, body, 0o644))
		}
		want, err := os.ReadFile(golden)
		require.NoError(t, err)
		require.Equal(t, string(want), string(body))
	})
	t.Run("coarsened csv has no device column", func(t *testing.T) {
		code, body := exportGet(t, a, "kind=pipe&format=csv&coarsen=district&"+span)
		require.Equal(t, http.StatusOK, code, string(body))
		require.NotContains(t, string(body), "pipe-0000")
		require.Contains(t, string(body), "time,district,metric,mean,min,max,count\n")
		golden := "../testdata/archive/export_coarse.csv"
		if *update {
			require.NoError(t, os.WriteFile(golden, body, 0o644))
		}
		want, err := os.ReadFile(golden)
		require.NoError(t, err)
		require.Equal(t, string(want), string(body))
	})
	t.Run("parquet round-trips through the Arrow reader", func(t *testing.T) {
		code, body := exportGet(t, a, "kind=pipe&format=parquet&"+span)
		require.Equal(t, http.StatusOK, code)
		p := filepath.Join(t.TempDir(), "x.parquet")
		require.NoError(t, os.WriteFile(p, body, 0o644))
		rows, err := readParquet(context.Background(), p)
		require.NoError(t, err)
		require.Len(t, rows, 11, "10 minutes of one reading a minute, plus the pending one")
	})
	for _, bad := range []string{"format=csv", "kind=toaster", "kind=pipe&format=xml", "kind=pipe&from=yesterday",
		"kind=pipe&coarsen=device", fmt.Sprintf("kind=pipe&from=%d&to=%d", t0.Unix(), t0.Add(-time.Hour).Unix())} {
		t.Run("a bad query is refused: "+bad, func(t *testing.T) {
			code, body := exportGet(t, a, bad)
			require.Equal(t, http.StatusBadRequest, code)
			require.Contains(t, string(body), `"errorType":"bad_data"`)
		})
	}
}

func BenchmarkArchiveWrite(b *testing.B) {
	dir := b.TempDir()
	a, err := OpenArchive(dir, DefaultArchive(), nil, nil)
	require.NoError(b, err)
	rs := make([]pipeline.Reading, 5000)
	n := 0
	b.ReportAllocs()
	for b.Loop() {
		for i := range rs {
			rs[i] = rd(fmt.Sprintf("pipe-%05d", n%10000), "gulou", "pipe", "pressure", float64(n%1000)/10, t0.Add(time.Duration(n)*time.Millisecond))
			n++
		}
		require.NoError(b, a.Write(context.Background(), pipeline.Batch{Readings: rs}))
	}
	b.StopTimer()
	require.NoError(b, a.SealAll())
	var size int64
	_ = filepath.Walk(dir, func(_ string, fi os.FileInfo, _ error) error {
		if fi != nil && !fi.IsDir() {
			size += fi.Size()
		}
		return nil
	})
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64(size)/float64(n), "parquet-bytes/reading")
}

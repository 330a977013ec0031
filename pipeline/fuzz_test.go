package pipeline

import (
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// readJournal reads a journal from its start to its end with a reader, as a sink
// worker does, and fails the test on any read error: every record that
// opening kept must decode.
func readJournal(t *testing.T, j *journal) []Reading {
	t.Helper()
	r := newJournalReader(j)
	defer r.close()
	var out []Reading
	pos := uint64(0)
	for pos < j.written.Load() {
		before := pos
		var err error
		out, pos, _, err = r.read(pos, out, 1<<20, 0)
		require.NoError(t, err, "a record that opening kept does not decode (at %d)", before)
		require.Greater(t, pos, before, "the reader made no progress at %d of %d", before, j.written.Load())
	}
	require.Equal(t, j.written.Load(), pos)
	return out
}

// FuzzJournalReader feeds arbitrary bytes to the journal as a segment file:
// opening must never fail or panic on damage, account for every byte (kept
// or dropped), and every record it keeps must decode when a sink reads the
// journal from start to end.
func FuzzJournalReader(f *testing.F) {
	good := appendRecord(nil, []Reading{reading("pipe-0001", 1), reading("pipe-0001", 2)})
	good = appendRecord(good, []Reading{{Device: "tl-1", Kind: "traffic_light", District: "d", Metric: "state", Value: 4}})
	f.Add(good)
	f.Add(good[:len(good)-1])
	f.Add(make([]byte, 64))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, seg []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, segmentName(0)), seg, 0o644); err != nil {
			t.Fatal(err)
		}
		j, st, err := openJournal(dir, 1<<30, discard())
		if err != nil {
			t.Fatalf("open must tolerate damage: %v", err)
		}
		defer j.close()
		if int64(j.written.Load())+st.DroppedBytes != int64(len(seg)) {
			t.Fatalf("kept %d + dropped %d != %d bytes", j.written.Load(), st.DroppedBytes, len(seg))
		}
		rs := readJournal(t, j)
		records := map[uint64]bool{}
		for _, r := range rs {
			records[r.Seq] = true
		}
		require.LessOrEqual(t, len(records), st.Records, "readings from more records than opening kept")
	})
}

// FuzzJournalRoundTrip writes records built from the fuzzer's readings,
// damages the segment (cut short at cut, one byte flipped at flip), opens and
// reads it back: exactly the records wholly before the damage come back, with
// every field as written.
func FuzzJournalRoundTrip(f *testing.F) {
	f.Add("pipe-0001", "gulou", "pressure", 401.5, int64(1_700_000_000_000_000_000), uint8(3), uint8(4), 1000, 1000)
	f.Add("tl-1", "d", "state", math.Inf(1), int64(-1), uint8(1), uint8(1), 30, 7)
	f.Add("", "", "", math.NaN(), int64(0), uint8(0), uint8(9), 0, 0)
	f.Fuzz(func(t *testing.T, dev, district, metric string, v float64, at int64, records, per uint8, cut, flip int) {
		if len(dev) > maxStringLen || len(district) > maxStringLen || len(metric) > maxStringLen {
			// The record format's limit (record.go): the gateways pass device
			// ids of at most 63 bytes and schema metric names.
			t.Skip()
		}
		var seg []byte
		var ends []int       // end offset of each record
		var want [][]Reading // readings of each record
		for i := 0; i < int(records%8)+1; i++ {
			rs := make([]Reading, int(per%16)+1)
			for k := range rs {
				rs[k] = Reading{Device: dev, Kind: "pipe", District: district, Metric: metric,
					Value: v + float64(k), Time: at + int64(k), Received: at ^ int64(i), Seq: uint64(len(seg))}
			}
			seg = appendRecord(seg, rs)
			ends = append(ends, len(seg))
			want = append(want, rs)
		}
		damage := len(seg) // first damaged byte
		if cut >= 0 && cut < len(seg) {
			seg = seg[:cut]
			damage = cut
		}
		if flip >= 0 && flip < len(seg) {
			seg[flip] ^= 0x5a
			damage = min(damage, flip)
		}
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, segmentName(0)), seg, 0o644))
		j, st, err := openJournal(dir, 1<<30, discard())
		require.NoError(t, err)
		defer j.close()
		var wantRs []Reading
		kept := 0
		for i, end := range ends {
			if end > damage {
				break
			}
			wantRs = append(wantRs, want[i]...)
			kept++
		}
		require.Equal(t, kept, st.Records, "records kept")
		got := readJournal(t, j)
		require.Len(t, got, len(wantRs))
		for i := range got {
			w, g := wantRs[i], got[i]
			// NaN != NaN: compare the bits.
			require.Equal(t, math.Float64bits(w.Value), math.Float64bits(g.Value), "reading %d value", i)
			w.Value, g.Value = 0, 0
			require.Equal(t, w, g, "reading %d", i)
		}
	})
}

// FuzzDecodeRecord checks that a record payload never panics the decoder.
func FuzzDecodeRecord(f *testing.F) {
	good := appendRecord(nil, []Reading{reading("pipe-0001", 1)})
	f.Add(good[headerSize:])
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, p []byte) {
		rs, err := decodeRecord(nil, p, 0, make(interner))
		if err == nil && len(rs) > len(p) {
			t.Fatalf("%d readings from %d bytes", len(rs), len(p))
		}
	})
}

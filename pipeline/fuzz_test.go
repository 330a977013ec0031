package pipeline

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// FuzzJournalReader feeds arbitrary bytes to the journal as a segment file:
// opening must never fail or panic on damage, and every record it keeps must
// decode.
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
		r := newJournalReader(j)
		defer r.close()
		// Records that pass the CRC are ours or astronomically unlikely; decoding
		// must not panic either way.
		_, _, _, _ = r.read(0, nil, 1<<20, 0)
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

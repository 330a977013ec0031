package cluster

import (
	"encoding/hex"
	"flag"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func sampleBatch() []pipeline.Reading {
	return []pipeline.Reading{
		{Device: "pipe-0001", Kind: "pipe", District: "gulou", Metric: "pressure", Value: 412.5, Time: 1767225600_000_000_123, Received: 1767225600_050_000_000},
		{Device: "pipe-0001", Kind: "pipe", District: "gulou", Metric: "flow", Value: -3, Time: 1767225600_000_000_123, Received: 1767225600_050_000_000},
		{Device: "tl-0001", Kind: "traffic_light", District: "my district", Metric: "state", Value: 3, Time: 1767225605_000_000_000, Received: 1767225604_000_000_000},
		{Device: "w-ü", Kind: "weather", District: "", Metric: "t", Value: math.Inf(1), Time: -5, Received: 0},
	}
}

func TestBatchRoundTripsAndMatchesTheGoldenEncoding(t *testing.T) {
	enc := AppendBatch(nil, sampleBatch())
	golden := filepath.Join("..", "testdata", "cluster", "batch_v1.hex")
	if *update {
		require.NoError(t, os.WriteFile(golden, []byte(hex.EncodeToString(enc)+"\n"), 0o644))
	}
	want, err := os.ReadFile(golden)
	require.NoError(t, err, "run go test ./cluster -run TestBatch -update")
	require.Equal(t, strings.TrimSpace(string(want)), hex.EncodeToString(enc), "the wire format changed: bump batchVersion")

	got, err := DecodeBatch(enc, []pipeline.Reading{{Device: "kept"}})
	require.NoError(t, err)
	require.Equal(t, append([]pipeline.Reading{{Device: "kept"}}, sampleBatch()...), got, "appended to dst")
	empty, err := DecodeBatch(AppendBatch(nil, nil), nil)
	require.NoError(t, err)
	require.Empty(t, empty)
}

func TestDecodeBatchRefusesDamagedPayloads(t *testing.T) {
	good := AppendBatch(nil, sampleBatch())
	tests := []struct {
		name    string
		payload []byte
		want    string
	}{
		{"empty", nil, "not a version 1 batch"},
		{"another version", append([]byte{2}, good[1:]...), "not a version 1 batch"},
		{"truncated", good[:len(good)-3], "bad reading batch"},
		{"trailing bytes", append(append([]byte{}, good...), 0), "trailing bytes"},
		{"no reading count", AppendBatch(nil, nil)[:2], "reading count"},
		{"a huge reading count", []byte{1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f}, "reading count too large"},
		{"a huge string", []byte{1, 1, 0xff, 0xff, 0x03}, "string too long"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dst := []pipeline.Reading{{Device: "kept"}}
			got, err := DecodeBatch(tc.payload, dst)
			require.ErrorIs(t, err, ErrBadBatch)
			require.ErrorContains(t, err, tc.want)
			require.Equal(t, dst, got, "dst unchanged")
		})
	}
	// A reading whose device index points past the table.
	bad := []byte{1, 1, 1, 'a', 1, 5, 0, 0, 0}
	bad = append(bad, make([]byte, 10)...)
	_, err := DecodeBatch(bad, nil)
	require.ErrorContains(t, err, "device index out of range")
}

// FuzzDecodeBatch: no payload panics the decoder or makes it allocate beyond
// its bounds, and whatever decodes encodes back to the same readings.
func FuzzDecodeBatch(f *testing.F) {
	good := AppendBatch(nil, sampleBatch())
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add(AppendBatch(nil, nil))
	f.Add([]byte{1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		rs, err := DecodeBatch(b, nil)
		if err != nil {
			return
		}
		again, err := DecodeBatch(AppendBatch(nil, rs), nil)
		if err != nil {
			t.Fatalf("re-encoded batch does not decode: %v", err)
		}
		if len(again) != len(rs) {
			t.Fatalf("%d readings, then %d", len(rs), len(again))
		}
		for i := range rs {
			a, b := rs[i], again[i]
			if a.Device != b.Device || a.Kind != b.Kind || a.District != b.District || a.Metric != b.Metric ||
				math.Float64bits(a.Value) != math.Float64bits(b.Value) || a.Time != b.Time || a.Received != b.Received {
				t.Fatalf("reading %d: %+v, then %+v", i, a, b)
			}
		}
	})
}

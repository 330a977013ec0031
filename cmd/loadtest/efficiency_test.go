package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cmd/internal/servertest"
)

// The efficiency benchmark's smoke form (make bench-e2e runs 200,000
// messages): both modes, the binary against itself as the baseline, every
// reading verified in VictoriaMetrics and in citypulse's own store. The
// figures are printed, never asserted (shared machines).
func TestEfficiencySmoke(t *testing.T) {
	skipShort(t)
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // where the harness makes its data directories
	var out, errOut bytes.Buffer
	code := mainCode(t.Context(), []string{"efficiency", "--citypulse", serverBin, "--baseline", serverBin,
		"--messages", "5000", "--configs", filepath.Join(servertest.Root(), "configs"), "--drain-timeout", "2m"}, &out, &errOut)
	t.Logf("stdout:\n%s\nstderr:\n%s", out.String(), errOut.String())
	require.Equal(t, 0, code)
	for _, mode := range []string{"external", "embedded"} {
		require.Contains(t, out.String(), mode+" ratio ", "both binaries ran in %s mode", mode)
	}
	require.Equal(t, 2, strings.Count(out.String(), "VictoriaMetrics 20000/20000, citypulse TSDB 20000/20000"))
	require.Equal(t, 2, strings.Count(out.String(), "embedded     1 "))
	leftover, _ := filepath.Glob(filepath.Join(tmp, "citypulse-efficiency-*"))
	require.Empty(t, leftover, "the harness removes its data directories")
}

// A reading missing from the store fails the run with the reading named;
// one nobody sent, too. A duplicate (an at-least-once resend) does not.
func TestStoreCheckComplete(t *testing.T) {
	require.NoError(t, StoreCheck{Expected: 8, Acked: 8, Found: 8}.complete())
	require.NoError(t, StoreCheck{Expected: 8, Acked: 8, Found: 8, Duplicated: 2}.complete())
	for name, c := range map[string]StoreCheck{
		"a reading lost":       {Expected: 8, Acked: 8, Found: 7, Lost: 1, Examples: []string{"lost: d pressure @1"}},
		"a reading unexpected": {Expected: 8, Acked: 8, Found: 8, Unexpected: 1},
		"a message unacked":    {Expected: 8, Acked: 4, Found: 8},
		"nothing generated":    {},
		"the query failed":     {Expected: 8, Acked: 8, Error: "query: 422"},
	} {
		require.Error(t, c.complete(), name)
	}
	require.ErrorContains(t, StoreCheck{Expected: 8, Acked: 8, Found: 7, Lost: 1, Examples: []string{"lost: d pressure @1"}}.complete(),
		"lost: d pressure @1")
}

// Every packet the flood prepares is a well-formed QoS 1 PUBLISH whose
// remaining length covers exactly the rest of it, also past 127 and 16383
// bytes (two and three length bytes).
func TestPublishPacket(t *testing.T) {
	for _, size := range []int{10, 200, 20000} {
		body := bytes.Repeat([]byte("x"), size)
		p := publishPacket("devices/d/readings", packetID(65535), body)
		require.Equal(t, byte(0x32), p[0])
		n, mul, i := 0, 1, 1
		for ; ; i++ {
			n += int(p[i]&0x7f) * mul
			mul *= 128
			if p[i]&0x80 == 0 {
				break
			}
		}
		require.Equal(t, len(p)-i-1, n, "remaining length of a %d-byte body", size)
		require.Equal(t, []byte{0, 1}, p[i+1+2+len("devices/d/readings"):][:2], "packet id 65535 wraps to 1")
		require.Equal(t, body, p[len(p)-size:])
	}
}

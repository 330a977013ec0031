package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
)

// FuzzLoadConfig feeds arbitrary files to the config loader: it returns a
// config or an error, never panics, and a config it returns survives the
// round trip that `citypulse config` offers (the effective config printed as
// YAML, saved and loaded again gives the same config). loadConfig validates
// what it returns, so re-validating would prove nothing; the round trip fails
// on a key that prints under another name than it loads, a value that prints
// in a form the loader reads differently (durations, lists, floats), or one
// that validates but cannot be written back. Seeds: the shipped configs and
// testdata/fuzz/config/*.yaml (crashers found are kept there).
func FuzzLoadConfig(f *testing.F) {
	seeds, _ := filepath.Glob("../../configs/*.yaml")
	more, _ := filepath.Glob("../../testdata/fuzz/config/*.yaml")
	for _, p := range append(seeds, more...) {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("ingest:\n  max_past: -1h\n"))
	f.Add([]byte("pipeline: [1, 2]\n"))
	f.Add([]byte("http: {addr: 99999}\n"))
	f.Add([]byte("pipeline: {fsync_interval: 1500ms, batch: {max_readings: 77}}\nhttp: {admin_token: 0123456789abcdef0}\n"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(dir, "c.yaml")
		require.NoError(t, os.WriteFile(p, b, 0o600))
		c, err := loadConfig(p, nil)
		if err != nil {
			return
		}
		printed, err := yaml.Marshal(c) // what printConfig writes, secrets unmasked
		require.NoError(t, err)
		p2 := filepath.Join(dir, "printed.yaml")
		require.NoError(t, os.WriteFile(p2, printed, 0o600))
		back, err := loadConfig(p2, nil)
		require.NoError(t, err, "the printed config does not load:\n%s", printed)
		// Compared as printed: an empty list and no list print alike.
		again, err := yaml.Marshal(back)
		require.NoError(t, err)
		require.Equal(t, string(printed), string(again), "the printed config loads as another config")
	})
}

package main

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzLoadConfig feeds arbitrary files to the config loader: it must return a
// config that validates or an error, never panic. Seeds: the shipped configs
// and testdata/fuzz/config/*.yaml (crashers found are kept there).
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
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(dir, "c.yaml")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := loadConfig(p, nil)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("loadConfig returned a config that does not validate: %v", err)
		}
	})
}

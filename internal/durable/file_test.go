package durable

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestWriteFile(t *testing.T) {
	for _, tc := range []struct {
		name string
		sync bool
	}{{"without fsync", false}, {"with fsync of the file and its directory", true}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "state.json")
			require.NoError(t, WriteFile(path, []byte("old"), 0o600, tc.sync))
			require.NoError(t, WriteFile(path, []byte("new"), 0o600, tc.sync))
			b, err := os.ReadFile(path)
			require.NoError(t, err)
			require.Equal(t, "new", string(b))
			st, err := os.Stat(path)
			require.NoError(t, err)
			require.Equal(t, os.FileMode(0o600), st.Mode().Perm())
			_, err = os.Stat(path + ".tmp")
			require.ErrorIs(t, err, os.ErrNotExist, "no temporary file is left behind")
		})
	}
}

func TestWriteFileFailureKeepsTheOldContent(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	require.NoError(t, WriteFile(path, []byte("old"), 0o644, true))
	// A directory where the temporary file would go makes the write fail.
	require.NoError(t, os.Mkdir(path+".tmp", 0o755))
	err := WriteFile(path, []byte("new"), 0o644, true)
	require.ErrorContains(t, err, "state.json")
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, "old", string(b))
}

func TestSyncDirOfAMissingDirectoryFails(t *testing.T) {
	require.Error(t, SyncDir(filepath.Join(t.TempDir(), "missing")))
	require.NoError(t, SyncDir(t.TempDir()))
}

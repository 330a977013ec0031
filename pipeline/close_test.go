package pipeline

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// openJournalFiles counts this process's descriptors on files under dir.
func openJournalFiles(t *testing.T, dir string) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("needs /proc/self/fd")
	}
	n := 0
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name()))
		if err == nil && strings.HasPrefix(target, dir) {
			n++
		}
	}
	return n
}

func TestCloseReleasesTheJournalOfAPipelineThatNeverRan(t *testing.T) {
	dir := t.TempDir()
	p, err := New(Options{Config: testConfig(), Dir: dir, Sinks: []SinkSpec{{Sink: &collectSink{name: "a"}}}})
	require.NoError(t, err)
	require.Positive(t, openJournalFiles(t, dir), "New opens the journal")

	require.NoError(t, p.Close())
	require.Zero(t, openJournalFiles(t, dir), "Close closes every journal file")
	require.NoError(t, p.Close(), "Close is idempotent")
	require.ErrorIs(t, p.Run(context.Background()), ErrClosed, "a closed pipeline does not run")
	require.ErrorIs(t, p.Submit(context.Background(), []Reading{reading("pipe-0001", 1)}), ErrClosed)
}

func TestCloseAfterRunIsANoOp(t *testing.T) {
	dir := t.TempDir()
	r := start(t, dir, testConfig(), &collectSink{name: "a"})
	r.stop(t)
	require.Zero(t, openJournalFiles(t, dir), "Run closed the journal")
	require.NoError(t, r.p.Close())
	require.NoError(t, r.p.Close())
}

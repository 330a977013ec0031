package servers

import (
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseStatCPU(t *testing.T) {
	for _, tc := range []struct {
		name, stat string
		want       time.Duration
		bad        bool
	}{
		{name: "utime and stime are fields 14 and 15, in ticks of 10 ms",
			stat: "4242 (citypulse) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 130 0 0 20 0 12 0 500 1000000 2000 18446744073709551615",
			want: 3800 * time.Millisecond},
		{name: "a command name with spaces and parentheses is skipped whole",
			stat: "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 1 1 1",
			want: 30 * time.Millisecond},
		{name: "a truncated line is an error", stat: "7 (x) R 1 2 3", bad: true},
		{name: "no command name is an error", stat: "7 x R", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseStatCPU(tc.stat)
			if tc.bad {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

// The harness's own CPU time grows while it burns CPU.
func TestCPUTimeOfSelf(t *testing.T) {
	before, err := CPUTime(os.Getpid())
	require.NoError(t, err)
	x := 0
	for start := time.Now(); time.Since(start) < 300*time.Millisecond; {
		x++
	}
	after, err := CPUTime(os.Getpid())
	require.NoError(t, err)
	require.Greater(t, after, before, "spun %d times", x)
}

// A process that exits during start-up is an error carrying its output; one
// that is ready stops cleanly with SIGTERM and reports its CPU time.
func TestStartProc(t *testing.T) {
	_, err := StartProc("false", []string{"sh", "-c", "echo broken config; exit 3"}, nil, nil,
		func() error { return os.ErrNotExist }, 10*time.Second)
	require.ErrorContains(t, err, "broken config")
	p, err := StartProc("sleeper", []string{"sleep", "60"}, nil, nil, func() error { return nil }, 10*time.Second)
	require.NoError(t, err)
	_, err = CPUTime(p.Pid())
	require.NoError(t, err)
	require.Error(t, p.Stop(10*time.Second), "sleep dies of SIGTERM: not a clean exit")
	require.True(t, p.Exited())
}

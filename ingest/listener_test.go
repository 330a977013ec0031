package ingest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// Out of file descriptors, the broker cannot accept; once some are free again
// it must accept the waiting connection (mochi's own accept loop would have
// returned for good on the first error, leaving a broker that is up but deaf).
// The exhaustion is real: the test lowers its own open-files limit.
func TestBrokerKeepsAcceptingAfterRunningOutOfFiles(t *testing.T) {
	b := startBroker(t, &recorder{})
	var old syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old))
	low := old
	low.Cur = 256
	require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low))
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })

	var held []*os.File
	release := func() {
		for _, f := range held {
			f.Close()
		}
		held = nil
	}
	t.Cleanup(release)
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			require.True(t, errors.Is(err, syscall.EMFILE), "%v", err)
			break
		}
		held = append(held, f)
	}
	// one descriptor for the client's socket; none left for the accept
	held[len(held)-1].Close()
	held = held[:len(held)-1]

	c := newClient(b.Addr().String(), "pipe-0001", "secret-pipe-0001")
	tok := c.Connect()
	if tok.WaitTimeout(300 * time.Millisecond) {
		// done: either the server accepted (the failure this test is for) or
		// the client itself found no descriptor (another goroutine of the
		// test binary took the one left): then the server was not exercised
		require.Error(t, tok.Error(), "no CONNACK while the server cannot accept")
		t.Skipf("the client could not dial while out of descriptors (%v): the server was not exercised", tok.Error())
	}

	release()
	require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old))
	require.True(t, tok.WaitTimeout(10*time.Second), "accepted once descriptors are free")
	require.NoError(t, tok.Error())
	c.Disconnect(50)
	require.GreaterOrEqual(t, testutil.ToFloat64(b.m.accept), 1.0, "the failed accepts are counted")
	t.Logf("accept errors counted while out of descriptors: %v", testutil.ToFloat64(b.m.accept))
}

// A connection that a device closes is routine (Debug); mochi's empty Warn
// messages get a text.
func TestConnLogHandler(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		level slog.Level
		want  string
	}{
		{"device closed", fmt.Errorf("read connection: %w", io.EOF), slog.LevelInfo, ""},
		{"reset, shown at debug level", &os.SyscallError{Syscall: "read", Err: syscall.ECONNRESET}, slog.LevelDebug, `level=DEBUG msg="mqtt connection ended"`},
		{"other error", errors.New("read connection: malformed packet"), slog.LevelInfo, `level=WARN msg="mqtt connection ended" error="read connection: malformed packet"`},
		{"connect timeout", fmt.Errorf("read connection: %w", os.ErrDeadlineExceeded), slog.LevelInfo, ""},
		{"wrong password (counted and sampled elsewhere)", packets.ErrBadUsernameOrPassword, slog.LevelInfo, ""},
		{"a will refused", packets.ErrNotAuthorized, slog.LevelInfo, ""},
		{"server full", packets.ErrServerBusy, slog.LevelInfo, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			log := slog.New(connLogHandler{slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: tc.level})})
			log.Warn("", "error", tc.err)
			if tc.want == "" {
				require.Empty(t, buf.String())
				return
			}
			require.Contains(t, buf.String(), tc.want)
		})
	}
}

// max_connections above what the open-files limit leaves (less the slots for
// connections not authenticated yet) is lowered, so that devices past it are
// refused (and back off) instead of waiting unanswered.
func TestMaxConnectionsFollowsTheOpenFilesLimit(t *testing.T) {
	var old syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old))
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
	for _, tc := range []struct {
		openFiles      uint64
		configured     int
		wantMaxClients int64
	}{
		{1000, 100000, 558},  // reserve 256, a quarter of the rest (186) for pending connections
		{5000, 100000, 3476}, // reserve a tenth, 1024 for pending connections
		{5000, 300, 300},     // under the limit: as configured
		{5000, 0, 3476},      // 0 (unlimited) is bounded too
	} {
		t.Run(fmt.Sprint(tc.openFiles, "/", tc.configured), func(t *testing.T) {
			lim := old
			lim.Cur = min(tc.openFiles, old.Max)
			require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim))
			defer func() { require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old)) }()
			if lim.Cur != tc.openFiles {
				t.Skipf("hard open-files limit %d is below %d", old.Max, tc.openFiles)
			}
			b, err := NewBroker(MQTTConfig{Enabled: true, Addr: "127.0.0.1:0", MaxConnections: tc.configured}, testRegistry(t), NewHandler(&recorder{}, HandlerOptions{}), nil, nil)
			require.NoError(t, err)
			defer b.Close()
			require.Equal(t, tc.wantMaxClients, b.srv.Options.Capabilities.MaximumClients)
		})
	}
}

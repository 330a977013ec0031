package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/udp"
	"github.com/stretchr/testify/require"
)

// The journal's disk fills up: devices get a back-off answer (CoAP 5.03),
// nothing is acknowledged that was not written, the operator reads what to do
// in the log, and when space returns ingestion resumes by itself; every
// acknowledged reading is in the store. The disk is a size-limited tmpfs
// mounted over the journal directory (this needs root, as on CI).
func TestJournalDiskFull(t *testing.T) {
	skipShort(t)
	s := newProc(t, "pipeline:\n  shards: 1\n  segment_bytes: 4194304\n")
	journal := filepath.Join(s.dir, "data", "journal")
	require.NoError(t, os.MkdirAll(journal, 0o755))
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", journal).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a size-limited tmpfs (needs root): %v %s", err, out)
	}
	defer func() { _ = exec.Command("umount", "-l", journal).Run() }()
	s.start()

	co, err := udp.Dial(s.coap)
	require.NoError(t, err)
	defer co.Close()
	post := func(i int) codes.Code {
		body := fmt.Appendf(nil, `[{"n":"pressure","v":%d,"t":%d}]`, 100+i%500, time.Now().Add(-2*time.Hour).Unix()+int64(i))
		resp, err := co.Post(ctxT(t, 5*time.Second), "/devices/pipe-0001/readings", message.AppSenmlJSON, bytes.NewReader(body),
			message.Option{ID: message.URIQuery, Value: []byte("key=secret-pipe-0001")})
		require.NoError(t, err)
		return resp.Code()
	}
	acked := map[int]bool{}
	i := 0
	full := false
	for ; i < 20000 && !full; i++ {
		switch c := post(i); c {
		case codes.Changed:
			acked[i] = true
		case codes.ServiceUnavailable:
			full = true
		default:
			t.Fatalf("post %d: unexpected %v", i, c)
		}
	}
	require.True(t, full, "the journal filled its 256 KiB disk")
	t.Logf("disk full after %d acknowledged posts", len(acked))
	require.Eventually(t, func() bool {
		return strings.Contains(s.Logs(), "journal write failed") && strings.Contains(s.Logs(), "check the disk")
	}, 5*time.Second, 50*time.Millisecond, "the operator is told what happened and where")
	require.Equal(t, codes.ServiceUnavailable, post(i), "still full: still refused")
	i++

	// space returns
	out, err := exec.Command("mount", "-o", "remount,size=64m", journal).CombinedOutput()
	require.NoError(t, err, "%s", out)
	t0 := time.Now()
	eventually(t, 10*time.Second, func() error {
		if c := post(i); c != codes.Changed {
			i++
			return fmt.Errorf("got %v", c)
		}
		acked[i] = true
		i++
		return nil
	})
	t.Logf("ingestion resumed %v after space returned", time.Since(t0).Round(time.Millisecond))
	for range 100 {
		require.Equal(t, codes.Changed, post(i))
		acked[i] = true
		i++
	}

	// every acknowledged reading is in the store, none that was refused; and
	// so after a restart, which replays the journal that once hit the wall
	storeHasAll := func() error {
		v, err := latest(t, s.http, `count_over_time(pipe_pressure{device="pipe-0001"}[3h])`)
		if err != nil {
			return err
		}
		if int(v) != len(acked) {
			return fmt.Errorf("store has %v readings, %d were acknowledged", v, len(acked))
		}
		return nil
	}
	eventually(t, 20*time.Second, storeHasAll)
	s.stop()
	s.start()
	require.NotContains(t, s.Logs(), "cut a damaged or torn segment", "no corruption")
	eventually(t, 20*time.Second, storeHasAll)
	s.stop()
}

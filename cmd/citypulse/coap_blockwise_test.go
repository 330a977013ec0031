package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// libcoap's client sends a body block-wise with a new token per block (RFC
// 7959 allows it); against the real binary, every reading of a 10-block body
// must be stored and queryable (issue 12).
func TestCoAPBlockwiseFromLibcoapIsStored(t *testing.T) {
	bin, s := libcoapAndServer(t)
	defer s.stop()

	const n = 400
	var b strings.Builder
	b.WriteByte('[')
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"n":"pressure","v":%d,"t":%d}`, i, i-n) // one a second, relative to now
	}
	b.WriteByte(']')
	require.Greater(t, b.Len(), 9*1024, "a body of ten 1024-byte blocks")
	f := filepath.Join(t.TempDir(), "big.json")
	require.NoError(t, os.WriteFile(f, []byte(b.String()), 0o600))

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	uri := "coap://" + s.coap + "/devices/pipe-0001/readings?key=secret-pipe-0001"
	out, err := exec.CommandContext(ctx, bin, "-m", "post", "-b", "1024", "-t", "110", "-f", f, uri).CombinedOutput()
	require.NoError(t, err, "coap-client-notls: %s", out)
	require.NotContains(t, string(out), "4.", "no error answer: %s", out)
	eventually(t, 15*time.Second, func() error {
		count, err := latest(t, s.http, `count_over_time(pipe_pressure{device="pipe-0001"}[10m])`)
		if err != nil {
			return err
		}
		sum, err := latest(t, s.http, `sum_over_time(pipe_pressure{device="pipe-0001"}[10m])`)
		if err == nil && (count != n || sum != n*(n-1)/2) {
			err = fmt.Errorf("stored %v readings summing to %v, want %d summing to %d", count, sum, n, n*(n-1)/2)
		}
		return err
	})
}

// libcoap's client, a whole body in one datagram, CON and NON: the requests
// the gateway's direct path takes (ingest/coapdirect.go) are answered and
// stored; a wrong key goes to go-coap's path and gets 4.01.
func TestCoAPFromLibcoapInOneDatagram(t *testing.T) {
	bin, s := libcoapAndServer(t)
	defer s.stop()
	post := func(key string, v int, extra ...string) string {
		f := filepath.Join(t.TempDir(), "r.json")
		require.NoError(t, os.WriteFile(f, fmt.Appendf(nil, `[{"n":"pressure","v":%d}]`, v), 0o600))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		args := append([]string{"-m", "post", "-t", "110", "-B", "10", "-f", f}, extra...)
		args = append(args, "coap://"+s.coap+"/devices/pipe-0001/readings?key="+key)
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		require.NoError(t, err, "coap-client-notls: %s", out)
		return string(out)
	}
	require.NotContains(t, post("secret-pipe-0001", 300), "4.", "CON")
	require.NotContains(t, post("secret-pipe-0001", 400, "-N"), "4.", "NON")
	require.Contains(t, post("wrong", 500), "4.01")
	eventually(t, 15*time.Second, func() error {
		sum, err := latest(t, s.http, `sum_over_time(pipe_pressure{device="pipe-0001"}[10m])`)
		if err == nil && sum != 700 {
			err = fmt.Errorf("stored readings sum to %v, want 700 (300 + 400)", sum)
		}
		return err
	})
}

// libcoapAndServer finds libcoap's client and starts the server binary.
func libcoapAndServer(t *testing.T) (string, *proc) {
	t.Helper()
	skipShort(t)
	bin, err := exec.LookPath("coap-client-notls")
	if err != nil {
		t.Fatal("coap-client-notls not found: run `make deps` (installs Debian's libcoap3-bin)")
	}
	s := newProc(t, "")
	s.start()
	return bin, s
}

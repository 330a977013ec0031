package clusterstate

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/devices"
)

func dev(id string) devices.Device {
	return devices.Device{ID: id, Kind: devices.KindPipe, District: "gulou", Interval: 10 * time.Second, Secret: "secret-" + id}
}

// startRegistry is one node's registry (the config file's base devices)
// shared through the bucket on nc; it runs until the test ends.
func startRegistry(t *testing.T, nc *nats.Conn, base ...devices.Device) *Registry {
	t.Helper()
	local, err := devices.NewRegistry(base, "")
	require.NoError(t, err)
	r, err := NewRegistry(nc, local, "CITYPULSE_DEVICES", 3, nil, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, r.Ensure(ctx))
	rctx, rcancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := r.Run(rctx); err != nil {
			t.Error(err)
		}
	}()
	t.Cleanup(func() { rcancel(); wg.Wait() })
	select {
	case <-r.Ready():
	case <-ctx.Done():
		t.Fatal("the registry did not apply the bucket's contents within a minute")
	}
	return r
}

// A device added through one node's device API authenticates on another node
// (connected to another NATS server) within seconds; a removal on the second
// node reaches the first; an id taken on one node is refused on the other;
// a node started later applies what changed before.
func TestDeviceChangesReachEveryNode(t *testing.T) {
	c := natstest.Start(t, 3)
	base := []devices.Device{dev("pipe-0001"), dev("pipe-0002")}
	a := startRegistry(t, connect(t, c.Nodes[0].URL()), base...)
	b := startRegistry(t, connect(t, c.Nodes[2].URL()), base...)

	// through a's HTTP device API, as an operator would
	srv := httptest.NewServer(http.HandlerFunc(devices.NewAPI(a, nil).Add))
	defer srv.Close()
	posted := time.Now()
	resp, err := http.Post(srv.URL, "application/json", strings.NewReader(
		`{"id":"pipe-0100","kind":"pipe","district":"gulou","interval":"10s","secret":"secret-pipe-0100"}`))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	waitFor(t, "pipe-0100 on b", func() bool { _, ok := b.Get("pipe-0100"); return ok })
	t.Logf("added through a's API, applied on b %v after the request", time.Since(posted))
	_, ok := b.reg.Authenticate("pipe-0100", "secret-pipe-0100")
	require.True(t, ok)
	_, ok = b.reg.Authenticate("pipe-0100", "wrong-secret")
	require.False(t, ok)

	require.ErrorIs(t, b.Add(dev("pipe-0100")), devices.ErrDuplicate)
	require.NoError(t, b.Remove("pipe-0100"))
	require.NoError(t, b.Remove("pipe-0001")) // a device of the config file
	waitFor(t, "the removals on a", func() bool {
		_, added := a.Get("pipe-0100")
		_, based := a.Get("pipe-0001")
		return !added && !based
	})
	require.NoError(t, a.Add(dev("pipe-0200")))

	late := startRegistry(t, connect(t, c.Nodes[1].URL()), base...)
	var ids []string
	for _, d := range late.List() {
		ids = append(ids, d.ID)
	}
	require.Equal(t, []string{"pipe-0002", "pipe-0200"}, ids)
}

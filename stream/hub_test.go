package stream

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// readEvents reads SSE data lines from r until n arrived or the stream ends.
func readEvents(r *bufio.Reader, n int) ([]string, error) {
	var got []string
	for len(got) < n {
		line, err := r.ReadString('\n')
		if err != nil {
			return got, err
		}
		if d, ok := strings.CutPrefix(line, "data: "); ok {
			got = append(got, strings.TrimSuffix(d, "\n"))
		}
	}
	return got, nil
}

func openStream(t *testing.T, url, path string) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	require.NoError(t, err)
	_, err = fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path)
	require.NoError(t, err)
	br := bufio.NewReader(conn)
	status, err := br.ReadString('\n')
	require.NoError(t, err)
	require.Contains(t, status, "200")
	return conn, br
}

// A thousand clients, one of which stops reading: the publisher never blocks,
// the stalled client is dropped, and every other client gets every event in
// order. The publisher paces itself as a live source does (a vital-sign round
// at a time), so the readers are never a whole buffer behind.
func TestStalledClientAffectsNoOther(t *testing.T) {
	const clients, events, round = 1000, 600, 50
	reg := prometheus.NewRegistry()
	h := New(Options{MaxClients: clients, Buffer: 4 * round, WriteTimeout: time.Minute, Registerer: reg})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		topics := strings.Split(r.URL.Query().Get("topics"), ",")
		h.Serve(w, r, func(ev Event) bool { return slices.Contains(topics, ev.Topic) }, nil)
	}))
	defer srv.Close()

	// The stalled client: a tiny receive buffer, and it never reads.
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	stalled, err := d.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	require.NoError(t, err)
	defer stalled.Close()
	_, err = fmt.Fprintf(stalled, "GET /?topics=all,bulk HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)

	rs := make([]*bufio.Reader, clients-1)
	for i := range rs {
		c, br := openStream(t, srv.URL, "/?topics=all")
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(6 * time.Minute))
		rs[i] = br
	}
	require.Eventually(t, func() bool { return h.Clients() == clients }, 20*time.Second, 10*time.Millisecond)

	var wg sync.WaitGroup
	progress := make([]atomic.Int64, len(rs))
	errs := make(chan error, len(rs))
	for i, br := range rs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range events {
				got, err := readEvents(br, 1)
				if err != nil {
					errs <- fmt.Errorf("after %d events: %w", n, err)
					return
				}
				if got[0] != fmt.Sprint(n) {
					errs <- fmt.Errorf("event %d is %q", n, got[0])
					return
				}
				progress[i].Store(int64(n + 1))
			}
		}()
	}
	behind := func(upTo int) bool {
		for i := range progress {
			if progress[i].Load() < int64(upTo) {
				return true
			}
		}
		return false
	}
	bulk := []byte(strings.Repeat("x", 8000))
	deadline := time.Now().Add(5 * time.Minute)
	for i := range events {
		if i%round == 0 {
			for behind(i-round) && time.Now().Before(deadline) && len(errs) == 0 {
				time.Sleep(5 * time.Millisecond)
			}
		}
		h.Publish(Event{Topic: "all", Data: []byte(fmt.Sprint(i))})
		// Bulk that only the stalled client asked for, to fill its socket.
		h.Publish(Event{Topic: "bulk", Data: bulk})
		h.Publish(Event{Topic: "bulk", Data: bulk})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool { return testutil.ToFloat64(h.m.dropped) == 1 }, 30*time.Second, 10*time.Millisecond,
		"the stalled client is dropped")
	require.Equal(t, clients-1, h.Clients())
}

func TestRefusesPastMaxClientsAndFilters(t *testing.T) {
	h := New(Options{MaxClients: 1})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.Serve(w, r, func(ev Event) bool { return ev.Topic == "alert" }, func() []Event { return []Event{{Name: "snapshot", Data: []byte("s")}} })
	}))
	defer srv.Close()
	c, br := openStream(t, srv.URL, "/")
	defer c.Close()
	require.Eventually(t, func() bool { return h.Clients() == 1 }, 5*time.Second, 5*time.Millisecond)

	resp, err := http.Get(srv.URL)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	require.Equal(t, "5", resp.Header.Get("Retry-After"))

	h.Publish(Event{Topic: "vital", Data: []byte("no")})
	h.Publish(Event{Topic: "alert", Name: "alert", Data: []byte("a\nb")})
	got, err := readEvents(br, 3)
	require.NoError(t, err)
	require.Equal(t, []string{"s", "a", "b"}, got, "snapshot first, filtered events after, multi-line data split")
}

func TestClientLeavingIsNotCountedAsDropped(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := New(Options{Registerer: reg})
	ctx, cancel := context.WithCancel(context.Background())
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { h.Serve(w, r, nil, nil) }))
	defer srv.Close()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return h.Clients() == 1 }, 5*time.Second, 5*time.Millisecond)
	cancel()
	resp.Body.Close()
	require.Eventually(t, func() bool { return h.Clients() == 0 }, 5*time.Second, 5*time.Millisecond)
	require.Zero(t, testutil.ToFloat64(h.m.dropped))
}

// A client that stops reading is dropped by the write timeout even when its
// buffer never fills.
func TestWriteTimeoutDropsAStalledClient(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := New(Options{Buffer: 100000, WriteTimeout: 300 * time.Millisecond, Registerer: reg})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { h.Serve(w, r, nil, nil) }))
	defer srv.Close()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	stalled, err := d.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	require.NoError(t, err)
	defer stalled.Close()
	_, err = fmt.Fprintf(stalled, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return h.Clients() == 1 }, 10*time.Second, 5*time.Millisecond)
	bulk := []byte(strings.Repeat("x", 64<<10))
	for range 200 { // 12.5 MiB: more than the socket buffers hold
		h.Publish(Event{Data: bulk})
	}
	require.Eventually(t, func() bool { return testutil.ToFloat64(h.m.dropped) == 1 }, 30*time.Second, 10*time.Millisecond)
	require.Zero(t, h.Clients())
}

// A stream lives longer than the server's read and write timeouts.
func TestAStreamOutlivesTheServersTimeouts(t *testing.T) {
	h := New(Options{Heartbeat: 200 * time.Millisecond})
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { h.Serve(w, r, nil, nil) }))
	srv.Config.ReadTimeout, srv.Config.WriteTimeout = 500*time.Millisecond, 500*time.Millisecond
	srv.Start()
	defer srv.Close()
	c, br := openStream(t, srv.URL, "/")
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	require.Eventually(t, func() bool { return h.Clients() == 1 }, 5*time.Second, 5*time.Millisecond)
	time.Sleep(1500 * time.Millisecond) // three times the timeouts
	h.Publish(Event{Data: []byte("still here")})
	got, err := readEvents(br, 1)
	require.NoError(t, err)
	require.Equal(t, []string{"still here"}, got)
}

// The snapshot is taken after the client is subscribed: an event published
// while it is being taken reaches the client after it.
func TestSnapshotIsTakenAfterSubscribing(t *testing.T) {
	h := New(Options{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.Serve(w, r, nil, func() []Event {
			h.Publish(Event{Topic: "change", Data: []byte("change during snapshot")})
			return []Event{{Name: "snapshot", Data: []byte("snapshot")}}
		})
	}))
	defer srv.Close()
	c, br := openStream(t, srv.URL, "/")
	defer c.Close()
	got, err := readEvents(br, 2)
	require.NoError(t, err)
	require.Equal(t, []string{"snapshot", "change during snapshot"}, got)
}

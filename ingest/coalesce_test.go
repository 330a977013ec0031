package ingest

import (
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// countingConn counts the writes that reach the socket.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

func coalescingPair(t *testing.T) (*coalescingConn, *countingConn, net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	peer, err := net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { peer.Close() })
	s, err := l.Accept()
	require.NoError(t, err)
	cc := &countingConn{Conn: s}
	c := newCoalescingConn(cc)
	t.Cleanup(func() { c.Close() })
	return c, cc, peer
}

func TestCoalescingConn(t *testing.T) {
	t.Run("writes between two reads leave with one write, before the read", func(t *testing.T) {
		c, cc, peer := coalescingPair(t)
		for _, p := range []string{"a", "bc", "def"} {
			_, err := c.Write([]byte(p))
			require.NoError(t, err)
		}
		require.Zero(t, cc.writes.Load(), "nothing sent yet")
		_, err := peer.Write([]byte("x"))
		require.NoError(t, err)
		_, err = c.Read(make([]byte, 1))
		require.NoError(t, err)
		require.EqualValues(t, 1, cc.writes.Load())
		got := make([]byte, 6)
		_, err = io.ReadFull(peer, got)
		require.NoError(t, err)
		require.Equal(t, "abcdef", string(got))
	})
	t.Run("a write while a read waits goes out at once", func(t *testing.T) {
		c, _, peer := coalescingPair(t)
		read := make(chan error, 1)
		go func() { _, err := c.Read(make([]byte, 1)); read <- err }()
		require.Eventually(t, func() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.reading }, 10*time.Second, time.Millisecond)
		_, err := c.Write([]byte("now"))
		require.NoError(t, err)
		require.NoError(t, peer.SetReadDeadline(time.Now().Add(10*time.Second)))
		got := make([]byte, 3)
		_, err = io.ReadFull(peer, got)
		require.NoError(t, err, "sent without waiting for the read")
		require.Equal(t, "now", string(got))
		_, err = peer.Write([]byte("x"))
		require.NoError(t, err)
		require.NoError(t, <-read)
	})
	t.Run("a write after the oldest gathered byte is old sends all", func(t *testing.T) {
		c, cc, peer := coalescingPair(t)
		_, err := c.Write([]byte("old"))
		require.NoError(t, err)
		time.Sleep(2 * coalesceAge)
		_, err = c.Write([]byte("new"))
		require.NoError(t, err)
		require.EqualValues(t, 1, cc.writes.Load())
		got := make([]byte, 6)
		_, err = io.ReadFull(peer, got)
		require.NoError(t, err)
		require.Equal(t, "oldnew", string(got))
	})
	t.Run("close sends what was gathered", func(t *testing.T) {
		c, _, peer := coalescingPair(t)
		_, err := c.Write([]byte("bye"))
		require.NoError(t, err)
		require.NoError(t, c.Close())
		got, err := io.ReadAll(peer)
		require.NoError(t, err)
		require.Equal(t, "bye", string(got))
	})
	t.Run("a full buffer is sent", func(t *testing.T) {
		c, cc, _ := coalescingPair(t)
		big := make([]byte, coalesceMax/2+1)
		for range 2 {
			_, err := c.Write(big)
			require.NoError(t, err)
		}
		require.EqualValues(t, 1, cc.writes.Load())
	})
}

// The keep-alive deadline mochi moves at every packet is re-armed at most
// once per deadlineSlack, and a silent connection is still closed: after its
// deadline, at most deadlineSlack late.
func TestCoalescingConnDeadlineIsCoarseButHolds(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	c := newCoalescingConn(a)
	defer c.Close()
	preAuth := time.Now().Add(time.Hour)
	require.NoError(t, c.SetDeadline(preAuth))
	require.Equal(t, preAuth, c.armed, "the first deadline is set as it is")
	require.NoError(t, c.SetDeadline(time.Time{}))
	first := time.Now().Add(2 * time.Second)
	require.NoError(t, c.SetDeadline(first))
	require.Equal(t, first, c.armed)
	first = first.Add(deadlineSlack)
	require.NoError(t, c.SetDeadline(first))
	armed := c.armed
	require.Equal(t, first.Add(deadlineSlack), armed, "moved: with the slack")
	require.NoError(t, c.SetDeadline(first.Add(10*time.Millisecond)), "within the slack: not re-armed")
	require.Equal(t, armed, c.armed)
	later := first.Add(deadlineSlack + time.Millisecond)
	require.NoError(t, c.SetDeadline(later))
	require.Equal(t, later.Add(deadlineSlack), c.armed, "past the armed one: re-armed")

	earlier := c.armed.Add(-5 * time.Second)
	require.NoError(t, c.SetDeadline(earlier), "much earlier than the armed one: set")
	require.Equal(t, earlier, c.armed)

	soon := time.Now().Add(50 * time.Millisecond)
	require.NoError(t, c.SetDeadline(soon), "a near deadline is set as it is")
	require.Equal(t, soon, c.armed)
	start := time.Now()
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	require.ErrorAs(t, err, &ne)
	require.True(t, ne.Timeout())
	require.Less(t, time.Since(start), 5*time.Second)
}

// A peer that reads nothing cannot hold a send, or Close, for ever: Close
// gives a blocked send a second.
func TestCoalescingConnCloseEndsABlockedSend(t *testing.T) {
	a, b := net.Pipe() // b never reads: a send blocks
	defer b.Close()
	c := newCoalescingConn(a)
	c.hold()
	_, err := c.Write(make([]byte, 1024))
	require.NoError(t, err, "held: gathered, not sent")
	released := make(chan struct{})
	go func() { defer close(released); c.release() }()
	time.Sleep(50 * time.Millisecond) // the send is blocked on the peer
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for the blocked send")
	}
	<-released
}

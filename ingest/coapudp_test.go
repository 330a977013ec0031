package ingest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/stretchr/testify/require"
)

func cachedAnswer(mid uint16, code codes.Code) *pool.Message {
	m := pool.NewMessage(context.Background())
	m.SetCode(code)
	m.SetMessageID(int32(mid))
	m.SetType(message.Acknowledgement)
	m.SetToken([]byte{1, 2, 3, 4, 5, 6, 7, 8})
	return m
}

func TestDedupCacheKeepsAnswersForTheExchangeLifetime(t *testing.T) {
	c := newDedupCache(1 << 20)
	peer := c.forPeer(netip.MustParseAddrPort("192.0.2.1:5683"))
	other := c.forPeer(netip.MustParseAddrPort("192.0.2.1:5684"))
	require.NoError(t, peer.Store("7", cachedAnswer(7, codes.Changed)))
	require.NoError(t, peer.Store("7", cachedAnswer(7, codes.BadRequest)), "a live answer is not replaced")
	got := pool.NewMessage(context.Background())
	ok, err := peer.Load("7", got)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, codes.Changed, got.Code())
	ok, _ = peer.Load("8", got)
	require.False(t, ok)
	ok, _ = other.Load("7", got)
	require.False(t, ok, "another peer's message id 7 is another exchange")

	for i := range 3000 {
		require.NoError(t, peer.Store(fmt.Sprint(1000+i), cachedAnswer(uint16(1000+i), codes.Changed)))
	}
	c.expire(time.Now())
	n, _, _ := c.stats()
	require.Equal(t, 3001, n, "nothing expired yet")
	c.expire(time.Now().Add(udpclient.ExchangeLifetime + time.Second))
	n, bytes, _ := c.stats()
	require.Zero(t, n, "everything expired")
	require.Zero(t, bytes)
	require.Empty(t, c.peers, "a peer with no answers is forgotten")
	require.Less(t, len(c.order), 1024, "the FIFO is compacted")
	require.NoError(t, peer.Store("7", cachedAnswer(7, codes.BadRequest)))
	ok, _ = peer.Load("7", got)
	require.True(t, ok)
	require.Equal(t, codes.BadRequest, got.Code(), "an expired answer is replaced")
}

// A hostile peer cannot grow the cache without limit: one source address
// holds at most the 65,536 message ids, and many source addresses together
// at most the total bound, past which the oldest answers go first.
func TestDedupCacheIsBoundedPerPeerAndInTotal(t *testing.T) {
	const max = 100_000
	c := newDedupCache(max)
	hostile := c.forPeer(netip.MustParseAddrPort("198.51.100.7:40000"))
	for i := range 3 * 65536 { // every message id, three times over
		require.NoError(t, hostile.Store(fmt.Sprint(uint16(i)), cachedAnswer(uint16(i), codes.Changed)))
	}
	n, bytes, evicted := c.stats()
	require.Equal(t, 65536, n, "one peer: at most the message-id space")
	require.Zero(t, evicted)
	require.Positive(t, bytes)

	honest := c.forPeer(netip.MustParseAddrPort("192.0.2.1:5683"))
	require.NoError(t, honest.Store("1", cachedAnswer(1, codes.Changed)))
	for port := range 40 { // many source ports: 40 × 10,000 answers
		p := c.forPeer(netip.AddrPortFrom(netip.MustParseAddr("198.51.100.8"), uint16(10000+port)))
		for mid := range 10_000 {
			require.NoError(t, p.Store(fmt.Sprint(mid), cachedAnswer(uint16(mid), codes.Changed)))
		}
		n, _, _ = c.stats()
		require.LessOrEqual(t, n, max)
	}
	n, _, evicted = c.stats()
	require.Equal(t, max, n, "held at the bound")
	require.EqualValues(t, 65536+1+400_000-max, evicted)
	require.LessOrEqual(t, len(c.order)-c.head, 2*max, "the FIFO is bounded too")
	got := pool.NewMessage(context.Background())
	ok, _ := hostile.Load("0", got)
	require.False(t, ok, "the oldest answers went first")
	last := c.forPeer(netip.AddrPortFrom(netip.MustParseAddr("198.51.100.8"), 10039))
	ok, _ = last.Load("9999", got)
	require.True(t, ok, "the newest are kept")
	require.LessOrEqual(t, len(c.peers), 12, "peers with no answers left are forgotten")
}

// BenchmarkDedupCacheMemory reports the heap one kept answer costs (a 2.04
// with an 8-byte token, as the load test's clients get).
func BenchmarkDedupCacheMemory(b *testing.B) {
	const n = coapDedupMaxEntries
	for range b.N {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		c := newDedupCache(n)
		raw, err := cachedAnswer(1, codes.Changed).MarshalWithEncoder(coder.DefaultCoder)
		require.NoError(b, err)
		now := time.Now()
		for i := range n {
			c.store(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(20000+i/65536)), uint16(i), raw, now)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "heap-bytes/answer")
		runtime.KeepAlive(c)
	}
}

// A confirmable request sent again with the same message id (its ACK was
// lost) gets the same answer from the cache and is not handled twice.
func TestCoAPRetransmissionIsAnsweredFromTheCache(t *testing.T) {
	rec := &recorder{}
	s := startCoAP(t, rec)
	c := dialRawCoAP(t, s.Addr().String())
	first := c.post("pipe-0001", "secret-pipe-0001", []byte{1}, senml(5, 1))
	c.mid-- // the same message id again
	again := c.post("pipe-0001", "secret-pipe-0001", []byte{1}, senml(5, 1))
	require.Equal(t, codes.Changed, first.code)
	require.Equal(t, first, again)
	require.Equal(t, []int{5}, values(t, rec), "handled once")
}

// A peer's go-coap state is dropped after the idle timeout, by the periodic
// check. (A request the direct path takes makes none: a wrong key goes to
// go-coap's path.)
func TestCoAPForgetsIdlePeers(t *testing.T) {
	rec := &recorder{}
	h := NewHandler(rec, HandlerOptions{})
	s, err := NewCoAP(CoAPConfig{Enabled: true, Addr: "127.0.0.1:0"}, testRegistry(t), h, nil, nil)
	require.NoError(t, err)
	s.udpS.idle = 100 * time.Millisecond
	runGateway(t, s)
	c := dialRawCoAP(t, s.Addr().String())
	require.Equal(t, codes.Unauthorized, c.post("pipe-0001", "wrong", []byte{1}, senml(1, 1)).code)
	require.Len(t, s.udpS.snapshot(), 1)
	require.Eventually(t, func() bool { return len(s.udpS.snapshot()) == 0 }, 10*time.Second, 50*time.Millisecond)
	require.Equal(t, codes.Changed, c.post("pipe-0001", "secret-pipe-0001", []byte{2}, senml(2, 1)).code, "served again")
}

// A peer whose only answer is the oldest when the cache is full loses it to
// its own next answer, and is still counted right (it was forgotten with its
// last answer and must come back).
func TestDedupCacheEvictsAPeersOnlyAnswerForItsNext(t *testing.T) {
	c := newDedupCache(2)
	a := c.forPeer(netip.MustParseAddrPort("192.0.2.1:5683"))
	b := c.forPeer(netip.MustParseAddrPort("192.0.2.2:5683"))
	require.NoError(t, a.Store("1", cachedAnswer(1, codes.Changed)))
	require.NoError(t, b.Store("1", cachedAnswer(1, codes.Changed)))
	require.NoError(t, a.Store("2", cachedAnswer(2, codes.Changed)))
	got := pool.NewMessage(context.Background())
	ok, _ := a.Load("2", got)
	require.True(t, ok, "the new answer is kept")
	ok, _ = a.Load("1", got)
	require.False(t, ok, "the oldest went")
	n, _, evicted := c.stats()
	require.Equal(t, 2, n)
	require.EqualValues(t, 1, evicted)
	c.expire(time.Now().Add(udpclient.ExchangeLifetime + time.Second))
	n, bytes, _ := c.stats()
	require.Zero(t, n)
	require.Zero(t, bytes)
	require.Empty(t, c.peers)
	require.Empty(t, c.byID)
}

// Random claims, stores and expiries over many peers keep the cache's counts true:
// the answers per peer add up, the bytes add up, the bound holds.
func TestDedupCacheCountsStayTrue(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	c := newDedupCache(50)
	now := time.Now()
	raws := [][]byte{{0x60, 0x44, 0, 1}, make([]byte, 40)} // inline and big
	for i := range 20_000 {
		addr := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), uint16(1+rng.IntN(40)))
		if rng.IntN(100) == 0 {
			now = now.Add(time.Duration(rng.IntN(300)) * time.Second)
			c.expire(now)
		} else if rng.IntN(4) == 0 {
			c.claim(nil, addr, uint16(rng.IntN(64)), now)
		} else {
			c.store(addr, uint16(rng.IntN(64)), raws[rng.IntN(2)], now)
		}
		n, bytes := 0, 0
		for k, e := range c.m {
			require.Contains(t, c.byID, k.peer, "step %d", i)
			if e.n == dedupPending {
				continue
			}
			if e.n > 0 {
				bytes += int(e.n)
			} else {
				bytes += len(c.big[k])
			}
		}
		for _, p := range c.peers {
			require.Positive(t, p.n)
			n += p.n
		}
		require.Equal(t, len(c.m), n, "step %d", i)
		require.Equal(t, c.bytes, bytes, "step %d", i)
		require.LessOrEqual(t, len(c.m), 50)
		require.Len(t, c.byID, len(c.peers))
	}
}

// The CoAP/UDP socket asks for a receive buffer that holds a burst of
// requests from many clients (the kernel's default of 208 KiB dropped some
// under the load test: each cost its client a retransmission).
func TestCoAPSocketHasALargeReceiveBuffer(t *testing.T) {
	s := startCoAP(t, &recorder{})
	uc, ok := s.udpL.NetConn().(*net.UDPConn)
	require.True(t, ok)
	raw, err := uc.SyscallConn()
	require.NoError(t, err)
	var size int
	var serr error
	require.NoError(t, raw.Control(func(fd uintptr) {
		size, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF)
	}))
	require.NoError(t, serr)
	want := udpReadBuffer
	if b, err := os.ReadFile("/proc/sys/net/core/rmem_max"); err == nil {
		if max, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && max < want {
			want = max // the kernel's cap
		}
	}
	require.GreaterOrEqual(t, size, want, "SO_RCVBUF (Linux reports twice what was set)")
}

package ingest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
	"github.com/stretchr/testify/require"
)

func TestResponseCacheKeepsAnswersForTheExchangeLifetime(t *testing.T) {
	c := newResponseCache()
	answer := func(code codes.Code) *pool.Message {
		m := pool.NewMessage(context.Background())
		m.SetCode(code)
		m.SetMessageID(7)
		m.SetType(message.Acknowledgement)
		return m
	}
	require.NoError(t, c.Store("7", answer(codes.Changed)))
	require.NoError(t, c.Store("7", answer(codes.BadRequest)), "a live answer is not replaced")
	got := pool.NewMessage(context.Background())
	ok, err := c.Load("7", got)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, codes.Changed, got.Code())
	ok, _ = c.Load("8", got)
	require.False(t, ok)

	for i := range 3000 {
		require.NoError(t, c.Store(fmt.Sprint(1000+i), answer(codes.Changed)))
	}
	c.CheckExpirations(time.Now())
	require.Equal(t, 3001, c.len(), "nothing expired yet")
	c.CheckExpirations(time.Now().Add(udpclient.ExchangeLifetime + time.Second))
	require.Zero(t, c.len(), "everything expired")
	require.Less(t, len(c.order), 1024, "the FIFO is compacted")
	require.NoError(t, c.Store("7", answer(codes.BadRequest)))
	ok, _ = c.Load("7", got)
	require.True(t, ok)
	require.Equal(t, codes.BadRequest, got.Code(), "an expired answer is replaced")
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

// A peer's state is dropped after the idle timeout, by the periodic check.
func TestCoAPForgetsIdlePeers(t *testing.T) {
	rec := &recorder{}
	h := NewHandler(rec, HandlerOptions{})
	s, err := NewCoAP(CoAPConfig{Enabled: true, Addr: "127.0.0.1:0"}, testRegistry(t), h, nil, nil)
	require.NoError(t, err)
	s.udpS.idle = 100 * time.Millisecond
	runGateway(t, s)
	c := dialRawCoAP(t, s.Addr().String())
	require.Equal(t, codes.Changed, c.post("pipe-0001", "secret-pipe-0001", []byte{1}, senml(1, 1)).code)
	require.Len(t, s.udpS.snapshot(), 1)
	require.Eventually(t, func() bool { return len(s.udpS.snapshot()) == 0 }, 10*time.Second, 50*time.Millisecond)
	require.Equal(t, codes.Changed, c.post("pipe-0001", "secret-pipe-0001", []byte{2}, senml(2, 1)).code, "served again")
}

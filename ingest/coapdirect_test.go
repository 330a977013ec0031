package ingest

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/ingest/payload"
)

func TestDedupCacheClaims(t *testing.T) {
	c := newDedupCache(100)
	addr := netip.MustParseAddrPort("192.0.2.1:5683")
	now := time.Now()
	_, st := c.claim(nil, addr, 7, now)
	require.Equal(t, claimed, st, "a new request is the caller's to handle")
	_, st = c.claim(nil, addr, 7, now)
	require.Equal(t, busy, st, "a copy while it is handled is dropped")
	ok, err := c.forPeer(addr).Load("7", nil)
	require.NoError(t, err)
	require.False(t, ok, "go-coap's path sees no answer yet")
	n, bytes, _ := c.stats()
	require.Equal(t, 1, n)
	require.Zero(t, bytes)

	raw := []byte{0x68, 0x44, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8, 0xc0}
	c.store(addr, 7, raw, now)
	got, st := c.claim(nil, addr, 7, now)
	require.Equal(t, answered, st)
	require.Equal(t, raw, got, "a copy after the answer gets the answer")
	c.store(addr, 7, []byte{0x68, 0x80, 0, 7}, now)
	got, _ = c.claim(nil, addr, 7, now)
	require.Equal(t, raw, got, "a live answer is not replaced")

	_, st = c.claim(nil, addr, 7, now.Add(c.lifetime+time.Second))
	require.Equal(t, claimed, st, "after the exchange lifetime the id is new again")
}

func TestDedupCacheRelease(t *testing.T) {
	c := newDedupCache(100)
	addr := netip.MustParseAddrPort("192.0.2.1:5683")
	now := time.Now()
	_, st := c.claim(nil, addr, 9, now)
	require.Equal(t, claimed, st)
	c.release(addr, 9)
	n, _, _ := c.stats()
	require.Zero(t, n, "a released claim is forgotten")
	_, st = c.claim(nil, addr, 9, now.Add(time.Millisecond))
	require.Equal(t, claimed, st, "a copy after the release is handled as new")

	raw := []byte{0x68, 0x44, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8}
	c.store(addr, 9, raw, now)
	c.release(addr, 9)
	got, st := c.claim(nil, addr, 9, now)
	require.Equal(t, answered, st, "release leaves an answer alone")
	require.Equal(t, raw, got)

	c.release(netip.MustParseAddrPort("192.0.2.2:5683"), 9) // unknown peer: nothing
	c.expire(now.Add(c.lifetime + time.Second))
	n, bytes, _ := c.stats()
	require.Zero(t, n, "the released claim's FIFO slot expires without harm")
	require.Zero(t, bytes)
}

func TestEncodeAnswerGrowsForALongDiagnostic(t *testing.T) {
	for _, size := range []int{0, 10, 200, 1000} {
		m := message.Message{Token: []byte{1, 2, 3, 4}, Code: codes.BadRequest, Type: message.Acknowledgement,
			MessageID: 7, Payload: []byte(strings.Repeat("x", size))}
		var buf [256]byte
		raw, err := encodeAnswer(buf[:], m)
		require.NoError(t, err, size)
		var got message.Message
		_, err = coder.DefaultCoder.Decode(raw, &got)
		require.NoError(t, err, size)
		require.Equal(t, string(m.Payload), string(got.Payload), size)
	}
}

// parseDirect takes exactly the plain requests and leaves the rest to go-coap.
func TestParseDirect(t *testing.T) {
	path := func(id string) message.Options {
		return message.Options{{ID: message.URIPath, Value: []byte("devices")}, {ID: message.URIPath, Value: []byte(id)},
			{ID: message.URIPath, Value: []byte("readings")}}
	}
	with := func(o message.Options, more ...message.Option) message.Options {
		o = append(message.Options{}, o...)
		for _, m := range more {
			o = o.Add(m)
		}
		return o
	}
	key := message.Option{ID: message.URIQuery, Value: []byte("key=s3cret")}
	cbor := message.Option{ID: message.ContentFormat, Value: []byte{112}}
	body := []byte(`[{"n":"pressure","v":1}]`)
	tests := []struct {
		name   string
		m      message.Message
		take   bool
		format payload.Format
	}{
		{"CON POST with key and format", message.Message{Type: message.Confirmable, Code: codes.POST, Options: with(path("pipe-1"), key, cbor), Payload: body}, true, payload.SenMLCBOR},
		{"NON POST without format", message.Message{Type: message.NonConfirmable, Code: codes.POST, Options: with(path("pipe-1"), key), Payload: body}, true, payload.Unknown},
		{"no key (AllowUnauthenticated decides)", message.Message{Type: message.Confirmable, Code: codes.POST, Options: path("pipe-1"), Payload: body}, true, payload.Unknown},
		{"GET", message.Message{Type: message.Confirmable, Code: codes.GET, Options: with(path("pipe-1"), key), Payload: body}, false, 0},
		{"another path", message.Message{Type: message.Confirmable, Code: codes.POST, Options: message.Options{{ID: message.URIPath, Value: []byte("other")}}, Payload: body}, false, 0},
		{"a fourth segment", message.Message{Type: message.Confirmable, Code: codes.POST, Options: with(path("pipe-1"), message.Option{ID: message.URIPath, Value: []byte("x")}), Payload: body}, false, 0},
		{"an empty id", message.Message{Type: message.Confirmable, Code: codes.POST, Options: path(""), Payload: body}, false, 0},
		{"an id with a slash", message.Message{Type: message.Confirmable, Code: codes.POST, Options: path("a/b"), Payload: body}, false, 0},
		{"block-wise", message.Message{Type: message.Confirmable, Code: codes.POST, Options: with(path("pipe-1"), key, message.Option{ID: message.Block1, Value: []byte{0x0e}}), Payload: body}, false, 0},
		{"No-Response", message.Message{Type: message.Confirmable, Code: codes.POST, Options: with(path("pipe-1"), key, message.Option{ID: message.NoResponse, Value: []byte{2}}), Payload: body}, false, 0},
		{"an unsupported format", message.Message{Type: message.Confirmable, Code: codes.POST, Options: with(path("pipe-1"), key, message.Option{ID: message.ContentFormat, Value: []byte{0}}), Payload: body}, false, 0},
		{"no payload", message.Message{Type: message.Confirmable, Code: codes.POST, Options: with(path("pipe-1"), key)}, false, 0},
		{"an ACK", message.Message{Type: message.Acknowledgement, Code: codes.POST, Options: with(path("pipe-1"), key), Payload: body}, false, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.m.MessageID, tc.m.Token = 4242, []byte{9, 8, 7}
			buf := make([]byte, 1024)
			n, err := coder.DefaultCoder.Encode(tc.m, buf)
			require.NoError(t, err)
			opts := make(message.Options, 0, 8)
			r, ok := parseDirect(buf[:n], &opts)
			require.Equal(t, tc.take, ok)
			if !ok {
				return
			}
			require.Equal(t, "pipe-1", r.id)
			require.Equal(t, tc.format, r.format)
			require.Equal(t, body, r.body)
			require.Equal(t, uint16(4242), r.mid)
			require.Equal(t, []byte{9, 8, 7}, r.token[:r.tkl])
			if tc.m.Options.HasOption(message.URIQuery) {
				require.Equal(t, "s3cret", r.key)
			}
		})
	}
}

// FuzzParseDirect: no datagram makes the direct path's parser panic, and
// what it takes, go-coap's decoder reads the same way.
func FuzzParseDirect(f *testing.F) {
	m := message.Message{Type: message.Confirmable, Code: codes.POST, MessageID: 1, Token: []byte{1, 2},
		Options: message.Options{{ID: message.URIPath, Value: []byte("devices")}, {ID: message.URIPath, Value: []byte("pipe-0001")},
			{ID: message.URIPath, Value: []byte("readings")}, {ID: message.ContentFormat, Value: []byte{110}},
			{ID: message.URIQuery, Value: []byte("key=k")}},
		Payload: []byte(`[{"n":"pressure","v":1}]`)}
	buf := make([]byte, 512)
	n, err := coder.DefaultCoder.Encode(m, buf)
	require.NoError(f, err)
	f.Add(buf[:n])
	f.Add([]byte{0x40, 0x02, 0, 1, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		opts := make(message.Options, 0, 8) // as the server's
		r, ok := parseDirect(data, &opts)
		if !ok {
			return
		}
		var want message.Message
		want.Options = make(message.Options, 0, 16)
		_, err := coder.DefaultCoder.Decode(data, &want)
		require.NoError(t, err, "go-coap reads what the direct path took")
		p, err := want.Options.Path()
		require.NoError(t, err)
		require.Equal(t, "/devices/"+r.id+"/readings", p)
		id, ok := deviceOfPath(p)
		require.True(t, ok)
		require.Equal(t, r.id, id)
		require.Equal(t, codes.POST, want.Code)
		require.Equal(t, want.Type, r.typ)
		require.EqualValues(t, want.MessageID, r.mid)
		require.Equal(t, []byte(want.Token), r.token[:r.tkl])
		require.Equal(t, want.Payload, r.body)
		if cf, err := want.Options.ContentFormat(); err == nil {
			require.Equal(t, payload.FromCoAP(uint16(cf)), r.format)
		} else {
			require.Equal(t, payload.Unknown, r.format)
		}
		for _, q := range queries(want.Options) {
			if k, ok := strings.CutPrefix(q, "key="); ok {
				require.Equal(t, k, r.key, "the last key= query, as authenticate takes it")
			}
		}
	})
}

func queries(o message.Options) []string {
	var qs []string
	for _, x := range o {
		if x.ID == message.URIQuery {
			qs = append(qs, string(x.Value))
		}
	}
	return qs
}

// A copy of a request sent while it is being journaled is dropped, not
// journaled again; a copy sent after the answer gets the same answer.
func TestCoAPDirectPathAnswersACopyOnce(t *testing.T) {
	rec := &recorder{hold: make(chan struct{})}
	s := startCoAP(t, rec)
	c := dialRawCoAP(t, s.Addr().String())
	req := c.request("pipe-0001", "secret-pipe-0001", []byte{4, 2}, senml(5, 1))
	c.send(req)
	c.send(req) // retransmitted while the first is held
	time.Sleep(100 * time.Millisecond)
	close(rec.hold)
	first := c.await(c.mid, []byte{4, 2}, 5*time.Second)
	require.Equal(t, codes.Changed, first.code)
	c.send(req) // its ACK was lost
	require.Equal(t, first, c.await(c.mid, []byte{4, 2}, 5*time.Second))
	require.Equal(t, []int{5}, values(t, rec), "journaled once")
	require.Empty(t, s.udpS.snapshot(), "taken by the direct path: no go-coap peer state")
}

// One device sending many requests while its journal writes wait does not
// hold up another peer: the reader reads on. Through go-coap's path the
// first device's 16-deep queue filled, and the reader waited for it.
func TestCoAPOnePeerCannotHoldUpTheReader(t *testing.T) {
	rec := &recorder{hold: make(chan struct{})}
	s := startCoAP(t, rec)
	busy := dialRawCoAP(t, s.Addr().String())
	for i := range 200 {
		busy.send(busy.request("pipe-0001", "secret-pipe-0001", []byte{byte(i)}, senml(i, 1)))
	}
	other := dialRawCoAP(t, s.Addr().String())
	require.Equal(t, codes.Unauthorized, other.post("pipe-0002", "wrong", []byte{1}, senml(1, 1)).code,
		"answered while the first device's 200 requests wait for the journal")
	close(rec.hold)
	require.Eventually(t, func() bool { return len(rec.readings()) == 200 }, 10*time.Second, 10*time.Millisecond)
}

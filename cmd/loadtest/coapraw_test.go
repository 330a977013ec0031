package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/citypulse/citypulse/cmd/internal/servertest"
	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/sim"
)

// The request encoder against go-coap's decoder: same type, message ID,
// token, path, query, content format and payload, including option values
// long enough for the extended length forms.
func TestAppendRequestDecodesWithGoCoAP(t *testing.T) {
	for _, tc := range []struct {
		name    string
		typ     byte
		cf      uint16
		id, key string
		body    []byte
	}{
		{"senml-cbor CON", coapCON, 112, "cp-d00-pipe-000", "s3cret", []byte{0x81, 0xa1, 0x00, 0x61, 0x61}},
		{"senml-json NON", coapNON, 110, "d", "k", []byte(`[{"n":"x","v":1}]`)},
		{"json, long key", coapCON, 50, "dev-1", strings.Repeat("k", 250), []byte(`{"x":1}`)},
		{"text/plain (cf 0), no body", coapCON, 0, strings.Repeat("i", 13), "k", nil},
		{"two-byte content format", coapCON, 11542, "dev", "key", []byte("x")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := appendRequest(nil, tc.typ, 0xbeef, 0x01020304, tc.id, tc.key, tc.cf, tc.body)
			m := pool.NewMessage(context.Background())
			_, err := m.UnmarshalWithDecoder(coder.DefaultCoder, b)
			require.NoError(t, err)
			require.Equal(t, message.Type(tc.typ), m.Type())
			require.Equal(t, codes.POST, m.Code())
			require.Equal(t, int32(0xbeef), m.MessageID())
			require.Equal(t, message.Token{1, 2, 3, 4}, m.Token())
			p, err := m.Path()
			require.NoError(t, err)
			require.Equal(t, "/devices/"+tc.id+"/readings", p)
			q, err := m.Queries()
			require.NoError(t, err)
			require.Equal(t, []string{"key=" + tc.key}, q)
			cf, err := m.ContentFormat()
			require.NoError(t, err)
			require.Equal(t, message.MediaType(tc.cf), cf)
			if len(tc.body) == 0 {
				require.Nil(t, m.Body())
				return
			}
			body, err := m.ReadBody()
			require.NoError(t, err)
			require.Equal(t, tc.body, body)
			_, err = parseCoAP(b) // and the client's own parser accepts it
			require.NoError(t, err)
		})
	}
}

// response encodes a message from the server with go-coap's encoder.
func response(t testing.TB, typ message.Type, code codes.Code, mid uint16, token []byte) []byte {
	m := pool.NewMessage(context.Background())
	m.SetType(typ)
	m.SetCode(code)
	m.SetMessageID(int32(mid))
	m.SetToken(token)
	if code != codes.Empty {
		m.SetContentFormat(message.TextPlain)
		m.SetBody(strings.NewReader("accepted 10, rejected 0"))
	}
	b, err := m.MarshalWithEncoder(coder.DefaultCoder)
	require.NoError(t, err)
	return b
}

func TestParseCoAPMalformed(t *testing.T) {
	tok := []byte{1, 2, 3, 4}
	for _, tc := range []struct {
		name string
		b    []byte
		ok   bool
	}{
		{"piggybacked 2.04", response(t, message.Acknowledgement, codes.Changed, 7, tok), true},
		{"empty ACK", []byte{0x60, 0, 0, 7}, true},
		{"separate 4.01", response(t, message.Confirmable, codes.Unauthorized, 9, tok), true},
		{"nothing", nil, false},
		{"three bytes", []byte{0x60, 0x44, 0}, false},
		{"version 2", []byte{0xa0, 0x44, 0, 1}, false},
		{"token length 9", append([]byte{0x69, 0x44, 0, 1}, make([]byte, 9)...), false},
		{"token cut short", []byte{0x64, 0x44, 0, 1, 1, 2}, false},
		{"empty message with a token", []byte{0x61, 0, 0, 1, 5}, false},
		{"empty message with bytes after", []byte{0x60, 0, 0, 1, 0xff}, false},
		{"option delta 15", []byte{0x60, 0x44, 0, 1, 0xf0}, false},
		{"option length 15", []byte{0x60, 0x44, 0, 1, 0x1f}, false},
		{"extended delta cut short", []byte{0x60, 0x44, 0, 1, 0xd0}, false},
		{"two-byte length cut short", []byte{0x60, 0x44, 0, 1, 0x1e, 0x01}, false},
		{"option value beyond the end", []byte{0x60, 0x44, 0, 1, 0x15, 'a'}, false},
		{"payload marker without payload", []byte{0x60, 0x44, 0, 1, 0xff}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseCoAP(tc.b)
			if tc.ok {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, errNotCoAP)
			}
		})
	}
}

// FuzzCoAPResponse feeds arbitrary datagrams to the client's parser and
// dispatcher (with a request pending whose token and message ID the seeds
// use): nothing panics, and whatever completes the request does it once.
func FuzzCoAPResponse(f *testing.F) {
	tok := []byte{0, 0, 0, 1}
	f.Add(response(f, message.Acknowledgement, codes.Changed, 1, tok))
	f.Add(response(f, message.Acknowledgement, codes.BadRequest, 1, tok))
	f.Add(response(f, message.Confirmable, codes.Changed, 77, tok))
	f.Add(response(f, message.NonConfirmable, codes.Changed, 78, tok))
	f.Add([]byte{0x60, 0, 0, 1})
	f.Add([]byte{0x70, 0, 0, 1})
	f.Add([]byte{0x64, 0x44, 0, 1, 0, 0, 0, 1, 0xff})
	sink, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(f, err)
	defer sink.Close()
	sock, err := net.DialUDP("udp", nil, sink.LocalAddr().(*net.UDPAddr))
	require.NoError(f, err)
	defer sock.Close()
	f.Fuzz(func(t *testing.T, b []byte) {
		c := newRawCoAP(Scenario{Transport: Transport{InFlight: 1, Confirmable: true}}, defaultCoAPTiming)
		c.sock = sock
		var calls atomic.Int32
		c.window <- struct{}{}
		c.out.Add(1)
		c.pending[1] = &rawExchange{token: 1, mid: 1, done: func(bool, error) { calls.Add(1) }}
		c.handle(sock, b)
		if len(c.pending) == 0 {
			require.Equal(t, int32(1), calls.Load())
			require.Empty(t, c.window)
		} else {
			require.Zero(t, calls.Load())
		}
	})
}

// fastTiming keeps the retransmission tests short: 50-75 ms, then 2x back-off.
var fastTiming = coapTiming{AckTimeout: 50 * time.Millisecond, RandomFactor: 1.5, MaxRetransmit: 4, ExchangeLifetime: time.Hour}

// A server that answers nothing: the request is sent 1 + MAX_RETRANSMIT times
// with the same message ID, then fails with a clear error, within
// MAX_TRANSMIT_WAIT.
func TestRawCoAPGivesUpAfterMaxRetransmit(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	hole, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer hole.Close()
	sc := Scenario{Target: Target{CoAP: hole.LocalAddr().String()}, Format: "senml-cbor",
		Transport: Transport{Protocol: "coap", InFlight: 2, Confirmable: true}}
	c := newRawCoAP(sc, fastTiming)
	require.NoError(t, c.connect(t.Context()))
	dev := &simDevice{Device: &sim.Device{ID: "dev-1", Secret: "k"}}
	outcome := make(chan error, 1)
	t0 := time.Now()
	require.NoError(t, c.send(t.Context(), dev, []byte{0x80}, func(ok bool, err error) {
		require.False(t, ok)
		outcome <- err
	}))
	var err2 error
	select {
	case err2 = <-outcome:
	case <-time.After(30 * time.Second):
		t.Fatal("no outcome")
	}
	took := time.Since(t0)
	require.EqualError(t, err2, "coap: no acknowledgement after 4 retransmissions")
	require.GreaterOrEqual(t, took, 31*fastTiming.AckTimeout, "1+2+4+8+16 ACK timeouts")
	require.Less(t, took, 31*fastTiming.AckTimeout*3/2+5*time.Second)
	require.Equal(t, int64(4), c.retransmissions())
	// the copies the server got: 5, one message ID
	buf := make([]byte, 1500)
	mids := map[uint16]int{}
	require.NoError(t, hole.SetReadDeadline(time.Now().Add(time.Second)))
	for {
		n, err := hole.Read(buf)
		if err != nil {
			break
		}
		m, err := parseCoAP(buf[:n])
		require.NoError(t, err)
		mids[m.mid]++
	}
	require.Len(t, mids, 1)
	for _, n := range mids {
		require.Equal(t, 5, n)
	}
	c.close()
}

// A separate response: an empty ACK stops the retransmissions, the CON
// response that follows completes the request and is acknowledged with its
// own message ID; a 4.01 is a coapError.
func TestRawCoAPSeparateResponse(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	srv, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer srv.Close()
	sc := Scenario{Target: Target{CoAP: srv.LocalAddr().String()}, Format: "senml-json",
		Transport: Transport{Protocol: "coap", InFlight: 1, Confirmable: true}}
	// the test has a second (at least) to send the empty ACK
	tm := coapTiming{AckTimeout: time.Second, RandomFactor: 1.5, MaxRetransmit: 4, ExchangeLifetime: time.Hour}
	c := newRawCoAP(sc, tm)
	require.NoError(t, c.connect(t.Context()))
	dev := &simDevice{Device: &sim.Device{ID: "dev-1", Secret: "k"}}
	for _, code := range []codes.Code{codes.Changed, codes.Unauthorized} {
		outcome := make(chan error, 1)
		require.NoError(t, c.send(t.Context(), dev, []byte("[]"), func(ok bool, err error) {
			require.Equal(t, err == nil, ok)
			outcome <- err
		}))
		buf := make([]byte, 1500)
		require.NoError(t, srv.SetReadDeadline(time.Now().Add(10*time.Second)))
		n, from, err := srv.ReadFromUDP(buf)
		require.NoError(t, err)
		req, err := parseCoAP(buf[:n])
		require.NoError(t, err)
		token := append([]byte(nil), req.token...)
		_, err = srv.WriteToUDP([]byte{0x60, 0, byte(req.mid >> 8), byte(req.mid)}, from)
		require.NoError(t, err)
		time.Sleep(2 * time.Second) // past the first retransmission's time: none may come
		_, err = srv.WriteToUDP(response(t, message.Confirmable, code, 0x4242, token), from)
		require.NoError(t, err)
		n, _, err = srv.ReadFromUDP(buf)
		require.NoError(t, err)
		require.Equal(t, []byte{0x60, 0, 0x42, 0x42}, buf[:n], "the CON response is acknowledged (and nothing was retransmitted)")
		err = <-outcome
		if code == codes.Changed {
			require.NoError(t, err)
			continue
		}
		var ce coapError
		require.ErrorAs(t, err, &ce)
		require.Equal(t, codes.Unauthorized, ce.code)
	}
	require.Zero(t, c.retransmissions())
	c.close()
}

// udpRelay forwards datagrams between clients and a CoAP server, one
// upstream socket per client (so the server sees distinct peers), and drops
// the first copy of every CON request it sees.
type udpRelay struct {
	ln      *net.UDPConn
	server  *net.UDPAddr
	dropped atomic.Int64
	mu      sync.Mutex
	ups     map[string]*net.UDPConn
	seen    map[string]bool
	wg      sync.WaitGroup
}

func startRelay(t *testing.T, server string) *udpRelay {
	ln, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	sa, err := net.ResolveUDPAddr("udp", server)
	require.NoError(t, err)
	r := &udpRelay{ln: ln, server: sa, ups: map[string]*net.UDPConn{}, seen: map[string]bool{}}
	r.wg.Go(r.run)
	t.Cleanup(r.stop)
	return r
}

func (r *udpRelay) run() {
	buf := make([]byte, 2048)
	for {
		n, from, err := r.ln.ReadFromUDP(buf)
		if err != nil {
			return
		}
		b := buf[:n]
		if m, err := parseCoAP(b); err == nil && m.typ == coapCON && m.code != 0 {
			key := fmt.Sprintf("%s/%d", from, m.mid)
			r.mu.Lock()
			first := !r.seen[key]
			r.seen[key] = true
			r.mu.Unlock()
			if first {
				r.dropped.Add(1)
				continue
			}
		}
		if up := r.upstream(from); up != nil {
			_, _ = up.Write(b)
		}
	}
}

func (r *udpRelay) upstream(client *net.UDPAddr) *net.UDPConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	if up := r.ups[client.String()]; up != nil {
		return up
	}
	up, err := net.DialUDP("udp", nil, r.server)
	if err != nil {
		return nil
	}
	r.ups[client.String()] = up
	r.wg.Go(func() {
		buf := make([]byte, 2048)
		for {
			n, err := up.Read(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err == nil {
				_, _ = r.ln.WriteToUDP(buf[:n], client)
			}
		}
	})
	return up
}

func (r *udpRelay) stop() {
	_ = r.ln.Close()
	r.mu.Lock()
	for _, up := range r.ups {
		_ = up.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// coapServerFleet starts the real server with a small fleet of its own.
func coapServerFleet(t *testing.T) (*servertest.Server, Scenario) {
	sc, err := LoadScenario(filepath.Join(servertest.Root(), "configs/loadtest/coap.yaml"))
	require.NoError(t, err)
	sc.Fleet.Districts = 2
	sc.Fleet.PerDistrict = map[devices.Kind]int{"pipe": 4, "power": 4}
	sc.Transport.Connections = 4
	sc.Fleet.Unique = false
	devFile := filepath.Join(t.TempDir(), "devices.yaml")
	require.NoError(t, os.WriteFile(devFile, devicesYAML(buildFleet(sc), sc.Fleet.Interval), 0o600))
	s := startServer(t, fmt.Sprintf("127.0.0.1:%d", servertest.FreePort(t, "tcp")), devFile)
	sc.Target = Target{CoAP: s.CoAP, HTTP: s.HTTP, AdminToken: adminToken, ReadToken: readToken}
	sc.Measure = Measure{Check: true}
	sc.Settle = 30 * time.Second
	require.NoError(t, sc.Validate())
	return s, sc
}

// Against the real server: the first copy of every CON request is lost on
// the way, so every request is retransmitted, and still every reading is
// acknowledged and stored; a wrong key is answered 4.01.
func TestRawCoAPAgainstServer(t *testing.T) {
	skipShort(t)
	s, sc := coapServerFleet(t)
	t.Run("first copy of every request lost", func(t *testing.T) {
		relay := startRelay(t, s.CoAP)
		sc := sc
		sc.Target.CoAP = relay.ln.LocalAddr().String()
		sc.Rate, sc.Duration = 100, 3*time.Second
		r := newRunner(sc, quietLog(t))
		var conns []*rawCoAPConn
		var mu sync.Mutex
		r.dial = func(ctx context.Context, sc Scenario, _ []*simDevice, _ int) (conn, error) {
			c := newRawCoAP(sc, coapTiming{AckTimeout: 200 * time.Millisecond, RandomFactor: 1.5, MaxRetransmit: 4,
				ExchangeLifetime: defaultCoAPTiming.ExchangeLifetime})
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			return c, c.connect(ctx)
		}
		require.NoError(t, r.Run(t.Context()))
		st := r.check(t.Context(), newAPI(sc.Target))
		t.Logf("sent %d, acked %d, failed %d, retransmitted %d, relay dropped %d; store %+v",
			r.sent.Load(), r.acked.Load(), r.failed.Load(), r.retransmits.Load(), relay.dropped.Load(), st)
		require.Positive(t, r.sent.Load())
		require.Zero(t, r.failed.Load(), "errors: %v", r.errorList())
		require.Equal(t, r.sent.Load(), r.acked.Load())
		require.Equal(t, r.sent.Load(), relay.dropped.Load(), "the relay dropped the first copy of each")
		require.GreaterOrEqual(t, r.retransmits.Load(), r.sent.Load(), "each was sent again")
		require.Empty(t, st.Error)
		require.Zero(t, st.Lost)
		require.Equal(t, r.readingsAcked.Load(), st.Acked)
		require.Equal(t, st.Acked, st.Found)
	})
	t.Run("wrong key is 4.01", func(t *testing.T) {
		c := newRawCoAP(sc, defaultCoAPTiming)
		require.NoError(t, c.connect(t.Context()))
		defer c.close()
		dev := buildFleet(sc)[0]
		body, err := sim.Encode("senml-cbor", []sim.Reading{{Name: dev.Metrics[0].Name, TS: time.Now().UnixMilli(), V: 1}})
		require.NoError(t, err)
		for _, tc := range []struct {
			key  string
			code codes.Code
		}{{dev.Secret, codes.Changed}, {"wrong", codes.Unauthorized}} {
			d := *dev
			d.Device = &sim.Device{ID: dev.ID, Secret: tc.key}
			outcome := make(chan error, 1)
			require.NoError(t, c.send(t.Context(), &d, body, func(ok bool, err error) {
				require.Equal(t, err == nil, ok)
				outcome <- err
			}))
			err := <-outcome
			if tc.code == codes.Changed {
				require.NoError(t, err)
				continue
			}
			var ce coapError
			require.ErrorAs(t, err, &ce)
			require.Equal(t, tc.code, ce.code)
		}
	})
	s.Stop()
}

// The request a simDevice sends carries its key in the URI query, in the
// header's message ID order: consecutive requests use consecutive IDs and
// distinct tokens.
func TestRawCoAPMessageIDsAndTokens(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	srv, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer srv.Close()
	sc := Scenario{Target: Target{CoAP: srv.LocalAddr().String()}, Format: "senml-cbor",
		Transport: Transport{Protocol: "coap", InFlight: 8, Confirmable: false}}
	c := newRawCoAP(sc, defaultCoAPTiming)
	require.NoError(t, c.connect(t.Context()))
	dev := &simDevice{Device: &sim.Device{ID: "dev-1", Secret: "k"}}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		require.NoError(t, c.send(t.Context(), dev, []byte{0x80}, func(ok bool, err error) {
			defer wg.Done()
			require.True(t, ok)
			require.NoError(t, err)
		}))
	}
	buf := make([]byte, 1500)
	var mids []uint16
	tokens := map[uint32]bool{}
	require.NoError(t, srv.SetReadDeadline(time.Now().Add(10*time.Second)))
	for range 8 {
		n, from, err := srv.ReadFromUDP(buf)
		require.NoError(t, err)
		m, err := parseCoAP(buf[:n])
		require.NoError(t, err)
		require.Equal(t, coapNON, m.typ)
		mids = append(mids, m.mid)
		tokens[binary.BigEndian.Uint32(m.token)] = true
		_, err = srv.WriteToUDP(response(t, message.NonConfirmable, codes.Changed, 9000+m.mid, m.token), from)
		require.NoError(t, err)
	}
	wg.Wait()
	require.Len(t, tokens, 8)
	for i := 1; i < len(mids); i++ {
		require.Equal(t, mids[i-1]+1, mids[i])
	}
	c.close()
}

// One client may not reuse a message ID within EXCHANGE_LIFETIME (the server
// would answer from its deduplication cache without storing anything): after
// at most 65,536 requests the next one waits for its block of IDs, and goes
// once the block's lifetime has passed.
func TestRawCoAPWaitsForReusableMessageIDs(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	sink, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer sink.Close()
	sc := Scenario{Target: Target{CoAP: sink.LocalAddr().String()}, Format: "senml-cbor",
		Transport: Transport{Protocol: "coap", InFlight: 1, Confirmable: true}}
	tm := fastTiming
	tm.AckTimeout = time.Hour // nothing expires while the test holds the exchanges
	c := newRawCoAP(sc, tm)
	require.NoError(t, c.connect(t.Context()))
	dev := &simDevice{Device: &sim.Device{ID: "dev-1", Secret: "k"}}
	first := c.mid + 1
	seen := map[uint16]bool{}
	n := 0
	for ; ; n++ {
		wait, err := c.start(dev, []byte{0x80}, func(bool, error) {})
		require.NoError(t, err)
		if wait > 0 {
			require.Greater(t, wait, time.Hour-time.Minute)
			break
		}
		require.False(t, seen[c.mid], "message ID %d reused", c.mid)
		seen[c.mid] = true
		require.Less(t, n, 1<<16)
	}
	require.GreaterOrEqual(t, n, 1<<16-255)
	require.Equal(t, first&0xff00, (c.mid+1)&0xff00, "it waits at the block it started in")
	c.midBlock[(c.mid+1)>>8] = time.Now().Add(-time.Hour) // the lifetime has passed
	wait, err := c.start(dev, []byte{0x80}, func(bool, error) {})
	require.NoError(t, err)
	require.Zero(t, wait)
	require.Equal(t, first&0xff00, c.mid&0xff00)
	c.mu.Lock()
	clear(c.pending) // the exchanges were started without send's bookkeeping
	c.mu.Unlock()
	c.close()
}

// A new socket's first request never waits for its message ID, wherever in
// a block the random first ID falls; a block it took is only reused after
// EXCHANGE_LIFETIME.
func TestRawCoAPFirstRequestNeverWaits(t *testing.T) {
	dev := &simDevice{Device: &sim.Device{ID: "dev-1", Secret: "k"}}
	for _, mid := range []uint16{0x12fe, 0x12ff, 0x1200, 0x1234, 0xffff, 0xfffe} {
		sink, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		require.NoError(t, err)
		sc := Scenario{Target: Target{CoAP: sink.LocalAddr().String()}, Format: "senml-cbor",
			Transport: Transport{Protocol: "coap", InFlight: 1, Confirmable: true}}
		tm := fastTiming
		tm.AckTimeout = time.Hour
		c := newRawCoAP(sc, tm)
		require.NoError(t, c.connect(t.Context()))
		c.mu.Lock()
		c.resetIDs(mid, 7, time.Now())
		c.mu.Unlock()
		for i := range 3 {
			wait, err := c.start(dev, []byte{0x80}, func(bool, error) {})
			require.NoError(t, err, "mid %#x", mid)
			require.Zero(t, wait, "mid %#x, request %d", mid, i)
			require.Equal(t, mid+uint16(i)+1, c.mid)
		}
		first := mid + 1
		require.False(t, c.midBlock[first>>8].IsZero(), "mid %#x: the first ID's block is taken", mid)
		c.mu.Lock()
		clear(c.pending)
		c.mu.Unlock()
		c.close()
		require.NoError(t, sink.Close())
	}
}

package ingest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/ingest/payload"
)

func TestLimiter(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	type step struct {
		at   time.Duration
		n    int
		ok   bool
		wait time.Duration
	}
	tests := []struct {
		name        string
		rate        float64
		burst       int
		steps       []step
		unlimited   bool
		bucketCount int
	}{
		{name: "no limit", rate: 0, unlimited: true, steps: []step{{0, 1_000_000, true, 0}}},
		{name: "a burst, then the rate", rate: 10, burst: 100, steps: []step{
			{0, 100, true, 0},
			{0, 1, false, 100 * time.Millisecond},
			{100 * time.Millisecond, 1, true, 0},
			{time.Second, 10, false, 100 * time.Millisecond}, // 9 tokens refilled since 100 ms
			{2 * time.Second, 10, true, 0},
		}},
		{name: "the bucket never holds more than the burst", rate: 10, burst: 20, steps: []step{
			{time.Hour, 20, true, 0},
			{time.Hour, 1, false, 100 * time.Millisecond},
		}},
		{name: "a message over the burst never passes", rate: 10, burst: 20, steps: []step{
			{0, 21, false, time.Duration(1<<63 - 1)},
			{0, 20, true, 0},
		}},
		{name: "the burst is at least the rate", rate: 50, burst: 1, steps: []step{{0, 50, true, 0}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newLimiter(tt.rate, tt.burst)
			require.Equal(t, tt.unlimited, l == nil)
			for i, s := range tt.steps {
				ok, wait := l.allow("pipe-0001", s.n, t0.Add(s.at))
				require.Equal(t, s.ok, ok, "step %d", i)
				require.InDelta(t, float64(s.wait), float64(wait), float64(time.Millisecond), "step %d", i)
			}
			if l != nil {
				ok, _ := l.allow("pipe-0002", 1, t0)
				require.True(t, ok, "every device has its own bucket")
			}
		})
	}
}

func TestHandlerRateLimitsADevice(t *testing.T) {
	rec := &recorder{}
	reg := prometheus.NewRegistry()
	h := NewHandler(rec, HandlerOptions{RateLimit: 1, RateBurst: 2, Registerer: reg})
	dev, _ := testRegistry(t).Get("pipe-0001")
	body := []byte(`[{"n":"pressure","v":300},{"n":"flow","v":3}]`)
	_, err := h.Handle(context.Background(), dev, payload.SenMLJSON, body)
	require.NoError(t, err)
	res, err := h.Handle(context.Background(), dev, payload.SenMLJSON, body)
	require.ErrorIs(t, err, ErrRateLimited)
	var rl *RateLimitError
	require.True(t, errors.As(err, &rl))
	require.Greater(t, rl.RetryAfter, time.Duration(0))
	require.Equal(t, 2, res.Rejected)
	require.Len(t, rec.readings(), 2, "nothing of the refused message was journaled")
	require.Equal(t, 2.0, testutil.ToFloat64(h.m.rejected.WithLabelValues(ReasonRateLimited)))
}

func startLimitedBroker(t *testing.T, rec *recorder) *Broker {
	t.Helper()
	h := NewHandler(rec, HandlerOptions{RateLimit: 1, RateBurst: 1})
	b, err := NewBroker(MQTTConfig{Enabled: true, Addr: "127.0.0.1:0"}, testRegistry(t), h, nil, nil)
	require.NoError(t, err)
	runGateway(t, b)
	return b
}

// v3.1.1 has no negative PUBACK: a rate-limited QoS 1 publish is not
// acknowledged and the client is disconnected, so it re-sends later.
func TestBrokerRateLimitV311(t *testing.T) {
	rec := &recorder{}
	b := startLimitedBroker(t, rec)
	c := connect(t, b.Addr().String(), "pipe-0001", "secret-pipe-0001")
	tok := c.Publish("devices/pipe-0001/readings", 1, false, []byte(`[{"n":"pressure","v":300}]`))
	require.True(t, tok.WaitTimeout(5*time.Second))
	require.NoError(t, tok.Error())
	tok = c.Publish("devices/pipe-0001/readings", 1, false, []byte(`[{"n":"pressure","v":301}]`))
	tok.WaitTimeout(5 * time.Second)
	require.Error(t, tok.Error(), "no PUBACK for a rate-limited publish")
	require.Eventually(t, func() bool { return !c.IsConnectionOpen() }, 5*time.Second, 10*time.Millisecond)
	require.Len(t, rec.readings(), 1)
}

// mqtt5 is a minimal MQTT v5 client on mochi's packet codec: enough to read a
// PUBACK reason code, which paho.mqtt.golang (3.1.1) cannot.
type mqtt5 struct {
	conn net.Conn
	r    *bufio.Reader
}

func dial5(t *testing.T, addr, id, secret string) *mqtt5 {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	c := &mqtt5{conn: conn, r: bufio.NewReader(conn)}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: id, Clean: true, Keepalive: 30,
			UsernameFlag: true, Username: []byte(id), PasswordFlag: true, Password: []byte(secret)}}
	c.write(t, pk.ConnectEncode)
	fh, body := c.read(t)
	require.Equal(t, packets.Connack, fh.Type)
	ack := packets.Packet{FixedHeader: fh, ProtocolVersion: 5}
	require.NoError(t, ack.ConnackDecode(body))
	require.Equal(t, packets.CodeSuccess.Code, ack.ReasonCode)
	return c
}

func (c *mqtt5) write(t *testing.T, enc func(*bytes.Buffer) error) {
	var buf bytes.Buffer
	require.NoError(t, enc(&buf))
	_, err := c.conn.Write(buf.Bytes())
	require.NoError(t, err)
}

func (c *mqtt5) read(t *testing.T) (packets.FixedHeader, []byte) {
	require.NoError(t, c.conn.SetReadDeadline(time.Now().Add(5*time.Second)))
	hb, err := c.r.ReadByte()
	require.NoError(t, err)
	var fh packets.FixedHeader
	require.NoError(t, fh.Decode(hb))
	n, mul := 0, 1
	for {
		b, err := c.r.ReadByte()
		require.NoError(t, err)
		n += int(b&127) * mul
		mul *= 128
		if b&128 == 0 {
			break
		}
	}
	fh.Remaining = n
	body := make([]byte, n)
	_, err = c.r.Read(body)
	require.NoError(t, err)
	return fh, body
}

// publish sends a QoS 1 publish and returns the PUBACK reason code.
func (c *mqtt5) publish(t *testing.T, id uint16, topic string, body []byte) byte {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 5,
		TopicName: topic, PacketID: id, Payload: body}
	c.write(t, pk.PublishEncode)
	fh, b := c.read(t)
	require.Equal(t, packets.Puback, fh.Type)
	ack := packets.Packet{FixedHeader: fh, ProtocolVersion: 5}
	require.NoError(t, ack.PubackDecode(b))
	require.Equal(t, id, ack.PacketID)
	return ack.ReasonCode
}

func TestBrokerRateLimitV5NegativePuback(t *testing.T) {
	rec := &recorder{}
	b := startLimitedBroker(t, rec)
	c := dial5(t, b.Addr().String(), "pipe-0001", "secret-pipe-0001")
	require.Equal(t, packets.CodeSuccess.Code, c.publish(t, 1, "devices/pipe-0001/readings", []byte(`[{"n":"pressure","v":300}]`)))
	require.Equal(t, packets.ErrQuotaExceeded.Code, c.publish(t, 2, "devices/pipe-0001/readings", []byte(`[{"n":"pressure","v":301}]`)),
		"0x97 quota exceeded: back off")
	require.Equal(t, packets.ErrPayloadFormatInvalid.Code, c.publish(t, 3, "devices/pipe-0001/readings", []byte(`[{"n":`)),
		"a malformed payload is 0x99 (before any rate limit)")
	require.Equal(t, packets.ErrPacketTooLarge.Code, c.publish(t, 4, "devices/pipe-0001/readings",
		[]byte(`[{"n":"pressure","v":1},{"n":"flow","v":2}]`)), "more readings than the burst: no wait helps")
	require.Len(t, rec.readings(), 1)
}

func TestCoAPRateLimitIsTooManyRequests(t *testing.T) {
	rec := &recorder{}
	h := NewHandler(rec, HandlerOptions{RateLimit: 0.5, RateBurst: 1})
	s, err := NewCoAP(CoAPConfig{Enabled: true, Addr: "127.0.0.1:0"}, testRegistry(t), h, nil, nil)
	require.NoError(t, err)
	runGateway(t, s)
	body := []byte(`[{"n":"pressure","v":1}]`)
	require.Equal(t, codes.Changed, post(t, s.Addr().String(), "/devices/pipe-0001/readings", "secret-pipe-0001", body).Code)
	m := post(t, s.Addr().String(), "/devices/pipe-0001/readings", "secret-pipe-0001", body)
	require.Equal(t, codes.TooManyRequests, m.Code)
	require.Equal(t, byte(2), m.Options[0].Value[0], "Max-Age: retry in 2 s at 0.5 readings/s")
	two := []byte(`[{"n":"pressure","v":1},{"n":"flow","v":2}]`)
	require.Equal(t, codes.RequestEntityTooLarge, post(t, s.Addr().String(), "/devices/pipe-0002/readings", "secret-pipe-0002", two).Code,
		"a message larger than the burst can never pass")
}

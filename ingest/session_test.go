package ingest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// dialRaw connects with MQTT version v (4: 3.1.1, 5) and the CONNECT
// parameters cp (protocol name and credentials filled in) and returns the
// client and the CONNACK.
func dialRaw(t *testing.T, addr string, v byte, cp packets.ConnectParams) (*mqtt5, packets.Packet) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	c := &mqtt5{conn: conn, r: bufio.NewReader(conn)}
	cp.ProtocolName = []byte("MQTT")
	cp.UsernameFlag, cp.PasswordFlag = true, true
	if cp.Keepalive == 0 {
		cp.Keepalive = 30
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: v, Connect: cp}
	if v == 5 && !cp.Clean {
		// v5: a session outlives its connection only with an expiry interval
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 300, true
	}
	c.write(t, pk.ConnectEncode)
	fh, body := c.read(t)
	require.Equal(t, packets.Connack, fh.Type)
	ack := packets.Packet{FixedHeader: fh, ProtocolVersion: v}
	require.NoError(t, ack.ConnackDecode(body))
	return c, ack
}

func creds(id string) packets.ConnectParams {
	return packets.ConnectParams{Username: []byte(id), Password: []byte("secret-" + id), Clean: true}
}

// next reads the next packet, or reports that the server closed the
// connection (io.EOF, a reset); a silent server fails the test after wait.
func (c *mqtt5) next(t *testing.T, wait time.Duration) (packets.FixedHeader, []byte, bool) {
	t.Helper()
	require.NoError(t, c.conn.SetReadDeadline(time.Now().Add(wait)))
	if _, err := c.r.ReadByte(); err != nil {
		var ne net.Error
		require.False(t, errors.As(err, &ne) && ne.Timeout(), "the server neither answered nor closed the connection within %v", wait)
		return packets.FixedHeader{}, nil, false
	}
	require.NoError(t, c.r.UnreadByte())
	fh, body := c.read(t)
	return fh, body, true
}

// requireClosed reads until the server closes the connection, allowing for
// a DISCONNECT before it, whose v5 reason code it returns (0 without one).
func (c *mqtt5) requireClosed(t *testing.T, v byte) byte {
	t.Helper()
	fh, body, open := c.next(t, 5*time.Second)
	if !open {
		return 0
	}
	require.Equal(t, packets.Disconnect, fh.Type, "expected the connection to end, got packet type %d", fh.Type)
	pk := packets.Packet{FixedHeader: fh, ProtocolVersion: v}
	require.NoError(t, pk.DisconnectDecode(body))
	_, _, open = c.next(t, 5*time.Second)
	require.False(t, open, "closed after the DISCONNECT")
	return pk.ReasonCode
}

func (c *mqtt5) send(t *testing.T, v byte, qos byte, id uint16, topic string) {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, ProtocolVersion: v,
		TopicName: topic, PacketID: id, Payload: []byte(`[{"n":"pressure","v":300}]`)}
	c.write(t, pk.PublishEncode)
}

// A device that presents another device's client id, with its own valid
// credentials, neither disconnects that device nor is handed its session;
// a device still resumes its own session.
func TestBrokerSessionsBelongToTheirDevice(t *testing.T) {
	b := startBroker(t, &recorder{})
	addr := b.Addr().String()
	persistent := func(id, clientID string) packets.ConnectParams {
		cp := creds(id)
		cp.ClientIdentifier, cp.Clean = clientID, false
		return cp
	}
	for _, v := range []byte{4, 5} {
		bID := fmt.Sprintf("b-client-v%d", v)
		// B holds a persistent session under its client id
		_, ack := dialRaw(t, addr, v, persistent("pipe-0002", bID))
		require.Equal(t, packets.CodeSuccess.Code, ack.ReasonCode)
		bConn, ack := dialRaw(t, addr, v, persistent("pipe-0002", bID))
		require.Equal(t, packets.CodeSuccess.Code, ack.ReasonCode)
		require.True(t, ack.SessionPresent, "v%d: a device resumes its own session", v)

		// A, with its own valid credentials and B's client id, while B is connected
		_, ack = dialRaw(t, addr, v, persistent("pipe-0001", bID))
		require.Equal(t, packets.CodeSuccess.Code, ack.ReasonCode)
		require.False(t, ack.SessionPresent, "v%d: A is not handed B's session", v)
		bConn.send(t, v, 1, 7, "devices/pipe-0002/readings")
		fh, _, open := bConn.next(t, 5*time.Second)
		require.True(t, open, "v%d: B was not disconnected by A", v)
		require.Equal(t, packets.Puback, fh.Type)

		// and after B has gone, its session stays its own
		bConn.conn.Close()
		_, ack = dialRaw(t, addr, v, persistent("pipe-0001", bID))
		require.Equal(t, packets.CodeSuccess.Code, ack.ReasonCode)
		require.True(t, ack.SessionPresent, "v%d: A resumes the session A made a moment ago, not B's", v)
		_, ack = dialRaw(t, addr, v, persistent("pipe-0002", bID))
		require.True(t, ack.SessionPresent, "v%d: B's session survived", v)
	}
}

// QoS 2 is refused per the spec (the broker announces Maximum QoS 1): v5 gets
// DISCONNECT 0x9B "QoS not supported", v3.1.1 a closed connection; never a
// PUBACK, and nothing is journaled.
func TestBrokerRefusesQoS2(t *testing.T) {
	rec := &recorder{}
	b := startBroker(t, rec)
	for _, tc := range []struct {
		v    byte
		want byte
	}{{4, 0}, {5, packets.ErrQosNotSupported.Code}} {
		c, ack := dialRaw(t, b.Addr().String(), tc.v, creds("pipe-0001"))
		require.Equal(t, packets.CodeSuccess.Code, ack.ReasonCode)
		c.send(t, tc.v, 2, 1, "devices/pipe-0001/readings")
		require.Equal(t, tc.want, c.requireClosed(t, tc.v), "v%d", tc.v)
	}
	require.Empty(t, rec.readings())
	require.Equal(t, 2.0, testutil.ToFloat64(b.h.m.rejected.WithLabelValues(ReasonUnsupportedQoS)))
}

// A will is a publish like any other: only to the device's own readings
// topic; anything else is refused at CONNECT with "not authorized".
func TestBrokerAppliesTheTopicACLToWills(t *testing.T) {
	b := startBroker(t, &recorder{})
	for _, tc := range []struct {
		topic string
		ok    bool
	}{
		{"devices/pipe-0001/readings", true},
		{"devices/pipe-0002/readings", false},
		{"devices/+/readings", false},
		{"devices/#", false},
		{"$SYS/broker/clients", false},
		{"alerts", false},
	} {
		for _, v := range []byte{4, 5} {
			cp := creds("pipe-0001")
			cp.ClientIdentifier, cp.Clean = "will-test", true
			cp.WillFlag, cp.WillTopic, cp.WillPayload = true, tc.topic, []byte("gone")
			_, ack := dialRaw(t, b.Addr().String(), v, cp)
			if tc.ok {
				require.Equal(t, packets.CodeSuccess.Code, ack.ReasonCode, "v%d will on %s", v, tc.topic)
				continue
			}
			want := packets.ErrNotAuthorized.Code
			if v == 4 {
				want = packets.Err3NotAuthorized.Code // 0x05
			}
			require.Equal(t, want, ack.ReasonCode, "v%d will on %s", v, tc.topic)
		}
	}
}

// A QoS 1 publish to $SYS/... is refused like any forbidden topic: v5 PUBACK
// 0x87 with the connection kept, v3.1.1 a closed connection; never left
// unanswered (mochi dropped it without a PUBACK). A wildcard in a topic name
// is a protocol violation that mochi's decoder answers with DISCONNECT 0x82.
func TestBrokerAnswersPublishesToInvalidTopics(t *testing.T) {
	rec := &recorder{}
	b := startBroker(t, rec)
	for _, tc := range []struct {
		topic      string
		disconnect byte // v5: 0 means PUBACK 0x87 and the connection goes on
	}{
		{"$SYS/broker/load", 0},
		{"$sys/x", 0},
		{"devices/+/readings", packets.ErrProtocolViolation.Code},
		{"devices/pipe-0001/#", packets.ErrProtocolViolation.Code},
	} {
		c, _ := dialRaw(t, b.Addr().String(), 5, creds("pipe-0001"))
		c.send(t, 5, 1, 3, tc.topic)
		if tc.disconnect != 0 {
			require.Equal(t, tc.disconnect, c.requireClosed(t, 5), "v5 %s", tc.topic)
		} else {
			fh, body, open := c.next(t, 5*time.Second)
			require.True(t, open, "v5 %s", tc.topic)
			require.Equal(t, packets.Puback, fh.Type, "v5 %s", tc.topic)
			ack := packets.Packet{FixedHeader: fh, ProtocolVersion: 5}
			require.NoError(t, ack.PubackDecode(body))
			require.Equal(t, packets.ErrNotAuthorized.Code, ack.ReasonCode, "v5 %s", tc.topic)
			require.Equal(t, packets.CodeSuccess.Code, c.publish(t, 4, "devices/pipe-0001/readings", []byte(`[{"n":"pressure","v":300}]`)),
				"v5 %s: the connection goes on", tc.topic)
		}

		c, _ = dialRaw(t, b.Addr().String(), 4, creds("pipe-0001"))
		c.send(t, 4, 1, 3, tc.topic)
		c.requireClosed(t, 4)
	}
	require.Len(t, rec.readings(), 2, "only the publishes to the device's own topic")
	require.Equal(t, 4.0, testutil.ToFloat64(b.h.m.rejected.WithLabelValues(ReasonForbidden)))
}

package ingest

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"
	mochipk "github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// rawDevice connects to the embedded broker as device id (MQTT 3.1.1) over a
// plain socket, so that a test sees every packet in the order it came.
func rawDevice(t *testing.T, addr, id, secret string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
	cp.ProtocolName, cp.ProtocolVersion, cp.CleanSession, cp.ClientIdentifier = "MQTT", 4, true, id
	cp.UsernameFlag, cp.Username, cp.PasswordFlag, cp.Password = true, id, true, []byte(secret)
	require.NoError(t, cp.Write(c))
	ack, err := packets.ReadPacket(c)
	require.NoError(t, err)
	require.Equal(t, byte(0), ack.(*packets.ConnackPacket).ReturnCode)
	return c
}

func publishQoS1(t *testing.T, c net.Conn, topic string, id uint16, body []byte) {
	t.Helper()
	p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	p.TopicName, p.Qos, p.MessageID, p.Payload = topic, 1, id, body
	require.NoError(t, p.Write(c))
}

// The broker reads a device's next publishes while the earlier ones are
// being journaled (one journal write can then carry them all), and still
// acknowledges each only once it is durable, in the order they came (MQTT
// 3.1.1 §4.6): a malformed message among them, whose answer is known at
// once, waits for its turn. Before, the reader waited for each journal
// write, so only the first publish reached the pipeline.
func TestBrokerReadsOnWhileJournalingAndAcksInOrder(t *testing.T) {
	rec := &recorder{hold: make(chan struct{})}
	b := startBroker(t, rec)
	c := rawDevice(t, b.Addr().String(), "pipe-0001", "secret-pipe-0001")
	const n, bad = 10, 5
	for i := uint16(1); i <= n; i++ {
		body := fmt.Appendf(nil, `[{"n":"pressure","v":%d}]`, 300+i)
		if i == bad {
			body = []byte(`not json`)
		}
		publishQoS1(t, c, "devices/pipe-0001/readings", i, body)
	}
	require.Eventually(t, func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return rec.calls == n-1
	}, 5*time.Second, 5*time.Millisecond, "every well-formed publish queued while none is journaled")

	require.NoError(t, c.SetReadDeadline(time.Now().Add(200*time.Millisecond)))
	_, err := packets.ReadPacket(c)
	var ne net.Error
	require.ErrorAs(t, err, &ne, "no PUBACK, not even the malformed message's, before the first is journaled")
	require.True(t, ne.Timeout())

	close(rec.hold)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	for want := uint16(1); want <= n; want++ {
		pk, err := packets.ReadPacket(c)
		require.NoError(t, err)
		ack, ok := pk.(*packets.PubackPacket)
		require.True(t, ok, "got %T", pk)
		require.Equal(t, want, ack.MessageID, "acknowledged in the order published")
	}
	require.Len(t, rec.readings(), n-1)
}

// MQTT v5: a publish refused for its topic (another device's, or one mochi
// reserves) is answered with PUBACK 0x87 in its turn, after the publishes
// before it that are still being journaled, not ahead of them.
func TestBrokerV5RefusalsWaitForTheirTurn(t *testing.T) {
	rec := &recorder{hold: make(chan struct{})}
	b := startBroker(t, rec)
	c, _ := dialRaw(t, b.Addr().String(), 5, creds("pipe-0001"))
	c.send(t, 5, 1, 1, "devices/pipe-0001/readings")
	c.send(t, 5, 1, 2, "devices/pipe-0001/readings")
	c.send(t, 5, 1, 3, "devices/pipe-0002/readings")
	c.send(t, 5, 1, 4, "$SYS/broker")
	c.send(t, 5, 1, 5, "devices/pipe-0001/readings")
	require.Eventually(t, func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return rec.calls == 3
	}, 5*time.Second, 5*time.Millisecond)
	require.NoError(t, c.conn.SetReadDeadline(time.Now().Add(200*time.Millisecond)))
	_, err := c.r.ReadByte()
	var ne net.Error
	require.ErrorAs(t, err, &ne, "nothing answered, not even the refusals, before the first publish is journaled")

	close(rec.hold)
	for _, want := range []struct {
		id   uint16
		code byte
	}{{1, 0}, {2, 0}, {3, mochipk.ErrNotAuthorized.Code}, {4, mochipk.ErrNotAuthorized.Code}, {5, 0}} {
		fh, body, open := c.next(t, 10*time.Second)
		require.True(t, open)
		require.Equal(t, mochipk.Puback, fh.Type)
		ack := mochipk.Packet{FixedHeader: fh, ProtocolVersion: 5}
		require.NoError(t, ack.PubackDecode(body))
		require.Equal(t, want.id, ack.PacketID, "answered in the order published")
		require.Equal(t, want.code, ack.ReasonCode, "packet %d", want.id)
	}
	require.Len(t, rec.readings(), 3)
}

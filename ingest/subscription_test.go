package ingest

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"

	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stretchr/testify/require"
)

// streamConn is a net.Conn reading a fixed byte stream.
type streamConn struct {
	net.Conn
	r io.Reader
}

func (c streamConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// logPublish appends a delivered PUBLISH to a log in a form both sides of
// the comparison share.
func logPublish(log []byte, topic []byte, qos byte, id uint16, payload []byte, tooBig bool) []byte {
	log = append(log, 0xff, 'P', qos, byte(id>>8), byte(id))
	if tooBig {
		log = append(log, 'B')
	}
	log = binary.BigEndian.AppendUint16(log, uint16(len(topic)))
	log = append(log, topic...)
	log = binary.BigEndian.AppendUint32(log, uint32(len(payload)))
	return append(log, payload...)
}

// readThrough runs the subscription reader over stream as paho would (reads
// of readSize bytes until an error) with a read buffer of bufSize, and logs
// the publishes it takes out and the bytes it passes to paho, in order.
func readThrough(stream []byte, bufSize, readSize int) ([]byte, error) {
	var log []byte
	c := &bufferedConn{r: bufio.NewReaderSize(streamConn{r: bytes.NewReader(stream)}, bufSize)}
	c.deliver = func(p inboundPublish) { log = logPublish(log, p.Topic, p.QoS, p.ID, p.Payload, p.TooBig) }
	buf := make([]byte, readSize)
	for {
		n, err := c.Read(buf)
		log = append(log, buf[:n]...)
		if err != nil {
			return log, err
		}
	}
}

// referenceRead splits stream with paho's own packet reader: QoS 0/1
// PUBLISH packets logged as delivered, every other packet's bytes as passed.
// clean: paho read every packet to the stream's end.
func referenceRead(stream []byte) (log []byte, clean bool) {
	r := bytes.NewReader(stream)
	for {
		start := len(stream) - r.Len()
		if r.Len() == 0 {
			return log, true
		}
		if declaredLength(stream[start:]) > r.Len() {
			return log, false // cut short; paho would allocate all it declares first
		}
		pk, err := packets.ReadPacket(r)
		if err != nil {
			return log, false
		}
		if p, ok := pk.(*packets.PublishPacket); ok && p.Qos <= 1 {
			log = logPublish(log, []byte(p.TopicName), p.Qos, p.MessageID, p.Payload, false)
			continue
		}
		log = append(log, stream[start:len(stream)-r.Len()]...)
	}
}

// declaredLength is the remaining length a packet's fixed header declares
// (as paho reads it: at most four bytes).
func declaredLength(b []byte) int {
	n := 0
	for i, shift := 1, 0; i < len(b) && i <= 4; i, shift = i+1, shift+7 {
		n |= int(b[i]&0x7f) << shift
		if b[i]&0x80 == 0 {
			break
		}
	}
	return n
}

func mqttStream(t testing.TB, pks ...packets.ControlPacket) []byte {
	var b bytes.Buffer
	for _, p := range pks {
		require.NoError(t, p.Write(&b))
	}
	return b.Bytes()
}

func publishPacket(topic string, qos byte, id uint16, payload []byte) *packets.PublishPacket {
	p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	p.TopicName, p.Qos, p.MessageID, p.Payload = topic, qos, id, payload
	return p
}

func sampleStream(t testing.TB) []byte {
	suback := packets.NewControlPacket(packets.Suback).(*packets.SubackPacket)
	suback.MessageID, suback.ReturnCodes = 1, []byte{1}
	return mqttStream(t,
		packets.NewControlPacket(packets.Connack),
		suback,
		publishPacket("devices/pipe-0001/readings", 1, 7, []byte(`[{"n":"pressure","v":300}]`)),
		publishPacket("devices/pipe-0002/readings", 0, 0, []byte(`{"pressure":301}`)),
		packets.NewControlPacket(packets.Pingresp),
		publishPacket("devices/pipe-0001/readings", 2, 8, []byte(`qos 2 is paho's`)),
		publishPacket("devices/pipe-0001/readings", 1, 9, bytes.Repeat([]byte("x"), 300)), // over a small buffer
	)
}

// The subscription reader takes out exactly the QoS 0 and 1 PUBLISH packets
// paho's reader would have parsed, with the same topic, id and payload, and
// passes every other packet to paho byte for byte, in order, whatever the
// sizes of the reads and of its buffer.
func TestSubscriptionReaderSplitsAsPahoDoes(t *testing.T) {
	stream := sampleStream(t)
	want, clean := referenceRead(stream)
	require.True(t, clean)
	require.Equal(t, 3, bytes.Count(want, []byte{0xff, 'P'}), "QoS 0 and 1 publishes")
	for _, bufSize := range []int{16, 64, 4096} {
		for _, readSize := range []int{1, 2, 5, 1000} {
			got, err := readThrough(stream, bufSize, readSize)
			require.ErrorIs(t, err, io.EOF)
			require.Equal(t, want, got, "buffer %d, reads of %d", bufSize, readSize)
		}
	}
}

// A PUBLISH too large to hold is delivered without its payload (refused)
// and skipped as it streams past; the packets after it are read as usual.
func TestSubscriptionReaderSkipsAnOversizedPublish(t *testing.T) {
	stream := mqttStream(t,
		publishPacket("devices/pipe-0001/readings", 1, 3, bytes.Repeat([]byte("y"), maxInboundPublish+1)),
		publishPacket("devices/pipe-0001/readings", 1, 4, []byte(`[]`)),
		packets.NewControlPacket(packets.Pingresp))
	got, err := readThrough(stream, 64<<10, 4096)
	require.ErrorIs(t, err, io.EOF)
	want := logPublish(nil, []byte("devices/pipe-0001/readings"), 1, 3, nil, true)
	want = logPublish(want, []byte("devices/pipe-0001/readings"), 1, 4, []byte(`[]`), false)
	want = append(want, 0xd0, 0)
	require.Equal(t, want, got)
}

// Whatever the broker sends, the reader does not panic, and what it
// delivered and passed agrees with paho's reading of the same bytes as far
// as both got (one may stop earlier at a malformed packet: the connection
// then ends; the reader refuses some that paho reads leniently, such as a
// fifth remaining-length byte). When paho reads every packet to the end, so
// does the reader, with the same result, unless it refused one.
func FuzzSubscriptionReader(f *testing.F) {
	f.Add(sampleStream(f), uint8(16), uint8(3))
	f.Add([]byte{0x32, 0x80, 0x80, 0x80, 0x80, 0x01}, uint8(64), uint8(1))
	f.Add([]byte{0x32, 0x03, 0x00, 0x05, 0x61}, uint8(64), uint8(8))
	f.Fuzz(func(t *testing.T, stream []byte, bufSize, readSize uint8) {
		got, gotErr := readThrough(stream, int(bufSize)+16, int(readSize)+1)
		want, clean := referenceRead(stream)
		n := min(len(got), len(want))
		require.Equal(t, string(want[:n]), string(got[:n]))
		if clean && !errors.Is(gotErr, errMalformedPacket) {
			require.ErrorIs(t, gotErr, io.EOF)
			require.Equal(t, string(want), string(got))
		}
	})
}

package ingest

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/internal/servers"
)

// fakeMsg is a paho.Message whose Ack is recorded.
type fakeMsg struct {
	topic   string
	payload []byte
	id      int
	acks    *ackLog
}

type ackLog struct {
	mu  sync.Mutex
	ids []int
}

func (m *fakeMsg) Duplicate() bool   { return false }
func (m *fakeMsg) Qos() byte         { return 1 }
func (m *fakeMsg) Retained() bool    { return false }
func (m *fakeMsg) Topic() string     { return m.topic }
func (m *fakeMsg) MessageID() uint16 { return uint16(m.id) }
func (m *fakeMsg) Payload() []byte   { return m.payload }
func (m *fakeMsg) Ack() {
	m.acks.mu.Lock()
	m.acks.ids = append(m.acks.ids, m.id)
	m.acks.mu.Unlock()
}

// Messages are queued for the journal without waiting for it, a device's in
// order, and acknowledged in arrival order, each only after it was journaled.
func TestExternalQueuesWithoutWaitingAndAcksInOrder(t *testing.T) {
	rec := &recorder{hold: make(chan struct{})}
	x := runAcker(t, rec)

	acks := &ackLog{}
	devs := []string{"pipe-0001", "pipe-0002", "nobody"}
	const n = 60
	for i := range n {
		dev := devs[i%len(devs)]
		x.handle(nil, &fakeMsg{topic: "devices/" + dev + "/readings", id: i + 1, acks: acks,
			payload: fmt.Appendf(nil, `[{"n":"pressure","v":%d}]`, i)})
	}
	time.Sleep(100 * time.Millisecond)
	acks.mu.Lock()
	require.Empty(t, acks.ids, "nothing journaled yet, so nothing acknowledged (not even the unknown device's message, which comes after)")
	acks.mu.Unlock()
	close(rec.hold)
	require.Eventually(t, func() bool {
		acks.mu.Lock()
		defer acks.mu.Unlock()
		return len(acks.ids) == n
	}, 5*time.Second, 10*time.Millisecond)
	for i, id := range acks.ids {
		require.Equal(t, i+1, id, "acknowledged in arrival order")
	}
	last := map[string]float64{"pipe-0001": -1, "pipe-0002": -1}
	for _, r := range rec.readings() {
		require.Greater(t, r.Value, last[r.Device], "per-device order")
		last[r.Device] = r.Value
	}
	require.Len(t, rec.readings(), 2*n/3)
}

// runAcker makes an External over sub's handler with its acker running
// until the test ends, without connecting to any broker: the test feeds
// handle or fromReader itself.
func runAcker(t *testing.T, sub Submitter) *External {
	t.Helper()
	x, err := NewExternal(ExternalConfig{URL: "tcp://127.0.0.1:1", Topic: "devices/+/readings", ClientID: "t"},
		testRegistry(t), NewHandler(sub, HandlerOptions{}), nil, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	x.ctx = ctx
	x.inflight = make(chan inflightMsg, externalWindow)
	ackerDone := make(chan struct{})
	go func() { defer close(ackerDone); x.acker(ctx) }()
	t.Cleanup(func() { cancel(); <-ackerDone })
	return x
}

// External mode against a real mosquitto: every message published through the
// broker is journaled, in order, and paho reads the subscription through a
// buffer: far fewer read(2) calls than messages (reading straight from the
// socket, paho makes at least three per message: the first byte, the
// remaining length, the rest).
func TestExternalAgainstMosquitto(t *testing.T) {
	if testing.Short() {
		t.Skip("starts mosquitto; run without -short (make test installs it)")
	}
	mq, addr, err := servers.StartMosquitto(t.TempDir())
	require.NoError(t, err)
	defer func() { require.NoError(t, mq.Stop(10*time.Second)) }()
	rec := &recorder{}
	x, err := NewExternal(ExternalConfig{URL: "tcp://" + addr, Topic: "devices/+/readings", ClientID: "citypulse-test", QoS: 1},
		testRegistry(t), NewHandler(rec, HandlerOptions{}), nil, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- x.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()

	pub := rawPublisher(t, addr)
	defer pub.Close()
	w := bufio.NewWriter(pub)
	id := uint16(0)
	send := func(dev string, v int) {
		id++
		p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
		p.TopicName, p.Qos, p.MessageID = "devices/"+dev+"/readings", 1, id
		p.Payload = fmt.Appendf(nil, `[{"n":"pressure","v":%d}]`, v)
		require.NoError(t, p.Write(w))
	}
	// the subscription is made asynchronously after the connect: probe
	require.Eventually(t, func() bool {
		send("pipe-0001", 1)
		require.NoError(t, w.Flush())
		return len(rec.readings()) > 0
	}, 15*time.Second, 100*time.Millisecond, "no probe arrived through mosquitto")
	time.Sleep(200 * time.Millisecond) // the last probes in flight arrive
	before := len(rec.readings())

	const n = 3000
	reads0, writes0 := readSyscalls(t), ioCount(t, "syscw")
	for i := range n {
		send("pipe-0002", i)
	}
	require.NoError(t, w.Flush())
	require.Eventually(t, func() bool { return len(rec.readings()) >= before+n }, 30*time.Second, 20*time.Millisecond)
	reads, writes := readSyscalls(t)-reads0, ioCount(t, "syscw")-writes0
	t.Logf("%d messages through mosquitto: %d read and %d write system calls in this process (%.2f and %.2f per message)",
		n, reads, writes, float64(reads)/n, float64(writes)/n)
	// one write(2) per PUBACK unless they are gathered (the publisher's own
	// writes are a few buffered flushes)
	require.Less(t, writes, n/2, "PUBACKs are sent several per write(2)")
	// unbuffered, paho makes at least three per message; buffered, one read
	// may carry many (even one per message plus a would-block retry stays
	// under two)
	require.Less(t, reads, 2*n, "paho reads the subscription through a buffer")
	var got []float64
	for _, r := range rec.readings()[before:] {
		require.Equal(t, "pipe-0002", r.Device, "no probe after the wait")
		got = append(got, r.Value)
	}
	for i, v := range got {
		require.Equal(t, float64(i), v, "every message, in order")
	}
}

// rawPublisher connects to the broker with a plain socket: its own reads
// (only the CONNACK) do not blur the count of the subscriber's.
func rawPublisher(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
	cp.ProtocolName, cp.ProtocolVersion, cp.CleanSession, cp.ClientIdentifier = "MQTT", 4, true, "field-gateway"
	require.NoError(t, cp.Write(c))
	ack, err := packets.ReadPacket(c)
	require.NoError(t, err)
	require.Equal(t, byte(0), ack.(*packets.ConnackPacket).ReturnCode)
	return c
}

// readSyscalls is the read(2)-like system calls this process made so far
// (syscr of /proc/self/io).
func readSyscalls(t *testing.T) int { return ioCount(t, "syscr") }

// ioCount reads one counter of /proc/self/io (syscr, syscw).
func ioCount(t *testing.T, name string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	require.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+": "); ok {
			n, err := strconv.Atoi(v)
			require.NoError(t, err)
			return n
		}
	}
	t.Fatalf("no %s in /proc/self/io", name)
	return 0
}

// The buffered opener speaks TLS for ssl:// (with the configured roots) and
// refuses a scheme it does not dial.
func TestOpenBufferedTLS(t *testing.T) {
	cert, key, pool := selfSigned(t)
	pair, err := tls.LoadX509KeyPair(cert, key)
	require.NoError(t, err)
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{pair}})
	require.NoError(t, err)
	defer l.Close()
	served := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			_, err = c.Write([]byte{0x20, 2, 0, 0}) // a CONNACK
			c.Close()
		}
		served <- err
	}()
	o := paho.NewClientOptions().SetTLSConfig(&tls.Config{RootCAs: pool})
	c, err := openBuffered(&url.URL{Scheme: "ssl", Host: l.Addr().String()}, *o)
	require.NoError(t, err)
	defer c.Close()
	require.IsType(t, &tls.Conn{}, c.(*bufferedConn).Conn)
	pkt, err := packets.ReadPacket(c)
	require.NoError(t, err)
	require.IsType(t, &packets.ConnackPacket{}, pkt)
	require.NoError(t, <-served)

	_, err = openBuffered(&url.URL{Scheme: "ws", Host: l.Addr().String()}, *o)
	require.ErrorContains(t, err, `scheme "ws"`)
}

// A message whose journal write failed is not acknowledged, and neither is
// anything read after it on that connection: the connection is closed, so
// that the broker sends them all again after paho reconnects (it re-sends
// only on a new connection, and acknowledging the later ones would skip it).
func TestExternalReconnectsAfterAFailedJournalWrite(t *testing.T) {
	rec := &recorder{failWait: 2}
	x := runAcker(t, rec)

	ours, broker := net.Pipe()
	bc := &bufferedConn{Conn: ours, r: bufio.NewReader(ours)}
	for id := uint16(1); id <= 3; id++ {
		x.fromReader(bc, inboundPublish{Topic: []byte("devices/pipe-0001/readings"), QoS: 1, ID: id,
			Payload: fmt.Appendf(nil, `[{"n":"pressure","v":%d}]`, 300+id)})
	}
	require.NoError(t, broker.SetReadDeadline(time.Now().Add(10*time.Second)))
	got, err := io.ReadAll(broker)
	require.NoError(t, err, "the connection is closed, not left open")
	require.Equal(t, []byte{0x40, 2, 0, 1}, got, "only the message before the failed one is acknowledged")
	require.True(t, bc.failed.Load())
}

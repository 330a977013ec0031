package ingest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
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

// Messages are journaled concurrently but a device's in order, and
// acknowledged in arrival order, each only after it was journaled.
func TestExternalJournalsConcurrentlyAndAcksInOrder(t *testing.T) {
	rec := &recorder{hold: make(chan struct{})}
	x, err := NewExternal(ExternalConfig{URL: "tcp://127.0.0.1:1", Topic: "devices/+/readings", ClientID: "t"},
		testRegistry(t), NewHandler(rec, HandlerOptions{}), nil, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	x.ctx = ctx
	x.inflight = make(chan *inflightMsg, externalWindow)
	x.last = map[string]chan struct{}{}
	ackerDone := make(chan struct{})
	go func() { defer close(ackerDone); x.acker(ctx) }()

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
	cancel()
	x.work.Wait()
	<-ackerDone
}

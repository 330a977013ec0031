package ingest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/pipeline"
)

type countSink struct{ n atomic.Int64 }

func (c *countSink) Name() string { return "count" }

// await waits until the sink has n readings or d has passed, and returns
// how many it has.
func (c *countSink) await(n int64, d time.Duration) int64 {
	for deadline := time.Now().Add(d); c.n.Load() < n && time.Now().Before(deadline); {
		time.Sleep(100 * time.Microsecond)
	}
	return c.n.Load()
}
func (c *countSink) Write(_ context.Context, b pipeline.Batch) error {
	c.n.Add(int64(len(b.Readings)))
	return nil
}

// BenchmarkBrokerQoS1 publishes QoS 1 SenML JSON messages of 10 readings from
// 16 device connections through the embedded broker, the handler and the real
// pipeline (journal, fsync interval) to a counting sink. One op = one message;
// the clock stops when the sink has every reading.
func BenchmarkBrokerQoS1(b *testing.B) {
	const clients = 16
	var list []devices.Device
	for i := 0; i < clients; i++ {
		list = append(list, devices.Device{ID: fmt.Sprintf("pipe-%04d", i), Kind: devices.KindPipe, District: "gulou",
			Interval: 10 * time.Second, Secret: "bench-secret"})
	}
	reg, err := devices.NewRegistry(list, "")
	if err != nil {
		b.Fatal(err)
	}
	sink := &countSink{}
	p, err := pipeline.New(pipeline.Options{Config: pipeline.Default(), Dir: b.TempDir(), Sinks: []pipeline.SinkSpec{{Sink: sink}}})
	if err != nil {
		b.Fatal(err)
	}
	h := NewHandler(Local(p), HandlerOptions{})
	br, err := NewBroker(MQTTConfig{Enabled: true, Addr: "127.0.0.1:0"}, reg, h, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = p.Run(ctx) }()
	go func() { defer wg.Done(); _ = br.Run(ctx) }()
	defer func() { cancel(); wg.Wait() }()

	msg := []byte(`[{"bn":"urn:dev:DEV:","n":"pressure","v":400},{"n":"pressure","v":401,"t":-1},{"n":"pressure","v":402,"t":-2},` +
		`{"n":"pressure","v":403,"t":-3},{"n":"pressure","v":404,"t":-4},{"n":"flow","v":1},{"n":"flow","v":2,"t":-1},` +
		`{"n":"flow","v":3,"t":-2},{"n":"flow","v":4,"t":-3},{"n":"flow","v":5,"t":-4}]`)
	conns := make([]paho.Client, clients)
	for i := range conns {
		id := list[i].ID
		c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + br.Addr().String()).SetClientID(id).
			SetUsername(id).SetPassword("bench-secret").SetAutoReconnect(false).SetMaxResumePubInFlight(64))
		if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			b.Fatal("connect", tok.Error())
		}
		defer c.Disconnect(10)
		conns[i] = c
	}
	var next atomic.Int64
	b.ResetTimer()
	var pw sync.WaitGroup
	for i := range conns {
		pw.Add(1)
		go func() {
			defer pw.Done()
			c, id := conns[i], list[i].ID
			payload := []byte(strings.ReplaceAll(string(msg), "DEV", id))
			window := make([]paho.Token, 0, 32)
			for next.Add(1) <= int64(b.N) {
				window = append(window, c.Publish("devices/"+id+"/readings", 1, false, payload))
				if len(window) == cap(window) {
					for _, t := range window {
						t.Wait()
					}
					window = window[:0]
				}
			}
			for _, t := range window {
				t.Wait()
			}
		}()
	}
	pw.Wait() // every message acknowledged: journaled
	want := int64(b.N) * 10
	stored := sink.await(want, time.Minute)
	b.StopTimer() // and the sink has every reading (or the minute ran out: stored/reading shows it)
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
	b.ReportMetric(float64(stored)/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64(stored)/float64(want), "stored/reading")
}

package ingest

import (
	"context"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/citypulse/citypulse/devices"
)

// BenchmarkCoAPWarmPeer is the cost of a confirmable request from a peer that
// has already sent 10,000 (whose answers the deduplication cache keeps for
// 247 s): with go-coap's udp.Server it grows with that number, since every
// packet walks the peer's whole cache (issue 13).
func BenchmarkCoAPWarmPeer(b *testing.B) {
	rec := &recorder{}
	h := NewHandler(rec, HandlerOptions{})
	reg, err := devices.NewRegistry([]devices.Device{{ID: "pipe-0001", Kind: devices.KindPipe, District: "gulou",
		Interval: 10 * time.Second, Secret: "secret-pipe-0001"}}, "")
	if err != nil {
		b.Fatal(err)
	}
	s, err := NewCoAP(CoAPConfig{Enabled: true, Addr: "127.0.0.1:0", AllowUnauthenticated: true}, reg, h, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	b.Cleanup(func() { cancel(); <-done })
	c := dialRawCoAP(b, s.Addr().String())
	body := senml(1, 1)
	for range 10000 {
		c.post("pipe-0001", "", []byte{1}, body)
	}
	rec.mu.Lock()
	before := len(rec.got)
	rec.mu.Unlock()
	b.ResetTimer()
	for range b.N {
		if r := c.post("pipe-0001", "", []byte{1}, body); r.code != codes.Changed {
			b.Fatal(r.code, r.diag)
		}
	}
	b.StopTimer()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	// each answered request must have handed its reading to the pipeline
	b.ReportMetric(float64(len(rec.got)-before)/float64(b.N), "journaled/request")
}

package cluster

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
)

// The library's error handler signals a lost pin without blocking, as often
// as JetStream answers a pull with a pin mismatch (once per waiting pull
// request). settle and deliver, which see the signal while the consume loop
// (the only other reader) waits on them, must return at once however often
// it comes, and leave the loss for take to record. They once put the signal
// back with a blocking send, which hung the partition for good (no batch
// handled, none given back) when the handler had filled the channel again in
// between.
func TestALostPinStopsSettleAndDeliverHoweverOftenItIsSignalled(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(o *Owner, st *partition) bool
	}{
		{"settle", func(o *Owner, st *partition) bool {
			_, ok := o.settle(context.Background(), st, nil)
			return ok
		}},
		{"deliver", func(o *Owner, st *partition) bool {
			return o.deliver(context.Background(), st, nil)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := &Owner{cfg: Default(), m: NewMetrics(nil), log: slog.New(slog.DiscardHandler),
				handle: func(context.Context, []Message) (Commit, error) { return nil, errors.New("store down") }}
			st := &partition{p: 3, msgs: make(chan jetstream.Msg, 1), lost: make(chan struct{}, 1), stop: make(chan struct{})}
			handlerDone := make(chan struct{})
			go func() { // the library's error handler, answered by many pin mismatches
				defer close(handlerDone)
				for {
					select {
					case st.lost <- struct{}{}:
					case <-st.stop:
						return
					default:
						runtime.Gosched() // full: signal again at once
					}
				}
			}()
			defer func() { close(st.stop); <-handlerDone }()
			returned := make(chan bool, 1)
			go func() { returned <- tc.run(o, st) }()
			select {
			case ok := <-returned:
				require.False(t, ok, "the partition was lost")
				require.True(t, st.lostSeen, "the loss is left for take to record")
			case <-time.After(10 * time.Second):
				t.Fatalf("%s did not return after the pin was lost", tc.name)
			}
		})
	}
}

package ingest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/ingest/payload"
	"github.com/citypulse/citypulse/pipeline"
)

// recorder is a test double of the pipeline: it records submissions, can push
// back, and can hold a submission until released.
type recorder struct {
	mu       sync.Mutex
	got      []pipeline.Reading
	calls    int
	pushBack int           // return ErrBackpressure for this many calls
	failWait int           // the Wait of this call (1-based) fails with ErrBackpressure, as a failed journal write
	hold     chan struct{} // when set, Wait waits for it to be closed
}

func (r *recorder) Begin(ctx context.Context, rs []pipeline.Reading) (Waiter, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	if r.pushBack > 0 {
		r.pushBack--
		return nil, fmt.Errorf("%w: test", pipeline.ErrBackpressure)
	}
	return recorded{r: r, rs: rs, hold: r.hold, fail: r.calls == r.failWait}, nil
}

// recorded is one submission to a recorder: Wait records it (after the hold).
type recorded struct {
	r    *recorder
	rs   []pipeline.Reading
	hold chan struct{}
	fail bool
}

func (w recorded) Wait(ctx context.Context) error {
	if w.hold != nil {
		select {
		case <-w.hold:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if w.fail {
		return fmt.Errorf("%w: journal write failed (test)", pipeline.ErrBackpressure)
	}
	w.r.mu.Lock()
	defer w.r.mu.Unlock()
	w.r.got = append(w.r.got, w.rs...)
	return nil
}

func (r *recorder) readings() []pipeline.Reading {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]pipeline.Reading(nil), r.got...)
}

var now = time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)

func testRegistry(t testing.TB) *devices.Registry {
	t.Helper()
	r, err := devices.NewRegistry([]devices.Device{
		{ID: "pipe-0001", Kind: devices.KindPipe, District: "gulou", Interval: 10 * time.Second, Secret: "secret-pipe-0001"},
		{ID: "pipe-0002", Kind: devices.KindPipe, District: "xuanwu", Interval: 10 * time.Second, Secret: "secret-pipe-0002"},
		{ID: "tl-0001", Kind: devices.KindTrafficLight, District: "gulou", Interval: 5 * time.Second, Secret: "secret-tl-0001"},
	}, "")
	require.NoError(t, err)
	return r
}

func TestHandlerValidatesEveryReadingAndCountsRejects(t *testing.T) {
	tests := []struct {
		name     string
		device   string
		payload  string
		accepted int
		reason   string
	}{
		{"a valid reading is accepted", "pipe-0001", `[{"n":"pressure","v":400}]`, 1, ""},
		{"an unknown metric is rejected", "pipe-0001", `[{"n":"voltage","v":230}]`, 0, ReasonUnknownMetric},
		{"an out-of-range value is rejected", "pipe-0001", `[{"n":"pressure","v":-5}]`, 0, ReasonOutOfRange},
		{"a state name maps to its index", "tl-0001", `[{"n":"state","vs":"amber"}]`, 1, ""},
		{"an unknown state is rejected", "tl-0001", `[{"n":"state","vs":"purple"}]`, 0, ReasonBadState},
		{"a reading from the far past is rejected", "pipe-0001", `[{"n":"pressure","v":1,"t":1000000000}]`, 0, ReasonTooOld},
		{"a reading from the future is rejected", "pipe-0001", `[{"n":"pressure","v":1,"t":3600}]`, 0, ReasonTooNew},
		{"a foreign name is rejected", "pipe-0001", `[{"n":"pipe-0002/pressure","v":1}]`, 0, payload.ReasonForeignDevice},
		{"the valid rest of a message is kept", "pipe-0001", `[{"n":"pressure","v":1},{"n":"bogus","v":1},{"n":"flow","v":2}]`, 2, ReasonUnknownMetric},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			rec := &recorder{}
			h := NewHandler(rec, HandlerOptions{Registerer: reg, Now: func() time.Time { return now }})
			dev, _ := testRegistry(t).Get(tc.device)
			res, err := h.Handle(context.Background(), dev, payload.SenMLJSON, []byte(tc.payload))
			require.NoError(t, err)
			require.Equal(t, tc.accepted, res.Accepted)
			require.Len(t, rec.readings(), tc.accepted)
			if tc.reason != "" {
				require.Equal(t, float64(1), testutil.ToFloat64(h.m.rejected.WithLabelValues(tc.reason)))
			}
			for _, r := range rec.readings() {
				require.Equal(t, dev.District, r.District)
				require.Equal(t, string(dev.Kind), r.Kind)
			}
		})
	}
}

func TestHandlerRejectsNonFiniteCBORValues(t *testing.T) {
	rec := &recorder{}
	h := NewHandler(rec, HandlerOptions{Now: func() time.Time { return now }})
	dev, _ := testRegistry(t).Get("pipe-0001")
	// [{0: "pressure", 2: NaN}] in CBOR: a float64 NaN.
	msg := []byte{0x81, 0xa2, 0x00, 0x68, 'p', 'r', 'e', 's', 's', 'u', 'r', 'e', 0x02, 0xfb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0}
	res, err := h.Handle(context.Background(), dev, payload.SenMLCBOR, msg)
	require.NoError(t, err)
	require.Zero(t, res.Accepted)
	require.Equal(t, float64(1), testutil.ToFloat64(h.m.rejected.WithLabelValues(ReasonNotFinite)))
}

func TestHandlerReportsAnUnusableMessage(t *testing.T) {
	h := NewHandler(&recorder{}, HandlerOptions{})
	dev, _ := testRegistry(t).Get("pipe-0001")
	_, err := h.Handle(context.Background(), dev, payload.Unknown, []byte("not a payload"))
	var pe *payload.Error
	require.ErrorAs(t, err, &pe)
	require.Equal(t, float64(1), testutil.ToFloat64(h.m.rejected.WithLabelValues(payload.ReasonMalformed)))
}

package backoff

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/require"
)

func TestNextDoublesWithJitterUpToMax(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	for i, step := range []time.Duration{100, 200, 400, 800, 1000, 1000} {
		step *= time.Millisecond
		d := b.Next()
		require.GreaterOrEqual(t, d, step/2, "attempt %d", i)
		require.LessOrEqual(t, d, step, "attempt %d", i)
	}
	b.Reset()
	require.LessOrEqual(t, b.Next(), 100*time.Millisecond, "a reset starts from Min")
}

func TestSleep(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		require.True(t, Sleep(context.Background(), time.Minute))
		require.Equal(t, time.Minute, time.Since(start))

		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		start = time.Now()
		require.False(t, Sleep(ctx, time.Hour), "a done context ends the sleep")
		require.Equal(t, time.Second, time.Since(start))
	})
}

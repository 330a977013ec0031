package storage

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

// Float seconds in query and export parameters are exact to the millisecond
// (the float's nearest value to .271 is just below it).
func TestParseTimeKeepsMilliseconds(t *testing.T) {
	for _, c := range []struct {
		in   string
		want time.Time
	}{
		{"1796194324.271", time.Unix(1796194324, 271_000_000)},
		{"1796194324.274", time.Unix(1796194324, 274_000_000)},
		{"1796194324.277", time.Unix(1796194324, 277_000_000)},
		{"1796194324.280", time.Unix(1796194324, 280_000_000)},
		{"1796194324", time.Unix(1796194324, 0)},
		{"2026-12-01T08:00:00.271Z", time.Date(2026, 12, 1, 8, 0, 0, 271_000_000, time.UTC)},
	} {
		got, err := parseTime(c.in)
		require.NoError(t, err, c.in)
		require.True(t, c.want.Equal(got), "%s: got %s", c.in, got.Format(time.RFC3339Nano))
	}
}

// City series of one junction or corridor carry it, so two junctions of a
// district, or two corridors, are two series.
func TestCitySeriesOfOneThingCarryIt(t *testing.T) {
	for _, c := range []struct {
		r    pipeline.Reading
		want string
	}{
		{pipeline.Reading{Kind: "city", Device: "city", District: "gulou", Metric: "pipe_pressure_min"}, `{__name__="city_pipe_pressure_min", district="gulou"}`},
		{pipeline.Reading{Kind: "city", Device: "tl-0001", District: "gulou", Metric: "signal_cycle_seconds"}, `{__name__="city_signal_cycle_seconds", device="tl-0001", district="gulou"}`},
		{pipeline.Reading{Kind: "city", Device: "zhongshan-road", District: "city", Metric: "corridor_offset_error_seconds"}, `{__name__="city_corridor_offset_error_seconds", corridor="zhongshan-road"}`},
	} {
		require.Equal(t, c.want, seriesLabels(&c.r).String())
	}
}

package pipeline

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRunsSplitWhereDeviceKindOrDistrictChanges(t *testing.T) {
	rs := []Reading{
		{Device: "a", Kind: "pipe", District: "x", Metric: "1"},
		{Device: "a", Kind: "pipe", District: "x", Metric: "2"},
		{Device: "a", Kind: "pipe", District: "y", Metric: "3"},
		{Device: "b", Kind: "pipe", District: "y", Metric: "4"},
		{Device: "b", Kind: "city", District: "y", Metric: "5"},
		{Device: "a", Kind: "pipe", District: "x", Metric: "6"},
	}
	var got [][]string
	for run := range Runs(rs) {
		var ms []string
		for _, r := range run {
			ms = append(ms, r.Metric)
		}
		got = append(got, ms)
	}
	require.Equal(t, [][]string{{"1", "2"}, {"3"}, {"4"}, {"5"}, {"6"}}, got)
	for range Runs(nil) {
		t.Fatal("no runs in nothing")
	}
}

package rules

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/devices"
)

const pipesOut = "{name: pipes_out, type: fleet, select: {kind: pipe}, silent_ratio: 0.5, factor: 2}"

// fleetOf is n pipes of gulou (interval 10 s), pipe-0 … pipe-<n-1>.
func fleetOf(n int) fixedDevices {
	var list fixedDevices
	for i := range n {
		list = append(list, devices.Device{ID: "pipe-" + string(rune('0'+i)), Kind: "pipe", District: "gulou", Interval: 10 * time.Second})
	}
	return list
}

// On one machine the tick counts every device and judges; in cluster mode
// (an ownership predicate) the tick judges no fleet rule: a node knows the
// silence of its own devices only, and JudgeFleet on every node's counts
// decides.
func TestFleetTickJudgesOnOneMachineOnly(t *testing.T) {
	for _, tc := range []struct {
		name string
		owns func(string) bool
		want []string
	}{
		{"one machine: 3 of 4 silent fires", nil, []string{"pipes_out:firing"}},
		{"cluster, every owner owned: the tick leaves it to JudgeFleet", func(string) bool { return true }, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			e := NewEngine(Default(), []*Rule{mustRule(t, pipesOut)}, EngineOptions{Shards: 2, Notifier: rec, Devices: fleetOf(4)})
			e.SetOwns(tc.owns)
			e.started = t0
			e.Observe(e.shardOf("pipe-0"), pressure("pipe-0", 400, 55*time.Second))
			e.Tick(t0.Add(time.Minute))
			require.Equal(t, tc.want, rec.kinds())
		})
	}
}

// FleetCounts counts the owned devices only, per partition, each silent when
// it has not reported for factor × its interval.
func TestFleetCountsPerPartitionOfOwnedDevices(t *testing.T) {
	list := fleetOf(4)
	part := func(d string) int { return int(d[len(d)-1]-'0') % 2 } // pipe-0, pipe-2 → 0
	for _, tc := range []struct {
		name string
		owns func(string) bool
		want map[int]FleetCounts
	}{
		{"every device owned", nil, map[int]FleetCounts{
			0: {"pipes_out": {"gulou": {Devices: 2, Silent: 1}}},
			1: {"pipes_out": {"gulou": {Devices: 2, Silent: 1}}},
		}},
		{"partition 0 owned", func(o string) bool { return part(o) == 0 }, map[int]FleetCounts{
			0: {"pipes_out": {"gulou": {Devices: 2, Silent: 1}}},
		}},
		{"nothing owned", func(string) bool { return false }, map[int]FleetCounts{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := NewEngine(Default(), []*Rule{mustRule(t, pipesOut)}, EngineOptions{Shards: 2, Devices: list})
			e.SetOwns(tc.owns)
			e.started = t0
			// pipe-0 and pipe-1 report 5 s before; pipe-2 and pipe-3 never (60 s > 2 × 10 s)
			e.Observe(e.shardOf("pipe-0"), pressure("pipe-0", 400, 55*time.Second))
			e.Observe(e.shardOf("pipe-1"), pressure("pipe-1", 400, 55*time.Second))
			require.Equal(t, tc.want, e.FleetCounts(t0.Add(time.Minute), part))
		})
	}
}

func TestCombineFleet(t *testing.T) {
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	c := func(n, s int) FleetCounts { return FleetCounts{"pipes_out": {"gulou": {Devices: n, Silent: s}}} }
	for _, tc := range []struct {
		name  string
		parts []FleetPartial
		want  FleetCounts
		n     int // partitions counted
	}{
		{"nothing", nil, FleetCounts{}, 0},
		{"two nodes' partitions add up", []FleetPartial{
			{At: at(1), Parts: map[int]FleetCounts{0: c(3, 0), 1: c(2, 2)}},
			{At: at(1), Parts: map[int]FleetCounts{2: c(3, 3)}},
		}, c(8, 5), 3},
		{"a partition in hand-over counts once, from the later report", []FleetPartial{
			{At: at(1), Parts: map[int]FleetCounts{0: c(3, 0), 1: c(2, 0)}},
			{At: at(2), Parts: map[int]FleetCounts{1: c(2, 2), 2: c(3, 3)}},
		}, c(8, 5), 3},
		{"an owned partition without selected devices is counted", []FleetPartial{
			{At: at(1), Parts: map[int]FleetCounts{0: c(3, 1), 1: {}}},
		}, c(3, 1), 2},
		{"rules and districts stay apart", []FleetPartial{
			{At: at(1), Parts: map[int]FleetCounts{0: {"pipes_out": {"gulou": {Devices: 1}, "xuanwu": {Devices: 2, Silent: 1}}}}},
			{At: at(1), Parts: map[int]FleetCounts{1: {"lights_out": {"gulou": {Devices: 4, Silent: 4}}}}},
		}, FleetCounts{"pipes_out": {"gulou": {Devices: 1}, "xuanwu": {Devices: 2, Silent: 1}}, "lights_out": {"gulou": {Devices: 4, Silent: 4}}}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, counted := CombineFleet(tc.parts)
			require.Equal(t, tc.want, got)
			require.Len(t, counted, tc.n)
		})
	}
}

// JudgeFleet fires and resolves a district's alert once on the combined
// counts, and only on the engine that owns the fleet alerts.
func TestJudgeFleet(t *testing.T) {
	c := func(n, s int) FleetCounts { return FleetCounts{"pipes_out": {"gulou": {Devices: n, Silent: s}}} }
	for _, tc := range []struct {
		name   string
		owns   func(string) bool
		counts []FleetCounts
		want   []string
	}{
		{"above the ratio fires once, below resolves once", func(o string) bool { return o == FleetOwner },
			[]FleetCounts{c(8, 5), c(8, 6), c(8, 1), c(8, 0)}, []string{"pipes_out:firing", "pipes_out:resolved"}},
		{"at the ratio does not fire", func(o string) bool { return o == FleetOwner },
			[]FleetCounts{c(8, 4)}, nil},
		{"a rule without counts is left as it is", func(o string) bool { return o == FleetOwner },
			[]FleetCounts{c(8, 5), {}, {"pipes_out": {}}}, []string{"pipes_out:firing"}},
		{"a node without the fleet alerts judges nothing", func(o string) bool { return o != FleetOwner },
			[]FleetCounts{c(8, 8)}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			e := NewEngine(Default(), []*Rule{mustRule(t, pipesOut)}, EngineOptions{Shards: 2, Notifier: rec})
			e.SetOwns(tc.owns)
			for i, counts := range tc.counts {
				e.JudgeFleet(counts, t0.Add(time.Duration(i)*time.Second))
			}
			require.Equal(t, tc.want, rec.kinds())
		})
	}
}

// The fleet alerts belong to FleetOwner: they move with the election, not
// with the partition of their district.
func TestFleetAlertsAreFleetOwners(t *testing.T) {
	rec := &recorder{}
	a := NewEngine(Default(), []*Rule{mustRule(t, pipesOut)}, EngineOptions{Shards: 2, Notifier: rec})
	a.SetOwns(func(o string) bool { return o == FleetOwner })
	a.JudgeFleet(FleetCounts{"pipes_out": {"gulou": {Devices: 2, Silent: 2}}}, t0)
	require.Equal(t, []string{"pipes_out:firing"}, rec.kinds())

	snap, err := a.ExportState(func(o string) bool { return o == "gulou" })
	require.NoError(t, err)
	b := NewEngine(Default(), []*Rule{mustRule(t, pipesOut)}, EngineOptions{Shards: 2, Notifier: rec})
	n, err := b.ImportState(snap, nil)
	require.NoError(t, err)
	require.Zero(t, n, "the district's partition holds no fleet alert")

	snap, err = a.ExportState(func(o string) bool { return o == FleetOwner })
	require.NoError(t, err)
	n, err = b.ImportState(snap, nil)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	b.SetOwns(func(o string) bool { return o == FleetOwner })
	b.JudgeFleet(FleetCounts{"pipes_out": {"gulou": {Devices: 2, Silent: 2}}}, t0.Add(time.Second))
	b.JudgeFleet(FleetCounts{"pipes_out": {"gulou": {Devices: 2}}}, t0.Add(2*time.Second))
	require.Equal(t, []string{"pipes_out:firing", "pipes_out:resolved"}, rec.kinds(), "restored: no second firing")
	require.Equal(t, 1, a.DropState(func(o string) bool { return o == FleetOwner }))
}

// A partition no node reports has had no reading since it was last
// reported: its devices count as silent once that is longer ago than the
// rule's window (or their last reading known here, or the engine's start).
func TestFleetCountsSince(t *testing.T) {
	list := fleetOf(2)
	for _, tc := range []struct {
		name  string
		since time.Duration // after t0, the engine's start
		seen  time.Duration // pipe-0's last reading known here (0: none)
		added time.Duration // the tick that first listed the devices (0: the first tick)
		want  FleetCount
	}{
		{"reported 30 s ago: silent past 2 × 10 s", 30 * time.Second, 0, 0, FleetCount{Devices: 2, Silent: 2}},
		{"reported 10 s ago: not yet", 50 * time.Second, 0, 0, FleetCount{Devices: 2}},
		{"never reported: since the start, a minute", 0, 0, 0, FleetCount{Devices: 2, Silent: 2}},
		{"a later reading known here counts", 0, 55 * time.Second, 0, FleetCount{Devices: 2, Silent: 1}},
		{"added at run time 50 s in: not yet", 0, 0, 50 * time.Second, FleetCount{Devices: 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var listed fixedDevices
			e := NewEngine(Default(), []*Rule{mustRule(t, pipesOut)}, EngineOptions{Shards: 2, Devices: &listed})
			e.SetOwns(func(string) bool { return false })
			e.started = t0
			if tc.added > 0 {
				e.Tick(t0)
			}
			listed = list
			e.Tick(t0.Add(tc.added))
			if tc.seen > 0 {
				e.Observe(e.shardOf("pipe-0"), pressure("pipe-0", 400, tc.seen))
			}
			since := time.Time{}
			if tc.since > 0 {
				since = t0.Add(tc.since)
			}
			got := e.FleetCountsSince(t0.Add(time.Minute), func(string) bool { return true }, since)
			require.Equal(t, FleetCounts{"pipes_out": {"gulou": tc.want}}, got)
		})
	}
}

// A node's counts are bounded by the partitions it owns × districts × fleet
// rules, whatever the number of devices: a third of 64 partitions, 200
// districts and 3 fleet rules stay far below NATS's 1 MB max_payload.
func TestFleetPartialSize(t *testing.T) {
	p := FleetPartial{At: t0, Parts: map[int]FleetCounts{}}
	for q := range 22 {
		c := FleetCounts{}
		for r := range 3 {
			for d := range 200 {
				c.add(fmt.Sprintf("fleet_rule_%d", r), fmt.Sprintf("district-%03d", d), FleetCount{Devices: 1000 + d, Silent: d})
			}
		}
		p.Parts[q] = c
	}
	b, err := json.Marshal(p)
	require.NoError(t, err)
	t.Logf("22 partitions × 200 districts × 3 fleet rules: %d bytes", len(b))
	require.Less(t, len(b), 1<<20)
}

// A district provisioned while the server runs gets the same grace as one
// present at the start: its devices are silent only factor × their interval
// after the first tick that listed them, not since the engine started (the
// load test saw a false district_power_outage for every district of a fleet
// added to a server that had run for a minute). A device that never reports
// is still caught, and a device present at the first tick counts from the
// start.
func TestADeviceAddedAtRunTimeGetsItsGrace(t *testing.T) {
	const pipeSilent = "{name: pipe_silent, type: deadman, select: {kind: pipe}, factor: 2}"
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	for _, tc := range []struct {
		name  string
		rule  string
		ticks []int // seconds after the start; the fleet is added before the second
		want  []string
	}{
		{"fleet: within the grace", pipesOut, []int{60, 61, 80}, nil},
		{"fleet: past the grace", pipesOut, []int{60, 61, 82}, []string{"pipes_out:firing"}},
		{"deadman: within the grace", pipeSilent, []int{60, 61, 80}, nil},
		{"deadman: past the grace", pipeSilent, []int{60, 61, 82},
			[]string{"pipe_silent:firing", "pipe_silent:firing", "pipe_silent:firing", "pipe_silent:firing"}},
		{"present at the first tick: from the start", pipesOut, []int{0, 21}, []string{"pipes_out:firing"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var list fixedDevices
			if tc.ticks[0] == 0 {
				list = fleetOf(4)
			}
			rec := &recorder{}
			e := NewEngine(Default(), []*Rule{mustRule(t, tc.rule)}, EngineOptions{Shards: 2, Notifier: rec, Devices: &list})
			e.started = t0
			for i, s := range tc.ticks {
				if i == 1 {
					list = fleetOf(4)
				}
				e.Tick(at(s))
			}
			require.Equal(t, tc.want, rec.kinds())
		})
	}
}

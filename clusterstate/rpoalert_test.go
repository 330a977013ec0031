package clusterstate

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/notifier"
)

// The RPO alert fires once a mirror has been over the budget for the
// hold-off, once however long it stays over, resolves once when caught up,
// and never fires for a blip shorter than the hold-off or at an active site.
func TestRPOAlertFiresAfterTheHoldOffAndResolvesOnce(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 14, 0, 0, 0, time.UTC)
	within := cluster.StandbyStatus{Site: "standby", Role: cluster.RoleStandby, WithinRPO: true, RPOBudgetSeconds: 5}
	over := within
	over.WithinRPO = false
	activeOver := over
	activeOver.Role = cluster.RoleActive
	lag := errors.New("stream CITYPULSE_READINGS is 7.0 s behind the active site")
	type step struct {
		at   time.Duration
		st   cluster.StandbyStatus
		want string // "" none, else the kind sent
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{"over for longer than the hold-off: one firing, one resolution", []step{
			{0, within, ""}, {1 * time.Second, over, ""}, {2 * time.Second, over, ""}, {3 * time.Second, over, notifier.KindFiring},
			{4 * time.Second, over, ""}, {60 * time.Second, over, ""}, {61 * time.Second, within, notifier.KindResolved},
			{62 * time.Second, within, ""}}},
		{"a blip shorter than the hold-off is not notified", []step{
			{0, over, ""}, {1 * time.Second, over, ""}, {2 * time.Second, within, ""}, {3 * time.Second, over, ""},
			{4 * time.Second, over, ""}, {5 * time.Second, within, ""}}},
		{"an active site mirrors nothing and never raises it", []step{
			{0, activeOver, ""}, {10 * time.Second, activeOver, ""}}},
		{"a second episode is a new firing", []step{
			{0, over, ""}, {2 * time.Second, over, notifier.KindFiring}, {3 * time.Second, within, notifier.KindResolved},
			{4 * time.Second, over, ""}, {6 * time.Second, over, notifier.KindFiring}}},
		{"a node without the site's lease raises nothing", []step{
			{0, over, ""}, {3 * time.Second, over, ""}, {60 * time.Second, within, ""}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := &RPOAlert{HoldOff: 2 * time.Second}
			if strings.Contains(c.name, "without the site's lease") {
				a.Leader = func() bool { return false }
			}
			var fired notifier.Event
			for _, s := range c.steps {
				ev, ok := a.Step(t0.Add(s.at), s.st, lag)
				if s.want == "" {
					require.False(t, ok, "at %v: sent %s", s.at, ev.Kind)
					continue
				}
				require.True(t, ok, "at %v: nothing sent, want %s", s.at, s.want)
				require.Equal(t, s.want, ev.Kind)
				require.Equal(t, RPOAlertName, ev.Labels["alertname"])
				require.Equal(t, "standby", ev.Labels["site"])
				if ev.Kind == notifier.KindFiring {
					fired = ev
					require.Contains(t, ev.Annotations["description"], "7.0 s behind")
					continue
				}
				require.Equal(t, fired.Fingerprint, ev.Fingerprint)
				require.Equal(t, fired.StartsAt, ev.StartsAt)
				require.NotEqual(t, fired.Key, ev.Key)
			}
		})
	}
}

// Two nodes that see the same episode (the lease moved between them) make
// the same keys for it, so a receiver keeps one page.
func TestRPOAlertKeysAreTheEpisodes(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 14, 0, 0, 0, time.UTC)
	over := cluster.StandbyStatus{Site: "standby", Role: cluster.RoleStandby, RPOBudgetSeconds: 5}
	a, b := &RPOAlert{HoldOff: time.Second}, &RPOAlert{HoldOff: time.Second}
	_, _ = a.Step(t0, over, nil)
	_, _ = b.Step(t0.Add(300*time.Millisecond), over, nil) // its own poll, the same second
	ea, ok := a.Step(t0.Add(2*time.Second), over, nil)
	require.True(t, ok)
	eb, ok := b.Step(t0.Add(2500*time.Millisecond), over, nil)
	require.True(t, ok)
	require.Equal(t, ea.Key, eb.Key)
}

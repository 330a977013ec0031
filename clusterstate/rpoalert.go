package clusterstate

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/rules"
)

// RPOAlertName is the alertname of the operations alert a standby site
// raises while its mirrors are behind the recovery point budget.
const RPOAlertName = "dr_replication_lag_over_budget"

// Notifier takes an alert's notifications (the server's: the alert history,
// the operations stream, and the outbox behind the silences' gate).
type Notifier interface {
	Enqueue(ev notifier.Event)
}

// RPOAlert turns a standby site's replication lag into an operations alert:
// it fires once a mirror has been behind the RPO budget (cluster.standby.
// rpo_budget) for longer than the hold-off, and resolves once every mirror
// is within it again. It is one alert per site, notified through the same
// path as the rules' alerts, so silences and the receivers' idempotency
// keys apply. A site that is active mirrors nothing and never raises it.
// Every node of a standby site sees the same lag: only the holder of a
// site-local lease (Leader) raises it, so the operations centre gets one page
// per site, not one per node; the keys are made from the episode's start, so
// a leader that takes over a firing episode resends the same keys.
type RPOAlert struct {
	HoldOff time.Duration
	// Leader reports whether this node raises the site's alert (nil: it does).
	Leader func() bool

	overSince time.Time // zero while within the budget
	firing    *notifier.Event
}

// Step is one look at the site's status at now: it returns the
// notification to send, if the alert fires or resolves. check is the
// standby's CheckRPO result for the same status (the worst stream, for the
// operators).
func (a *RPOAlert) Step(now time.Time, st cluster.StandbyStatus, check error) (notifier.Event, bool) {
	if a.Leader != nil && !a.Leader() {
		return notifier.Event{}, false
	}
	over := !st.WithinRPO && st.Role == cluster.RoleStandby
	if !over {
		a.overSince = time.Time{}
		if a.firing == nil {
			return notifier.Event{}, false
		}
		ev := *a.firing
		a.firing = nil
		ev.Kind, ev.At, ev.EndsAt = notifier.KindResolved, now, now
		ev.Key = rpoKey(ev.Fingerprint, ev.Kind, ev.ActiveAt)
		return ev, true
	}
	if a.overSince.IsZero() {
		a.overSince = now
	}
	if a.firing != nil || now.Sub(a.overSince) < a.HoldOff {
		return notifier.Event{}, false
	}
	labels := map[string]string{"alertname": RPOAlertName, "severity": "critical", "site": st.Site}
	why := "a mirror is behind the active site"
	if check != nil {
		why = check.Error()
	}
	ev := notifier.Event{Kind: notifier.KindFiring, At: now, Labels: labels, StartsAt: now, ActiveAt: a.overSince,
		Fingerprint: rules.Fingerprint(labels),
		Annotations: map[string]string{
			"summary": fmt.Sprintf("standby site %s is behind its recovery point budget (%.0f s) since %s", st.Site,
				st.RPOBudgetSeconds, a.overSince.UTC().Format(time.RFC3339)),
			"description": why + ". Losing the active site now would lose about that much of what it acknowledged: " +
				"check the link between the sites (docs/disaster-recovery.md).",
		}}
	ev.Key = rpoKey(ev.Fingerprint, ev.Kind, a.overSince)
	a.firing = &ev
	return ev, true
}

// rpoKey is a notification's idempotency key: the alert, the kind and the
// start of the episode (when the lag went over the budget, to the second).
func rpoKey(fp, kind string, since time.Time) string {
	return fp + "-" + kind + "-" + strconv.FormatInt(since.Unix(), 36)
}

// Run looks at the standby every interval until ctx is done and hands each
// firing and resolution to out.
func (a *RPOAlert) Run(ctx context.Context, sb *cluster.Standby, interval time.Duration, out Notifier) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			if ev, ok := a.Step(now, sb.Status(), sb.CheckRPO()); ok {
				out.Enqueue(ev)
			}
		}
	}
}

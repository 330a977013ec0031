package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/clusterstate"
	"github.com/citypulse/citypulse/cmd/internal/servertest"
)

// The operations side of a standby site, through real processes: two sites
// of one NATS server each linked by a cuttable leaf-node link
// (natstest.Sites), one CityPulse node per site with its own VictoriaMetrics
// and a loopback webhook. Run with CITYPULSE_TEST_DR=1 (make test-dr).

// drOpsNode prepares a site's node (not started) with the shipped rules,
// vitals off and the webhook as receiver, a 3 s RPO budget and a 1 s alert
// hold-off.
func drOpsNode(t *testing.T, nats *natstest.Cluster, site, peer, devices, hook string) *servertest.Server {
	rulesFile, _ := filepath.Abs("../../configs/rules.yaml")
	s, _ := drNode(t, drSite{nats: nats, site: site, peer: peer, devices: devices, rules: rulesFile, hook: hook,
		replicas: 1, noVitals: true, rpoBudget: 3 * time.Second, rpoHoldOff: time.Second})
	return s
}

// httpDo sends a request with the admin token and returns the status and body.
func httpDo(t *testing.T, method, url, body string) (int, string) {
	t.Helper()
	return doAs(t, drToken, method, url, body)
}

func silenceBody(alertname, by string) string {
	return `{"matchers":[{"name":"alertname","value":"` + alertname + `","isEqual":true}],"endsAt":"` +
		time.Now().Add(time.Hour).UTC().Format(time.RFC3339) + `","createdBy":"` + by + `","comment":"test"}`
}

// A standby site's node is live (/healthz 200) but not ready (/readyz 503,
// naming the fence) until promoted; a silence made at the primary is in its
// store within seconds; a cut link raises dr_replication_lag_over_budget
// once at a loopback webhook and the restored link resolves it once; the
// dashboard's DR view shows the role, the epoch, the link and each mirror's
// lag against the budget, and follows the cut and the restore without a
// console error.
func TestAStandbySiteIsNotReadyMirrorsSilencesAndAlertsOnReplicationLag(t *testing.T) {
	skipShort(t)
	if os.Getenv("CITYPULSE_TEST_DR") == "" {
		t.Skip("the disaster-recovery tests run with CITYPULSE_TEST_DR=1 (make test-dr)")
	}
	chromiumPath(t)
	sites := natstest.StartSites(t, 1, 1)
	devFile, _ := clusterFleet(t, t.TempDir(), 3)
	{ // the readings stream at the primary, as its installation creates it
		nc, err := nats.Connect(sites.Primary.URL())
		require.NoError(t, err)
		cfg := cluster.Default()
		cfg.Replicas, cfg.Partitions = 1, 8
		l, err := cluster.NewLog(nc, cfg, nil)
		require.NoError(t, err)
		_, err = l.EnsureStream(ctxT(t, 30*time.Second))
		require.NoError(t, err)
		nc.Close()
	}
	hook := newAlertReceiver(t, clusterstate.RPOAlertName)
	primary := drOpsNode(t, sites.Primary, natstest.PrimaryDomain, natstest.StandbyDomain, devFile, hook.srv.URL)
	primary.Start()
	code, body := httpDo(t, "GET", "http://"+primary.HTTP+"/readyz", "")
	require.Equal(t, http.StatusServiceUnavailable, code, "a site not yet activated is not ready: %s", body)
	out, _, err := drCommand(t, primary, "activate")
	require.NoError(t, err, out)
	eventually(t, 30*time.Second, func() error {
		if code, body := httpDo(t, "GET", "http://"+primary.HTTP+"/readyz", ""); code != http.StatusOK {
			return fmt.Errorf("primary /readyz %d %s", code, body)
		}
		return nil
	})

	standby := drOpsNode(t, sites.Standby, natstest.StandbyDomain, natstest.PrimaryDomain, devFile, hook.srv.URL)
	standby.Start()
	eventually(t, 60*time.Second, func() error {
		st, _ := drStatus(t, standby)
		if st.Role != cluster.RoleStandby || st.ActiveSite != natstest.PrimaryDomain || !st.WithinRPO {
			return fmt.Errorf("standby: %+v", st)
		}
		return nil
	})
	code, body = httpDo(t, "GET", "http://"+standby.HTTP+"/readyz", "")
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Contains(t, body, "standby: this site is fenced, epoch 1")
	code, _ = httpDo(t, "GET", "http://"+standby.HTTP+"/healthz", "")
	require.Equal(t, http.StatusOK, code, "a standby is live")

	// A silence made at the primary reaches the standby; the standby's copy
	// takes no changes.
	silenced, took := silenceSeen(t, drToken, "gas_leak", primary.HTTP, standby.HTTP)
	t.Logf("a silence made at the primary was listed at the standby after %v", took.Round(time.Millisecond))
	code, body = httpDo(t, "POST", "http://"+standby.HTTP+"/api/v1/silences", silenceBody("gas_leak", "ops-bo"))
	require.Equal(t, http.StatusServiceUnavailable, code, body)
	require.Contains(t, body, "read-only")

	// The DR view in a real browser.
	browser := newBrowser(t)
	tb := openTab(t, browser, "http://"+standby.HTTP)
	tb.open(t, "/#token="+drToken)
	tb.click(t, `a[href="#/dr"]`)
	fact := func(st pageState, name string) string { return st.Facts[name] }
	mirrorRows := func(st pageState) [][]string {
		for _, tbl := range st.Tables {
			if strings.HasPrefix(tbl.Caption, "Mirrors of the active site's streams") {
				return tbl.Rows
			}
		}
		return nil
	}
	readings := func(st pageState) []string {
		for _, r := range mirrorRows(st) {
			if len(r) == 6 && r[0] == cluster.Default().Stream {
				return r
			}
		}
		return nil
	}
	st := tb.waitFor(t, "the DR view of a healthy standby", 30*time.Second, func(st pageState) error {
		switch {
		case !strings.HasPrefix(fact(st, "role"), "standby"):
			return fmt.Errorf("role %q", fact(st, "role"))
		case fact(st, "fence epoch") != "1" || fact(st, "active site") != natstest.PrimaryDomain:
			return fmt.Errorf("epoch %q, active %q", fact(st, "fence epoch"), fact(st, "active site"))
		case fact(st, "link to the other site") != "up" || !strings.HasPrefix(fact(st, "recovery point"), "within"):
			return fmt.Errorf("link %q, rpo %q", fact(st, "link to the other site"), fact(st, "recovery point"))
		case len(mirrorRows(st)) != 5 || readings(st) == nil:
			return fmt.Errorf("mirrors %v", mirrorRows(st))
		}
		return nil
	})
	t.Logf("healthy: %v", readings(st))

	// The link cut: one firing, the view turns red.
	sites.Link.Cut()
	cut := time.Now()
	st = tb.waitFor(t, "the DR view of a cut link", 60*time.Second, func(st pageState) error {
		r := readings(st)
		switch {
		case fact(st, "link to the other site") != "down" || !strings.HasPrefix(fact(st, "recovery point"), "OVER"):
			return fmt.Errorf("link %q, rpo %q", fact(st, "link to the other site"), fact(st, "recovery point"))
		case r == nil || r[5] != "down":
			return fmt.Errorf("readings mirror %v", r)
		}
		return nil
	})
	t.Logf("cut (page after %v): %v", time.Since(cut).Round(time.Millisecond), readings(st))
	tb.screenshot(t, t.ArtifactDir(), "dashboard-dr")
	ectx, cancel := context.WithTimeout(tb.ctx, 10*time.Second)
	over, err := chromedp.Run(ectx, chromedp.Evaluate[int](`document.querySelectorAll("tr.mirror.over td.behind.bad").length`))
	cancel()
	require.NoError(t, err)
	require.Positive(t, over, "the mirrors over the budget are highlighted")
	eventually(t, 60*time.Second, func() error {
		if n := hook.transitions("firing"); n != 1 {
			return fmt.Errorf("%d firing notifications", n)
		}
		return nil
	})
	t.Logf("dr_replication_lag_over_budget fired at the webhook %v after the cut (budget 3 s, hold-off 1 s)", time.Since(cut).Round(time.Millisecond))

	// Restored: caught up, resolved once, the view green again.
	sites.Link.Restore()
	restored := time.Now()
	eventually(t, 60*time.Second, func() error {
		if n := hook.transitions("resolved"); n != 1 {
			return fmt.Errorf("%d resolved notifications", n)
		}
		return nil
	})
	t.Logf("resolved at the webhook %v after the restore", time.Since(restored).Round(time.Millisecond))
	tb.waitFor(t, "the DR view of a restored link", 60*time.Second, func(st pageState) error {
		if fact(st, "link to the other site") != "up" || !strings.HasPrefix(fact(st, "recovery point"), "within") {
			return fmt.Errorf("link %q, rpo %q", fact(st, "link to the other site"), fact(st, "recovery point"))
		}
		if r := readings(st); r == nil || r[1] != "0" || r[5] != "up" {
			return fmt.Errorf("readings mirror %v", r)
		}
		return nil
	})
	time.Sleep(3 * time.Second) // a second firing or resolution would arrive by now
	require.Equal(t, 1, hook.transitions("firing"), "exactly one firing")
	require.Equal(t, 1, hook.transitions("resolved"), "exactly one resolution")

	// Promoted (planned: the primary is fenced), the standby is ready and
	// takes silences; the old primary is fenced and not ready.
	out, _, err = drCommand(t, standby, "promote")
	require.NoError(t, err, out)
	eventually(t, 30*time.Second, func() error {
		if code, body := httpDo(t, "GET", "http://"+standby.HTTP+"/readyz", ""); code != http.StatusOK {
			return fmt.Errorf("promoted standby /readyz %d %s", code, body)
		}
		if code, body := httpDo(t, "GET", "http://"+primary.HTTP+"/readyz", ""); code != http.StatusServiceUnavailable ||
			!strings.Contains(body, "standby: this site is fenced, epoch 2") {
			return fmt.Errorf("fenced primary /readyz %d %s", code, body)
		}
		return nil
	})
	tb.waitFor(t, "the DR view of the promoted site", 30*time.Second, func(st pageState) error {
		if !strings.HasPrefix(fact(st, "role"), "active") || fact(st, "fence epoch") != "2" {
			return fmt.Errorf("role %q, epoch %q", fact(st, "role"), fact(st, "fence epoch"))
		}
		return nil
	})
	eventually(t, 30*time.Second, func() error {
		if code, body := httpDo(t, "POST", "http://"+standby.HTTP+"/api/v1/silences", silenceBody("gas_leak", "ops-bo")); code != http.StatusOK {
			return fmt.Errorf("silence at the promoted site: %d %s", code, body)
		}
		return nil
	})
	_, body = httpDo(t, "GET", "http://"+standby.HTTP+"/api/v1/silences", "")
	require.Contains(t, body, silenced, "the primary's silence is still there after the promotion")
	require.Empty(t, tb.consoleErrors(nil), "the page's console")
}

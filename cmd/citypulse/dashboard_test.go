package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/require"
)

// The dashboard tests drive Debian's Chromium through the DevTools protocol
// (chromedp) against the real binary: what they read is what an operator
// sees, after the page's own scripts ran, in one page that is never reloaded.

// chromiumPath finds Debian's Chromium (make deps installs it); the tests skip
// without it, saying how to get it.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"/usr/bin/chromium", "chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("chromium not found: the dashboard tests need Debian's chromium (make deps installs it)")
	return ""
}

// newBrowser starts a headless Chromium that lives until the test ends and
// returns its context; each tab is a child of it (openTab).
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1400, 1000),
	}
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(alloc)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	// The first Do starts the browser; it must have no timeout of its own
	// (that would end the browser), so a watchdog bounds it instead.
	watchdog := time.AfterFunc(time.Minute, cancel)
	require.NoError(t, chromedp.Do(ctx), "start chromium")
	watchdog.Stop()
	return ctx
}

// tab is one browser tab (in a browser context of its own: its own
// sessionStorage) and everything its console said.
type tab struct {
	ctx  context.Context
	base string // http://host:port

	mu        sync.Mutex
	console   []chromedp.ConsoleMessage
	listenErr error // why the console stopped being read early
}

func openTab(t *testing.T, browser context.Context, base string) *tab {
	t.Helper()
	ctx, cancel := chromedp.NewContext(browser, chromedp.WithNewBrowserContext())
	require.NoError(t, chromedp.Do(ctx), "open a tab")
	tb := &tab{ctx: ctx, base: base}
	messages := chromedp.Console(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m, err := range messages {
			if err != nil {
				if ctx.Err() == nil { // not the tab closing: the test stopped listening
					tb.mu.Lock()
					tb.listenErr = err
					tb.mu.Unlock()
				}
				return
			}
			tb.mu.Lock()
			tb.console = append(tb.console, m)
			tb.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return tb
}

// do runs steps with a bound, so a page that never answers fails the test
// instead of hanging it.
func (tb *tab) do(t *testing.T, d time.Duration, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, d)
	defer cancel()
	require.NoError(t, chromedp.Do(ctx, steps...))
}

// open loads path (relative to the server) in the tab.
func (tb *tab) open(t *testing.T, path string) {
	t.Helper()
	tb.do(t, 30*time.Second, chromedp.Navigate(tb.base+path))
}

// click clicks the first element matching the CSS selector, as a user would.
// The page re-renders its view when live data arrives, so the node found may
// be replaced before the click lands: then it is looked up again.
func (tb *tab) click(t *testing.T, css string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(tb.ctx, time.Until(deadline))
		err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS(css), chromedp.NodeVisible))
		cancel()
		if err == nil || !strings.Contains(err.Error(), "Could not find node") || time.Now().After(deadline) {
			require.NoError(t, err, "click %s", css)
			return
		}
	}
}

// pageState is what the page shows, read from its DOM by stateJS.
type pageState struct {
	Status string `json:"status"`
	Live   string `json:"live"` // the indicator's class
	Mode   string `json:"mode"` // and its mode
	Href   string `json:"href"`
	Hash   string `json:"hash"`
	Main   string `json:"main"`   // the text of the view
	Marker string `json:"marker"` // set by the test; a reload would lose it
	Cards  []struct {
		Name   string            `json:"name"`
		Vitals map[string]string `json:"vitals"`
	} `json:"cards"`
	Alerts []struct {
		Name     string   `json:"name"`
		Severity string   `json:"severity"`
		Links    []string `json:"links"`
		Summary  string   `json:"summary"`
		Folded   bool     `json:"folded"`
	} `json:"alerts"`
	Tables []struct {
		Caption string     `json:"caption"`
		Rows    [][]string `json:"rows"`
	} `json:"tables"`
	Charts []struct {
		Title  string `json:"title"`
		Points int    `json:"points"`
		Canvas bool   `json:"canvas"`
	} `json:"charts"`
	Facts      map[string]string `json:"facts"`      // the dl.facts of a device or an alert
	Unlabelled []string          `json:"unlabelled"` // form controls without an accessible name
}

const stateJS = `(() => {
  const text = e => e ? e.textContent.trim() : "";
  const all = (root, css) => [...root.querySelectorAll(css)];
  const main = document.getElementById("view");
  return {
    status: text(document.getElementById("status")),
    live: document.getElementById("live").className,
    mode: text(document.getElementById("live-mode")),
    href: location.href, hash: location.hash,
    main: main.innerText,
    marker: String(window.citypulseTestMarker || ""),
    cards: all(main, "article.district").map(a => ({ name: text(a.querySelector("h3 a")),
      vitals: Object.fromEntries(all(a, "dl .vital").map(v => [text(v.querySelector("dt")), text(v.querySelector("dd"))])) })),
    alerts: all(main, "ul.alerts > li.alert").map(li => ({ name: text(li.querySelector(".name")),
      severity: text(li.querySelector(".badge")), links: all(li, "a:not(.name)").map(text),
      summary: text(li.querySelector(".summary")), folded: !!li.closest("details.more") })),
    tables: all(main, "table").map(t => ({ caption: text(t.caption),
      rows: [...t.tBodies[0].rows].map(r => [...r.cells].map(text)) })),
    charts: all(main, "figure.chart").map(f => ({ title: text(f.querySelector("figcaption")),
      points: Number(f.dataset.points || 0), canvas: !!f.querySelector("canvas") })),
    facts: Object.fromEntries(all(main, "dl.facts dt").map(dt => [text(dt), text(dt.nextElementSibling)])),
    unlabelled: all(document, "input, select, textarea, button").filter(e =>
      !(e.labels && e.labels.length) && !e.getAttribute("aria-label") && !e.textContent.trim()).map(e => e.outerHTML),
  };
})()`

func (tb *tab) state() (pageState, error) {
	ctx, cancel := context.WithTimeout(tb.ctx, 10*time.Second)
	defer cancel()
	return chromedp.Run(ctx, chromedp.Evaluate[pageState](stateJS))
}

// waitFor reads the page until cond accepts it (returns nil) or d passes.
// It polls from Go: the CSP forbids the eval that chromedp.Poll needs.
func (tb *tab) waitFor(t *testing.T, what string, d time.Duration, cond func(pageState) error) pageState {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, err := tb.state()
		if err == nil {
			if err = cond(st); err == nil {
				return st
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v\nstatus %q, live %q, hash %q, view:\n%s", what, d, err, st.Status, st.Live, st.Hash, st.Main)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// screenshotsDir is CITYPULSE_SCREENSHOTS, taken out of the environment when
// the tests start: the server they run rejects any CITYPULSE_* variable that
// names no config key, and it inherits the test's environment.
var screenshotsDir = func() string {
	d := os.Getenv("CITYPULSE_SCREENSHOTS")
	os.Unsetenv("CITYPULSE_SCREENSHOTS")
	return d
}()

// screenshot saves the whole page as name.png in the given dir (the test's
// artifact dir: kept with go test -artifacts) and,
// when CITYPULSE_SCREENSHOTS names a directory, there too.
func (tb *tab) screenshot(t *testing.T, dir, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, 20*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	require.NoError(t, err)
	require.Greater(t, len(png), 1000, "a screenshot with something on it")
	for _, d := range []string{dir, screenshotsDir} {
		if d == "" {
			continue
		}
		require.NoError(t, os.MkdirAll(d, 0o755))
		p := filepath.Join(d, name+".png")
		require.NoError(t, os.WriteFile(p, png, 0o644))
		t.Logf("screenshot %s", p)
	}
}

// consoleErrors lists what the page reported as going wrong: every uncaught
// exception, console.error or console.assert, and every browser error (a CSP
// violation, a failed load) except failed requests that allowed accepts.
func (tb *tab) consoleErrors(allowed func(chromedp.ConsoleMessage) bool) []string {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	var bad []string
	if tb.listenErr != nil {
		bad = append(bad, "reading the console: "+tb.listenErr.Error())
	}
	for _, m := range tb.console {
		failed := m.IsException() || m.Type == chromedp.ConsoleError || m.Type == "assert"
		if m.Source == "network" && allowed != nil && allowed(m) {
			failed = false // a request that is refused on purpose
		}
		if failed {
			bad = append(bad, fmt.Sprintf("%s (%s:%d)", m, m.URL, m.Line+1))
		}
	}
	return bad
}

// publishReading sends one reading of dev over MQTT as the device itself.
func publishReading(t *testing.T, s *proc, dev, body string) {
	t.Helper()
	c, err := mqttConnect(s.mqtt, dev, "secret-"+dev, false)
	require.NoError(t, err)
	defer c.Disconnect(100)
	publish(t, c, "devices/"+dev+"/readings", 1, []byte(body))
}

// signalPlan is a junction's state transitions as one SenML pack: cycles
// of 90 s from start, green 30 s, amber 3 s, red the rest, each change with
// its own time (none after now).
func signalPlan(start time.Time, cycles int) string {
	var recs []string
	for c := range cycles {
		at := start.Add(time.Duration(c) * 90 * time.Second).Unix()
		for _, st := range []struct {
			off   int64
			state string
		}{{0, "green"}, {30, "amber"}, {33, "red"}} {
			if at+st.off <= time.Now().Unix() {
				recs = append(recs, fmt.Sprintf(`{"n":"state","vs":%q,"t":%d}`, st.state, at+st.off))
			}
		}
	}
	return "[" + strings.Join(recs, ",") + "]"
}

func cardVitals(st pageState, district string) map[string]string {
	for _, c := range st.Cards {
		if c.Name == district {
			return c.Vitals
		}
	}
	return nil
}

func tableRows(st pageState, caption string) ([][]string, bool) {
	for _, tb := range st.Tables {
		if tb.Caption == caption {
			return tb.Rows, true
		}
	}
	return nil, false
}

// urgent checks the page's unfolded alerts are exactly the gas leak at
// pipe-0001, and that what it folded away is only of severity info.
func urgentIsGasLeak(t *testing.T, st pageState) {
	t.Helper()
	var urgent []string
	for _, a := range st.Alerts {
		if a.Folded {
			require.Equal(t, "info", a.Severity, "only info alerts are folded: %+v", a)
			continue
		}
		urgent = append(urgent, a.Name)
		require.Equal(t, "gas_leak", a.Name)
		require.Equal(t, "critical", a.Severity)
		require.Equal(t, []string{"gulou", "pipe-0001"}, a.Links, "district and device")
		require.Equal(t, "Gas at pipe-0001 (gulou) is 35 %LEL", a.Summary)
	}
	require.Equal(t, []string{"gas_leak"}, urgent, "%+v", st.Alerts)
}

func vitalIs(district, sign, want string) func(pageState) error {
	return func(st pageState) error {
		if got := cardVitals(st, district)[sign]; got != want {
			return fmt.Errorf("%s %s: %q, want %q", district, sign, got, want)
		}
		return nil
	}
}

const dashReadToken, dashAdminToken = "dash-read-token-7f3a9c", "dash-admin-token-b81e44"

// The dashboard, in a real headless Chromium against the real server, in one
// page that is never reloaded: with the read token it shows the firing alert
// and each district's vital signs; a new reading reaches the district card
// without a reload; a district's trend charts draw points from the query API;
// the device view shows the device's last readings; the sinks view lists the
// embedded store. The page reports no error on its console, and the token
// (given in the URL fragment) never reaches the server's log.
func TestDashboardInHeadlessChromium(t *testing.T) {
	skipShort(t)
	chromiumPath(t)
	corridors, _ := filepath.Abs("../../configs/corridors.yaml")
	s := newProc(t, fmt.Sprintf("vitals:\n  interval: 1s\nhttp:\n  read_token: %s\n  admin_token: %s\n", dashReadToken, dashAdminToken),
		"CITYPULSE_SIGNALS_FILE="+corridors)
	s.start()
	defer s.stop()

	resp, err := http.Get("http://" + s.http + "/")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "the page itself is public: it holds no data")
	require.Contains(t, resp.Header.Get("Content-Security-Policy"), "script-src 'self'")
	require.Equal(t, "DENY", resp.Header.Get("X-Frame-Options"))

	publishReading(t, s, "pipe-0001", `{"pressure":420,"gas_concentration":35}`) // gas_leak fires at once
	publishReading(t, s, "pipe-0002", `{"pressure":180}`)

	browser := newBrowser(t)
	shots := t.ArtifactDir() // kept with go test -artifacts [-outputdir DIR]
	tb := openTab(t, browser, "http://"+s.http)
	tb.open(t, "/#token="+dashReadToken)
	tb.do(t, 5*time.Second, chromedp.Evaluate[chromedp.Void](`window.citypulseTestMarker = "the same page"`))
	samePage := func(st pageState) error {
		if st.Marker != "the same page" {
			return fmt.Errorf("the page was reloaded")
		}
		return nil
	}

	// Each step runs in the same page, after the ones before it.
	for _, step := range []struct {
		name string
		run  func(t *testing.T)
	}{
		{"city view", func(t *testing.T) {
			st := tb.waitFor(t, "the city view with vital signs and the alert", 30*time.Second, func(st pageState) error {
				switch {
				case !strings.HasPrefix(st.Status, "updated "):
					return fmt.Errorf("status %q", st.Status)
				case len(st.Alerts) == 0:
					return fmt.Errorf("no alert yet")
				}
				for _, f := range []func(pageState) error{vitalIs("gulou", "mains pressure min", "420 kPa"), vitalIs("xuanwu", "mains pressure min", "180 kPa")} {
					if err := f(st); err != nil {
						return err
					}
				}
				return nil
			})
			require.NotContains(t, st.Href, dashReadToken, "the token leaves the address bar")
			urgentIsGasLeak(t, st)
			require.Equal(t, "city", st.Cards[0].Name, "the city card comes first")
			require.Equal(t, "180 kPa", cardVitals(st, "city")["mains pressure min"], "the city-wide minimum")
			require.Equal(t, "no data", cardVitals(st, "qinhuai")["mains pressure min"], "a district with no pipe says so")
			require.Equal(t, "live ok", st.Live, "fresh data: %q", st.Mode)
			require.Contains(t, []string{"live", "polling"}, st.Mode, "the stream, or polling where the server has none")
			require.Empty(t, st.Unlabelled, "every control has an accessible name")
			tb.screenshot(t, shots, "dashboard-city")
		}},
		{"live values change without a reload", func(t *testing.T) {
			// 30 kPa down: a new minimum for gulou, well short of the 80 kPa
			// burst_main needs (a second critical alert would change the list).
			publishReading(t, s, "pipe-0001", `{"pressure":390}`)
			tb.waitFor(t, "gulou's new minimum on its card", 30*time.Second, func(st pageState) error {
				if err := samePage(st); err != nil {
					return err
				}
				return vitalIs("gulou", "mains pressure min", "390 kPa")(st)
			})
		}},
		{"live regions speak only when something changes", func(t *testing.T) {
			// A screen reader reads a live region out at every change: the
			// seconds counting up and each refresh's time must stay out of them.
			tb.do(t, 5*time.Second, chromedp.Evaluate[chromedp.Void](`(() => {
			  window.citypulseLiveChanges = [];
			  const obs = new MutationObserver(ms => ms.forEach(m => window.citypulseLiveChanges.push(
			    (m.target.parentElement || m.target).id + ": " + m.target.textContent)));
			  document.querySelectorAll('[role=status], [role=alert], [aria-live]').forEach(e =>
			    obs.observe(e, { childList: true, characterData: true, subtree: true }));
			})()`))
			tb.do(t, 15*time.Second, chromedp.Sleep(7*time.Second)) // a poll (5 s) and the ticking clock
			changes, err := chromedp.Run(tb.ctx, chromedp.Evaluate[[]string](`window.citypulseLiveChanges`))
			require.NoError(t, err)
			require.Empty(t, changes, "live regions changed while nothing happened")
		}},
		{"sinks", func(t *testing.T) {
			tb.click(t, `header nav a[href="#/sinks"]`)
			st := tb.waitFor(t, "the sinks table", 10*time.Second, func(st pageState) error {
				rows, ok := tableRows(st, "Where readings are stored")
				if !ok || len(rows) == 0 || len(rows[0]) < 2 {
					return fmt.Errorf("no sinks table")
				}
				return nil
			})
			rows, _ := tableRows(st, "Where readings are stored")
			var names []string
			for _, r := range rows {
				names = append(names, r[0])
			}
			require.Contains(t, names, "tsdb", "the embedded store's sink")
		}},
		{"district view draws trend charts", func(t *testing.T) {
			tb.click(t, `header nav a[href="#/"]`)
			tb.click(t, `article.district a[href="#/district/gulou"]`)
			st := tb.waitFor(t, "a chart with points", 30*time.Second, func(st pageState) error {
				for _, c := range st.Charts {
					if c.Title == "Mains pressure, lowest (kPa)" && c.Points > 0 && c.Canvas {
						return nil
					}
				}
				return fmt.Errorf("charts %+v", st.Charts)
			})
			require.NoError(t, samePage(st))
			require.Equal(t, "#/district/gulou", st.Hash)
			require.Len(t, st.Cards, 1)
			require.Equal(t, "390 kPa", st.Cards[0].Vitals["mains pressure min"])
			urgentIsGasLeak(t, st)
			rows, ok := tableRows(st, "Devices in gulou")
			require.True(t, ok)
			require.Equal(t, [][]string{{"pipe-0001", "pipe", "10s"}, {"tl-0001", "traffic_light", "5s"}}, rows)
			tb.screenshot(t, shots, "dashboard-district")
		}},
		{"device view shows the last readings", func(t *testing.T) {
			tb.click(t, `table a[href="#/device/pipe-0001"]`)
			st := tb.waitFor(t, "pipe-0001's last readings", 15*time.Second, func(st pageState) error {
				rows, ok := tableRows(st, "Latest value of each metric")
				if !ok {
					return fmt.Errorf("no readings table")
				}
				got := map[string]string{}
				for _, r := range rows {
					if len(r) == 3 {
						got[r[0]] = r[1]
					}
				}
				if got["pipe_pressure"] != "390" || got["pipe_gas_concentration"] != "35" {
					return fmt.Errorf("readings %v", rows)
				}
				return nil
			})
			require.NoError(t, samePage(st))
			require.Contains(t, st.Main, "last reading ")
			require.Equal(t, map[string]string{"kind": "pipe", "interval": "10s"}, st.Facts)
			urgentIsGasLeak(t, st)
		}},
		{"alert view", func(t *testing.T) {
			links, err := chromedp.Run(tb.ctx, chromedp.Evaluate[int](`document.querySelectorAll("li.alert a.name").length`))
			require.NoError(t, err)
			require.Positive(t, links, "the device view links its alert to the alert view")
			tb.click(t, `li.alert a.name`)
			st := tb.waitFor(t, "the alert's labels and history", 15*time.Second, func(st pageState) error {
				if st.Facts["alertname"] != "gas_leak" || strings.Contains(st.Main, "loading…") {
					return fmt.Errorf("facts %v", st.Facts)
				}
				if rows := historyRows(st); !hasRow(rows, `\| pending`) || !hasRow(rows, `\| firing — Gas at pipe-0001 \(gulou\) is 35 %LEL`) {
					return fmt.Errorf("history %q", rows)
				}
				return nil
			})
			require.NoError(t, samePage(st))
			require.True(t, strings.HasPrefix(st.Hash, "#/alert/"), st.Hash)
			require.Equal(t, "pipe-0001", st.Facts["device"])
			require.Equal(t, "gulou", st.Facts["district"])
			require.Equal(t, "critical", st.Facts["severity"])
			urgentIsGasLeak(t, st)
		}},
		{"corridor view shows each junction's timing", func(t *testing.T) {
			// configs/corridors.yaml: tl-0001, then tl-0002 900 m on at 50 km/h
			// (64.8 s). Both run 90 s cycles, 30 s green; tl-0002's greens
			// start 58 s after tl-0001's: 6.8 s early.
			req, err := http.NewRequest(http.MethodPost, "http://"+s.http+"/api/v1/devices",
				strings.NewReader(`{"id":"tl-0002","kind":"traffic_light","district":"xuanwu","interval":"5s","secret":"secret-tl-0002"}`))
			require.NoError(t, err)
			req.Header.Set("Authorization", "Bearer "+dashAdminToken)
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			resp.Body.Close()
			require.Equal(t, http.StatusCreated, resp.StatusCode, "the corridor's second junction joins the fleet")
			now := time.Now().Truncate(time.Second)
			publishReading(t, s, "tl-0001", signalPlan(now.Add(-330*time.Second), 4))
			publishReading(t, s, "tl-0002", signalPlan(now.Add(-272*time.Second), 4))
			tb.click(t, `header nav a[href="#/corridors"]`)
			st := tb.waitFor(t, "the corridor's junctions with their timing", 20*time.Second, func(st pageState) error {
				rows, ok := tableRows(st, "zhongshan-road: junctions in driving order, design speed 50 km/h")
				if !ok || len(rows) != 2 || rows[1][7] == "–" {
					return fmt.Errorf("tables %+v", st.Tables)
				}
				return samePage(st)
			})
			rows, _ := tableRows(st, "zhongshan-road: junctions in driving order, design speed 50 km/h")
			require.Equal(t, [][]string{
				{"1", "tl-0001", "–", "–", "90 s", "33 %", "–", "–"},
				{"2", "tl-0002", "900 m", "65 s", "90 s", "33 %", "58 s", "−7 s"},
			}, rows)
			require.Contains(t, st.Main, "worst error 7 s")
			tb.screenshot(t, shots, "dashboard-corridors")
		}},
	} {
		if !t.Run(step.name, step.run) {
			break
		}
	}
	require.Empty(t, tb.consoleErrors(nil), "the page's console")
	require.NotContains(t, s.Logs(), dashReadToken, "the token travels in a header, never in a URL the server logs")
}

// Without a token, or with a wrong one, the dashboard shows no data and says
// why; the only errors on its console are the refused requests. A token typed
// into the form (label, keyboard, Enter) shows the data, and Forget drops it.
func TestDashboardToken(t *testing.T) {
	skipShort(t)
	chromiumPath(t)
	s := newProc(t, fmt.Sprintf("vitals:\n  interval: 1s\nhttp:\n  read_token: %s\n  admin_token: %s\n", dashReadToken, dashAdminToken))
	s.start()
	defer s.stop()
	publishReading(t, s, "pipe-0001", `{"pressure":420,"gas_concentration":35}`)
	eventually(t, 30*time.Second, func() error { // what a token would show exists
		resp, err := http.DefaultClient.Do(authGet(t, "http://"+s.http+"/api/v1/alerts", dashReadToken))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || !strings.Contains(string(b), "gas_leak") {
			return fmt.Errorf("alerts: %d %s %v", resp.StatusCode, b, err)
		}
		return nil
	})

	browser := newBrowser(t)
	const noToken, refused = "this dashboard needs a read token", "token refused: enter a valid read token"
	refusedOrOptional := func(m chromedp.ConsoleMessage) bool {
		return strings.Contains(m.Text, "401") && strings.Contains(m.URL, "/api/v1/")
	}
	for _, tc := range []struct {
		name, url, want string
		then            func(t *testing.T, tb *tab) // more steps in the same page
	}{
		{name: "no token", url: "/", want: noToken},
		{name: "wrong token", url: "/#token=not-the-token", want: refused},
		{name: "the token form", url: "/", want: noToken, then: func(t *testing.T, tb *tab) {
			tb.do(t, 10*time.Second, chromedp.SendKeys(chromedp.ID("token"), dashReadToken+"\n"))
			st := tb.waitFor(t, "the data", 20*time.Second, func(st pageState) error {
				if !strings.HasPrefix(st.Status, "updated ") || len(st.Alerts) == 0 {
					return fmt.Errorf("status %q, %d alerts", st.Status, len(st.Alerts))
				}
				return nil
			})
			urgentIsGasLeak(t, st)
			v, err := chromedp.Run(tb.ctx, chromedp.Value(chromedp.ID("token")))
			require.NoError(t, err)
			require.Empty(t, v, "the field is cleared once the token is taken")
			tb.click(t, "#forget")
			tb.waitFor(t, "no data again", 20*time.Second, noData(noToken))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tb := openTab(t, browser, "http://"+s.http)
			tb.open(t, tc.url)
			tb.waitFor(t, "the reason", 20*time.Second, noData(tc.want))
			if tc.then != nil {
				tc.then(t, tb)
			}
			require.Empty(t, tb.consoleErrors(refusedOrOptional), "the page's console")
		})
	}
	require.NotContains(t, s.Logs(), dashReadToken, "the token travels in a header only")
}

// noData accepts a page that shows nothing from the API and says why.
func noData(why string) func(pageState) error {
	return func(st pageState) error {
		switch {
		case st.Status != why:
			return fmt.Errorf("status %q, want %q", st.Status, why)
		case len(st.Cards) > 0 || len(st.Alerts) > 0:
			return fmt.Errorf("%d cards, %d alerts", len(st.Cards), len(st.Alerts))
		case strings.Contains(st.Main, "gas_leak") || strings.Contains(st.Main, "420"):
			return fmt.Errorf("the view shows data: %q", st.Main)
		}
		return nil
	}
}

func authGet(t *testing.T, url, token string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	return req
}

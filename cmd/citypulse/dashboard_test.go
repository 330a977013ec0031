package main

import (
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// chromium finds Debian's Chromium (make test installs it).
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("chromium not found: run `make test` (it installs Debian's chromium)")
	return ""
}

// dumpDOM loads url in headless Chromium, lets its scripts run (fetches
// included) and returns the DOM as rendered.
func dumpDOM(t *testing.T, bin, url string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--user-data-dir="+t.TempDir(), "--virtual-time-budget=3000", "--dump-dom", url)
	out, err := cmd.Output()
	require.NoError(t, err, "chromium")
	return string(out)
}

// rendered is dumpDOM once the page's first refresh has finished (its status
// no longer reads "loading…"), trying for up to 20 s on a slow machine.
func rendered(t *testing.T, bin, url string) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		dom := dumpDOM(t, bin, url)
		if st := status(dom); (st != "" && st != "loading…") || time.Now().After(deadline) {
			return dom
		}
	}
}

var (
	rowRE  = regexp.MustCompile(`(?s)<tr[^>]*>(.*?)</tr>`)
	cellRE = regexp.MustCompile(`(?s)<t[dh][^>]*>(.*?)</t[dh]>`)
	bodyRE = regexp.MustCompile(`(?s)<table id="(\w+)">.*?<tbody>(.*?)</tbody>`)
)

// tables returns each table's body rows as cell texts, by table id.
func tables(dom string) map[string][][]string {
	out := map[string][][]string{}
	for _, m := range bodyRE.FindAllStringSubmatch(dom, -1) {
		for _, r := range rowRE.FindAllStringSubmatch(m[2], -1) {
			var cells []string
			for _, c := range cellRE.FindAllStringSubmatch(r[1], -1) {
				cells = append(cells, strings.TrimSpace(c[1]))
			}
			out[m[1]] = append(out[m[1]], cells)
		}
	}
	return out
}

func status(dom string) string {
	m := regexp.MustCompile(`<span id="status"[^>]*>(.*?)</span>`).FindStringSubmatch(dom)
	if m == nil {
		return ""
	}
	return m[1]
}

// The dashboard, in a real headless Chromium against the real server: with the
// read token it shows the firing alert, each district's vital signs and the
// sinks; without a token, or with a wrong one, it shows no data and says why.
// The token (given in the URL fragment) never reaches the server's logs.
func TestDashboardInHeadlessChromium(t *testing.T) {
	skipShort(t)
	bin := chromium(t)
	const readToken, adminToken = "dash-read-token-7f3a9c", "dash-admin-token-b81e44"
	s := newProc(t, fmt.Sprintf("vitals:\n  interval: 1s\nhttp:\n  read_token: %s\n  admin_token: %s\n", readToken, adminToken))
	s.start()
	defer s.stop()

	resp, err := http.Get("http://" + s.http + "/")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "the page itself is public: it holds no data")
	require.Contains(t, resp.Header.Get("Content-Security-Policy"), "script-src 'self'")
	require.Equal(t, "DENY", resp.Header.Get("X-Frame-Options"))

	for dev, body := range map[string]string{
		"pipe-0001": `{"pressure":420,"gas_concentration":35}`, // gas_leak fires at once
		"pipe-0002": `{"pressure":180}`,
	} {
		c, err := mqttConnect(s.mqtt, dev, "secret-"+dev, false)
		require.NoError(t, err)
		publish(t, c, "devices/"+dev+"/readings", 1, []byte(body))
		c.Disconnect(100)
	}

	var dom string
	var tabs map[string][][]string
	deadline := time.Now().Add(30 * time.Second)
	for {
		dom = rendered(t, bin, "http://"+s.http+"/#token="+readToken)
		tabs = tables(dom)
		if strings.HasPrefix(status(dom), "updated") && len(tabs["alerts"]) > 0 && len(tabs["alerts"][0]) == 6 &&
			strings.Contains(dom, "<td>xuanwu</td>") || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	require.True(t, strings.HasPrefix(status(dom), "updated"), "status %q", status(dom))
	require.Len(t, tabs["alerts"], 1, "%v", tabs["alerts"])
	a := tabs["alerts"][0]
	require.Equal(t, []string{"gas_leak", "critical", "gulou", "pipe-0001", "Gas at pipe-0001 (gulou) is 35 %LEL"}, a[:5])
	vitals := map[string][]string{}
	for _, r := range tabs["vitals"] {
		vitals[r[0]] = r
	}
	require.Equal(t, "420", vitals["gulou"][1], "gulou's minimum mains pressure")
	require.Equal(t, "180", vitals["xuanwu"][1])
	require.Equal(t, "180", vitals["city"][1], "the city-wide minimum")
	require.Equal(t, "city", tabs["vitals"][0][0], "the city row comes first")
	require.Contains(t, dom, `<td>tsdb</td>`, "the embedded store's sink")

	for _, tc := range []struct{ name, url, want string }{
		{"no token", "/", "this dashboard needs a read token"},
		{"wrong token", "/#token=not-the-token", "token refused: enter a valid read token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dom := rendered(t, bin, "http://"+s.http+tc.url)
			require.Equal(t, tc.want, status(dom))
			require.NotContains(t, dom, "gas_leak")
			require.NotContains(t, dom, "420")
		})
	}
	require.NotContains(t, s.Logs(), readToken, "the token travels in a header, never in a URL the server logs")
}

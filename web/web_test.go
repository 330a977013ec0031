package web

import (
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestHandler(t *testing.T) {
	srv := httptest.NewServer(Handler())
	defer srv.Close()
	for _, tc := range []struct {
		path, contentType, body string
		status                  int
	}{
		{"/", "text/html", `<script type="module" src="/ui/app.js"></script>`, 200},
		{"/ui/app.js", "javascript", "/api/v1/events", 200},
		{"/ui/api.js", "javascript", "Authorization", 200},
		{"/ui/style.css", "text/css", "table", 200},
		{"/ui/favicon.svg", "image/svg+xml", "<svg", 200},
		{"/ui/vendor/uplot/uPlot.iife.min.js", "javascript", "uPlot", 200},
		{"/ui/nothing.js", "", "", 404},
		{"/index.html", "", "", 404},
	} {
		t.Run(tc.path, func(t *testing.T) {
			resp, err := http.Get(srv.URL + tc.path)
			require.NoError(t, err)
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, tc.status, resp.StatusCode)
			require.Contains(t, resp.Header.Get("Content-Security-Policy"), "default-src 'none'")
			require.Equal(t, "nosniff", resp.Header.Get("X-Content-Type-Options"))
			if tc.status == 200 {
				require.Contains(t, resp.Header.Get("Content-Type"), tc.contentType)
				require.Contains(t, string(b), tc.body)
			}
		})
	}
}

// The page renders API data with textContent only: nothing a device or a
// rule annotation says can become markup or script. No script of ours sets a
// style attribute either (the CSP refuses inline styles) or puts the token in
// a URL.
func TestScriptNeverParsesHTML(t *testing.T) {
	scripts, err := fs.Glob(static, "static/*.js")
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(scripts), 5, "app, api, dom, live, views")
	for _, name := range scripts {
		b, err := static.ReadFile(name)
		require.NoError(t, err)
		for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
			`"style"`, "cssText", "?token=", "&token="} {
			require.False(t, strings.Contains(string(b), bad), "%s uses %s", name, bad)
		}
	}
	html, err := static.ReadFile("static/index.html")
	require.NoError(t, err)
	require.NotContains(t, string(html), "<script>", "no inline script (the CSP forbids it)")
	require.NotContains(t, string(html), "style=", "no inline style (the CSP forbids it)")
}

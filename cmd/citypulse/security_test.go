package main

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Roles: without a token nothing is readable, the read token reads but
// changes nothing, the admin token does both. Secrets (device keys, tokens,
// webhook secrets) never appear in the server's logs, metrics or API answers, not
// even when a device presents a wrong one or an admin adds a device.
func TestSecretsNeverLeak(t *testing.T) {
	skipShort(t)
	const (
		admin    = "admin-token-never-logged-0001"
		read     = "read-token-never-logged-0001"
		hook     = "webhook-secret-never-logged-01"
		wrongKey = "wrong-key-never-logged-000001"
		newKey   = "new-device-key-never-logged-1"
	)
	s := newInproc(t, fmt.Sprintf(`rules:
  notify:
    receivers:
      - {name: ops, type: webhook, url: "http://127.0.0.1:9/hook", secret: %q}
    allow_hosts: ["127.0.0.1"]
http: {admin_token: %q, read_token: %q}
log: {level: debug}
`, hook, admin, read))
	s.run()

	// a device with the right secret, one with a wrong one, a CoAP key in the URI
	c, err := mqttConnect(s.mqtt, "pipe-0001", "secret-pipe-0001", false)
	require.NoError(t, err)
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`[{"n":"pressure","v":300}]`))
	c.Disconnect(50)
	_, err = mqttConnect(s.mqtt, "pipe-0002", wrongKey, false)
	require.Error(t, err)

	do := func(method, path, token, body string) string {
		req, _ := http.NewRequest(method, s.url+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.Status + string(b)
	}
	// roles: no token, read-only, admin
	status := func(method, path, token string) string {
		return do(method, path, token, `{"id":"pipe-0200","kind":"pipe","district":"gulou","interval":"10s","secret":"role-test-secret-0200"}`)[:3]
	}
	require.Equal(t, "401", status("GET", "/api/v1/devices", ""), "reading needs a token")
	require.Equal(t, "401", status("GET", "/api/v1/query?query=up", ""), "so does the query API")
	require.Equal(t, "200", status("GET", "/api/v1/devices", read))
	require.Equal(t, "200", status("GET", "/api/v1/devices", admin), "admin can read")
	require.Equal(t, "401", status("POST", "/api/v1/devices", read), "the read token cannot change anything")
	require.Equal(t, "401", status("POST", "/-/reload", read))
	require.Equal(t, "401", status("GET", "/debug/pprof/", read), "profiles are for admins")
	require.Equal(t, "200", status("GET", "/debug/pprof/", admin))
	require.Equal(t, "200", status("GET", "/healthz", ""), "liveness stays open")

	added := do("POST", "/api/v1/devices", admin, fmt.Sprintf(`{"id":"pipe-0100","kind":"pipe","district":"gulou","interval":"10s","secret":%q}`, newKey))
	require.Contains(t, added, "201")
	do("POST", "/api/v1/devices", "not-the-admin-token-000000", `{}`)

	var answers strings.Builder
	for _, p := range []string{"/api/v1/devices", "/api/v1/devices/pipe-0100", "/api/v1/devices/pipe-0001", "/metrics",
		"/api/v1/rules", "/api/v1/outbox", "/api/v1/sinks", "/api/v1/alerts", "/api/v1/status/buildinfo"} {
		answers.WriteString(do("GET", p, read, ""))
	}
	answers.WriteString(added)
	time.Sleep(200 * time.Millisecond) // let the log catch up
	s.stop()
	logs := s.logs.String()
	require.Contains(t, logs, "pipe-0002", "the refused login is logged (by device id)")
	for _, secret := range []string{admin, read, hook, wrongKey, newKey, "secret-pipe-0001", "secret-pipe-0002"} {
		require.NotContains(t, logs, secret, "the log holds a secret")
		require.NotContains(t, answers.String(), secret, "an API answer holds a secret")
	}
}

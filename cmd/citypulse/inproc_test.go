package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The in-process tests build the real server value (real TSDB in a temp dir,
// real pipeline, real gateways on free loopback ports) and talk to its
// Handler through httptest: HTTP behaviour, auth and API shapes, without a
// process. What needs a process (SIGKILL, descriptors, the binary's flags) is
// in the subprocess tests.

// inproc is one server value with its HTTP API behind an httptest server.
type inproc struct {
	t      *testing.T
	s      *server
	cfg    Config
	web    *httptest.Server
	url    string // the httptest server's base URL
	mqtt   string // host:port of the embedded broker
	logs   *syncBuffer
	cancel context.CancelFunc
	done   chan error
}

// inprocConfig loads the test config: the test fleet, data under dir, the
// gateways on free loopback ports, config appended as YAML.
func inprocConfig(t *testing.T, dir, config string) Config {
	t.Helper()
	devicesFile := filepath.Join(dir, "devices.yaml")
	require.NoError(t, os.WriteFile(devicesFile, []byte(testDevices), 0o600))
	vitals, _ := filepath.Abs("../../configs/vitals.yaml")
	rulesFile, _ := filepath.Abs("../../configs/rules.yaml")
	path := filepath.Join(dir, "citypulse.yaml")
	require.NoError(t, os.WriteFile(path, []byte(config), 0o600))
	cfg, err := loadConfig(path, map[string]any{
		"data_dir": filepath.Join(dir, "data"), "devices.file": devicesFile,
		"vitals.file": vitals, "rules.file": rulesFile, "http.addr": "127.0.0.1:0",
		"ingest.mqtt.addr":      fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp")),
		"ingest.coap.addr":      fmt.Sprintf("127.0.0.1:%d", freePort(t, "udp")),
		"ingest.coap.dtls_addr": fmt.Sprintf("127.0.0.1:%d", freePort(t, "udp")),
	})
	require.NoError(t, err)
	return cfg
}

// newInproc builds a server from config (YAML) in a fresh directory.
func newInproc(t *testing.T, config string) *inproc {
	t.Helper()
	return buildInproc(t, inprocConfig(t, t.TempDir(), config))
}

func buildInproc(t *testing.T, cfg Config) *inproc {
	t.Helper()
	p := &inproc{t: t, cfg: cfg, logs: &syncBuffer{}, mqtt: cfg.Ingest.MQTT.Addr}
	s, err := newServer(cfg, p.logs)
	require.NoError(t, err, "%s", p.logs.String())
	p.s = s
	p.web = httptest.NewServer(s.Handler())
	p.url = p.web.URL
	t.Cleanup(func() {
		p.web.Close()
		if p.done != nil && p.cancel != nil {
			p.cancel()
			<-p.done
		}
		require.NoError(t, s.Close())
	})
	return p
}

// run runs the server (gateways, pipeline, rules) until stop or the test's end.
func (p *inproc) run() {
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel, p.done = cancel, make(chan error, 1)
	go func() { p.done <- p.s.Run(ctx) }()
	eventually(p.t, 30*time.Second, func() error {
		if !p.s.ready.Load() {
			return fmt.Errorf("not ready")
		}
		return nil
	})
}

// stop ends Run and requires a clean stop.
func (p *inproc) stop() {
	p.t.Helper()
	p.cancel()
	select {
	case err := <-p.done:
		require.NoError(p.t, err, "%s", p.logs.String())
	case <-time.After(30 * time.Second):
		p.t.Fatalf("Run did not return within 30s\n%s", p.logs.String())
	}
	p.cancel, p.done = nil, nil
	p.web.Close()
}

// do sends a request with a bearer token (none when empty) and returns the
// status code and the body.
func (p *inproc) do(method, path, token, body string) (int, string) {
	p.t.Helper()
	req, err := http.NewRequest(method, p.url+path, strings.NewReader(body))
	require.NoError(p.t, err)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(p.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(p.t, err)
	return resp.StatusCode, string(b)
}

// httpHost is the host:port of the httptest server, for the helpers that take one.
func (p *inproc) httpHost() string { return strings.TrimPrefix(p.url, "http://") }

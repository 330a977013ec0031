package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"
)

// The end-to-end tests run the real citypulse binary on free loopback ports.

var binPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "citypulse-e2e")
	if err != nil {
		panic(err)
	}
	binPath = filepath.Join(dir, "citypulse")
	out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build citypulse: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts the real server and real peers; run without -short (make test)")
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T, network string) int {
	t.Helper()
	if network == "udp" {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(t, err)
		defer c.Close()
		return c.LocalAddr().(*net.UDPAddr).Port
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

const testDevices = `devices:
  - {id: pipe-0001, kind: pipe, district: gulou, interval: 10s, secret: "secret-pipe-0001"}
  - {id: pipe-0002, kind: pipe, district: xuanwu, interval: 10s, secret: "secret-pipe-0002"}
  - {id: tl-0001, kind: traffic_light, district: gulou, interval: 5s, secret: "secret-tl-0001"}
  - {id: bay-0001, kind: parking, district: qinhuai, interval: 30s, secret: "secret-bay-0001"}
`

// server is one run of the binary.
type server struct {
	t        *testing.T
	dir      string
	mqtt     string // host:port
	coap     string
	dtls     string
	http     string
	cfgPath  string
	extraEnv []string
	cmd      *exec.Cmd
	logs     *syncBuffer
	exited   chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// newServer prepares a data dir, a device list and free ports; config is
// extra YAML appended to the config file.
func newServer(t *testing.T, config string, env ...string) *server {
	t.Helper()
	dir := t.TempDir()
	s := &server{
		t:        t,
		dir:      dir,
		mqtt:     fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp")),
		coap:     fmt.Sprintf("127.0.0.1:%d", freePort(t, "udp")),
		dtls:     fmt.Sprintf("127.0.0.1:%d", freePort(t, "udp")),
		http:     fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp")),
		cfgPath:  filepath.Join(dir, "citypulse.yaml"),
		extraEnv: env,
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "devices.yaml"), []byte(testDevices), 0o600))
	cfg := fmt.Sprintf("data_dir: %s\ndevices:\n  file: %s\n%s", filepath.Join(dir, "data"), filepath.Join(dir, "devices.yaml"), config)
	require.NoError(t, os.WriteFile(s.cfgPath, []byte(cfg), 0o600))
	t.Cleanup(func() {
		if s.cmd != nil && s.cmd.ProcessState == nil {
			_ = s.cmd.Process.Kill()
			<-s.exited
		}
		if t.Failed() && s.logs != nil {
			t.Logf("server log:\n%s", s.logs.String())
		}
	})
	return s
}

// start runs the binary and waits until /readyz answers.
func (s *server) start() {
	t := s.t
	t.Helper()
	s.cmd = exec.Command(binPath, "serve", "--config", s.cfgPath,
		"--mqtt-addr", s.mqtt, "--coap-addr", s.coap, "--dtls-addr", s.dtls, "--http-addr", s.http)
	vitals, _ := filepath.Abs("../../configs/vitals.yaml")
	rulesFile, _ := filepath.Abs("../../configs/rules.yaml")
	s.cmd.Env = append(append(serverEnv(), "CITYPULSE_VITALS_FILE="+vitals, "CITYPULSE_RULES_FILE="+rulesFile), s.extraEnv...)
	if s.logs == nil {
		s.logs = &syncBuffer{}
	}
	s.cmd.Stdout, s.cmd.Stderr = s.logs, s.logs
	require.NoError(t, s.cmd.Start())
	s.exited = make(chan error, 1)
	go func() { s.exited <- s.cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case err := <-s.exited:
			t.Fatalf("server exited during start-up: %v\n%s", err, s.logs.String())
		default:
		}
		resp, err := http.Get("http://" + s.http + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("server not ready after 60s\n%s", s.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// serverEnv is the test's environment without the tests' own knobs
// (CITYPULSE_TEST_*), which the server would reject as unknown config keys.
func serverEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CITYPULSE_TEST_") {
			env = append(env, kv)
		}
	}
	return env
}

// stop sends SIGTERM and requires a clean exit.
func (s *server) stop() {
	s.t.Helper()
	require.NoError(s.t, s.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-s.exited:
		require.NoError(s.t, err, "a graceful shutdown exits 0")
	case <-time.After(30 * time.Second):
		s.t.Fatalf("server did not stop within 30s after SIGTERM\n%s", s.logs.String())
	}
}

// kill sends SIGKILL: no chance to flush anything.
func (s *server) kill() {
	s.t.Helper()
	require.NoError(s.t, s.cmd.Process.Kill())
	<-s.exited
}

// mqttConnect connects a paho client to addr as device id.
func mqttConnect(addr, id, secret string, v5 bool) (mqtt.Client, error) {
	o := mqtt.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)).
		SetUsername(id).SetPassword(secret).SetConnectTimeout(5 * time.Second).SetAutoReconnect(false).
		SetConnectRetry(false).SetCleanSession(true)
	if v5 {
		o.SetProtocolVersion(5)
	}
	c := mqtt.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	return c, tok.Error()
}

func publish(t *testing.T, c mqtt.Client, topic string, qos byte, payload []byte) {
	t.Helper()
	tok := c.Publish(topic, qos, false, payload)
	require.True(t, tok.WaitTimeout(10*time.Second), "publish to %s timed out", topic)
	require.NoError(t, tok.Error())
}

// promResult is a sample or series from the query API.
type promResult struct {
	Metric map[string]string `json:"metric"`
	Value  []any             `json:"value"`
	Values [][]any           `json:"values"`
}

// query runs an instant PromQL query against the server's API.
func query(t *testing.T, httpAddr, q string) []promResult {
	t.Helper()
	resp, err := http.Get("http://" + httpAddr + "/api/v1/query?query=" + url.QueryEscape(q))
	require.NoError(t, err)
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
	var r struct {
		Status string `json:"status"`
		Data   struct {
			Result []promResult `json:"result"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal(body, &r), string(body))
	require.Equal(t, "success", r.Status)
	return r.Data.Result
}

// eventually retries f until it returns nil or the deadline passes.
func eventually(t *testing.T, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	var err error
	for time.Now().Before(deadline) {
		if err = f(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("condition not met within %v: %v", d, err)
}

// latest returns the value of the single series matched by q.
func latest(t *testing.T, httpAddr, q string) (float64, error) {
	res := query(t, httpAddr, q)
	if len(res) != 1 {
		return 0, fmt.Errorf("%s: %d series", q, len(res))
	}
	return strconv.ParseFloat(res[0].Value[1].(string), 64)
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

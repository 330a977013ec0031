package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cmd/internal/servertest"
)

// The end-to-end tests run the real citypulse binary on free loopback ports.

var binPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "citypulse-e2e")
	if err != nil {
		panic(err)
	}
	if binPath, err = servertest.Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
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
func freePort(t *testing.T, network string) int { return servertest.FreePort(t, network) }

const testDevices = `devices:
  - {id: pipe-0001, kind: pipe, district: gulou, interval: 10s, secret: "secret-pipe-0001"}
  - {id: pipe-0002, kind: pipe, district: xuanwu, interval: 10s, secret: "secret-pipe-0002"}
  - {id: tl-0001, kind: traffic_light, district: gulou, interval: 5s, secret: "secret-tl-0001"}
  - {id: bay-0001, kind: parking, district: qinhuai, interval: 30s, secret: "secret-bay-0001"}
`

// proc is one run of the binary (servertest.Server) with the test fleet.
type proc struct {
	*servertest.Server
	t                      *testing.T
	dir                    string
	mqtt, coap, dtls, http string
}

// syncBuffer collects a process's output while a test reads it.
type syncBuffer = servertest.SyncBuffer

// newProc prepares a data dir, a device list and free ports; config is
// extra YAML appended to the config file, env extra environment.
func newProc(t *testing.T, config string, env ...string) *proc {
	t.Helper()
	vitals, _ := filepath.Abs("../../configs/vitals.yaml")
	rulesFile, _ := filepath.Abs("../../configs/rules.yaml")
	env = append([]string{"CITYPULSE_VITALS_FILE=" + vitals, "CITYPULSE_RULES_FILE=" + rulesFile}, env...)
	srv := servertest.New(t, binPath, env...)
	s := &proc{Server: srv, t: t, dir: srv.Dir, mqtt: srv.MQTT, coap: srv.CoAP, dtls: srv.DTLS, http: srv.HTTP}
	devicesFile := filepath.Join(s.dir, "devices.yaml")
	require.NoError(t, os.WriteFile(devicesFile, []byte(testDevices), 0o600))
	srv.SetConfig(fmt.Sprintf("data_dir: {{data}}\ndevices:\n  file: %s\n%s", devicesFile, config))
	return s
}

func (s *proc) start() { s.t.Helper(); s.Start() }
func (s *proc) stop()  { s.t.Helper(); s.Stop() }
func (s *proc) kill()  { s.t.Helper(); s.Kill() }

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

// Package servertest runs the real citypulse binary on free loopback ports for
// the integration tests of the commands.
package servertest

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/citypulse/citypulse/internal/servers"
)

// Build compiles ./cmd/citypulse into dir and returns the binary's path.
func Build(dir string) (string, error) {
	_, file, _, _ := runtime.Caller(0)
	pkg := filepath.Join(filepath.Dir(file), "..", "..", "citypulse")
	bin := filepath.Join(dir, "citypulse")
	out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("build citypulse: %v\n%s", err, out)
	}
	return bin, nil
}

// Root is the repository root (for configs/).
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

// FreePort returns a loopback port that was free a moment ago.
func FreePort(t testing.TB, network string) int {
	t.Helper()
	p, err := servers.FreePort(network)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Server is one run of the binary.
type Server struct {
	t                      testing.TB
	bin                    string
	MQTT, CoAP, DTLS, HTTP string   // host:port
	Dir                    string   // holds the config and the data dir
	Env                    []string // extra environment
	Probe                  string   // what Start waits for: ProbeReady (default) or ProbeLive
	proc                   *servers.Proc
	logs                   *SyncBuffer
	configured             bool
}

// Addrs are the listen addresses of one run of the binary (host:port).
type Addrs struct{ MQTT, CoAP, DTLS, HTTP string }

// FreeAddrs picks free loopback ports for a run.
func FreeAddrs() (Addrs, error) {
	var ports [4]int
	for i, network := range []string{"tcp", "udp", "udp", "tcp"} {
		p, err := servers.FreePort(network)
		if err != nil {
			return Addrs{}, err
		}
		ports[i] = p
	}
	f := func(p int) string { return fmt.Sprintf("127.0.0.1:%d", p) }
	return Addrs{MQTT: f(ports[0]), CoAP: f(ports[1]), DTLS: f(ports[2]), HTTP: f(ports[3])}, nil
}

// StartCityPulse runs `bin serve` with the config file on addrs, with env
// added to the environment (the CITYPULSE_TEST_* knobs of the tests are not
// passed on: they are not config keys), and waits up to 60 s for /readyz.
func StartCityPulse(bin, config string, a Addrs, env []string, logs *SyncBuffer) (*servers.Proc, error) {
	return StartCityPulseProbe(bin, config, a, env, logs, ProbeReady)
}

// The paths Start can wait for: ready to be sent devices, or up.
const (
	ProbeReady = "/readyz"
	// ProbeLive is for a node of a standby site: it is up (/healthz 200)
	// but not ready (/readyz 503) while its site is fenced.
	ProbeLive = "/healthz"
)

// StartCityPulseProbe is StartCityPulse waiting for probe (ProbeReady or
// ProbeLive) to answer 200.
func StartCityPulseProbe(bin, config string, a Addrs, env []string, logs *SyncBuffer, probe string) (*servers.Proc, error) {
	var full []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CITYPULSE_TEST_") {
			full = append(full, kv)
		}
	}
	args := []string{bin, "serve", "--config", config,
		"--mqtt-addr", a.MQTT, "--coap-addr", a.CoAP, "--dtls-addr", a.DTLS, "--http-addr", a.HTTP}
	return servers.StartProc("citypulse", args, append(full, env...), logs, func() error {
		resp, err := http.Get("http://" + a.HTTP + probe)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", probe, resp.Status)
		}
		return nil
	}, 60*time.Second)
}

// New prepares a server in a fresh directory on free loopback ports, with env
// added to its environment; SetConfig writes its config before Start.
func New(t testing.TB, bin string, env ...string) *Server {
	t.Helper()
	a, err := FreeAddrs()
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, bin: bin, Dir: t.TempDir(), Env: env, MQTT: a.MQTT, CoAP: a.CoAP, DTLS: a.DTLS, HTTP: a.HTTP}
	t.Cleanup(func() {
		if s.proc != nil {
			s.proc.Kill()
		}
		if t.Failed() && s.logs != nil {
			t.Logf("server log:\n%s", s.Logs())
		}
	})
	return s
}

// SetConfig writes the config file; "{{data}}" in it becomes the data
// directory: <Dir>/data the first time, a new empty one on every later call
// (a server that lost its disk).
func (s *Server) SetConfig(config string) {
	data := filepath.Join(s.Dir, "data")
	if s.configured {
		var err error
		if data, err = os.MkdirTemp(s.Dir, "data"); err != nil {
			s.t.Fatal(err)
		}
	}
	s.configured = true
	config = strings.ReplaceAll(config, "{{data}}", data)
	if err := os.WriteFile(filepath.Join(s.Dir, "citypulse.yaml"), []byte(config), 0o600); err != nil {
		s.t.Fatal(err)
	}
}

// Pid is the running server's process id.
func (s *Server) Pid() int { return s.proc.Pid() }

// Start runs the binary and waits until its Probe (/readyz by default)
// answers 200.
func (s *Server) Start() {
	s.t.Helper()
	if s.logs == nil {
		s.logs = &SyncBuffer{}
	}
	probe := s.Probe
	if probe == "" {
		probe = ProbeReady
	}
	p, err := StartCityPulseProbe(s.bin, filepath.Join(s.Dir, "citypulse.yaml"),
		Addrs{MQTT: s.MQTT, CoAP: s.CoAP, DTLS: s.DTLS, HTTP: s.HTTP}, s.Env, s.logs, probe)
	if err != nil {
		s.t.Fatal(err)
	}
	s.proc = p
}

// Stop sends SIGTERM and requires a clean exit within 30 s.
func (s *Server) Stop() {
	s.t.Helper()
	if err := s.proc.Stop(30 * time.Second); err != nil {
		s.t.Fatalf("%v\n%s", err, s.Logs())
	}
}

// Kill sends SIGKILL: no chance to flush anything.
func (s *Server) Kill() {
	s.t.Helper()
	s.proc.Kill()
}

// Logs is what the server wrote so far.
func (s *Server) Logs() string {
	if s.logs == nil {
		return ""
	}
	return s.logs.String()
}

// SyncBuffer is a bytes.Buffer safe for a process's stdout and a reader at once.
type SyncBuffer = servers.SyncBuffer

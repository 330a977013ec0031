// Package servertest runs the real citypulse binary on free loopback ports for
// the integration tests of the commands.
package servertest

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
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
	// Below the ephemeral range: a port the kernel hands out for ":0" is
	// also what it gives the next outgoing connection (the tests open
	// thousands), so a server started on it a moment later could find it
	// taken. Ports under the range are never used as source ports.
	low := ephemeralLow()
	for range 200 {
		p := 10000 + rand.IntN(low-10000)
		if portFree(network, p) {
			return p
		}
	}
	t.Fatalf("no free %s port found in [10000, %d)", network, low)
	return 0
}

// ephemeralLow is the first port of the kernel's ephemeral range.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 11000 {
				return n
			}
		}
	}
	return 32768
}

func portFree(network string, p int) bool {
	addr := fmt.Sprintf("127.0.0.1:%d", p)
	if network == "udp" {
		c, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		c.Close()
		return true
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// Server is one run of the binary.
type Server struct {
	t                      testing.TB
	bin                    string
	MQTT, CoAP, DTLS, HTTP string   // host:port
	Dir                    string   // holds the config and the data dir
	Env                    []string // extra environment
	cmd                    *exec.Cmd
	logs                   *SyncBuffer
	exited                 chan error
	configured             bool
}

// New prepares a server in a fresh directory on free loopback ports, with env
// added to its environment; SetConfig writes its config before Start.
func New(t testing.TB, bin string, env ...string) *Server {
	t.Helper()
	s := &Server{t: t, bin: bin, Dir: t.TempDir(), Env: env,
		MQTT: fmt.Sprintf("127.0.0.1:%d", FreePort(t, "tcp")),
		CoAP: fmt.Sprintf("127.0.0.1:%d", FreePort(t, "udp")),
		DTLS: fmt.Sprintf("127.0.0.1:%d", FreePort(t, "udp")),
		HTTP: fmt.Sprintf("127.0.0.1:%d", FreePort(t, "tcp")),
	}
	t.Cleanup(func() {
		if s.cmd != nil && s.cmd.ProcessState == nil {
			_ = s.cmd.Process.Kill()
			<-s.exited
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
func (s *Server) Pid() int { return s.cmd.Process.Pid }

// Start runs the binary and waits until /readyz answers.
func (s *Server) Start() {
	t := s.t
	t.Helper()
	s.cmd = exec.Command(s.bin, "serve", "--config", filepath.Join(s.Dir, "citypulse.yaml"),
		"--mqtt-addr", s.MQTT, "--coap-addr", s.CoAP, "--dtls-addr", s.DTLS, "--http-addr", s.HTTP)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CITYPULSE_TEST_") { // test knobs, not config keys
			s.cmd.Env = append(s.cmd.Env, kv)
		}
	}
	s.cmd.Env = append(s.cmd.Env, s.Env...)
	if s.logs == nil {
		s.logs = &SyncBuffer{}
	}
	s.cmd.Stdout, s.cmd.Stderr = s.logs, s.logs
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.exited = make(chan error, 1)
	go func() { s.exited <- s.cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case err := <-s.exited:
			t.Fatalf("server exited during start-up: %v\n%s", err, s.Logs())
		default:
		}
		resp, err := http.Get("http://" + s.HTTP + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("server not ready after 60s\n%s", s.Logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop sends SIGTERM and requires a clean exit within 30 s.
func (s *Server) Stop() {
	s.t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		s.t.Fatal(err)
	}
	select {
	case err := <-s.exited:
		if err != nil {
			s.t.Fatalf("a graceful shutdown exits 0, got %v\n%s", err, s.Logs())
		}
	case <-time.After(30 * time.Second):
		s.t.Fatalf("server did not stop within 30s after SIGTERM\n%s", s.Logs())
	}
}

// Kill sends SIGKILL: no chance to flush anything.
func (s *Server) Kill() {
	s.t.Helper()
	if err := s.cmd.Process.Kill(); err != nil {
		s.t.Fatal(err)
	}
	<-s.exited
}

// Logs is what the server wrote so far.
func (s *Server) Logs() string {
	if s.logs == nil {
		return ""
	}
	return s.logs.String()
}

// SyncBuffer is a bytes.Buffer safe for a process's stdout and a reader at once.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Package servers runs the real servers that the integration tests and the
// load harness need (mosquitto, VictoriaMetrics, citypulse itself) as child
// processes on free loopback ports: started, probed until ready, measured
// (CPU time from /proc) and stopped. It needs no testing.TB, so that
// cmd/loadtest can run the same servers as the tests.
package servers

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is a server process: its output is collected, it is ready once its
// probe answers, and it stops with SIGTERM.
type Proc struct {
	Name   string
	Cmd    *exec.Cmd
	logs   *SyncBuffer
	exited chan error
	err    error // the exit status, once exited is drained
	done   bool
}

// StartProc starts args (in environment env, or the harness's own when nil;
// logs into logs or a new buffer) and waits up to timeout until ready returns nil.
// A process that exits or is not ready in time is killed and its output is in
// the error. The child gets SIGKILL if the starting thread dies, so a killed
// harness leaves no server behind.
func StartProc(name string, args, env []string, logs *SyncBuffer, ready func() error, timeout time.Duration) (*Proc, error) {
	if logs == nil {
		logs = &SyncBuffer{}
	}
	p := &Proc{Name: name, Cmd: exec.Command(args[0], args[1:]...), logs: logs, exited: make(chan error, 1)}
	p.Cmd.Env = env
	p.Cmd.Stdout, p.Cmd.Stderr = logs, logs
	p.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.Cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() { p.exited <- p.Cmd.Wait() }()
	deadline := time.Now().Add(timeout)
	for {
		if p.Exited() {
			return nil, fmt.Errorf("%s exited during start-up: %v\n%s", name, p.err, logs)
		}
		err := ready()
		if err == nil {
			return p, nil
		}
		if time.Now().After(deadline) {
			p.Kill()
			return nil, fmt.Errorf("%s not ready after %v: %v\n%s", name, timeout, err, logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Exited reports whether the process has ended (without waiting).
func (p *Proc) Exited() bool {
	if p.done {
		return true
	}
	select {
	case p.err = <-p.exited:
		p.done = true
	default:
	}
	return p.done
}

// Pid is the process id.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// Logs is what the process wrote so far.
func (p *Proc) Logs() string { return p.logs.String() }

// Stop sends SIGTERM and waits up to grace for the exit, then kills; the
// error is a non-zero exit or the need to kill.
func (p *Proc) Stop(grace time.Duration) error {
	if p.Exited() {
		return p.err
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case p.err = <-p.exited:
		p.done = true
		if p.err != nil {
			return fmt.Errorf("%s: a graceful shutdown exits 0, got %w", p.Name, p.err)
		}
		return nil
	case <-time.After(grace):
		p.Kill()
		return fmt.Errorf("%s did not stop within %v after SIGTERM (killed)", p.Name, grace)
	}
}

// Kill sends SIGKILL and waits for the exit.
func (p *Proc) Kill() {
	if p.Exited() {
		return
	}
	_ = p.Cmd.Process.Kill()
	p.err = <-p.exited
	p.done = true
}

// CPUTime is the user+system CPU time pid has used, from /proc/<pid>/stat
// (utime and stime are in clock ticks: sysconf(_SC_CLK_TCK), 100 on Linux).
func CPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	return parseStatCPU(string(b))
}

// clockTicks is USER_HZ: what the kernel reports in /proc is in these units
// whatever its internal HZ; glibc's sysconf(_SC_CLK_TCK) returns it.
const clockTicks = 100

func parseStatCPU(stat string) (time.Duration, error) {
	// the command name (field 2) is in parentheses and may hold spaces
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("/proc stat: no command name")
	}
	f := strings.Fields(stat[i+1:])
	// after the name: state(3) ... utime(14) stime(15)
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc stat: %d fields after the name", len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc stat: %w", err)
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// LookBinary finds a server binary on PATH or in ~/go/bin (go install).
func LookBinary(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	if home, _ := os.UserHomeDir(); home != "" {
		p := filepath.Join(home, "go", "bin", name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found on PATH or in ~/go/bin: run `make deps`", name)
}

// HTTPOK returns nil when GET u answers 2xx.
func HTTPOK(u string) error {
	resp, err := http.Get(u)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s: %s", u, resp.Status)
	}
	return nil
}

// Listening returns nil once addr accepts TCP connections.
func Listening(addr string) func() error {
	return func() error {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	}
}

// MosquittoConf is a loopback mosquitto for external-broker mode: anonymous,
// no persistence, no limit on queued or in-flight messages (CityPulse's
// persistent session holds a whole flood while it catches up).
func MosquittoConf(port int) string {
	return fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n", port)
}

// StartMosquitto runs mosquitto with MosquittoConf on a free port, its config
// in dir; it returns the process and its host:port.
func StartMosquitto(dir string) (*Proc, string, error) {
	return startOnFreePort("mosquitto", 10*time.Second, func(bin string, port int) ([]string, func() error, error) {
		conf := filepath.Join(dir, "mosquitto.conf")
		err := os.WriteFile(conf, []byte(MosquittoConf(port)), 0o644)
		return []string{bin, "-c", conf}, Listening(fmt.Sprintf("127.0.0.1:%d", port)), err
	})
}

// VictoriaMetricsArgs are the flags of a test VictoriaMetrics storing under
// dir and listening on addr. An at-least-once writer may resend a batch whose
// answer it lost: identical samples are deduplicated, as VictoriaMetrics
// recommends. Queries see the newest samples at once (no latency offset, no
// cache), so a harness can wait for the last one.
func VictoriaMetricsArgs(bin, dir, addr string) []string {
	return []string{bin, "-storageDataPath=" + dir, "-httpListenAddr=" + addr, "-loggerLevel=ERROR",
		"-dedup.minScrapeInterval=1ms", "-search.latencyOffset=0s", "-search.disableCache"}
}

// StartVictoriaMetrics runs VictoriaMetrics on a free port with its data in
// dir; it returns the process and its host:port. Stop it with SIGTERM (Stop),
// never SIGKILL: it answers 204 before a write leaves its in-memory buffer.
func StartVictoriaMetrics(dir string) (*Proc, string, error) {
	return startOnFreePort("victoria-metrics", 60*time.Second, func(bin string, port int) ([]string, func() error, error) {
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		return VictoriaMetricsArgs(bin, dir, addr), func() error { return HTTPOK("http://" + addr + "/health") }, nil
	})
}

// startOnFreePort finds the server binary name, picks a free loopback TCP
// port, gets the command line and readiness probe for it from setup, and
// starts it; it returns the process and its host:port.
func startOnFreePort(name string, timeout time.Duration, setup func(bin string, port int) ([]string, func() error, error)) (*Proc, string, error) {
	bin, err := LookBinary(name)
	if err != nil {
		return nil, "", err
	}
	port, err := FreePort("tcp")
	if err != nil {
		return nil, "", err
	}
	args, ready, err := setup(bin, port)
	if err != nil {
		return nil, "", err
	}
	p, err := StartProc(name, args, nil, nil, ready, timeout)
	return p, fmt.Sprintf("127.0.0.1:%d", port), err
}

// FreePort returns a loopback port that was free a moment ago.
func FreePort(network string) (int, error) {
	// Below the ephemeral range: a port the kernel hands out for ":0" is
	// also what it gives the next outgoing connection (the tests open
	// thousands), so a server started on it a moment later could find it
	// taken. Ports under the range are never used as source ports.
	low := ephemeralLow()
	for range 200 {
		p := 10000 + rand.IntN(low-10000)
		if portFree(network, p) {
			return p, nil
		}
	}
	return 0, fmt.Errorf("no free %s port found in [10000, %d)", network, low)
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

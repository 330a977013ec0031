// Package natstest runs real nats-server processes with JetStream on free
// loopback ports for integration tests: a cluster of N nodes (routes on
// loopback, each with its own store directory under t.TempDir()), with ways to
// stop, SIGKILL and restart a node; and two such clusters as the primary and
// standby sites of disaster recovery, linked by a leaf node through a proxy
// that can cut the link (site.go). It is used by the tests of package cluster
// and is meant for the server's tests too.
//
// The binary is nats-server 2.11 or later (priority groups with the pinned
// client policy); `make deps` installs v2.15.2 with go install.
package natstest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/citypulse/citypulse/internal/servers"
)

// Binary returns the path of nats-server, or skips the test with the reason
// when -short is set or the binary is not installed.
func Binary(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("starts nats-server processes: skipped under -short")
	}
	// The go-installed one first: a Debian nats-server (2.9) on the PATH is
	// too old for priority groups.
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if home, err := os.UserHomeDir(); err == nil {
			gopath = filepath.Join(home, "go")
		}
	}
	if p := filepath.Join(gopath, "bin", "nats-server"); gopath != "" && isExec(p) {
		return p
	}
	if p, err := exec.LookPath("nats-server"); err == nil {
		return p
	}
	t.Skip("nats-server not installed: run `make deps` (go install github.com/nats-io/nats-server/v2@v2.15.2)")
	return ""
}

func isExec(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// Cluster is a set of nats-server processes routed to each other.
type Cluster struct {
	t     testing.TB
	Nodes []*Node
}

// Node is one nats-server process of a cluster.
type Node struct {
	t       testing.TB
	bin     string
	Name    string
	Client  int // client port on 127.0.0.1
	Route   int // cluster (route) port
	Monitor int // HTTP monitoring port
	Dir     string

	cluster string // cluster name (routes); "citypulse-test" if empty
	domain  string // JetStream domain, if any
	extra   string // more configuration, appended (leaf nodes)

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	logs   syncBuffer
}

// Start starts an n-node cluster with JetStream (n = 1 gives a single server
// without routes) and waits until every node is healthy and JetStream has a
// meta leader. The processes are killed when the test ends.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	return start(t, n, nil)
}

// start starts an n-node cluster; setup, if not nil, may set each node's
// cluster name, domain and extra configuration before it is written.
func start(t testing.TB, n int, setup func(*Node)) *Cluster {
	t.Helper()
	bin := Binary(t)
	c := &Cluster{t: t}
	used := map[int]bool{}
	port := func() int { // free, and not already given to another node or role
		for {
			if p := FreePort(t); !used[p] {
				used[p] = true
				return p
			}
		}
	}
	for i := range n {
		c.Nodes = append(c.Nodes, &Node{t: t, bin: bin, Name: fmt.Sprintf("n%d", i),
			Client: port(), Route: port(), Monitor: port(), Dir: t.TempDir()})
	}
	for _, nd := range c.Nodes {
		if setup != nil {
			setup(nd)
		}
		nd.writeConfig(c.Nodes)
	}
	t.Cleanup(func() {
		for _, nd := range c.Nodes {
			nd.kill()
		}
		if t.Failed() {
			for _, nd := range c.Nodes {
				t.Logf("nats-server %s log (tail):\n%s", nd.Name, tail(nd.logs.String(), 4000))
			}
		}
	})
	for _, nd := range c.Nodes {
		nd.Start()
	}
	c.WaitReady(60 * time.Second)
	return c
}

// URL is the client URL list of every node (comma separated), for nats.Connect.
func (c *Cluster) URL() string {
	var urls []string
	for _, nd := range c.Nodes {
		urls = append(urls, nd.URL())
	}
	return strings.Join(urls, ",")
}

// URL is this node's client URL.
func (n *Node) URL() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.Client) }

func (n *Node) writeConfig(all []*Node) {
	var routes []string
	for _, o := range all {
		if o != n {
			routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", o.Route))
		}
	}
	domain := ""
	if n.domain != "" {
		domain = fmt.Sprintf("\n  domain: %s", n.domain)
	}
	conf := fmt.Sprintf(`server_name: %s
listen: 127.0.0.1:%d
http: 127.0.0.1:%d
jetstream {
  store_dir: %q
  max_memory_store: 64MB
  max_file_store: 2GB%s
}
`, n.Name, n.Client, n.Monitor, filepath.Join(n.Dir, "js"), domain)
	if len(all) > 1 {
		name := n.cluster
		if name == "" {
			name = "citypulse-test"
		}
		conf += fmt.Sprintf(`cluster {
  name: %s
  listen: 127.0.0.1:%d
  routes: [%s]
}
`, name, n.Route, strings.Join(routes, ", "))
	}
	conf += n.extra
	if err := os.WriteFile(filepath.Join(n.Dir, "nats.conf"), []byte(conf), 0o600); err != nil {
		n.t.Fatal(err)
	}
}

// Start (re)starts the node's process on its ports and store directory; it
// does not wait for it to be ready (see Cluster.WaitReady).
func (n *Node) Start() {
	n.t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil {
		n.t.Fatalf("nats-server %s is already running", n.Name)
	}
	cmd := exec.Command(n.bin, "-c", filepath.Join(n.Dir, "nats.conf"))
	cmd.Stdout, cmd.Stderr = &n.logs, &n.logs
	if err := cmd.Start(); err != nil {
		n.t.Fatalf("start nats-server %s: %v", n.Name, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	n.cmd, n.exited = cmd, exited
}

// Stop sends SIGTERM (nats-server shuts down cleanly, stepping down from any
// leadership) and waits up to 30 s for the process to exit.
func (n *Node) Stop() { n.signal(syscall.SIGTERM) }

// Kill sends SIGKILL: no chance to step down or flush.
func (n *Node) Kill() { n.signal(syscall.SIGKILL) }

// Restart starts a stopped or killed node again on the same ports and store.
func (n *Node) Restart() { n.Start() }

// Running reports whether the node's process is running.
func (n *Node) Running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd != nil
}

func (n *Node) signal(sig syscall.Signal) {
	n.t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return
	}
	_ = n.cmd.Process.Signal(sig)
	select {
	case <-n.exited:
	case <-time.After(30 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.exited
		n.t.Errorf("nats-server %s did not exit within 30s of %v", n.Name, sig)
	}
	n.cmd = nil
}

func (n *Node) kill() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil {
		_ = n.cmd.Process.Kill()
		<-n.exited
		n.cmd = nil
	}
}

// Logs is what the node's process wrote so far (every run of it).
func (n *Node) Logs() string { return n.logs.String() }

// WaitReady waits until every running node answers /healthz and reports a
// JetStream meta leader, or fails the test after timeout.
func (c *Cluster) WaitReady(timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if last = c.ready(); last == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("NATS cluster not ready after %v: %v", timeout, last)
}

func (c *Cluster) ready() error {
	running := map[string]bool{}
	for _, nd := range c.Nodes {
		running[nd.Name] = nd.Running()
	}
	for _, nd := range c.Nodes {
		if !running[nd.Name] {
			continue
		}
		l, err := nd.ready()
		if err != nil {
			return err
		}
		// A survivor names a killed leader until its election timer fires.
		if !running[l] {
			return fmt.Errorf("%s: meta leader %q is not running", nd.Name, l)
		}
	}
	return nil
}

// MetaLeader is the name of the JetStream meta leader as a running node sees
// it ("" if none).
func (c *Cluster) MetaLeader() string {
	for _, nd := range c.Nodes {
		if !nd.Running() {
			continue
		}
		if l, err := nd.metaLeader(); err == nil && l != "" && c.Node(l) != nil && c.Node(l).Running() {
			return l
		}
	}
	return ""
}

// Node returns the node with the given server name, or nil.
func (c *Cluster) Node(name string) *Node {
	for _, nd := range c.Nodes {
		if nd.Name == name {
			return nd
		}
	}
	return nil
}

// ready returns the meta leader the node sees, or why it is not ready.
func (n *Node) ready() (string, error) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", n.Monitor))
	if err != nil {
		return "", fmt.Errorf("%s: %w", n.Name, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: healthz %s", n.Name, resp.Status)
	}
	l, err := n.metaLeader()
	if err != nil {
		return "", err
	}
	if l == "" {
		return "", fmt.Errorf("%s: no JetStream meta leader yet", n.Name)
	}
	return l, nil
}

func (n *Node) metaLeader() (string, error) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/jsz", n.Monitor))
	if err != nil {
		return "", fmt.Errorf("%s: %w", n.Name, err)
	}
	defer resp.Body.Close()
	var jsz struct {
		Meta *struct {
			Leader string `json:"leader"`
		} `json:"meta_cluster"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&jsz); err != nil {
		return "", fmt.Errorf("%s: jsz: %w", n.Name, err)
	}
	if jsz.Meta == nil {
		return n.Name, nil // a single server without a cluster is its own leader
	}
	return jsz.Meta.Leader, nil
}

// FreePort returns a loopback TCP port that was free a moment ago, below the
// kernel's ephemeral range (servers.FreePort).
func FreePort(t testing.TB) int {
	t.Helper()
	p, err := servers.FreePort("tcp")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
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

// Pid is the running process's id (0 when it is not running).
func (n *Node) Pid() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return 0
	}
	return n.cmd.Process.Pid
}

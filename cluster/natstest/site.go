package natstest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// Two sites: a primary and a standby, each its own NATS cluster with its own
// JetStream domain, linked by a leaf-node connection from the standby to the
// primary. The link passes through Link, a loopback TCP proxy, so a test can
// cut it for real (every connection closed, new ones refused) and restore it.
//
// A leaf node, not a gateway: clusters joined by gateways form one
// super-cluster with ONE JetStream meta group across all their servers, so
// losing the primary's 3 servers would leave the standby without a meta
// quorum (no stream could be created or edited, so no promotion). Leaf-node
// sites with separate domains keep two independent JetStream systems; the
// standby reaches the primary's streams through the domain's API prefix
// ($JS.<domain>.API), which is what a cross-domain mirror uses.

// Sites is a primary site, a standby site and the link between them.
type Sites struct {
	Primary *Cluster
	Standby *Cluster
	Link    *Link
}

// SiteDomains are the JetStream domains of the two sites.
const (
	PrimaryDomain = "primary"
	StandbyDomain = "standby"
)

// DeniedOnLink are the subjects the link does not carry in either direction:
// devices' readings and key-value writes stay on the site they were published
// at (a stream at each site listening on citypulse.readings.* after a
// promotion must not also store the other site's publishes); only JetStream's
// API and mirror traffic cross.
var DeniedOnLink = []string{"citypulse.>", "$KV.>"}

// StartSites starts a primary cluster of primaryNodes servers (domain
// "primary", listening for leaf nodes) and a standby cluster of standbyNodes
// servers (domain "standby") whose servers connect to the primary through a
// Link. It returns once both sites are ready and the link is up.
func StartSites(t testing.TB, primaryNodes, standbyNodes int) *Sites {
	t.Helper()
	leafPorts := map[string]int{}
	var mu sync.Mutex
	primary := start(t, primaryNodes, func(n *Node) {
		p := FreePort(t)
		mu.Lock()
		leafPorts[n.Name] = p
		mu.Unlock()
		n.Name = "p" + strings.TrimPrefix(n.Name, "n")
		n.cluster, n.domain = "primary", PrimaryDomain
		n.extra = fmt.Sprintf("leafnodes {\n  listen: 127.0.0.1:%d\n  no_advertise: true\n}\n", p)
	})
	var targets []int
	for _, p := range leafPorts {
		targets = append(targets, p)
	}
	link := NewLink(t, targets)
	deny := `"` + strings.Join(DeniedOnLink, `", "`) + `"`
	standby := start(t, standbyNodes, func(n *Node) {
		n.Name = "s" + strings.TrimPrefix(n.Name, "n")
		n.cluster, n.domain = "standby", StandbyDomain
		n.extra = fmt.Sprintf(`leafnodes {
  reconnect: "1s"
  remotes: [{
    url: "nats-leaf://127.0.0.1:%d"
    deny_imports: [%s]
    deny_exports: [%s]
  }]
}
`, link.Port(), deny, deny)
	})
	s := &Sites{Primary: primary, Standby: standby, Link: link}
	s.WaitLinked(60 * time.Second)
	return s
}

// WaitLinked waits until every running standby server has a leaf-node
// connection to the primary, or fails the test.
func (s *Sites) WaitLinked(timeout time.Duration) {
	s.Standby.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if s.Linked() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.Standby.t.Fatalf("standby site not linked to the primary after %v", timeout)
}

// Linked reports whether every running standby server has a leaf connection.
func (s *Sites) Linked() bool {
	for _, nd := range s.Standby.Nodes {
		if nd.Running() && nd.leafs() < 1 {
			return false
		}
	}
	return true
}

func (n *Node) leafs() int {
	var v struct {
		Leafs int `json:"leafnodes"`
	}
	if err := n.getJSON("/varz", &v); err != nil {
		return 0
	}
	return v.Leafs
}

// Link is a loopback TCP proxy carrying the leaf-node connections from the
// standby to the primary's leaf-node listeners (the first that accepts).
type Link struct {
	t       testing.TB
	port    int
	targets []int

	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// NewLink starts a proxy on a free loopback port forwarding to the targets
// (loopback ports); it is closed when the test ends.
func NewLink(t testing.TB, targets []int) *Link {
	t.Helper()
	l := &Link{t: t, port: FreePort(t), targets: targets, conns: map[net.Conn]struct{}{}}
	l.Restore()
	t.Cleanup(l.Cut)
	return l
}

// Port is the proxy's loopback port.
func (l *Link) Port() int { return l.port }

// Cut closes the listener and every connection through the link: both sites
// see their leaf connections drop, and reconnects are refused until Restore.
func (l *Link) Cut() {
	l.mu.Lock()
	if l.ln != nil {
		_ = l.ln.Close()
		l.ln = nil
	}
	for c := range l.conns {
		_ = c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
}

// Restore listens again (after Cut); the standby reconnects within a second.
func (l *Link) Restore() {
	l.t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ln != nil {
		return
	}
	var err error
	for range 50 { // the port may linger briefly after Cut
		var ln net.Listener
		if ln, err = net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", l.port)); err == nil {
			l.ln = ln
			l.wg.Add(1)
			go l.accept(ln)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	l.t.Fatalf("link: listen on %d: %v", l.port, err)
}

func (l *Link) accept(ln net.Listener) {
	defer l.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		up, err := l.dial()
		if err != nil || !l.track(c, up) {
			_ = c.Close()
			if up != nil {
				_ = up.Close()
			}
			continue
		}
		l.wg.Add(2)
		go l.pipe(c, up)
		go l.pipe(up, c)
	}
}

func (l *Link) dial() (net.Conn, error) {
	var errs []error
	for _, p := range l.targets {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p), time.Second)
		if err == nil {
			return c, nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// track registers a proxied pair unless the link was cut meanwhile.
func (l *Link) track(a, b net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ln == nil {
		return false
	}
	l.conns[a], l.conns[b] = struct{}{}, struct{}{}
	return true
}

func (l *Link) pipe(dst, src net.Conn) {
	defer l.wg.Done()
	_, _ = io.Copy(dst, src)
	_ = dst.Close()
	_ = src.Close()
	l.mu.Lock()
	delete(l.conns, dst)
	delete(l.conns, src)
	l.mu.Unlock()
}

func (n *Node) getJSON(path string, v any) error {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s", n.Monitor, path))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(v)
}

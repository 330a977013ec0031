package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// memberSubject carries the nodes' heartbeats: citypulse.cluster.member.<node
// id>, a JSON heartbeat. (Nodes before cluster.node_id announced themselves
// on citypulse.cluster.alive.<index>: the two never read each other's.)
const memberSubject = "citypulse.cluster.member"

// heartbeat is what a node announces every cluster.alive_interval, and once
// with Leave on a clean shutdown.
type heartbeat struct {
	// Inc is the node's incarnation: random, new at each start. Two
	// processes announcing one id with different incarnations are a
	// misconfiguration (cluster.node_id not unique), logged.
	Inc   string `json:"inc"`
	Leave bool   `json:"leave,omitempty"`
	// Owns are the partitions pinned to the node (for /api/v1/cluster;
	// ownership itself is JetStream's pin), Pulls those it pulls: a node
	// standing in for a partition hands it over once its preferred node
	// pulls it.
	Owns  []int `json:"owns,omitempty"`
	Pulls []int `json:"pulls,omitempty"`
}

// peer is another node as last heard of.
type peer struct {
	seen time.Time
	hb   heartbeat
}

// members tracks which nodes were heard of recently, and from that which
// node prefers which partition (Assign over the live nodes). It only
// decides which partitions a node pulls; exclusivity comes from the pinned
// consumers, so two nodes that disagree about who is alive never consume a
// partition together.
type members struct {
	self    string
	inc     string
	bound   int // partitions
	timeout time.Duration
	now     func() time.Time

	mu      sync.Mutex
	started time.Time
	peers   map[string]*peer
	// assign caches Assign over the live set named by key, which has not
	// changed since stable.
	key    string
	assign []string
	stable time.Time
}

func newMembers(self string, partitions int, timeout time.Duration) *members {
	return &members{self: self, inc: newIncarnation(), bound: partitions, timeout: timeout, now: time.Now, peers: map[string]*peer{}}
}

// newIncarnation is 64 random bits in hex.
func newIncarnation() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}

func (m *members) start() {
	m.mu.Lock()
	m.started = m.now()
	m.mu.Unlock()
}

// heard records id's heartbeat; conflict reports a heartbeat of this node's
// id from another incarnation (two nodes configured with one id).
func (m *members) heard(id string, hb heartbeat) (conflict bool) {
	if id == m.self {
		return hb.Inc != m.inc
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if hb.Leave {
		if p := m.peers[id]; p != nil && p.hb.Inc == hb.Inc {
			delete(m.peers, id)
		}
		return false
	}
	m.peers[id] = &peer{seen: m.now(), hb: hb}
	return false
}

// liveLocked returns the ids of this node and the others heard of within
// the timeout, sorted; it forgets the others.
func (m *members) liveLocked(now time.Time) []string {
	ids := []string{m.self}
	for id, p := range m.peers {
		if now.Sub(p.seen) < m.timeout {
			ids = append(ids, id)
		} else {
			delete(m.peers, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// assignmentLocked is Assign over the live nodes (cached while they stay).
func (m *members) assignmentLocked(live []string, now time.Time) []string {
	key := strings.Join(live, " ")
	if key != m.key || m.assign == nil {
		m.key, m.assign, m.stable = key, Assign(m.bound, live), now
	}
	return m.assign
}

// view is the cluster as this node sees it now: the live nodes (sorted),
// each one's heartbeat (this node's: zero), the preferred node of each
// partition.
func (m *members) view() (live []string, beats map[string]heartbeat, preferred []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	live = m.liveLocked(m.now())
	beats = make(map[string]heartbeat, len(live))
	for _, id := range live {
		if p := m.peers[id]; p != nil {
			beats[id] = p.hb
		}
	}
	return live, beats, slices.Clone(m.assignmentLocked(live, m.now()))
}

// shouldPull reports whether this node pulls partition p: it is p's
// preferred node among the live ones; or it owns p (stands in for it) and
// may not release it yet. A stand-in keeps p until the preferred node waits
// on p's consumer (its heartbeat lists p as pulled: it is past its start)
// and the live set has not changed for an alive timeout, then releases it
// (rebalance on join). The second condition damps flaps: a node whose
// heartbeats are late for a moment (a loaded machine) changes the others'
// live set, and with it the preference of a few partitions between nodes
// that are all alive (Assign's bound); those stay put unless the change
// lasts. For one alive timeout after the start a node pulls nothing: it
// has not yet heard the others.
func (m *members) shouldPull(p int, owned bool) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	if now.Sub(m.started) < m.timeout {
		return false
	}
	pref := m.assignmentLocked(m.liveLocked(now), now)[p]
	if pref == m.self {
		return true
	}
	if !owned {
		return false
	}
	peer := m.peers[pref]
	return peer == nil || !slices.Contains(peer.hb.Pulls, p) || now.Sub(m.stable) < m.timeout
}

// announce publishes this node's heartbeat every interval until ctx is
// done, then a leave so the others take its partitions at once. It keeps
// the members gauges.
func (m *members) announce(ctx context.Context, nc *nats.Conn, interval time.Duration, owned, pulling func() []int, mt *Metrics) {
	subj := memberSubject + "." + m.self
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		b, _ := json.Marshal(heartbeat{Inc: m.inc, Owns: owned(), Pulls: pulling()})
		_ = nc.Publish(subj, b)
		live, _, pref := m.view()
		mt.alive.Set(float64(len(live)))
		mt.preferred.Set(float64(countOf(pref, m.self)))
		select {
		case <-ctx.Done():
			b, _ := json.Marshal(heartbeat{Inc: m.inc, Leave: true})
			_ = nc.Publish(subj, b)
			_ = nc.Flush()
			return
		case <-t.C:
		}
	}
}

// listen records the others' heartbeats; a heartbeat of this node's id
// from another process is logged (at most once a minute).
func (m *members) listen(nc *nats.Conn, log *slog.Logger) (*nats.Subscription, error) {
	var warned time.Time
	return nc.Subscribe(memberSubject+".*", func(msg *nats.Msg) {
		id := msg.Subject[len(memberSubject)+1:]
		hb, ok := parseHeartbeat(msg.Data, m.bound)
		if !ok || checkNodeID(id) != nil {
			return
		}
		if m.heard(id, hb) && time.Since(warned) > time.Minute {
			warned = time.Now()
			log.Error("another process announces this node's cluster.node_id: give each node its own (the partitions' spread is wrong until then; exclusivity holds)",
				"node_id", id, "incarnation", m.inc, "other_incarnation", hb.Inc)
		}
	})
}

// parseHeartbeat reads a heartbeat; partitions outside [0, bound) are
// dropped, and lists are cut at bound entries. ok is false for anything
// that is not a heartbeat.
func parseHeartbeat(b []byte, bound int) (hb heartbeat, ok bool) {
	if json.Unmarshal(b, &hb) != nil || hb.Inc == "" {
		return heartbeat{}, false
	}
	keep := func(ps []int) []int {
		var out []int
		for _, p := range ps {
			if p >= 0 && p < bound && len(out) < bound {
				out = append(out, p)
			}
		}
		return out
	}
	hb.Owns, hb.Pulls = keep(hb.Owns), keep(hb.Pulls)
	if hb.Leave {
		hb.Owns, hb.Pulls = nil, nil
	}
	return hb, true
}

// countOf counts the partitions assigned to id.
func countOf(assign []string, id string) int {
	n := 0
	for _, a := range assign {
		if a == id {
			n++
		}
	}
	return n
}

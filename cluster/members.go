package cluster

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// aliveSubject carries the nodes' heartbeats: citypulse.cluster.alive.<index>
// with payload "alive" or "leave" (a clean shutdown).
const aliveSubject = "citypulse.cluster.alive"

// members tracks which nodes were heard of recently. It only decides which
// partitions a node pulls; exclusivity comes from the pinned consumers, so two
// nodes that disagree about who is alive never consume a partition together.
type members struct {
	self    int
	n       int
	bound   int // partitions
	timeout time.Duration
	now     func() time.Time

	mu      sync.Mutex
	started time.Time
	seen    []time.Time // zero: never heard of, or left
	owns    [][]int     // the partitions each node said it owned in its last heartbeat
}

func newMembers(self, n int, timeout time.Duration) *members {
	return &members{self: self, n: n, timeout: timeout, now: time.Now, seen: make([]time.Time, n), owns: make([][]int, n)}
}

func (m *members) start() {
	m.mu.Lock()
	m.started = m.now()
	m.mu.Unlock()
}

func (m *members) heard(index int, leave bool, owns []int) {
	if index < 0 || index >= m.n || index == m.self {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if leave {
		m.seen[index] = time.Time{}
		m.owns[index] = nil
		return
	}
	m.seen[index] = m.now()
	m.owns[index] = owns
}

// alive returns the other nodes heard of within the timeout, and the
// partitions each said it owned.
func (m *members) alive() map[int][]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	out := map[int][]int{}
	for i, t := range m.seen {
		if !t.IsZero() && now.Sub(t) < m.timeout {
			out[i] = m.owns[i]
		}
	}
	return out
}

// shouldPull reports whether this node pulls partition p: the nodes before it
// in p's order (preferredRank) are all gone. For one alive timeout after the
// start, a node pulls only its preferred partitions (it has not yet heard the
// others); after that, a node never heard of counts as gone.
func (m *members) shouldPull(p int) bool {
	rank := preferredRank(p, m.self, m.n)
	if rank == 0 {
		return true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	if now.Sub(m.started) < m.timeout {
		return false
	}
	for k := 0; k < rank; k++ {
		node := (p%m.n + k) % m.n
		if t := m.seen[node]; !t.IsZero() && now.Sub(t) < m.timeout {
			return false
		}
	}
	return true
}

// announce publishes this node's heartbeat every interval until ctx is done,
// then a "leave" so the others take its partitions at once. A heartbeat is
// "alive" and the partitions the node owns: "alive 0,3,6" (for
// /api/v1/cluster; ownership itself is JetStream's pin).
func announce(ctx context.Context, nc *nats.Conn, self int, interval time.Duration, owned func() []int) {
	subj := aliveSubject + "." + strconv.Itoa(self)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		_ = nc.Publish(subj, heartbeat(owned()))
		select {
		case <-ctx.Done():
			_ = nc.Publish(subj, []byte("leave"))
			_ = nc.Flush()
			return
		case <-t.C:
		}
	}
}

// listen records the others' heartbeats.
func (m *members) listen(nc *nats.Conn) (*nats.Subscription, error) {
	return nc.Subscribe(aliveSubject+".*", func(msg *nats.Msg) {
		i, err := strconv.Atoi(msg.Subject[len(aliveSubject)+1:])
		if err != nil {
			return
		}
		leave, owns := parseHeartbeat(msg.Data, m.bound)
		m.heard(i, leave, owns)
	})
}

// heartbeat is the payload of an "alive" heartbeat owning owned.
func heartbeat(owned []int) []byte {
	b := []byte("alive")
	for i, p := range owned {
		if i == 0 {
			b = append(b, ' ')
		} else {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, int64(p), 10)
	}
	return b
}

// parseHeartbeat reads a heartbeat; partitions outside [0, bound) and
// anything unreadable are ignored (an old node's plain "alive" owns none
// as far as this node can tell).
func parseHeartbeat(b []byte, bound int) (leave bool, owns []int) {
	s := string(b)
	if s == "leave" {
		return true, nil
	}
	_, list, ok := strings.Cut(s, " ")
	if !ok {
		return false, nil
	}
	for f := range strings.SplitSeq(list, ",") {
		if p, err := strconv.Atoi(f); err == nil && p >= 0 && p < bound && len(owns) < bound {
			owns = append(owns, p)
		}
	}
	return false, owns
}

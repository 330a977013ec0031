package clusterstate

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// maxNodes bounds the partials kept (one per node id heard of).
const maxNodes = 256

// exchange is the partial exchange that the roll-ups and the fleet rules
// share: every interval each node publishes its partial on <subject>.<node>,
// and every node keeps the latest partial heard from each other node, so
// that the lease holder can combine them. A partial older than two
// intervals (by this node's clock) is left out and forgotten: its node is
// gone, and what it reported is reported again by the new owners.
type exchange[P any] struct {
	nc       *nats.Conn
	subject  string // without the node token
	node     string
	interval time.Duration
	what     string            // for the logs: "roll-ups", "fleet rules"
	sent     func(P) time.Time // the sender's time of a partial
	log      *slog.Logger

	mu    sync.Mutex
	parts map[string]heard[P] // node id → its latest partial
}

// heard is a partial and when it arrived, by this node's clock: the nodes'
// clocks need not agree.
type heard[P any] struct {
	p  P
	at time.Time
}

func newExchange[P any](nc *nats.Conn, subject, node string, interval time.Duration, what string,
	sent func(P) time.Time, log *slog.Logger) (*exchange[P], error) {
	if node == "" || strings.ContainsAny(node, ".*> ") {
		return nil, fmt.Errorf("%s: node id %q must be a non-empty NATS subject token", what, node)
	}
	if interval <= 0 {
		return nil, fmt.Errorf("%s: interval must be > 0, got %v", what, interval)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &exchange[P]{nc: nc, subject: subject, node: node, interval: interval, what: what, sent: sent, log: log,
		parts: map[string]heard[P]{}}, nil
}

// subscribe starts keeping the other nodes' partials.
func (x *exchange[P]) subscribe() (*nats.Subscription, error) {
	s, err := x.nc.Subscribe(x.subject+".*", x.receive)
	if err != nil {
		return nil, fmt.Errorf("%s: subscribe to %s.*: %w", x.what, x.subject, err)
	}
	return s, nil
}

// receive keeps another node's partial unless an earlier-sent one would
// replace a later one; at most maxNodes nodes are kept.
func (x *exchange[P]) receive(m *nats.Msg) {
	node := m.Subject[len(x.subject)+1:]
	if node == x.node {
		return
	}
	var p P
	if err := json.Unmarshal(m.Data, &p); err != nil {
		x.log.Warn(x.what+": unreadable partial; left out", "node", node, "err", err)
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	old, ok := x.parts[node]
	if !ok && len(x.parts) >= maxNodes {
		return
	}
	if !ok || x.sent(p).After(x.sent(old.p)) {
		x.parts[node] = heard[P]{p: p, at: time.Now()}
	}
}

// publish sends this node's partial; a failure is logged with what it
// costs (consequence), and the round goes on.
func (x *exchange[P]) publish(own P, consequence string) {
	b, err := json.Marshal(own)
	if err != nil {
		x.log.Error(x.what+": cannot encode the partial", "err", err)
		return
	}
	if err := x.nc.Publish(x.subject+"."+x.node, b); err != nil {
		x.log.Warn(x.what+": cannot publish the partial; "+consequence, "err", err, "bytes", len(b))
	}
}

// heardSince is the other nodes' partials heard within two intervals of now;
// older ones are forgotten.
func (x *exchange[P]) heardSince(now time.Time) []heard[P] {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := make([]heard[P], 0, len(x.parts))
	for node, h := range x.parts {
		if now.Sub(h.at) > 2*x.interval {
			delete(x.parts, node)
			continue
		}
		out = append(out, h)
	}
	return out
}

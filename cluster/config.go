package cluster

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
)

// Config configures cluster mode. Keys are under cluster.* in the server's
// config file.
type Config struct {
	// Stream is the JetStream stream holding reading batches.
	Stream string `mapstructure:"stream" yaml:"stream"`
	// Partitions is the number of partitions P (device → FNV-1a mod P). It must
	// be the same on every node and gateway.
	Partitions int `mapstructure:"partitions" yaml:"partitions"`
	// Replicas is the stream's replication factor (3 in production: a batch is
	// acknowledged once a majority of 3 servers stored it; 1 for a single server).
	Replicas int `mapstructure:"replicas" yaml:"replicas"`
	// MaxAge bounds how long batches stay in the stream (consumed or not).
	MaxAge time.Duration `mapstructure:"max_age" yaml:"max_age"`
	// MaxBytes bounds the stream's size; when full, appends fail (nothing is
	// discarded silently). 0 means no limit.
	MaxBytes int64 `mapstructure:"max_bytes" yaml:"max_bytes"`
	// DuplicateWindow is how long JetStream remembers a batch's message id to
	// drop a resent copy.
	DuplicateWindow time.Duration `mapstructure:"duplicate_window" yaml:"duplicate_window"`

	// MaxInFlight bounds the batches published and not yet acknowledged; an
	// append beyond it waits (up to PublishTimeout).
	MaxInFlight int `mapstructure:"max_in_flight" yaml:"max_in_flight"`
	// PublishTimeout bounds the wait for JetStream's acknowledgement of a batch.
	PublishTimeout time.Duration `mapstructure:"publish_timeout" yaml:"publish_timeout"`
	// PublishLinger is how long a gateway's publisher waits for more
	// submissions to a partition before it publishes a batch (0: at once;
	// while a partition's batch awaits its acknowledgement the next ones
	// collect anyway). Larger batches cost JetStream less per reading and
	// add this much to a device's acknowledgement (docs/cluster.md, sizing).
	PublishLinger time.Duration `mapstructure:"publish_linger" yaml:"publish_linger"`

	// NodeID names this node, unique in the cluster and stable across its
	// restarts (default: the host name, its characters outside [A-Za-z0-9_-]
	// replaced by "_"). The live nodes are those heard of recently; each
	// prefers the partitions rendezvous hashing assigns it among them
	// (Assign), so nodes join and leave without a change to the others.
	NodeID string `mapstructure:"node_id" yaml:"node_id"`
	// Group is the priority group of the partition consumers.
	Group string `mapstructure:"group" yaml:"group"`
	// PinnedTTL is how long JetStream keeps a partition pinned to a node that
	// stopped pulling (crashed or cut off) before another node gets it.
	PinnedTTL time.Duration `mapstructure:"pinned_ttl" yaml:"pinned_ttl"`
	// AckWait is how long a delivered, unacknowledged batch waits before it is
	// delivered again; below PinnedTTL, so a new owner gets the old owner's
	// unacknowledged batches first.
	AckWait time.Duration `mapstructure:"ack_wait" yaml:"ack_wait"`
	// MaxAckPending bounds the unacknowledged batches per partition. With
	// acknowledgements after the shared store (cluster.ack_after_sinks) a
	// partition has a store flush's batches in flight: it must hold its
	// batches per second times the sink's batch.max_age plus a write, or
	// the partition is consumed no faster than MaxAckPending per flush.
	MaxAckPending int `mapstructure:"max_ack_pending" yaml:"max_ack_pending"`
	// MaxBatch bounds the batches handed to the handler in one call.
	MaxBatch int `mapstructure:"max_batch" yaml:"max_batch"`
	// Settle is how long a node that gains a partition collects batches at
	// least before the first call of the handler, to put redelivered batches
	// back in stream order. It then waits on (up to 2 × AckWait) while the
	// consumer has batches delivered and unacknowledged elsewhere (the
	// previous owner's), so that none is handled after a newer one.
	Settle time.Duration `mapstructure:"settle" yaml:"settle"`
	// AliveInterval is how often a node announces itself; a node not heard of
	// for AliveTimeout is taken as gone and its partitions are assigned to
	// the others. A starting node pulls nothing for AliveTimeout (it hears
	// the live nodes first).
	AliveInterval time.Duration `mapstructure:"alive_interval" yaml:"alive_interval"`
	AliveTimeout  time.Duration `mapstructure:"alive_timeout" yaml:"alive_timeout"`
}

// Default returns the defaults: 64 partitions, R3, a 4 s pin, 3 s ack wait.
func Default() Config {
	return Config{
		Stream:          "CITYPULSE_READINGS",
		Partitions:      64,
		Replicas:        3,
		MaxAge:          24 * time.Hour,
		DuplicateWindow: 2 * time.Minute,
		MaxInFlight:     1024,
		PublishTimeout:  5 * time.Second,
		NodeID:          DefaultNodeID(),
		Group:           "citypulse",
		PinnedTTL:       4 * time.Second,
		AckWait:         3 * time.Second,
		MaxAckPending:   1024,
		MaxBatch:        64,
		Settle:          200 * time.Millisecond,
		AliveInterval:   500 * time.Millisecond,
		AliveTimeout:    2 * time.Second,
	}
}

// Validate checks the config; messages name the key.
func (c Config) Validate() error {
	var errs []error
	if c.Stream == "" {
		errs = append(errs, errors.New("cluster.stream must not be empty"))
	}
	if c.Partitions < 1 || c.Partitions > 4096 {
		errs = append(errs, fmt.Errorf("cluster.partitions must be in [1, 4096], got %d", c.Partitions))
	}
	if c.Replicas != 1 && c.Replicas != 3 && c.Replicas != 5 {
		errs = append(errs, fmt.Errorf("cluster.replicas must be 1, 3 or 5, got %d", c.Replicas))
	}
	if c.MaxAge <= 0 || c.DuplicateWindow <= 0 || c.DuplicateWindow > c.MaxAge {
		errs = append(errs, fmt.Errorf("cluster.max_age (%v) and cluster.duplicate_window (%v) must be > 0, the window no longer than the age", c.MaxAge, c.DuplicateWindow))
	}
	if c.MaxBytes < 0 {
		errs = append(errs, fmt.Errorf("cluster.max_bytes must be >= 0, got %d", c.MaxBytes))
	}
	if c.PublishLinger < 0 || c.PublishLinger > c.PublishTimeout/2 {
		errs = append(errs, fmt.Errorf("cluster.publish_linger must be in [0, cluster.publish_timeout/2], got %v", c.PublishLinger))
	}
	if c.MaxInFlight < 1 || c.PublishTimeout <= 0 {
		errs = append(errs, fmt.Errorf("cluster.max_in_flight (%d) and cluster.publish_timeout (%v) must be > 0", c.MaxInFlight, c.PublishTimeout))
	}
	if err := checkNodeID(c.NodeID); err != nil {
		errs = append(errs, err)
	}
	if c.Group == "" {
		errs = append(errs, errors.New("cluster.group must not be empty"))
	}
	if c.PinnedTTL < 2*time.Second {
		// Pull requests expire after PinnedTTL/2 and JetStream wants at least 1 s.
		errs = append(errs, fmt.Errorf("cluster.pinned_ttl must be at least 2s, got %v", c.PinnedTTL))
	}
	if c.AckWait <= 0 || c.AckWait >= c.PinnedTTL {
		errs = append(errs, fmt.Errorf("cluster.ack_wait must be > 0 and below cluster.pinned_ttl (%v), got %v: a new owner must get the old owner's unacknowledged batches first", c.PinnedTTL, c.AckWait))
	}
	if c.MaxAckPending < 1 || c.MaxBatch < 1 || c.MaxBatch > c.MaxAckPending {
		errs = append(errs, fmt.Errorf("cluster.max_batch (%d) must be in [1, cluster.max_ack_pending (%d)]", c.MaxBatch, c.MaxAckPending))
	}
	if c.Settle < 0 || c.Settle >= c.AckWait {
		errs = append(errs, fmt.Errorf("cluster.settle must be in [0, cluster.ack_wait), got %v", c.Settle))
	}
	if c.AliveInterval <= 0 || c.AliveTimeout < 2*c.AliveInterval {
		errs = append(errs, fmt.Errorf("cluster.alive_timeout (%v) must be at least twice cluster.alive_interval (%v)", c.AliveTimeout, c.AliveInterval))
	}
	return errors.Join(errs...)
}

// maxNodeID bounds cluster.node_id: it is a NATS subject token and the prefix
// of every message id the node's gateways publish.
const maxNodeID = 64

// checkNodeID accepts 1 to 64 characters of [A-Za-z0-9_-]: a NATS subject
// token (no ".", "*", ">" or space) that also reads well in logs.
func checkNodeID(id string) error {
	if id == "" || len(id) > maxNodeID || strings.IndexFunc(id, func(r rune) bool { return !idChar(r) }) >= 0 {
		return fmt.Errorf("cluster.node_id must be 1 to %d characters of A-Z, a-z, 0-9, _ and - (unique in the cluster, stable across restarts), got %q", maxNodeID, id)
	}
	return nil
}

func idChar(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-'
}

// DefaultNodeID is the host name with the characters a node id may not hold
// replaced by "_" (node1.example.org: node1_example_org), at most 64 of
// them; "" if the host name is unknown (Validate then asks for
// cluster.node_id).
func DefaultNodeID() string {
	h, err := os.Hostname()
	if err != nil {
		return ""
	}
	id := strings.Map(func(r rune) rune {
		if idChar(r) {
			return r
		}
		return '_'
	}, h)
	if len(id) > maxNodeID {
		id = id[:maxNodeID]
	}
	return id
}

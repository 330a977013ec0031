package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// StateConfig configures where the state that moves with a partition is kept
// (keys under cluster.state.*).
type StateConfig struct {
	// Bucket is the object store of the partition snapshots.
	Bucket string `mapstructure:"bucket" yaml:"bucket"`
	// Stream holds the transitions since the snapshots, and the pending
	// notifications.
	Stream string `mapstructure:"stream" yaml:"stream"`
	// Replicas of the bucket and the stream (3 in production).
	Replicas int `mapstructure:"replicas" yaml:"replicas"`
	// Checkpoint is how often an owned partition's snapshot is written (and
	// its log purged); a new owner replays at most this much of the log.
	Checkpoint time.Duration `mapstructure:"checkpoint" yaml:"checkpoint"`
	// MaxBytes bounds the stream; when full, transitions are not recorded
	// (and notified all the same, logged as errors). 0: no limit.
	MaxBytes int64 `mapstructure:"max_bytes" yaml:"max_bytes"`
	// Devices is the key-value bucket of the runtime device changes (with
	// the devices' secrets: see docs/cluster.md for its access control).
	Devices string `mapstructure:"devices_bucket" yaml:"devices_bucket"`
	// Silences is the key-value bucket of the operators' silences and
	// acknowledgements, watched by every node.
	Silences string `mapstructure:"silences_bucket" yaml:"silences_bucket"`
	// Leases is the key-value bucket of the leases (the node that combines
	// the city roll-ups), LeaseTTL how long a lease outlives its last renewal.
	Leases   string        `mapstructure:"leases_bucket" yaml:"leases_bucket"`
	LeaseTTL time.Duration `mapstructure:"lease_ttl" yaml:"lease_ttl"`
}

// DefaultState returns the defaults: CITYPULSE_STATE, R3, a snapshot every 10 s.
func DefaultState() StateConfig {
	return StateConfig{Bucket: "CITYPULSE_STATE", Stream: "CITYPULSE_STATE_LOG", Replicas: 3,
		Checkpoint: 10 * time.Second, MaxBytes: 1 << 30, Devices: "CITYPULSE_DEVICES", Silences: "CITYPULSE_SILENCES", Leases: "CITYPULSE_LEASES",
		LeaseTTL: 6 * time.Second}
}

// Validate checks the config; messages name the key.
func (c StateConfig) Validate() error {
	var errs []error
	if c.Bucket == "" || c.Stream == "" || c.Devices == "" || c.Silences == "" || c.Leases == "" {
		errs = append(errs, errors.New("cluster.state.bucket, stream, devices_bucket, silences_bucket and leases_bucket must not be empty"))
	}
	if c.LeaseTTL < time.Second {
		errs = append(errs, fmt.Errorf("cluster.state.lease_ttl must be at least 1s, got %v", c.LeaseTTL))
	}
	if c.Replicas != 1 && c.Replicas != 3 && c.Replicas != 5 {
		errs = append(errs, fmt.Errorf("cluster.state.replicas must be 1, 3 or 5, got %d", c.Replicas))
	}
	if c.Checkpoint < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("cluster.state.checkpoint must be at least 100ms, got %v", c.Checkpoint))
	}
	if c.MaxBytes < 0 {
		errs = append(errs, fmt.Errorf("cluster.state.max_bytes must be >= 0, got %d", c.MaxBytes))
	}
	return errors.Join(errs...)
}

// StateMetrics are the state store's metrics.
type StateMetrics struct {
	appends        *prometheus.CounterVec
	checkpoints    *prometheus.CounterVec
	snapshotBytes  prometheus.Histogram
	restoreSeconds prometheus.Histogram
}

// NewStateMetrics builds the metrics and registers them with reg (nil: not registered).
func NewStateMetrics(reg prometheus.Registerer) *StateMetrics {
	m := &StateMetrics{
		appends: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_cluster_state_transitions_total",
			Help: "Alert transitions appended to the state log, by result (ok, error)."}, []string{"result"}),
		checkpoints: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_cluster_state_checkpoints_total",
			Help: "Partition snapshots written, by result (ok, error)."}, []string{"result"}),
		snapshotBytes: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "citypulse_cluster_state_snapshot_bytes", Help: "Size of the partition snapshots written.",
			Buckets: prometheus.ExponentialBuckets(256, 4, 10)}),
		restoreSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "citypulse_cluster_state_restore_seconds", Help: "Time to read a partition's state for a new owner.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)}),
	}
	if reg != nil {
		reg.MustRegister(m.appends, m.checkpoints, m.snapshotBytes, m.restoreSeconds)
	}
	return m
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

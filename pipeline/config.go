package pipeline

import (
	"errors"
	"fmt"
	"time"
)

// FsyncPolicy says when the journal calls fsync(2).
//
//   - "always": every group commit is fsynced before its readings are
//     acknowledged. Nothing acknowledged is lost even on power loss; each ack
//     costs an fsync (milliseconds on most disks).
//   - "interval" (default): acknowledged once write(2) returned (the record is in
//     the kernel's page cache and survives a crash of the process); fsync runs
//     every fsync_interval, so a power loss or kernel crash can lose at most that
//     window.
//   - "never": the kernel decides when to write back; a power loss can lose
//     whatever it had not written yet (typically up to 30 s on Linux).
type FsyncPolicy string

// Fsync policies.
const (
	FsyncAlways   FsyncPolicy = "always"
	FsyncInterval FsyncPolicy = "interval"
	FsyncNever    FsyncPolicy = "never"
)

// BatchPolicy decides when a sink's batch is flushed: when it holds MaxReadings
// readings or MaxBytes journal bytes, or when its oldest reading has waited MaxAge.
// It is a pure value; the sink loop asks it.
type BatchPolicy struct {
	MaxReadings int           `mapstructure:"max_readings" yaml:"max_readings"`
	MaxBytes    int           `mapstructure:"max_bytes" yaml:"max_bytes"`
	MaxAge      time.Duration `mapstructure:"max_age" yaml:"max_age"`
}

// Full reports whether a batch of n readings and size bytes must be flushed now.
func (p BatchPolicy) Full(n, size int) bool {
	return n >= p.MaxReadings || (p.MaxBytes > 0 && size >= p.MaxBytes)
}

// Due reports whether a batch whose first reading was added at first must be
// flushed at now.
func (p BatchPolicy) Due(first, now time.Time) bool {
	return !now.Before(first.Add(p.MaxAge))
}

// Validate checks the policy; key prefixes the messages.
func (p BatchPolicy) Validate(key string) error {
	var errs []error
	if p.MaxReadings < 1 || p.MaxReadings > 1_000_000 {
		errs = append(errs, fmt.Errorf("%s.max_readings must be in [1, 1000000], got %d", key, p.MaxReadings))
	}
	if p.MaxBytes < 0 {
		errs = append(errs, fmt.Errorf("%s.max_bytes must be >= 0 (0: no byte limit), got %d", key, p.MaxBytes))
	}
	if p.MaxAge <= 0 {
		errs = append(errs, fmt.Errorf("%s.max_age must be > 0, got %v", key, p.MaxAge))
	}
	return errors.Join(errs...)
}

// Config is the pipeline section of the server config.
type Config struct {
	// Shards is the number of shards; a device always maps to the same shard.
	// Changing it while the journal holds unflushed data is refused.
	Shards int `mapstructure:"shards" yaml:"shards"`
	// QueueSize bounds the submissions waiting for each shard loop.
	QueueSize int `mapstructure:"queue_size" yaml:"queue_size"`
	// SegmentBytes is the size at which a journal segment file is closed and a new one begun.
	SegmentBytes int64 `mapstructure:"segment_bytes" yaml:"segment_bytes"`
	// JournalMaxBytes bounds the journal on disk (all shards). At the bound the
	// pipeline stops acknowledging (backpressure) until the slowest sink catches up.
	JournalMaxBytes int64         `mapstructure:"journal_max_bytes" yaml:"journal_max_bytes"`
	Fsync           FsyncPolicy   `mapstructure:"fsync" yaml:"fsync"`
	FsyncInterval   time.Duration `mapstructure:"fsync_interval" yaml:"fsync_interval"`
	// Batch is the default batch policy of every sink.
	Batch BatchPolicy `mapstructure:"batch" yaml:"batch"`
	// RetryMin and RetryMax bound the backoff between retries of a failing sink.
	RetryMin time.Duration `mapstructure:"retry_min" yaml:"retry_min"`
	RetryMax time.Duration `mapstructure:"retry_max" yaml:"retry_max"`
}

// Default returns the defaults.
func Default() Config {
	return Config{
		Shards:          4,
		QueueSize:       4096,
		SegmentBytes:    64 << 20,
		JournalMaxBytes: 2 << 30,
		Fsync:           FsyncInterval,
		FsyncInterval:   100 * time.Millisecond,
		Batch:           BatchPolicy{MaxReadings: 5000, MaxBytes: 1 << 20, MaxAge: 200 * time.Millisecond},
		RetryMin:        100 * time.Millisecond,
		RetryMax:        30 * time.Second,
	}
}

// Validate checks the section; messages name the offending key.
func (c Config) Validate() error {
	var errs []error
	if c.Shards < 1 || c.Shards > 256 {
		errs = append(errs, fmt.Errorf("pipeline.shards must be in [1, 256], got %d", c.Shards))
	}
	if c.QueueSize < 1 {
		errs = append(errs, fmt.Errorf("pipeline.queue_size must be >= 1, got %d", c.QueueSize))
	}
	if c.SegmentBytes < 64<<10 {
		errs = append(errs, fmt.Errorf("pipeline.segment_bytes must be at least 65536, got %d", c.SegmentBytes))
	}
	if c.JournalMaxBytes < 2*c.SegmentBytes*int64(max(c.Shards, 1)) {
		errs = append(errs, fmt.Errorf("pipeline.journal_max_bytes (%d) must be at least 2 × segment_bytes × shards (%d)",
			c.JournalMaxBytes, 2*c.SegmentBytes*int64(max(c.Shards, 1))))
	}
	switch c.Fsync {
	case FsyncAlways, FsyncNever:
	case FsyncInterval:
		if c.FsyncInterval <= 0 {
			errs = append(errs, fmt.Errorf("pipeline.fsync_interval must be > 0 with fsync: interval, got %v", c.FsyncInterval))
		}
	default:
		errs = append(errs, fmt.Errorf("pipeline.fsync %q: want always, interval or never", c.Fsync))
	}
	if err := c.Batch.Validate("pipeline.batch"); err != nil {
		errs = append(errs, err)
	}
	if c.RetryMin <= 0 || c.RetryMax < c.RetryMin {
		errs = append(errs, fmt.Errorf("pipeline.retry_min (%v) must be > 0 and <= pipeline.retry_max (%v)", c.RetryMin, c.RetryMax))
	}
	return errors.Join(errs...)
}

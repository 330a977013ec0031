package storage

import (
	"errors"
	"fmt"
	"time"

	"github.com/citypulse/citypulse/pipeline"
)

// TSDBConfig configures the embedded store.
type TSDBConfig struct {
	// Retention is how long samples are kept.
	Retention time.Duration `mapstructure:"retention" yaml:"retention"`
	// OutOfOrderWindow is how far behind the newest sample of the store a reading
	// may be and still be accepted (late or backfilled readings). Older ones are
	// rejected and counted (reason too_old).
	OutOfOrderWindow time.Duration `mapstructure:"out_of_order_window" yaml:"out_of_order_window"`
	// QueryTimeout bounds one PromQL query.
	QueryTimeout time.Duration `mapstructure:"query_timeout" yaml:"query_timeout"`
	// QueryMaxSamples bounds the samples one query may load into memory.
	QueryMaxSamples int `mapstructure:"query_max_samples" yaml:"query_max_samples"`
	// QueryMaxConcurrency is how many PromQL queries run at once; more wait
	// in line (within their timeout), as with Prometheus' --query.max-concurrency.
	QueryMaxConcurrency int `mapstructure:"query_max_concurrency" yaml:"query_max_concurrency"`
	// Batch overrides pipeline.batch for this sink when max_readings is set.
	Batch pipeline.BatchPolicy `mapstructure:"batch" yaml:"batch"`
}

// DefaultTSDB returns the defaults.
func DefaultTSDB() TSDBConfig {
	return TSDBConfig{
		Retention:           30 * 24 * time.Hour,
		OutOfOrderWindow:    7 * 24 * time.Hour,
		QueryTimeout:        2 * time.Minute,
		QueryMaxSamples:     50_000_000,
		QueryMaxConcurrency: 4,
	}
}

// Validate checks the section; messages name the key.
func (c TSDBConfig) Validate() error {
	var errs []error
	if c.Retention < 2*time.Hour {
		errs = append(errs, fmt.Errorf("storage.tsdb.retention must be at least 2h, got %v", c.Retention))
	}
	if c.OutOfOrderWindow < 0 || c.OutOfOrderWindow > c.Retention {
		errs = append(errs, fmt.Errorf("storage.tsdb.out_of_order_window must be between 0 and storage.tsdb.retention, got %v", c.OutOfOrderWindow))
	}
	if c.QueryTimeout <= 0 {
		errs = append(errs, fmt.Errorf("storage.tsdb.query_timeout must be > 0, got %v", c.QueryTimeout))
	}
	if c.QueryMaxSamples < 1000 {
		errs = append(errs, fmt.Errorf("storage.tsdb.query_max_samples must be at least 1000, got %d", c.QueryMaxSamples))
	}
	if c.QueryMaxConcurrency < 1 {
		errs = append(errs, fmt.Errorf("storage.tsdb.query_max_concurrency must be at least 1, got %d", c.QueryMaxConcurrency))
	}
	if c.Batch != (pipeline.BatchPolicy{}) {
		errs = append(errs, c.Batch.Validate("storage.tsdb.batch"))
	}
	return errors.Join(errs...)
}

// BatchPolicy returns the sink's own batch policy, or nil to use the pipeline's.
func (c TSDBConfig) BatchPolicy() *pipeline.BatchPolicy {
	if c.Batch == (pipeline.BatchPolicy{}) {
		return nil
	}
	b := c.Batch
	return &b
}

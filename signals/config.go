package signals

import (
	"fmt"
	"time"
)

// Config configures the green-wave analysis (section signals).
type Config struct {
	Enabled bool `mapstructure:"enabled" yaml:"enabled"`
	// File lists the corridors (e.g. configs/corridors.yaml); empty: none,
	// only each junction's cycle and green share.
	File string `mapstructure:"file" yaml:"file"`
	// Interval is how often the timings are stored as city series.
	Interval time.Duration `mapstructure:"interval" yaml:"interval"`
}

// Default returns the defaults.
func Default() Config {
	return Config{Enabled: true, Interval: 30 * time.Second}
}

// Validate checks the section; messages name the key.
func (c Config) Validate() error {
	if !c.Enabled {
		return nil
	}
	if c.Interval < time.Second {
		return fmt.Errorf("signals.interval must be at least 1s, got %v", c.Interval)
	}
	return nil
}

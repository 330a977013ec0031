package opendata

import (
	"errors"
	"fmt"
	"slices"
	"time"
)

// Config configures the public feed (section opendata).
type Config struct {
	// Enabled serves /ngsi-ld/v1/ without a token.
	Enabled bool `mapstructure:"enabled" yaml:"enabled"`
	// Kinds lists the device kinds that are public: parking (ParkingSpot,
	// OffStreetParking) and traffic_light (TrafficSignal).
	Kinds []string `mapstructure:"kinds" yaml:"kinds"`
	// RatePerSecond and Burst bound the requests of one client address.
	RatePerSecond float64 `mapstructure:"rate_per_second" yaml:"rate_per_second"`
	Burst         int     `mapstructure:"burst" yaml:"burst"`
	// TotalRatePerSecond bounds the requests of all clients together.
	TotalRatePerSecond float64 `mapstructure:"total_rate_per_second" yaml:"total_rate_per_second"`
	// MaxClients bounds the client addresses tracked by the rate limit; past it
	// a new address is refused until an idle one expires.
	MaxClients int `mapstructure:"max_clients" yaml:"max_clients"`
	// MaxStreams bounds the live streams open at once, MaxStreamsPerClient
	// those of one client address (a stream holds an HTTP connection for as
	// long as its client reads).
	MaxStreams          int `mapstructure:"max_streams" yaml:"max_streams"`
	MaxStreamsPerClient int `mapstructure:"max_streams_per_client" yaml:"max_streams_per_client"`
	// StreamInterval is how often changed entities are sent to streams.
	StreamInterval time.Duration `mapstructure:"stream_interval" yaml:"stream_interval"`
	// StaleAfter is how many of a device's declared intervals its last value
	// stays valid; after that it is unknown.
	StaleAfter float64 `mapstructure:"stale_after" yaml:"stale_after"`
	// AlmostFull is the occupancy from which a car park is "almostFull".
	AlmostFull float64 `mapstructure:"almost_full" yaml:"almost_full"`
	// IDKey is the secret that turns a device id into its public alias (the
	// first 16 hex digits of HMAC-SHA256(IDKey, device id)), so an entity id
	// never reveals a device id, which is also its MQTT user name and DTLS
	// identity. Empty: the server keeps a random key in its data directory.
	// Nodes of a cluster must share it.
	IDKey string `mapstructure:"id_key" yaml:"id_key"`
}

// publicKinds are the kinds the feed knows how to publish.
var publicKinds = []string{"parking", "traffic_light"}

// Default returns the defaults.
func Default() Config {
	return Config{
		Enabled:             true,
		Kinds:               slices.Clone(publicKinds),
		RatePerSecond:       5,
		Burst:               20,
		TotalRatePerSecond:  500,
		MaxClients:          10000,
		MaxStreams:          100,
		MaxStreamsPerClient: 4,
		StreamInterval:      time.Second,
		StaleAfter:          3,
		AlmostFull:          0.9,
	}
}

// Validate checks the section; messages name the key.
func (c Config) Validate() error {
	var errs []error
	for _, k := range c.Kinds {
		if !slices.Contains(publicKinds, k) {
			errs = append(errs, fmt.Errorf("opendata.kinds: %q is not a kind the feed publishes (want some of %v)", k, publicKinds))
		}
	}
	if c.RatePerSecond <= 0 || c.Burst < 1 || c.TotalRatePerSecond < c.RatePerSecond {
		errs = append(errs, fmt.Errorf("opendata.rate_per_second (%v) and opendata.burst (%d) must be > 0, and opendata.total_rate_per_second (%v) at least the first",
			c.RatePerSecond, c.Burst, c.TotalRatePerSecond))
	}
	if c.MaxClients < 1 || c.MaxStreams < 1 || c.MaxStreamsPerClient < 1 || c.MaxStreamsPerClient > c.MaxStreams {
		errs = append(errs, fmt.Errorf("opendata.max_clients (%d), opendata.max_streams (%d) and opendata.max_streams_per_client (%d) must be at least 1, per client no more than in all",
			c.MaxClients, c.MaxStreams, c.MaxStreamsPerClient))
	}
	if c.StreamInterval < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("opendata.stream_interval must be at least 100ms, got %v", c.StreamInterval))
	}
	if c.StaleAfter < 1 {
		errs = append(errs, fmt.Errorf("opendata.stale_after must be at least 1 (intervals), got %v", c.StaleAfter))
	}
	if c.AlmostFull <= 0 || c.AlmostFull > 1 {
		errs = append(errs, fmt.Errorf("opendata.almost_full must be in (0, 1], got %v", c.AlmostFull))
	}
	return errors.Join(errs...)
}

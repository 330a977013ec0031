package main

import (
	"errors"
	"fmt"
	"net/url"

	"github.com/citypulse/citypulse/cluster"
)

// ClusterConfig configures cluster mode (docs/cluster.md): the gateways
// publish to a JetStream stream and each node consumes the partitions it
// owns. Off by default: one machine, the local journal, as before.
type ClusterConfig struct {
	Enabled bool `mapstructure:"enabled" yaml:"enabled"`
	// URLs are the NATS servers (nats:// or tls://); the client fails over
	// between them.
	URLs []string `mapstructure:"urls" yaml:"urls"`
	// User and Password, or Token, authenticate to NATS (both optional).
	User     string `mapstructure:"user" yaml:"user"`
	Password string `mapstructure:"password" yaml:"password"`
	Token    string `mapstructure:"token" yaml:"token"`
	// DedupeWindow is how many recent (metric, time) keys per device a
	// partition's new owner remembers to drop redelivered readings, for at
	// most DedupeDevices devices per partition.
	DedupeWindow  int `mapstructure:"dedupe_window" yaml:"dedupe_window"`
	DedupeDevices int `mapstructure:"dedupe_devices" yaml:"dedupe_devices"`
	// State is where the state that moves with a partition and the shared
	// state are kept (docs/cluster.md, "State").
	State cluster.StateConfig `mapstructure:"state" yaml:"state"`

	cluster.Config `mapstructure:",squash" yaml:",inline"`
}

// DefaultCluster returns the defaults: off, a local NATS server.
func DefaultCluster() ClusterConfig {
	return ClusterConfig{
		URLs:          []string{"nats://127.0.0.1:4222"},
		DedupeWindow:  32,
		DedupeDevices: 8192,
		Config:        cluster.Default(),
		State:         cluster.DefaultState(),
	}
}

// Validate checks the section when it is enabled; messages name the key.
func (c ClusterConfig) Validate() error {
	if !c.Enabled {
		return nil
	}
	errs := []error{c.Config.Validate(), c.State.Validate()}
	if len(c.URLs) == 0 {
		errs = append(errs, errors.New("cluster.urls must name at least one NATS server"))
	}
	for _, u := range c.URLs {
		pu, err := url.Parse(u)
		if err != nil || (pu.Scheme != "nats" && pu.Scheme != "tls") || pu.Host == "" {
			errs = append(errs, fmt.Errorf("cluster.urls: %q is not a nats:// or tls:// URL", u))
		}
	}
	if (c.User == "") != (c.Password == "") {
		errs = append(errs, errors.New("cluster.user and cluster.password go together"))
	}
	if c.Token != "" && c.User != "" {
		errs = append(errs, errors.New("cluster.token and cluster.user exclude each other"))
	}
	if c.DedupeWindow < 1 || c.DedupeDevices < 2 {
		errs = append(errs, fmt.Errorf("cluster.dedupe_window (%d) must be >= 1 and cluster.dedupe_devices (%d) >= 2", c.DedupeWindow, c.DedupeDevices))
	}
	return errors.Join(errs...)
}

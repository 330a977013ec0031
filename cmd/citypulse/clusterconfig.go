package main

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/viper"

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
	// AckAfterSinks names the sinks (tsdb, influx, remote_write, archive)
	// that must have written a batch's readings before its owner
	// acknowledges it to JetStream: the shared store's, so that a node lost
	// for good loses nothing acknowledged (docs/cluster.md, failure modes).
	// Empty: acknowledged once in the node's local journal.
	AckAfterSinks []string `mapstructure:"ack_after_sinks" yaml:"ack_after_sinks"`
	// State is where the state that moves with a partition and the shared
	// state are kept (docs/cluster.md, "State").
	State cluster.StateConfig `mapstructure:"state" yaml:"state"`
	// Standby is this site's side of disaster recovery between two sites
	// (docs/disaster-recovery.md); off by default.
	Standby StandbySection `mapstructure:"standby" yaml:"standby"`

	cluster.Config `mapstructure:",squash" yaml:",inline"`
}

// DefaultCluster returns the defaults: off, a local NATS server.
func DefaultCluster() ClusterConfig {
	return ClusterConfig{
		URLs:          []string{"nats://127.0.0.1:4222"},
		DedupeWindow:  32,
		DedupeDevices: 8192,
		AckAfterSinks: []string{"remote_write"},
		Config:        cluster.Default(),
		State:         cluster.DefaultState(),
		Standby:       defaultStandby(),
	}
}

func defaultStandby() StandbySection {
	sc := cluster.DefaultStandby("", "")
	sc.Streams = []string{} // the cluster's own names (mirrored)
	sc.Salvage = []string{} // the cluster's readings stream
	return StandbySection{StandbyConfig: sc, RPOAlertHoldOff: 10 * time.Second}
}

// StandbySection is cluster.standby: with enabled, the node keeps its site's
// mirrors of the other site's streams (cluster.Standby) and its gateways and
// owners work only while the fence record names this site. The streams
// default to the readings stream and the state's (see mirrored).
type StandbySection struct {
	Enabled bool `mapstructure:"enabled" yaml:"enabled"`
	// RPOAlertHoldOff is how long a mirror must stay behind rpo_budget
	// before the operations alert dr_replication_lag_over_budget fires
	// (through the rules' receivers and silences).
	RPOAlertHoldOff       time.Duration `mapstructure:"rpo_alert_hold_off" yaml:"rpo_alert_hold_off"`
	cluster.StandbyConfig `mapstructure:",squash" yaml:",inline"`
}

// standby returns the section's cluster config, its streams filled in from
// the cluster's names when none are configured.
func (c ClusterConfig) standby() cluster.StandbyConfig {
	sc := c.Standby.StandbyConfig
	if len(sc.Streams) == 0 {
		sc.Streams = c.mirrored()
	}
	if len(sc.Salvage) == 0 {
		sc.Salvage = []string{c.Stream}
	}
	return sc
}

// mirrored names the streams a standby site mirrors: the readings, the
// partitions' alert snapshots (an object store) and transitions, and the
// shared device changes and silences (key-value buckets). The leases are the
// site's own.
func (c ClusterConfig) mirrored() []string {
	return []string{c.Stream, "OBJ_" + c.State.Bucket, c.State.Stream, "KV_" + c.State.Devices, "KV_" + c.State.Silences}
}

// Validate checks the section when it is enabled; messages name the key.
func (c ClusterConfig) Validate() error {
	if !c.Enabled {
		return nil
	}
	errs := []error{c.Config.Validate(), c.State.Validate()}
	if c.Standby.Enabled {
		errs = append(errs, c.standby().Validate())
		if c.Standby.RPOAlertHoldOff < 0 {
			errs = append(errs, fmt.Errorf("cluster.standby.rpo_alert_hold_off must be >= 0, got %v", c.Standby.RPOAlertHoldOff))
		}
	}
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

// removedKeys are keys of earlier versions: refused with the way forward
// (as unknown keys they would be refused without it).
var removedKeys = []string{"cluster.index", "cluster.nodes"}

// checkRemoved refuses a removed key in the config file or the environment.
func checkRemoved(v *viper.Viper, path string) error {
	for _, k := range removedKeys {
		env := "CITYPULSE_" + strings.ToUpper(strings.ReplaceAll(k, ".", "_"))
		if _, set := os.LookupEnv(env); set || v.InConfig(k) {
			return fmt.Errorf("config %s: %s is no longer a key: cluster.nodes and cluster.index were removed, nodes now join and leave without restarting the others. "+
				"Delete both keys and give each node a unique, stable cluster.node_id (default: its host name); see docs/cluster.md, \"Upgrading from cluster.nodes and cluster.index\"",
				orDefault(path), k)
		}
	}
	return nil
}

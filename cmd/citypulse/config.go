package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/viper"
	"gopkg.in/yaml.v3"

	"github.com/citypulse/citypulse/ingest"
	"github.com/citypulse/citypulse/opendata"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
	"github.com/citypulse/citypulse/signals"
	"github.com/citypulse/citypulse/storage"
)

// Config is the whole server configuration: one section per package, each with
// its own defaults and Validate.
type Config struct {
	// DataDir holds the journal, the embedded store and runtime state.
	DataDir  string             `mapstructure:"data_dir" yaml:"data_dir"`
	Log      LogConfig          `mapstructure:"log" yaml:"log"`
	HTTP     HTTPConfig         `mapstructure:"http" yaml:"http"`
	Devices  DevicesConfig      `mapstructure:"devices" yaml:"devices"`
	Ingest   ingest.Config      `mapstructure:"ingest" yaml:"ingest"`
	Pipeline pipeline.Config    `mapstructure:"pipeline" yaml:"pipeline"`
	Storage  StorageConfig      `mapstructure:"storage" yaml:"storage"`
	Vitals   rules.VitalsConfig `mapstructure:"vitals" yaml:"vitals"`
	Rules    rules.Config       `mapstructure:"rules" yaml:"rules"`
	Signals  signals.Config     `mapstructure:"signals" yaml:"signals"`
	OpenData opendata.Config    `mapstructure:"opendata" yaml:"opendata"`
	Cluster  ClusterConfig      `mapstructure:"cluster" yaml:"cluster"`
}

// LogConfig configures the structured log.
type LogConfig struct {
	Level  string `mapstructure:"level" yaml:"level"`   // debug, info, warn, error
	Format string `mapstructure:"format" yaml:"format"` // text or json
}

// HTTPConfig configures the HTTP API.
type HTTPConfig struct {
	Addr string `mapstructure:"addr" yaml:"addr"`
	// AdminToken is the bearer token for changes (adding and removing devices).
	// Empty disables the changing endpoints.
	AdminToken string `mapstructure:"admin_token" yaml:"admin_token"`
	// ReadToken, when set, is required (or the admin token) by the read
	// endpoints (query API, device list). /metrics, /healthz and /readyz stay open.
	ReadToken string `mapstructure:"read_token" yaml:"read_token"`
	// OperatorToken, when set, may read (as the read token) and act on alerts:
	// acknowledge them and silence them. The admin token may too.
	OperatorToken string `mapstructure:"operator_token" yaml:"operator_token"`
	// ReadHeaderTimeout bounds reading a request's headers, ReadTimeout the
	// whole request with its body, WriteTimeout the answer (it must outlast
	// storage.tsdb.query_timeout), IdleTimeout a keep-alive connection
	// between requests.
	ReadHeaderTimeout time.Duration `mapstructure:"read_header_timeout" yaml:"read_header_timeout"`
	ReadTimeout       time.Duration `mapstructure:"read_timeout" yaml:"read_timeout"`
	WriteTimeout      time.Duration `mapstructure:"write_timeout" yaml:"write_timeout"`
	IdleTimeout       time.Duration `mapstructure:"idle_timeout" yaml:"idle_timeout"`
	// MaxHeaderBytes bounds a request's headers, MaxBodyBytes its body
	// (POST /api/v1/devices and /-/reload have lower limits of their own).
	MaxHeaderBytes int   `mapstructure:"max_header_bytes" yaml:"max_header_bytes"`
	MaxBodyBytes   int64 `mapstructure:"max_body_bytes" yaml:"max_body_bytes"`
	// MaxConnections bounds the HTTP connections open at once, and
	// MaxConnectionsPerHost those from one source address, so that HTTP
	// clients cannot use up the descriptors the journal and the stores need.
	MaxConnections        int `mapstructure:"max_connections" yaml:"max_connections"`
	MaxConnectionsPerHost int `mapstructure:"max_connections_per_host" yaml:"max_connections_per_host"`
}

// DefaultHTTP returns the HTTP defaults.
func DefaultHTTP() HTTPConfig {
	return HTTPConfig{
		Addr:                  ":8080",
		ReadHeaderTimeout:     10 * time.Second,
		ReadTimeout:           30 * time.Second,
		WriteTimeout:          3 * time.Minute,
		IdleTimeout:           time.Minute,
		MaxHeaderBytes:        64 << 10,
		MaxBodyBytes:          1 << 20,
		MaxConnections:        512,
		MaxConnectionsPerHost: 64,
	}
}

// Validate checks the section; messages name the key.
func (c HTTPConfig) Validate() error {
	var errs []error
	if c.Addr == "" {
		errs = append(errs, errors.New("http.addr must not be empty"))
	}
	if t := c.AdminToken; t != "" && len(t) < 16 {
		errs = append(errs, errors.New("http.admin_token must be at least 16 characters"))
	}
	if t := c.ReadToken; t != "" && len(t) < 16 {
		errs = append(errs, errors.New("http.read_token must be at least 16 characters"))
	}
	if t := c.OperatorToken; t != "" && len(t) < 16 {
		errs = append(errs, errors.New("http.operator_token must be at least 16 characters"))
	}
	for _, d := range []struct {
		key string
		v   time.Duration
	}{{"read_header_timeout", c.ReadHeaderTimeout}, {"read_timeout", c.ReadTimeout}, {"write_timeout", c.WriteTimeout}, {"idle_timeout", c.IdleTimeout}} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("http.%s must be > 0, got %v", d.key, d.v))
		}
	}
	if c.MaxHeaderBytes < 4<<10 {
		errs = append(errs, fmt.Errorf("http.max_header_bytes must be at least 4096, got %d", c.MaxHeaderBytes))
	}
	if c.MaxBodyBytes < 64<<10 {
		errs = append(errs, fmt.Errorf("http.max_body_bytes must be at least 65536, got %d", c.MaxBodyBytes))
	}
	if c.MaxConnections < 1 || c.MaxConnectionsPerHost < 1 || c.MaxConnectionsPerHost > c.MaxConnections {
		errs = append(errs, fmt.Errorf("http.max_connections (%d) and http.max_connections_per_host (%d) must be at least 1, per host no more than in total",
			c.MaxConnections, c.MaxConnectionsPerHost))
	}
	return errors.Join(errs...)
}

// DevicesConfig says where the device list is.
type DevicesConfig struct {
	File string `mapstructure:"file" yaml:"file"`
}

// StorageConfig configures the stores.
type StorageConfig struct {
	TSDB        storage.TSDBConfig        `mapstructure:"tsdb" yaml:"tsdb"`
	Influx      storage.InfluxConfig      `mapstructure:"influx" yaml:"influx"`
	Archive     storage.ArchiveConfig     `mapstructure:"archive" yaml:"archive"`
	RemoteWrite storage.RemoteWriteConfig `mapstructure:"remote_write" yaml:"remote_write"`
}

// DefaultConfig returns the embedded defaults: every gateway on its standard
// port, the embedded store, data under ./data.
func DefaultConfig() Config {
	return Config{
		DataDir:  "./data",
		Log:      LogConfig{Level: "info", Format: "text"},
		HTTP:     DefaultHTTP(),
		Devices:  DevicesConfig{File: "configs/devices.yaml"},
		Ingest:   ingest.Default(),
		Pipeline: pipeline.Default(),
		Vitals:   rules.DefaultVitals(),
		Rules:    rules.Default(),
		Storage: StorageConfig{TSDB: storage.DefaultTSDB(), Influx: storage.DefaultInflux(), Archive: storage.DefaultArchive(),
			RemoteWrite: storage.DefaultRemoteWrite()},
		Signals:  signals.Default(),
		OpenData: opendata.Default(),
		Cluster:  DefaultCluster(),
	}
}

// Validate checks every section.
func (c Config) Validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("data_dir must not be empty"))
	}
	switch strings.ToLower(c.Log.Level) {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log.level %q: want debug, info, warn or error", c.Log.Level))
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		errs = append(errs, fmt.Errorf("log.format %q: want text or json", c.Log.Format))
	}
	errs = append(errs, c.HTTP.Validate())
	if c.HTTP.WriteTimeout <= c.Storage.TSDB.QueryTimeout {
		errs = append(errs, fmt.Errorf("http.write_timeout (%v) must be longer than storage.tsdb.query_timeout (%v): a query's answer, even its timeout error, must reach the client",
			c.HTTP.WriteTimeout, c.Storage.TSDB.QueryTimeout))
	}
	if c.Devices.File == "" {
		errs = append(errs, errors.New("devices.file must not be empty"))
	}
	errs = append(errs, c.Ingest.Validate(), c.Pipeline.Validate(), c.Storage.TSDB.Validate(), c.Storage.Influx.Validate(), c.Storage.Archive.Validate(), c.Storage.RemoteWrite.Validate(),
		c.Vitals.Validate(), c.Rules.Validate(), c.Signals.Validate(), c.OpenData.Validate(), c.Cluster.Validate())
	if c.Cluster.Enabled && !c.Storage.RemoteWrite.Enabled {
		// Each node stores only the partitions it owns: only a store every
		// node writes to holds the whole city.
		errs = append(errs, errors.New("cluster.enabled requires storage.remote_write.enabled: the nodes must share one store (e.g. VictoriaMetrics)"))
	}
	if c.Cluster.Enabled {
		errs = append(errs, c.checkAckAfterSinks())
	}
	if c.Cluster.Enabled && c.Storage.RemoteWrite.Enabled && c.Storage.RemoteWrite.QueryBase() == "" {
		errs = append(errs, errors.New("cluster.enabled needs storage.remote_write.query_url (the shared store's Prometheus query API) when the write URL does not end in /api/v1/write: every node's query API answers from that store"))
	}
	if c.OpenData.Enabled && c.OpenData.MaxStreams > c.HTTP.MaxConnections/4 {
		// A public stream holds an HTTP connection without a token: the
		// public must never be able to take the operations centre's.
		errs = append(errs, fmt.Errorf("opendata.max_streams (%d) must be at most a quarter of http.max_connections (%d): the public feed's streams share the API's connections",
			c.OpenData.MaxStreams, c.HTTP.MaxConnections))
	}
	if c.Ingest.MaxPast > c.Storage.TSDB.OutOfOrderWindow {
		// Such a reading would be acknowledged, then refused by the store.
		errs = append(errs, fmt.Errorf("ingest.max_past (%v) must not exceed storage.tsdb.out_of_order_window (%v): readings the gateways accept must be storable",
			c.Ingest.MaxPast, c.Storage.TSDB.OutOfOrderWindow))
	}
	return errors.Join(errs...)
}

// loadConfig builds the config from the defaults, the YAML file (if path is not
// empty), CITYPULSE_* environment variables and the explicit overrides (from
// flags), in that order of precedence (later wins). Keys the config does not
// know are rejected.
func loadConfig(path string, overrides map[string]any) (Config, error) {
	v := viper.New()
	def := DefaultConfig()
	keys := flattenKeys(reflect.TypeOf(def), "")
	defMap := map[string]any{}
	if err := mapstructure.Decode(def, &defMap); err != nil {
		return Config{}, err
	}
	for _, k := range keys {
		v.SetDefault(k, lookup(defMap, k))
	}
	v.SetEnvPrefix("CITYPULSE")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	if path != "" {
		v.SetConfigFile(path)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return Config{}, fmt.Errorf("read config %s: %w", path, err)
		}
	}
	if err := checkRemoved(v, path); err != nil {
		return Config{}, err
	}
	if err := checkEnv(keys); err != nil {
		return Config{}, err
	}
	for k, val := range overrides {
		v.Set(k, val)
	}
	var c Config
	err := v.UnmarshalExact(&c, viper.DecodeHook(mapstructure.ComposeDecodeHookFunc(
		mapstructure.StringToTimeDurationHookFunc(),
		mapstructure.StringToSliceHookFunc(","),
	)))
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w (see configs/citypulse.yaml for the known keys)", orDefault(path), err)
	}
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("invalid config %s:\n%w", orDefault(path), err)
	}
	return c, nil
}

func orDefault(path string) string {
	if path == "" {
		return "(defaults)"
	}
	return path
}

// checkEnv rejects CITYPULSE_* variables that name no key: a typo in a variable
// would otherwise be silently ignored.
func checkEnv(keys []string) error {
	known := map[string]bool{}
	for _, k := range keys {
		known["CITYPULSE_"+strings.ToUpper(strings.ReplaceAll(k, ".", "_"))] = true
	}
	var unknown []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		// CITYPULSE_TEST_* are the tests' knobs (make test-long), not config keys
		if strings.HasPrefix(name, "CITYPULSE_") && !strings.HasPrefix(name, "CITYPULSE_TEST_") && !known[name] {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return fmt.Errorf("unknown environment variables %s: every CITYPULSE_* variable must name a config key (e.g. CITYPULSE_INGEST_MQTT_ADDR for ingest.mqtt.addr)",
			strings.Join(unknown, ", "))
	}
	return nil
}

var durationType = reflect.TypeOf(time.Duration(0))

// flattenKeys lists the dotted keys of every leaf field of t.
func flattenKeys(t reflect.Type, prefix string) []string {
	var out []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := strings.Split(f.Tag.Get("mapstructure"), ",")[0]
		if tag == "" && f.Anonymous && strings.Contains(f.Tag.Get("mapstructure"), ",squash") {
			out = append(out, flattenKeys(f.Type, prefix)...) // an embedded section's keys are the parent's
			continue
		}
		if tag == "" || tag == "-" {
			continue
		}
		key := prefix + tag
		if f.Type.Kind() == reflect.Struct && f.Type != durationType {
			out = append(out, flattenKeys(f.Type, key+".")...)
			continue
		}
		out = append(out, key)
	}
	return out
}

func lookup(m map[string]any, key string) any {
	parts := strings.Split(key, ".")
	var cur any = m
	for _, p := range parts {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = mm[p]
	}
	return cur
}

// printConfig writes the effective config as YAML with secrets masked.
func printConfig(w io.Writer, c Config) error {
	mask := func(s *string) {
		if *s != "" {
			*s = "********"
		}
	}
	mask(&c.HTTP.AdminToken)
	mask(&c.HTTP.ReadToken)
	mask(&c.HTTP.OperatorToken)
	mask(&c.Ingest.External.Password)
	mask(&c.Storage.Influx.Token)
	mask(&c.Storage.RemoteWrite.BearerToken)
	mask(&c.OpenData.IDKey)
	mask(&c.Cluster.Password)
	mask(&c.Cluster.Token)
	c.Rules.Notify.Receivers = slices.Clone(c.Rules.Notify.Receivers) // not the caller's
	for i := range c.Rules.Notify.Receivers {
		mask(&c.Rules.Notify.Receivers[i].Secret)
	}
	b, err := yaml.Marshal(c)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

package main

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/viper"

	"github.com/citypulse/citypulse/ingest"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
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
}

// DevicesConfig says where the device list is.
type DevicesConfig struct {
	File string `mapstructure:"file" yaml:"file"`
}

// StorageConfig configures the stores.
type StorageConfig struct {
	TSDB    storage.TSDBConfig    `mapstructure:"tsdb" yaml:"tsdb"`
	Influx  storage.InfluxConfig  `mapstructure:"influx" yaml:"influx"`
	Archive storage.ArchiveConfig `mapstructure:"archive" yaml:"archive"`
}

// DefaultConfig returns the embedded defaults: every gateway on its standard
// port, the embedded store, data under ./data.
func DefaultConfig() Config {
	return Config{
		DataDir:  "./data",
		Log:      LogConfig{Level: "info", Format: "text"},
		HTTP:     HTTPConfig{Addr: ":8080"},
		Devices:  DevicesConfig{File: "configs/devices.yaml"},
		Ingest:   ingest.Default(),
		Pipeline: pipeline.Default(),
		Vitals:   rules.DefaultVitals(),
		Rules:    rules.Default(),
		Storage:  StorageConfig{TSDB: storage.DefaultTSDB(), Influx: storage.DefaultInflux(), Archive: storage.DefaultArchive()},
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
	if c.HTTP.Addr == "" {
		errs = append(errs, errors.New("http.addr must not be empty"))
	}
	if t := c.HTTP.AdminToken; t != "" && len(t) < 16 {
		errs = append(errs, errors.New("http.admin_token must be at least 16 characters"))
	}
	if t := c.HTTP.ReadToken; t != "" && len(t) < 16 {
		errs = append(errs, errors.New("http.read_token must be at least 16 characters"))
	}
	if c.Devices.File == "" {
		errs = append(errs, errors.New("devices.file must not be empty"))
	}
	errs = append(errs, c.Ingest.Validate(), c.Pipeline.Validate(), c.Storage.TSDB.Validate(), c.Storage.Influx.Validate(), c.Storage.Archive.Validate(), c.Vitals.Validate(), c.Rules.Validate())
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
		if strings.HasPrefix(name, "CITYPULSE_") && !known[name] {
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

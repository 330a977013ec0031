package notifier

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"time"

	"github.com/citypulse/citypulse/pipeline"
)

// ReceiverConfig is one destination of notifications.
type ReceiverConfig struct {
	Name string `mapstructure:"name" yaml:"name"`
	// Type: "webhook" (Alertmanager webhook JSON, signed) or "alertmanager"
	// (POST <url>/api/v2/alerts of a real Alertmanager).
	Type string `mapstructure:"type" yaml:"type"`
	URL  string `mapstructure:"url" yaml:"url"`
	// Secret signs webhook bodies (X-CityPulse-Signature).
	Secret  string        `mapstructure:"secret" yaml:"secret"`
	Timeout time.Duration `mapstructure:"timeout" yaml:"timeout"`
}

// Config configures delivery (the rules.notify section).
type Config struct {
	Receivers []ReceiverConfig `mapstructure:"receivers" yaml:"receivers"`
	// AllowHosts lets webhooks reach hosts that resolve to loopback, link-local
	// or private addresses (SSRF guard): host names, IPs or CIDRs.
	AllowHosts []string      `mapstructure:"allow_hosts" yaml:"allow_hosts"`
	RetryMin   time.Duration `mapstructure:"retry_min" yaml:"retry_min"`
	RetryMax   time.Duration `mapstructure:"retry_max" yaml:"retry_max"`
	// MaxAge: a notification still undelivered after this goes to the dead letters.
	MaxAge      time.Duration `mapstructure:"max_age" yaml:"max_age"`
	ExternalURL string        `mapstructure:"external_url" yaml:"external_url"`
}

// Default returns the defaults: no receivers.
func Default() Config {
	return Config{RetryMin: 500 * time.Millisecond, RetryMax: time.Minute, MaxAge: 24 * time.Hour,
		ExternalURL: "http://localhost:8080"}
}

var receiverNameRE = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)

// Validate checks the section; messages name the key.
func (c Config) Validate() error {
	var errs []error
	names := map[string]bool{}
	for i, r := range c.Receivers {
		key := fmt.Sprintf("rules.notify.receivers[%d]", i)
		if !receiverNameRE.MatchString(r.Name) || names[r.Name] {
			errs = append(errs, fmt.Errorf("%s.name %q: want a unique [a-z][a-z0-9_]*", key, r.Name))
		}
		names[r.Name] = true
		if r.Type != "webhook" && r.Type != "alertmanager" {
			errs = append(errs, fmt.Errorf("%s.type %q: want webhook or alertmanager", key, r.Type))
		}
		if u, err := url.Parse(r.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("%s.url %q: want http(s)://host/path", key, r.URL))
		}
		if r.Type == "webhook" && len(r.Secret) < 16 {
			errs = append(errs, fmt.Errorf("%s.secret must be at least 16 characters (it signs every delivery)", key))
		}
		if r.Timeout < 0 {
			errs = append(errs, fmt.Errorf("%s.timeout must be >= 0", key))
		}
	}
	for _, h := range c.AllowHosts {
		if h == "" {
			errs = append(errs, errors.New("rules.notify.allow_hosts: empty entry"))
		}
	}
	if c.RetryMin <= 0 || c.RetryMax < c.RetryMin {
		errs = append(errs, fmt.Errorf("rules.notify.retry_min (%v) must be > 0 and <= retry_max (%v)", c.RetryMin, c.RetryMax))
	}
	if c.MaxAge < time.Minute {
		errs = append(errs, fmt.Errorf("rules.notify.max_age must be at least 1m, got %v", c.MaxAge))
	}
	return errors.Join(errs...)
}

// Durability says when the outbox calls fsync(2); serve passes the pipeline's
// fsync policy and interval, so that a notification is exactly as durable as
// the readings that raised it. The zero value fsyncs every entry ("always").
type Durability struct {
	Fsync    pipeline.FsyncPolicy
	Interval time.Duration
}

// FsyncEach reports whether every write is fsynced before it counts as done:
// "always" and the zero value; "interval" and "never" leave it to later.
func (d Durability) FsyncEach() bool {
	return d.Fsync != pipeline.FsyncInterval && d.Fsync != pipeline.FsyncNever
}

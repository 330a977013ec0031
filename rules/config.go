package rules

import (
	"errors"
	"fmt"
	"time"

	"github.com/citypulse/citypulse/notifier"
)

// Config is the rules section of the server config.
type Config struct {
	Enabled bool   `mapstructure:"enabled" yaml:"enabled"`
	File    string `mapstructure:"file" yaml:"file"` // configs/rules.yaml
	// Tick is how often hold-off timers, deadman and fleet rules are checked.
	Tick time.Duration `mapstructure:"tick" yaml:"tick"`
	// FlapWindow and FlapMax: more than FlapMax transitions within FlapWindow
	// make an alert "flapping".
	FlapWindow time.Duration   `mapstructure:"flap_window" yaml:"flap_window"`
	FlapMax    int             `mapstructure:"flap_max" yaml:"flap_max"`
	Notify     notifier.Config `mapstructure:"notify" yaml:"notify"`
}

// Default returns the defaults.
func Default() Config {
	return Config{Enabled: true, File: "configs/rules.yaml", Tick: time.Second, FlapWindow: 10 * time.Minute, FlapMax: 4,
		Notify: notifier.Default()}
}

// Validate checks the section; messages name the key.
func (c Config) Validate() error {
	if !c.Enabled {
		return nil
	}
	var errs []error
	if c.File == "" {
		errs = append(errs, errors.New("rules.file must not be empty"))
	}
	if c.Tick < 100*time.Millisecond || c.Tick > time.Minute {
		errs = append(errs, fmt.Errorf("rules.tick must be between 100ms and 1m, got %v", c.Tick))
	}
	if c.FlapMax < 0 || (c.FlapMax > 0 && c.FlapWindow <= 0) {
		errs = append(errs, errors.New("rules.flap_max must be >= 0 and rules.flap_window > 0"))
	}
	errs = append(errs, c.Notify.Validate())
	return errors.Join(errs...)
}

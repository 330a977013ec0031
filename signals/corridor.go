package signals

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"time"

	"gopkg.in/yaml.v3"
)

// Corridor is a road along which consecutive greens should follow a vehicle
// driving at Speed.
type Corridor struct {
	Name string `yaml:"name"`
	// Speed is the design speed, km/h.
	Speed float64 `yaml:"speed_kmh"`
	// Junctions in driving order; Distance is from the previous junction, m.
	Junctions []Stop `yaml:"junctions"`
}

// Stop is one junction of a corridor.
type Stop struct {
	Device   string  `yaml:"device"`
	Distance float64 `yaml:"distance_m"`
}

// Travel is the design travel time from junction i-1 to junction i.
func (c Corridor) Travel(i int) time.Duration {
	return time.Duration(c.Junctions[i].Distance / (c.Speed / 3.6) * float64(time.Second))
}

// LoadCorridors reads a corridors file (configs/corridors.yaml); unknown keys
// are refused.
func LoadCorridors(path string) ([]Corridor, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read corridors: %w", err)
	}
	var f struct {
		Corridors []Corridor `yaml:"corridors"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("parse corridors %s: %w", path, err)
	}
	seen := map[string]bool{}
	for i, c := range f.Corridors {
		if err := c.validate(); err != nil {
			return nil, fmt.Errorf("%s: corridors[%d]: %w", path, i, err)
		}
		if seen[c.Name] {
			return nil, fmt.Errorf("%s: corridors[%d]: name %q is used twice", path, i, c.Name)
		}
		seen[c.Name] = true
	}
	return f.Corridors, nil
}

func (c Corridor) validate() error {
	var errs []error
	if c.Name == "" {
		errs = append(errs, errors.New("name is required"))
	}
	if c.Speed <= 0 || c.Speed > 150 {
		errs = append(errs, fmt.Errorf("speed_kmh must be in (0, 150], got %v", c.Speed))
	}
	if len(c.Junctions) < 2 {
		errs = append(errs, errors.New("a corridor needs at least two junctions"))
	}
	for i, s := range c.Junctions {
		if s.Device == "" {
			errs = append(errs, fmt.Errorf("junctions[%d]: device is required", i))
		}
		if i > 0 && (s.Distance <= 0 || s.Distance > 10000) {
			errs = append(errs, fmt.Errorf("junctions[%d]: distance_m must be in (0, 10000], got %v", i, s.Distance))
		}
	}
	return errors.Join(errs...)
}

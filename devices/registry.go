package devices

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/citypulse/citypulse/internal/durable"
)

// Device is one field device.
type Device struct {
	ID       string        `yaml:"id" json:"id"`
	Kind     Kind          `yaml:"kind" json:"kind"`
	District string        `yaml:"district" json:"district"`
	Interval time.Duration `yaml:"interval" json:"interval"`
	// Secret is the MQTT password and the CoAP DTLS pre-shared key. It is never
	// logged or returned by the API (see Public).
	Secret string `yaml:"secret" json:"secret,omitempty"`
	// Group is what the device belongs to beyond its district: the car park of a
	// parking bay, the corridor of a junction. Optional.
	Group string `yaml:"group,omitempty" json:"group,omitempty"`
	// Location is where the device stands. Optional.
	Location *Location `yaml:"location,omitempty" json:"location,omitempty"`
}

// PublicDevice is a Device without its secret, safe to log and return.
type PublicDevice struct {
	ID       string    `json:"id"`
	Kind     Kind      `json:"kind"`
	District string    `json:"district"`
	Interval string    `json:"interval"`
	Group    string    `json:"group,omitempty"`
	Location *Location `json:"location,omitempty"`
}

// Public returns d without its secret.
func (d Device) Public() PublicDevice {
	return PublicDevice{ID: d.ID, Kind: d.Kind, District: d.District, Interval: d.Interval.String(),
		Group: d.Group, Location: d.Location}
}

// String names the device without its secret.
func (d Device) String() string {
	return fmt.Sprintf("%s(%s, %s)", d.ID, d.Kind, d.District)
}

var (
	idRE       = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	districtRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)
)

// Errors a caller can branch on.
var (
	ErrUnknownDevice = errors.New("unknown device")
	ErrDuplicate     = errors.New("device id already registered")
)

// Validate checks one device's fields.
func (d Device) Validate() error {
	if !idRE.MatchString(d.ID) {
		return fmt.Errorf("device id %q: must match [a-z0-9][a-z0-9-]* (at most 63 characters)", d.ID)
	}
	if _, ok := SchemaOf(d.Kind); !ok {
		return fmt.Errorf("device %s: unknown kind %q (want one of %v)", d.ID, d.Kind, Kinds())
	}
	if !districtRE.MatchString(d.District) {
		return fmt.Errorf("device %s: district %q must match [a-z0-9][a-z0-9_-]*", d.ID, d.District)
	}
	if d.Interval < time.Second || d.Interval > 24*time.Hour {
		return fmt.Errorf("device %s: interval %v must be between 1s and 24h", d.ID, d.Interval)
	}
	if len(d.Secret) < 8 {
		return fmt.Errorf("device %s: secret must be at least 8 characters", d.ID)
	}
	return d.validatePlace()
}

// File is the YAML layout of a device list (configs/devices.yaml).
type File struct {
	Devices []Device `yaml:"devices"`
}

// LoadFile reads and validates a device list.
func LoadFile(path string) ([]Device, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read device list: %w", err)
	}
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("parse device list %s: %w", path, err)
	}
	seen := make(map[string]bool, len(f.Devices))
	for i, d := range f.Devices {
		if err := d.Validate(); err != nil {
			return nil, fmt.Errorf("%s: devices[%d]: %w", path, i, err)
		}
		if seen[d.ID] {
			return nil, fmt.Errorf("%s: devices[%d]: %w: %s", path, i, ErrDuplicate, d.ID)
		}
		seen[d.ID] = true
	}
	return f.Devices, nil
}

// overlay is the persisted record of runtime changes made through the API on top
// of the device list from the config file.
type overlay struct {
	Added   []Device `json:"added"`
	Removed []string `json:"removed"`
}

// Registry holds the known devices. Lookups are lock-free (a copy-on-write map
// behind an atomic pointer): they happen on every message. Changes are rare and
// serialised by a mutex; when the registry has a state path they are persisted
// there, so runtime additions and removals survive a restart.
type Registry struct {
	mu        sync.Mutex // serialises writers
	devices   atomic.Pointer[map[string]Device]
	base      map[string]bool // ids that came from the config file
	ov        overlay
	statePath string
}

// NewRegistry builds a registry from the configured devices and, if statePath is
// not empty and exists, the runtime changes persisted there.
func NewRegistry(list []Device, statePath string) (*Registry, error) {
	r := &Registry{statePath: statePath, base: make(map[string]bool, len(list))}
	m := make(map[string]Device, len(list))
	for _, d := range list {
		if err := d.Validate(); err != nil {
			return nil, err
		}
		if _, dup := m[d.ID]; dup {
			return nil, fmt.Errorf("%w: %s", ErrDuplicate, d.ID)
		}
		m[d.ID] = d
		r.base[d.ID] = true
	}
	if statePath != "" {
		b, err := os.ReadFile(statePath)
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			return nil, fmt.Errorf("read device overlay: %w", err)
		default:
			if err := json.Unmarshal(b, &r.ov); err != nil {
				return nil, fmt.Errorf("parse device overlay %s: %w", statePath, err)
			}
			for _, id := range r.ov.Removed {
				delete(m, id)
			}
			for _, d := range r.ov.Added {
				if err := d.Validate(); err != nil {
					return nil, fmt.Errorf("device overlay %s: %w", statePath, err)
				}
				m[d.ID] = d
			}
		}
	}
	r.devices.Store(&m)
	return r, nil
}

// Get returns the device with the given id.
func (r *Registry) Get(id string) (Device, bool) {
	d, ok := (*r.devices.Load())[id]
	return d, ok
}

// Authenticate reports whether secret is id's secret, in constant time.
func (r *Registry) Authenticate(id, secret string) (Device, bool) {
	d, ok := r.Get(id)
	if !ok {
		// Compare anyway so that unknown and known ids take the same time.
		subtle.ConstantTimeCompare([]byte(secret), []byte("unknown-device-secret"))
		return Device{}, false
	}
	return d, subtle.ConstantTimeCompare([]byte(secret), []byte(d.Secret)) == 1
}

// Len returns the number of devices.
func (r *Registry) Len() int { return len(*r.devices.Load()) }

// List returns all devices sorted by id.
func (r *Registry) List() []Device {
	m := *r.devices.Load()
	out := make([]Device, 0, len(m))
	for _, d := range m {
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Add registers a new device.
func (r *Registry) Add(d Device) error {
	if err := d.Validate(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	old := *r.devices.Load()
	if _, ok := old[d.ID]; ok {
		return fmt.Errorf("%w: %s", ErrDuplicate, d.ID)
	}
	ov := r.ov
	ov.Added = append(append([]Device(nil), ov.Added...), d)
	ov.Removed = without(ov.Removed, d.ID)
	return r.commit(old, ov, func(m map[string]Device) { m[d.ID] = d })
}

// Remove unregisters a device.
func (r *Registry) Remove(id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	old := *r.devices.Load()
	if _, ok := old[id]; !ok {
		return fmt.Errorf("%w: %s", ErrUnknownDevice, id)
	}
	ov := overlay{Removed: r.ov.Removed}
	for _, d := range r.ov.Added {
		if d.ID != id {
			ov.Added = append(ov.Added, d)
		}
	}
	if r.base[id] {
		ov.Removed = append(without(ov.Removed, id), id)
	}
	return r.commit(old, ov, func(m map[string]Device) { delete(m, id) })
}

func (r *Registry) commit(old map[string]Device, ov overlay, change func(map[string]Device)) error {
	if r.statePath != "" {
		if err := writeOverlay(r.statePath, ov); err != nil {
			return fmt.Errorf("persist device change: %w", err)
		}
	}
	m := make(map[string]Device, len(old)+1)
	for k, v := range old {
		m[k] = v
	}
	change(m)
	r.ov = ov
	r.devices.Store(&m)
	return nil
}

func without(ids []string, id string) []string {
	out := make([]string, 0, len(ids))
	for _, x := range ids {
		if x != id {
			out = append(out, x)
		}
	}
	return out
}

// writeOverlay persists the device overlay, fsynced with its directory: an
// admin's change is acknowledged only once a power loss cannot undo it.
func writeOverlay(path string, ov overlay) error {
	b, err := json.MarshalIndent(ov, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return durable.WriteFile(path, b, 0o600, true)
}

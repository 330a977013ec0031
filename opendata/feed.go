package opendata

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/stream"
)

// DeviceLister is the device registry as the feed needs it.
type DeviceLister interface {
	List() []devices.Device
}

// The metrics the entity types are built from; nothing else is kept.
var publicMetrics = map[string][]string{
	"parking":       {"occupied", "available_spot_number", "total_spot_number"},
	"traffic_light": {"state", "fault"},
}

// value is the latest reading of one public metric.
type value struct {
	v float64
	t int64 // unix ns, the device's own time
}

// Feed keeps the latest public values and serves them. Build it with New.
type Feed struct {
	cfg  Config
	devs DeviceLister
	log  *slog.Logger
	now  func() time.Time
	hub  *stream.Hub
	lim  *limiter

	kinds map[string]bool
	alias func(device string) string // a device's public id

	mu   sync.Mutex
	last map[string]map[string]value // device → metric → latest

	sent map[string]string // entity id → keyValues JSON last streamed (Run only)
}

// Options are New's arguments.
type Options struct {
	Config     Config
	Devices    DeviceLister
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Now        func() time.Time // for tests; time.Now if nil
}

// New builds a feed; it starts nothing.
func New(o Options) *Feed {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	f := &Feed{
		cfg: o.Config, devs: o.Devices, log: o.Logger, now: o.Now,
		kinds: make(map[string]bool),
		last:  make(map[string]map[string]value),
		sent:  make(map[string]string),
		hub:   stream.New(stream.Options{MaxClients: o.Config.MaxStreams, Registerer: o.Registerer, Subsystem: "opendata"}),
		lim:   newLimiter(o.Config, o.Registerer, o.Now),
	}
	for _, k := range o.Config.Kinds {
		f.kinds[k] = true
	}
	f.alias = func(id string) string { return id }
	if o.Config.IDKey != "" {
		f.alias = func(id string) string { return Alias(o.Config.IDKey, id) }
	}
	return f
}

// Alias is a device's public id under key: HMAC-SHA256 of its id, as 16 hex
// digits (64 bits: collisions are negligible for a city's devices, and without
// the key the alias cannot be computed from a device id nor reversed).
func Alias(key, device string) string {
	m := hmac.New(sha256.New, []byte(key))
	m.Write([]byte(device))
	return hex.EncodeToString(m.Sum(nil)[:8])
}

// Observe keeps the latest value of each public metric; it runs in the shard
// loop and only updates a map.
func (f *Feed) Observe(_ int, rs []pipeline.Reading) {
	if len(rs) == 0 || !f.kinds[rs[0].Kind] {
		return // a submission is one device's readings, so one kind
	}
	ms := publicMetrics[rs[0].Kind]
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range rs {
		if !slices.Contains(ms, r.Metric) {
			continue
		}
		dm := f.last[r.Device]
		if dm == nil {
			dm = make(map[string]value, len(ms))
			f.last[r.Device] = dm
		}
		if old, ok := dm[r.Metric]; ok && old.t > r.Time {
			continue // a late reading does not replace a newer one
		}
		dm[r.Metric] = value{v: r.Value, t: r.Time}
	}
}

// snapshot is a consistent view of the public devices and their values at one
// instant, from which entities are built.
type snapshot struct {
	now     time.Time
	devices []devices.Device // public kinds only, sorted by id
	values  map[string]map[string]value
	fresh   func(d devices.Device, v value) bool
	alias   func(device string) string // a device's public id
}

func (f *Feed) snapshot() snapshot {
	var ds []devices.Device
	for _, d := range f.devs.List() {
		if f.kinds[string(d.Kind)] {
			ds = append(ds, d)
		}
	}
	slices.SortFunc(ds, func(a, b devices.Device) int { return strings.Compare(a.ID, b.ID) })
	now := f.now()
	f.mu.Lock()
	vals := make(map[string]map[string]value, len(ds))
	for _, d := range ds {
		if dm, ok := f.last[d.ID]; ok {
			vals[d.ID] = maps.Clone(dm)
		}
	}
	f.mu.Unlock()
	stale := f.cfg.StaleAfter
	return snapshot{now: now, devices: ds, values: vals, alias: f.alias, fresh: func(d devices.Device, v value) bool {
		return v.t != 0 && float64(now.UnixNano()-v.t) <= stale*float64(d.Interval)
	}}
}

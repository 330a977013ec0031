package sim

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/citypulse/citypulse/devices"
)

// Device is one simulated field device. Its signal state (noise, the energy
// register) belongs to whoever generates its readings: one goroutine at a time.
type Device struct {
	ID           string
	Kind         devices.Kind
	District     int    // index into Spec.Districts
	DistrictName string // Spec.Districts[District]
	Index        int    // among the devices of its kind in its district
	Secret       string
	Interval     time.Duration // the declared reporting interval
	Group        string        // the car park of a bay, the corridor of a junction (when the spec places devices)
	Location     *devices.Location
	Metrics      []devices.Metric // what it reports, in order

	rng    *rand.Rand
	energy float64 // power meter register
	rank   float64 // a parking bay is occupied when its district's fill exceeds it
	phase  int64   // a junction's offset within its signal cycle, in seconds
}

// Spec says which devices a fleet has.
type Spec struct {
	// Seed makes ids, secrets, places and signals repeatable.
	Seed int64
	// Prefix starts every id: <prefix>-<kind>-<district>-<nnnn>.
	Prefix    string
	Districts []string
	// PerDistrict is the number of devices of each kind in each district.
	PerDistrict map[devices.Kind]int
	// Interval is each kind's declared reporting interval; Default for the rest.
	Interval map[devices.Kind]time.Duration
	Default  time.Duration
	// LotEvery makes every LotEvery-th parking device a lot (available and
	// total spot numbers) and the others bays (occupied); 0 means 2.
	LotEvery int
	// Centers, when set, places each district's devices around its center and
	// groups bays into car parks and junctions into a corridor.
	Centers map[string]devices.Location
}

// Secret derives a device's secret from the seed.
func Secret(seed int64, id string) string {
	m := hmac.New(sha256.New, []byte(strconv.FormatInt(seed, 10)))
	m.Write([]byte(id))
	return hex.EncodeToString(m.Sum(nil))[:24]
}

// NewFleet creates the devices of s in a stable order: by kind, district, index.
func NewFleet(s Spec) []*Device {
	var out []*Device
	place := rand.New(rand.NewPCG(uint64(s.Seed), 0x91ace))
	for _, k := range devices.Kinds() {
		n := s.PerDistrict[k]
		schema, _ := devices.SchemaOf(k)
		for di, dn := range s.Districts {
			for i := range n {
				id := fmt.Sprintf("%s-%s-%s-%04d", s.Prefix, kindShort(k), dn, i)
				d := &Device{
					ID: id, Kind: k, District: di, DistrictName: dn, Index: i, Secret: Secret(s.Seed, id),
					Interval: s.intervalOf(k),
					Metrics:  deviceMetrics(k, schema, i, s.LotEvery),
					rng:      rand.New(rand.NewPCG(uint64(s.Seed), uint64(len(out)+1))),
					energy:   1000 * float64(i+1),
					rank:     (float64(i) + 0.5) / float64(n),
					phase:    int64(i*17+di*29) % 120,
				}
				s.place(d, place)
				out = append(out, d)
			}
		}
	}
	return out
}

func (s Spec) intervalOf(k devices.Kind) time.Duration {
	if iv, ok := s.Interval[k]; ok {
		return iv
	}
	return s.Default
}

// place sets a device's location and group when the spec has centers.
func (s Spec) place(d *Device, rng *rand.Rand) {
	c, ok := s.Centers[d.DistrictName]
	if !ok {
		return
	}
	d.Location = &devices.Location{Lat: round6(c.Lat + (rng.Float64()-0.5)*0.02), Lon: round6(c.Lon + (rng.Float64()-0.5)*0.02)}
	switch {
	case d.Kind == devices.KindParking && !d.IsLot():
		d.Group = fmt.Sprintf("%s-car-park-%d", d.DistrictName, d.Index/10) // the demo's 20: two car parks
	case d.Kind == devices.KindTrafficLight:
		d.Group = d.DistrictName + "-main-road"
	}
}

func round6(v float64) float64 { return float64(int64(v*1e6)) / 1e6 }

// IsLot reports whether a parking device is a lot (spot numbers), not a bay.
func (d *Device) IsLot() bool {
	return d.Kind == devices.KindParking && d.Metrics[0].Name != "occupied"
}

// Registration is the device as the server's device list holds it.
func (d *Device) Registration() devices.Device {
	return devices.Device{ID: d.ID, Kind: d.Kind, District: d.DistrictName, Interval: d.Interval, Secret: d.Secret,
		Group: d.Group, Location: d.Location}
}

func kindShort(k devices.Kind) string {
	switch k {
	case devices.KindTrafficLight:
		return "tl"
	case devices.KindParking:
		return "park"
	}
	return string(k)
}

// deviceMetrics is what a device of kind k reports: a parking device is a
// lot (spot numbers) every lotEvery-th, a bay (occupancy) otherwise.
func deviceMetrics(k devices.Kind, s *devices.Schema, i, lotEvery int) []devices.Metric {
	if k != devices.KindParking {
		return s.Metrics
	}
	if lotEvery <= 0 {
		lotEvery = 2
	}
	names := []string{"occupied"}
	if i%lotEvery == lotEvery-1 {
		names = []string{"available_spot_number", "total_spot_number"}
	}
	var ms []devices.Metric
	for _, n := range names {
		m, _ := s.Metric(n)
		ms = append(ms, m)
	}
	return ms
}

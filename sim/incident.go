package sim

import (
	"time"

	"github.com/citypulse/citypulse/devices"
)

// The incident types and the kind of device each disturbs.
var IncidentKinds = map[string]devices.Kind{
	"burst_main":       devices.KindPipe,
	"substation_trip":  devices.KindPower,
	"dark_junction":    devices.KindTrafficLight,
	"car_park_filling": devices.KindParking,
}

// Incident is a scheduled event in the city: it starts At into the run and
// holds for Lasts; with Every it happens again every Every, each time in the
// next district.
type Incident struct {
	// Type is burst_main, substation_trip, dark_junction or car_park_filling.
	Type  string        `yaml:"type" json:"type"`
	At    time.Duration `yaml:"at" json:"at"`
	Every time.Duration `yaml:"every" json:"every"`
	Lasts time.Duration `yaml:"lasts" json:"lasts"`
	// Devices is how many devices of its kind in the district it hits, a
	// different one each time (one burst main, one dark junction); 0: all.
	Devices int `yaml:"devices,omitempty" json:"devices,omitempty"`
	// District is the index of the district of the first occurrence.
	District int `yaml:"district,omitempty" json:"district,omitempty"`
}

// Occurrence is the occurrence k of in that holds el into the run and the
// district index (of districts) it happens in.
func (in Incident) Occurrence(el time.Duration, districts int) (k, district int, ok bool) {
	if el < in.At || districts < 1 {
		return 0, 0, false
	}
	if in.Every > 0 {
		k = int((el - in.At) / in.Every)
	}
	start := in.At + time.Duration(k)*in.Every
	if el-start >= in.Lasts {
		return 0, 0, false
	}
	return k, (k + in.District) % districts, true
}

// Hits reports whether in holds for d el into the run, and its occurrence.
// perDistrict is the number of devices of d's kind in each district.
func (in Incident) Hits(d *Device, el time.Duration, districts, perDistrict int) (k int, ok bool) {
	if IncidentKinds[in.Type] != d.Kind {
		return 0, false
	}
	k, district, ok := in.Occurrence(el, districts)
	if !ok || district != d.District {
		return 0, false
	}
	if in.Devices > 0 && perDistrict > 0 {
		// occurrences k, k+districts, ... in this district take the next devices
		first := (k / districts * in.Devices) % perDistrict
		if (d.Index-first+perDistrict)%perDistrict >= in.Devices {
			return 0, false
		}
	}
	return k, true
}

// Apply sets the condition of incident type typ.
func (c *Conditions) Apply(typ string) {
	switch typ {
	case "burst_main":
		c.Burst = true
	case "substation_trip":
		c.Trip = true
	case "dark_junction":
		c.Dark = true
	case "car_park_filling":
		c.Filling = true
	}
}

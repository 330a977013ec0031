package sim

import (
	"time"

	"github.com/citypulse/citypulse/devices"
)

// The demo city's districts (Nanjing's central districts) and their centers.
var demoCenters = map[string]devices.Location{
	"gulou":    {Lat: 32.0660, Lon: 118.7700},
	"xuanwu":   {Lat: 32.0480, Lon: 118.7970},
	"qinhuai":  {Lat: 32.0340, Lon: 118.7860},
	"jianye":   {Lat: 32.0040, Lon: 118.7320},
	"qixia":    {Lat: 32.1080, Lon: 118.9090},
	"yuhuatai": {Lat: 31.9920, Lon: 118.7790},
}

// DemoSpec is the demo city: 324 devices of the five kinds in six districts,
// each reporting at its kind's interval: per district 10 water mains, 8 power
// meters, 4 drainage and reservoir probes, 12 junctions and 20 parking devices
// (16 bays in car parks, 4 lots).
func DemoSpec(seed int64) Spec {
	return Spec{
		Seed:      seed,
		Prefix:    "demo",
		Districts: []string{"gulou", "xuanwu", "qinhuai", "jianye", "qixia", "yuhuatai"},
		PerDistrict: map[devices.Kind]int{
			devices.KindPipe: 10, devices.KindPower: 8, devices.KindWater: 4,
			devices.KindTrafficLight: 12, devices.KindParking: 20,
		},
		Interval: map[devices.Kind]time.Duration{
			devices.KindPipe: 10 * time.Second, devices.KindPower: 10 * time.Second, devices.KindWater: 30 * time.Second,
			devices.KindTrafficLight: 5 * time.Second, devices.KindParking: 15 * time.Second,
		},
		Default:  10 * time.Second,
		LotEvery: 5,
		Centers:  demoCenters,
	}
}

// DemoIncidents is the demo's schedule: a burst main at first, then a dark
// junction, a district power cut and car parks filling up, one every
// lasts+lasts/2, each in a district of its own and in the next one when its
// round comes again. Each
// lasts lasts, but the car parks stay full 6 minutes longer: the stock rule
// holds a full district for 5 minutes before it alerts.
func DemoIncidents(first, lasts time.Duration) []Incident {
	step := lasts + lasts/2
	parked := lasts + 6*time.Minute
	every := max(4*step, parked+step)
	return []Incident{
		{Type: "burst_main", At: first, Lasts: lasts, Every: every, Devices: 1},
		{Type: "dark_junction", At: first + step, Lasts: lasts, Every: every, Devices: 1, District: 1},
		{Type: "substation_trip", At: first + 2*step, Lasts: lasts, Every: every, District: 2},
		{Type: "car_park_filling", At: first + 3*step, Lasts: parked, Every: every, District: 3},
	}
}

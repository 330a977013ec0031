package opendata

import (
	"math"
	"sort"
	"time"

	"github.com/citypulse/citypulse/devices"
)

// Entity types served.
const (
	TypeParkingSpot      = "ParkingSpot"
	TypeOffStreetParking = "OffStreetParking"
	TypeTrafficSignal    = "TrafficSignal"
)

// attr is one attribute of an entity: a Property, a Relationship (value is the
// target's id) or a GeoProperty (value is GeoJSON).
type attr struct {
	name       string
	kind       string // Property, Relationship, GeoProperty
	value      any
	observedAt int64 // unix ns; 0 = none
}

// entity is an NGSI-LD entity before it is rendered.
type entity struct {
	id, typ string
	attrs   []attr
}

func entityID(typ, local string) string { return "urn:ngsi-ld:" + typ + ":" + local }

// geo is a device location as a GeoJSON point (longitude first).
func geo(l *devices.Location) map[string]any {
	return map[string]any{"type": "Point", "coordinates": []float64{l.Lon, l.Lat}}
}

// entities builds every entity of the snapshot, sorted by id.
func (s snapshot) entities(almostFull float64) []entity {
	var es []entity
	lots := map[string][]devices.Device{} // car park id → its devices
	for _, d := range s.devices {
		switch d.Kind {
		case devices.KindTrafficLight:
			es = append(es, s.trafficSignal(d))
		case devices.KindParking:
			park := d.Group
			if park == "" && s.isCounter(d) {
				park = s.alias(d.ID) // a car-park counter of its own
			}
			if park != "" {
				lots[park] = append(lots[park], d)
			}
			if !s.isCounter(d) {
				es = append(es, s.parkingSpot(d))
			}
		}
	}
	for park, ds := range lots {
		es = append(es, s.offStreetParking(park, ds, almostFull))
	}
	sort.Slice(es, func(i, j int) bool { return es[i].id < es[j].id })
	return es
}

// isCounter says a parking device counts a car park's spots rather than
// sensing one bay: it has reported spot numbers.
func (s snapshot) isCounter(d devices.Device) bool {
	vs := s.values[d.ID]
	_, a := vs["available_spot_number"]
	_, t := vs["total_spot_number"]
	return a || t
}

func (s snapshot) parkingSpot(d devices.Device) entity {
	e := entity{id: entityID(TypeParkingSpot, s.alias(d.ID)), typ: TypeParkingSpot}
	status, at := "unknown", int64(0)
	if v, ok := s.values[d.ID]["occupied"]; ok {
		at = v.t
		if s.fresh(d, v) {
			status = "free"
			if v.v >= 0.5 {
				status = "occupied"
			}
		}
	}
	site, category := entityID("OnStreetParking", d.District), "onStreet"
	if d.Group != "" {
		site, category = entityID(TypeOffStreetParking, d.Group), "offStreet"
	}
	e.attrs = append(e.attrs,
		attr{name: "status", kind: "Property", value: status, observedAt: at},
		attr{name: "category", kind: "Property", value: []string{category}},
		attr{name: "refParkingSite", kind: "Relationship", value: site},
	)
	return withLocation(e, d.Location)
}

func withLocation(e entity, l *devices.Location) entity {
	if l != nil {
		e.attrs = append(e.attrs, attr{name: "location", kind: "GeoProperty", value: geo(l)})
	}
	return e
}

// offStreetParking is one car park: from a fresh counter device if it has one,
// else from its bays when every bay is fresh; otherwise its availability is
// unknown and left out.
func (s snapshot) offStreetParking(park string, ds []devices.Device, almostFull float64) entity {
	e := entity{id: entityID(TypeOffStreetParking, park), typ: TypeOffStreetParking}
	e.attrs = append(e.attrs, attr{name: "name", kind: "Property", value: park})
	total, avail, at, known := s.spots(ds)
	if known && total > 0 {
		occ := float64(total-avail) / float64(total)
		status := "spacesAvailable"
		switch {
		case avail <= 0:
			status = "full"
		case occ >= almostFull:
			status = "almostFull"
		}
		e.attrs = append(e.attrs,
			attr{name: "availableSpotNumber", kind: "Property", value: avail, observedAt: at},
			attr{name: "totalSpotNumber", kind: "Property", value: total, observedAt: at},
			attr{name: "occupancy", kind: "Property", value: math.Round(occ*1000) / 1000, observedAt: at},
			attr{name: "status", kind: "Property", value: []string{status}, observedAt: at},
		)
	}
	return withLocation(e, s.parkLocation(ds))
}

// spots counts a car park's spots; known is false when any needed value is
// missing or stale.
func (s snapshot) spots(ds []devices.Device) (total, avail int, at int64, known bool) {
	for _, d := range ds {
		if !s.isCounter(d) {
			continue
		}
		a, okA := s.values[d.ID]["available_spot_number"]
		t, okT := s.values[d.ID]["total_spot_number"]
		if okA && okT && s.fresh(d, a) && s.fresh(d, t) {
			return int(t.v), min(int(a.v), int(t.v)), max(a.t, t.t), true
		}
	}
	for _, d := range ds {
		if s.isCounter(d) {
			continue
		}
		v, ok := s.values[d.ID]["occupied"]
		if !ok || !s.fresh(d, v) {
			return 0, 0, 0, false
		}
		total++
		if v.v < 0.5 {
			avail++
		}
		at = max(at, v.t)
	}
	return total, avail, at, total > 0
}

// parkLocation is the car park's counter's location, else the centre of its
// bays' locations.
func (s snapshot) parkLocation(ds []devices.Device) *devices.Location {
	for _, d := range ds {
		if s.isCounter(d) && d.Location != nil {
			return d.Location
		}
	}
	var sum devices.Location
	n := 0
	for _, d := range ds {
		if d.Location == nil {
			continue
		}
		sum.Lat += d.Location.Lat
		sum.Lon += d.Location.Lon
		n++
	}
	if n == 0 {
		return nil
	}
	round := func(x float64) float64 { return math.Round(x*1e7) / 1e7 } // about 1 cm
	return &devices.Location{Lat: round(sum.Lat / float64(n)), Lon: round(sum.Lon / float64(n))}
}

// trafficSignal is one junction's status: working, dark (off), flashing,
// faulty or unknown (nothing fresh).
func (s snapshot) trafficSignal(d devices.Device) entity {
	e := entity{id: entityID(TypeTrafficSignal, s.alias(d.ID)), typ: TypeTrafficSignal}
	states := []string{"off", "red", "amber", "green", "flashing"}
	st, okS := s.values[d.ID]["state"]
	fa, okF := s.values[d.ID]["fault"]
	status, signal, at := "unknown", "unknown", int64(0)
	if okS && s.fresh(d, st) {
		i := int(st.v)
		if i >= 0 && i < len(states) {
			signal = states[i]
		}
		at = st.t
		switch signal {
		case "off":
			status = "dark"
		case "flashing":
			status = "flashing"
		default:
			status = "working"
		}
	}
	if okF && s.fresh(d, fa) && fa.v >= 0.5 {
		status, at = "faulty", max(at, fa.t)
	}
	e.attrs = append(e.attrs,
		attr{name: "status", kind: "Property", value: status, observedAt: at},
		attr{name: "signalState", kind: "Property", value: signal, observedAt: at},
	)
	if d.Group != "" {
		e.attrs = append(e.attrs, attr{name: "corridor", kind: "Property", value: d.Group})
	}
	return withLocation(e, d.Location)
}

// keyValues renders e in the simplified representation.
func (e entity) keyValues() map[string]any {
	m := map[string]any{"id": e.id, "type": e.typ}
	for _, a := range e.attrs {
		m[a.name] = a.value
	}
	return m
}

// normalized renders e in the normalized representation, with observedAt.
func (e entity) normalized() map[string]any {
	m := map[string]any{"id": e.id, "type": e.typ}
	for _, a := range e.attrs {
		v := map[string]any{"type": a.kind}
		if a.kind == "Relationship" {
			v["object"] = a.value
		} else {
			v["value"] = a.value
		}
		if a.observedAt != 0 {
			v["observedAt"] = time.Unix(0, a.observedAt).UTC().Format("2006-01-02T15:04:05.000Z")
		}
		m[a.name] = v
	}
	return m
}

package sim

import (
	"math"
	"time"

	"github.com/citypulse/citypulse/devices"
)

// hourOf is t's time of day in hours, in t's location.
func hourOf(t time.Time) float64 {
	return float64(t.Hour()) + float64(t.Minute())/60 + float64(t.Second())/3600
}

// peak is a bump of height 1 at hour at, width hours wide, around the clock.
func peak(h, at, width float64) float64 {
	d := math.Abs(h - at)
	d = math.Min(d, 24-d)
	return math.Exp(-d * d / (2 * width * width))
}

// WaterDemand is the city's water demand in [0, 1]: a sharp morning peak at
// 7:30 (showers, breakfast), a broader evening one at 19:30, little at night.
func WaterDemand(t time.Time) float64 {
	h := hourOf(t)
	return math.Min(1, 0.15+0.8*peak(h, 7.5, 1.2)+0.55*peak(h, 19.5, 2))
}

// PowerLoad is the share of peak electrical load in [0, 1]: lowest before
// dawn, a daytime plateau and the evening peak at 19:00.
func PowerLoad(t time.Time) float64 {
	h := hourOf(t)
	return math.Min(1, 0.3+0.45*peak(h, 13, 3.5)+0.4*peak(h, 19, 1.5))
}

// Rush is road traffic in [0, 1]: sharp peaks at 8:00 and 17:30.
func Rush(t time.Time) float64 {
	h := hourOf(t)
	return math.Min(1, 0.1+0.9*peak(h, 8, 0.7)+0.9*peak(h, 17.5, 0.7))
}

// ParkingFill is the share of spaces taken in an ordinary day: car parks fill
// in the morning, stay full-ish by day (never past 85 %) and empty at night.
func ParkingFill(t time.Time) float64 {
	return 0.1 + 0.75*peak(hourOf(t), 13, 3)
}

// Conditions are the incidents that hold for a device at a moment.
type Conditions struct {
	Burst   bool // its main burst: pressure collapses, the leak detector fires
	Trip    bool // its district's substation tripped: the meter is silent
	Dark    bool // the junction's signals are off
	Filling bool // its district's car parks fill up
}

// Value models metric m of d at t, with relative noise, clamped into the
// metric's physical range (so the server never rejects a simulated reading).
func (d *Device) Value(m devices.Metric, t time.Time, noise float64, c Conditions) float64 {
	n := func(v float64) float64 { return v * (1 + noise*d.rng.NormFloat64()) }
	var v float64
	switch d.Kind {
	case devices.KindPipe:
		v = d.pipe(m.Name, t, n, c)
	case devices.KindPower:
		v = d.power(m.Name, t, n)
	case devices.KindWater:
		v = d.water(m.Name, t, n)
	case devices.KindTrafficLight:
		v = d.junction(m.Name, t, n, c)
	case devices.KindParking:
		v = d.parking(m.Name, t, c)
	}
	if m.Type == devices.State {
		v = math.Round(v)
	}
	return math.Max(m.Min, math.Min(m.Max, v))
}

// pipe: mains pressure (kPa) dips as demand peaks; a burst main drops to
// almost nothing and the flow through it surges.
func (d *Device) pipe(metric string, t time.Time, n func(float64) float64, c Conditions) float64 {
	demand := WaterDemand(t)
	switch metric {
	case "pressure":
		if c.Burst {
			return n(40)
		}
		return n(470 - 160*demand + 30*(d.rank-0.5)) // the lower the main, the higher the head
	case "flow":
		if c.Burst {
			return n(600)
		}
		return n(30 + 150*demand)
	case "leak":
		return b2f(c.Burst)
	case "gas_concentration":
		return math.Abs(n(0.5))
	case "temperature":
		return n(12)
	}
	return 0
}

// power: current and active power follow the load curve; the register counts.
func (d *Device) power(metric string, t time.Time, n func(float64) float64) float64 {
	load := PowerLoad(t)
	switch metric {
	case "voltage":
		return n(230 - 6*load)
	case "current":
		return n(40 + 160*load)
	case "active_power":
		return n(230 * (40 + 160*load) * 0.95 / 1000)
	case "energy":
		d.energy += 0.01 + 0.05*load
		return d.energy
	case "frequency":
		return 50 + 0.02*d.rng.NormFloat64()
	case "power_factor":
		return 0.95 + 0.01*d.rng.NormFloat64()
	}
	return 0 // fault
}

// water: drainage and reservoir levels follow demand an hour late.
func (d *Device) water(metric string, t time.Time, n func(float64) float64) float64 {
	switch metric {
	case "level":
		return n(2 + 3*d.rank + 0.6*WaterDemand(t.Add(-time.Hour)))
	case "turbidity":
		return math.Abs(n(0.4))
	case "ph":
		return n(7.3)
	case "free_chlorine":
		return math.Abs(n(0.6))
	case "conductivity":
		return n(450)
	case "temperature":
		return n(14)
	}
	return 0
}

// junction: a fixed-time signal plan, 90 s cycles at the rush hours and 60 s
// otherwise, 45 % green, 4 s amber, offset per junction; queues grow with
// traffic and on red. A dark junction reports off and its queue backs up.
func (d *Device) junction(metric string, t time.Time, n func(float64) float64, c Conditions) float64 {
	state := d.signalState(t)
	if c.Dark {
		state = 0
	}
	switch metric {
	case "state":
		return state
	case "queue_length":
		q := 2 + 25*Rush(t)
		switch state {
		case 0:
			q = 60
		case 1:
			q += 5
		}
		return math.Round(math.Abs(n(q)))
	}
	return 0 // fault
}

// signalState is the plan's state at t: 1 red, 2 amber, 3 green.
func (d *Device) signalState(t time.Time) float64 {
	cycle := int64(60)
	if Rush(t) > 0.5 {
		cycle = 90
	}
	green := cycle * 45 / 100
	switch p := (t.Unix() + d.phase) % cycle; {
	case p < green:
		return 3
	case p < green+4:
		return 2
	}
	return 1
}

// parking: a bay is occupied when its district's fill passes its rank; a lot
// of 200 spaces reports what is free. Filling up takes every space.
func (d *Device) parking(metric string, t time.Time, c Conditions) float64 {
	fill := ParkingFill(t)
	if c.Filling {
		fill = 1
	}
	switch metric {
	case "occupied":
		return b2f(fill > d.rank)
	case "total_spot_number":
		return 200
	case "available_spot_number":
		if c.Filling {
			return 0
		}
		return math.Round(200 * (1 - math.Min(1, fill+0.02*d.rng.NormFloat64())))
	}
	return 0
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

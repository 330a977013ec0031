package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"strconv"
	"time"

	"github.com/fxamacker/cbor/v2"

	"github.com/citypulse/citypulse/devices"
)

// simDevice is one simulated field device. Everything but the acks is owned by
// the single goroutine of the connection that serves it.
type simDevice struct {
	ID       string
	Kind     devices.Kind
	District int
	Secret   string
	metrics  []devices.Metric
	rng      *rand.Rand
	skew     time.Duration // this device's clock error
	offline  bool          // goes silent at hostile.offline_at, then backfills
	cursor   int           // next metric within the current point
	lastTS   int64         // ms of the last normal point
	lateTS   int64         // ms of the last late point
	energy   float64       // power meter register
	rank     float64       // a parking bay is occupied when the district's fill exceeds it
	readings []sentReading // every reading generated, in order
}

// sentReading is one reading as generated: (device, seq) is the device and the
// index into readings; ts is unique per (device, metric).
type sentReading struct {
	ts     int64 // unix ms
	value  float64
	metric uint8
	msg    *pubMsg // the message that carried it
}

// Points are stamped on a 4 ms grid so that late readings (ts ≡ 1 mod 4) can
// never land on the timestamp of a normal one (ts ≡ 0 mod 4).
const grid = 4

func districtName(i int) string { return fmt.Sprintf("d%02d", i) }

// deviceSecret derives a device's secret from the scenario seed.
func deviceSecret(seed int64, id string) string {
	m := hmac.New(sha256.New, []byte(strconv.FormatInt(seed, 10)))
	m.Write([]byte(id))
	return hex.EncodeToString(m.Sum(nil))[:24]
}

// buildFleet creates the scenario's devices in a stable order.
func buildFleet(sc Scenario) []*simDevice {
	var out []*simDevice
	rng := rand.New(rand.NewPCG(uint64(sc.Seed), 0x5eed))
	for _, k := range devices.Kinds() {
		n := sc.Fleet.PerDistrict[k]
		schema, _ := devices.SchemaOf(k)
		for d := range sc.Fleet.Districts {
			for i := range n {
				id := fmt.Sprintf("%s-%s-%s-%04d", sc.Fleet.Prefix, kindShort(k), districtName(d), i)
				dev := &simDevice{
					ID: id, Kind: k, District: d, Secret: deviceSecret(sc.Seed, id),
					metrics: deviceMetrics(k, schema, i),
					rng:     rand.New(rand.NewPCG(uint64(sc.Seed), uint64(len(out)+1))),
					energy:  1000 * float64(i+1),
					rank:    (float64(i/2) + 0.5) / float64((n+1)/2),
				}
				if rng.Float64() < sc.Hostile.ClockSkew {
					dev.skew = time.Duration((rng.Float64()*2 - 1) * float64(sc.Hostile.SkewBy))
				}
				dev.offline = rng.Float64() < sc.Hostile.Offline
				out = append(out, dev)
			}
		}
	}
	return out
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

// deviceMetrics is what a device of kind k reports: parking bays (even i)
// report occupancy, lots (odd i) spot numbers.
func deviceMetrics(k devices.Kind, s *devices.Schema, i int) []devices.Metric {
	if k == devices.KindParking {
		names := []string{"occupied"}
		if i%2 == 1 {
			names = []string{"available_spot_number", "total_spot_number"}
		}
		var ms []devices.Metric
		for _, n := range names {
			m, _ := s.Metric(n)
			ms = append(ms, m)
		}
		return ms
	}
	return s.Metrics
}

// diurnal is the shape of a city day in [0, 1]: a morning and an evening peak.
func diurnal(t time.Time) float64 {
	h := float64(t.Hour()) + float64(t.Minute())/60
	peak := func(at, width float64) float64 { return math.Exp(-(h - at) * (h - at) / (2 * width * width)) }
	return math.Min(1, 0.25+0.6*peak(8, 1.5)+0.75*peak(19, 2))
}

// rush is traffic: sharper peaks at 8:00 and 17:30.
func rush(t time.Time) float64 {
	h := float64(t.Hour()) + float64(t.Minute())/60
	peak := func(at float64) float64 { return math.Exp(-(h - at) * (h - at) / 0.5) }
	return math.Min(1, 0.1+0.9*peak(8)+0.9*peak(17.5))
}

// incidentState says which incidents hold for a device at a moment.
type incidentState struct {
	burst, trip, dark, filling bool
}

// value models metric m of d at t, clamped into the metric's physical range.
func (d *simDevice) value(m devices.Metric, t time.Time, noise float64, in incidentState) float64 {
	n := func(v float64) float64 { return v * (1 + noise*d.rng.NormFloat64()) }
	demand := diurnal(t)
	var v float64
	switch d.Kind {
	case devices.KindPipe:
		switch m.Name {
		case "pressure":
			v = n(420 - 90*demand)
			if in.burst {
				v = n(40)
			}
		case "flow":
			v = n(30 + 120*demand)
		case "leak":
			v = b2f(in.burst)
		case "gas_concentration":
			v = math.Abs(n(0.5))
		case "temperature":
			v = n(12)
		}
	case devices.KindPower:
		switch m.Name {
		case "voltage":
			v = n(230)
		case "current":
			v = n(40 + 160*demand)
		case "active_power":
			v = n(230 * (40 + 160*demand) * 0.95 / 1000)
		case "energy":
			d.energy += 0.01 + 0.05*demand
			v = d.energy
		case "frequency":
			v = 50 + 0.02*d.rng.NormFloat64()
		case "power_factor":
			v = 0.95 + 0.01*d.rng.NormFloat64()
		case "fault":
			v = 0
		}
	case devices.KindWater:
		switch m.Name {
		case "level":
			v = n(12 + 0.8*math.Sin(2*math.Pi*demand))
		case "turbidity":
			v = math.Abs(n(0.4))
		case "ph":
			v = n(7.3)
		case "free_chlorine":
			v = math.Abs(n(0.6))
		case "conductivity":
			v = n(450)
		case "temperature":
			v = n(14)
		}
	case devices.KindTrafficLight:
		switch m.Name {
		case "state": // a 90 s cycle: 40 s green, 4 s amber, 46 s red; phase per device
			phase := (t.UnixMilli()/1000 + int64(len(d.ID)*7+d.District*13)) % 90
			switch {
			case in.dark:
				v = 0
			case phase < 40:
				v = 3
			case phase < 44:
				v = 2
			default:
				v = 1
			}
		case "fault":
			v = 0
		case "queue_length":
			v = math.Round(math.Abs(n(2 + 25*rush(t))))
			if in.dark {
				v = math.Round(math.Abs(n(60)))
			}
		}
	case devices.KindParking:
		fill := 0.15 + 0.6*diurnal(t) // at most 75 % full on an ordinary day
		if in.filling {
			fill = 1
		}
		switch m.Name {
		case "occupied":
			v = b2f(fill > d.rank)
		case "total_spot_number":
			v = 200
		case "available_spot_number":
			v = math.Round(200 * (1 - math.Min(1, fill+0.02*d.rng.NormFloat64())))
		}
	}
	if m.Type == devices.State {
		v = math.Round(v)
	}
	return math.Max(m.Min, math.Min(m.Max, v))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// reading is one generated value before encoding.
type encReading struct {
	name string
	ts   int64
	v    float64
}

// encode serialises a message in format f. SenML times are float seconds: the
// encoder adds 0.4 µs so that the server's truncation to ms lands on ts.
func encode(f string, rs []encReading) ([]byte, error) {
	switch f {
	case "json":
		// one object per point: all readings of a message share one time
		obj := map[string]any{"time": rs[0].ts}
		for _, r := range rs {
			obj[r.name] = r.v
		}
		return json.Marshal(obj)
	case "senml-json":
		b := make([]byte, 0, 48*len(rs)+2)
		b = append(b, '[')
		for i, r := range rs {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"n":`...)
			b = strconv.AppendQuote(b, r.name)
			b = append(b, `,"t":`...)
			b = strconv.AppendFloat(b, float64(r.ts)/1000+4e-7, 'f', 7, 64)
			b = append(b, `,"v":`...)
			b = strconv.AppendFloat(b, r.v, 'g', -1, 64)
			b = append(b, '}')
		}
		return append(b, ']'), nil
	case "senml-cbor":
		recs := make([]map[int]any, len(rs))
		for i, r := range rs {
			recs[i] = map[int]any{0: r.name, 6: float64(r.ts)/1000 + 4e-7, 2: r.v}
		}
		return cbor.Marshal(recs)
	}
	return nil, fmt.Errorf("unknown format %q", f)
}

// malformed returns the i-th kind of garbage a broken device sends.
func malformed(i int) ([]byte, string) {
	all := []struct {
		body   string
		reason string
	}{
		{`[{"n":"pressure","v":`, "truncated SenML"},
		{"\xff\xfe not utf-8", "invalid UTF-8"},
		{`[{"n":"pressure","v":1e999}]`, "non-finite value"},
		{`[{"n":"no_such_metric","v":1}]`, "unknown metric"},
		{`{"time":"yesterday","pressure":1}`, "bad time"},
		{`[{"n":"pressure","v":-5}]`, "out of range"},
	}
	m := all[i%len(all)]
	return []byte(m.body), m.reason
}

// contentType is the MQTT v5 / CoAP media type of format f.
func contentType(f string) string {
	switch f {
	case "senml-cbor":
		return "application/senml+cbor"
	case "json":
		return "application/json"
	}
	return "application/senml+json"
}

// isLoopback reports whether host:port names a loopback address.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

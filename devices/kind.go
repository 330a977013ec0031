package devices

import (
	"fmt"
	"math"
	"sort"
)

// Kind names a class of field device. Every device has exactly one kind, and the
// kind's Schema says which metrics it may report.
type Kind string

// The five device kinds of a city network.
const (
	KindPipe         Kind = "pipe"          // water supply, drainage and gas pipes
	KindPower        Kind = "power"         // power meters and substations
	KindWater        Kind = "water"         // water works: level and quality probes
	KindTrafficLight Kind = "traffic_light" // signalled junctions
	KindParking      Kind = "parking"       // parking bays and lots
)

// KindCity is the kind of the vital-sign roll-ups (rules.Vitals), which every
// sink stores as city_<name>{district}. No device has it: it has no Schema,
// so the registry refuses a device of this kind and Kinds does not list it.
const KindCity Kind = "city"

// MetricType says how a metric's values behave over time.
type MetricType int

// Metric types.
const (
	Gauge   MetricType = iota // a value that goes up and down
	Counter                   // a monotonically increasing total
	State                     // an enumerated state; the value is an index into Metric.States
)

func (t MetricType) String() string {
	switch t {
	case Gauge:
		return "gauge"
	case Counter:
		return "counter"
	case State:
		return "state"
	}
	return fmt.Sprintf("MetricType(%d)", int(t))
}

// Metric describes one metric of a kind: its unit and the physical range outside
// which a value is bad input rather than a measurement.
type Metric struct {
	Name string // snake_case; the stored series is <kind>_<name>
	// FIWARE is the Smart Data Models attribute this metric follows, if one exists.
	FIWARE string
	Unit   string // UCUM-style unit ("kPa", "m3/h", "1" for dimensionless)
	Type   MetricType
	Min    float64 // inclusive
	Max    float64 // inclusive
	// States lists the names of an enumerated metric's values: value i means States[i].
	// Booleans are states ["false", "true"]: 0 and 1.
	States []string
	Help   string
}

// StateIndex returns the value of a state name ("off", "green", "true") for an
// enumerated metric.
func (m Metric) StateIndex(name string) (float64, bool) {
	for i, s := range m.States {
		if s == name {
			return float64(i), true
		}
	}
	return 0, false
}

// RangeError says that a value lies outside a metric's physical range, or is not
// one of its states.
type RangeError struct {
	Kind   Kind
	Metric string
	Value  float64
	Min    float64
	Max    float64
}

func (e *RangeError) Error() string {
	return fmt.Sprintf("%s %s = %g is outside its physical range [%g, %g]", e.Kind, e.Metric, e.Value, e.Min, e.Max)
}

// Check reports whether v is a valid value of m: finite, inside [Min, Max], and for
// a state metric a whole index into States.
func (m Metric) Check(kind Kind, v float64) error {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return fmt.Errorf("%s %s: value %v is not a finite number", kind, m.Name, v)
	}
	if v < m.Min || v > m.Max || (m.Type == State && v != math.Trunc(v)) {
		return &RangeError{Kind: kind, Metric: m.Name, Value: v, Min: m.Min, Max: m.Max}
	}
	return nil
}

// Schema is the set of metrics a kind reports.
type Schema struct {
	Kind Kind
	// FIWARE is the Smart Data Models entity type this kind follows.
	FIWARE  string
	Metrics []Metric
	byName  map[string]int
}

// Metric returns the metric called name.
func (s *Schema) Metric(name string) (Metric, bool) {
	i, ok := s.byName[name]
	if !ok {
		return Metric{}, false
	}
	return s.Metrics[i], true
}

var boolStates = []string{"false", "true"}

func gauge(name, fiware, unit string, lo, hi float64, help string) Metric {
	return Metric{Name: name, FIWARE: fiware, Unit: unit, Type: Gauge, Min: lo, Max: hi, Help: help}
}

func flag(name, fiware, help string) Metric {
	return Metric{Name: name, FIWARE: fiware, Unit: "1", Type: State, Min: 0, Max: 1, States: boolStates, Help: help}
}

// schemas holds the five kinds. Ranges are physical plausibility bounds, wide
// enough for any real installation and narrow enough to catch a broken encoder.
var schemas = map[Kind]*Schema{
	KindPipe: {Kind: KindPipe, FIWARE: "WaterNetwork/Pipe", Metrics: []Metric{
		gauge("pressure", "pressure", "kPa", 0, 10000, "line pressure"),
		gauge("flow", "flow", "m3/h", -100000, 100000, "volumetric flow; negative is reverse flow"),
		flag("leak", "leakDetected", "acoustic or pressure-transient leak detector"),
		gauge("gas_concentration", "gasConcentration", "%LEL", 0, 100, "gas concentration as a share of the lower explosive limit"),
		gauge("temperature", "temperature", "Cel", -50, 150, "medium temperature"),
	}},
	KindPower: {Kind: KindPower, FIWARE: "Energy/ThreePhaseAcMeasurement", Metrics: []Metric{
		gauge("voltage", "phaseVoltage", "V", 0, 1000000, "RMS voltage"),
		gauge("current", "current", "A", 0, 100000, "RMS current"),
		gauge("active_power", "activePower", "kW", -1000000, 1000000, "active power; negative is export"),
		{Name: "energy", FIWARE: "activeEnergyImport", Unit: "kWh", Type: Counter, Min: 0, Max: 1e12, Help: "imported active energy (meter register)"},
		gauge("frequency", "frequency", "Hz", 40, 70, "grid frequency"),
		gauge("power_factor", "powerFactor", "1", -1, 1, "displacement power factor"),
		flag("fault", "", "protection relay tripped or device fault"),
	}},
	KindWater: {Kind: KindWater, FIWARE: "WaterQualityObserved", Metrics: []Metric{
		gauge("level", "height", "m", -100, 1000, "water level above datum"),
		gauge("turbidity", "turbidity", "NTU", 0, 4000, "turbidity"),
		gauge("ph", "pH", "pH", 0, 14, "acidity"),
		gauge("free_chlorine", "freeChlorine", "mg/L", 0, 100, "free chlorine"),
		gauge("conductivity", "conductivity", "uS/cm", 0, 200000, "electrical conductivity"),
		gauge("temperature", "temperature", "Cel", -10, 60, "water temperature"),
	}},
	KindTrafficLight: {Kind: KindTrafficLight, FIWARE: "TrafficFlowObserved", Metrics: []Metric{
		{Name: "state", FIWARE: "", Unit: "1", Type: State, Min: 0, Max: 4,
			States: []string{"off", "red", "amber", "green", "flashing"}, Help: "signal state"},
		flag("fault", "", "controller or lamp fault"),
		gauge("queue_length", "queueLength", "{vehicle}", 0, 10000, "vehicles queued at the stop line"),
	}},
	KindParking: {Kind: KindParking, FIWARE: "ParkingSpot/OffStreetParking", Metrics: []Metric{
		flag("occupied", "status", "a bay is occupied"),
		gauge("available_spot_number", "availableSpotNumber", "{spot}", 0, 100000, "free spaces in a lot"),
		gauge("total_spot_number", "totalSpotNumber", "{spot}", 0, 100000, "total spaces in a lot"),
	}},
}

func init() {
	for _, s := range schemas {
		s.byName = make(map[string]int, len(s.Metrics))
		for i, m := range s.Metrics {
			if m.Type == State {
				s.Metrics[i].Max = float64(len(m.States) - 1)
			}
			s.byName[m.Name] = i
		}
	}
}

// SchemaOf returns the schema of kind k.
func SchemaOf(k Kind) (*Schema, bool) {
	s, ok := schemas[k]
	return s, ok
}

// Kinds returns the known kinds, sorted.
func Kinds() []Kind {
	ks := make([]Kind, 0, len(schemas))
	for k := range schemas {
		ks = append(ks, k)
	}
	sort.Slice(ks, func(i, j int) bool { return ks[i] < ks[j] })
	return ks
}

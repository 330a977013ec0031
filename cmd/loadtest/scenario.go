package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/sim"
)

// Scenario is one simulated city and how it is driven. A YAML file under
// configs/loadtest/ sets it; flags override the common knobs.
type Scenario struct {
	Name string `yaml:"name" json:"name"`
	// Seed makes device ids, secrets, signals and hostile choices repeatable.
	Seed int64 `yaml:"seed" json:"seed"`

	Fleet     Fleet     `yaml:"fleet" json:"fleet"`
	Transport Transport `yaml:"transport" json:"transport"`
	Target    Target    `yaml:"target" json:"target"`

	// Rate is the target rate in messages per second over the whole fleet;
	// 0 is open loop: every connection publishes as fast as its acks allow.
	Rate float64 `yaml:"rate" json:"rate"`
	// ReadingsPerMessage is how many readings one message carries.
	ReadingsPerMessage int `yaml:"readings_per_message" json:"readings_per_message"`
	// Format is senml-json, senml-cbor or json.
	Format string `yaml:"format" json:"format"`
	// Duration and MaxMessages bound the run: it stops at whichever comes first.
	Duration    time.Duration `yaml:"duration" json:"duration"`
	MaxMessages int64         `yaml:"max_messages" json:"max_messages"`
	// Settle is how long the checker waits for the last readings to become
	// queryable before it counts them lost.
	Settle time.Duration `yaml:"settle" json:"settle"`

	Incidents []Incident `yaml:"incidents" json:"incidents"`
	Hostile   Hostile    `yaml:"hostile" json:"hostile"`
	Measure   Measure    `yaml:"measure" json:"measure"`
}

// Fleet is the simulated city: Devices of each kind in each of Districts.
type Fleet struct {
	Districts int `yaml:"districts" json:"districts"`
	// PerDistrict is the number of devices of each kind in each district.
	PerDistrict map[devices.Kind]int `yaml:"per_district" json:"per_district"`
	// Prefix starts every device id. Unique adds the run's own id after it, so
	// that runs against one store never see each other's readings (late
	// readings reach back into the previous run); it needs target.provision.
	// Without it, ids are stable: `loadtest devices` writes them to a file.
	Prefix string `yaml:"prefix" json:"prefix"`
	Unique bool   `yaml:"unique" json:"unique"`
	// Interval is each device's nominal reporting interval (registered with the
	// server; deadman rules use it).
	Interval time.Duration `yaml:"interval" json:"interval"`
	// Noise is the relative standard deviation of sensor noise.
	Noise float64 `yaml:"noise" json:"noise"`
	// TimeOfDay is the hour of the daily shapes (package sim: water demand,
	// power load, car parks filling) the fleet starts at, run time added, so
	// what a run raises does not depend on when it runs. Default 03:00: the
	// quiet of the night, where only injected incidents raise alerts.
	TimeOfDay time.Duration `yaml:"time_of_day" json:"time_of_day"`
}

// Transport says how devices reach the server.
type Transport struct {
	// Protocol is mqtt or coap.
	Protocol string `yaml:"protocol" json:"protocol"`
	// QoS is the MQTT QoS, 0 or 1.
	QoS byte `yaml:"qos" json:"qos"`
	// Connections is the number of MQTT connections or CoAP clients; 0 is one
	// per device. Fewer connections than devices (multiplexed) need a broker
	// that lets one client publish for many devices (CityPulse's per-device ACL
	// does not, for MQTT).
	Connections int `yaml:"connections" json:"connections"`
	// Confirmable selects CoAP CON (true) or NON requests.
	Confirmable bool `yaml:"confirmable" json:"confirmable"`
	// DTLS sends CoAP over DTLS-PSK, one session per device.
	DTLS bool `yaml:"dtls" json:"dtls"`
	// InFlight bounds unacknowledged messages per connection.
	InFlight int `yaml:"in_flight" json:"in_flight"`
}

// Target is the server under test.
type Target struct {
	MQTT string `yaml:"mqtt" json:"mqtt"` // host:port
	CoAP string `yaml:"coap" json:"coap"` // host:port (DTLS when transport.dtls)
	// HTTP is the CityPulse HTTP API (query, devices, metrics); empty turns off
	// provisioning, queryable latency and the store check (a bare broker).
	HTTP string `yaml:"http" json:"http"`
	// AdminToken registers the fleet through POST /api/v1/devices; ReadToken
	// queries. Both may come from LOADTEST_ADMIN_TOKEN / _READ_TOKEN.
	AdminToken string `yaml:"admin_token" json:"-"`
	ReadToken  string `yaml:"read_token" json:"-"`
	// Provision registers the fleet before the run (needs the admin token).
	Provision bool `yaml:"provision" json:"provision"`
	// AllowRemote lets the harness target a non-loopback address.
	AllowRemote bool `yaml:"allow_remote" json:"allow_remote"`
}

// Incident is a scheduled event in the city (the sim model's schedule) that
// a rule should turn into an alert.
type Incident struct {
	sim.Incident `yaml:",inline"`
	// Alert is the alertname expected at the webhook receiver; Per says whether
	// the rule alerts per device or per district (default: by type).
	Alert string `yaml:"alert" json:"alert"`
	Per   string `yaml:"per" json:"per"`
}

// defaultPer is how the stock rules alert on each incident: burst_main and
// dark_junction per device, the fleet and roll-up rules per district.
var defaultPer = map[string]string{"burst_main": "device", "dark_junction": "device",
	"substation_trip": "district", "car_park_filling": "district"}

// Hostile are the realities of a field network, each a share of messages or
// devices (0 to 1) or a schedule.
type Hostile struct {
	Duplicates float64 `yaml:"duplicates" json:"duplicates"`     // messages sent twice
	OutOfOrder float64 `yaml:"out_of_order" json:"out_of_order"` // messages swapped with the next one
	// Late messages carry readings LateBy in the past.
	Late   float64       `yaml:"late" json:"late"`
	LateBy time.Duration `yaml:"late_by" json:"late_by"`
	// Offline devices go silent at OfflineAt for OfflineFor, then backfill.
	Offline    float64       `yaml:"offline" json:"offline"`
	OfflineAt  time.Duration `yaml:"offline_at" json:"offline_at"`
	OfflineFor time.Duration `yaml:"offline_for" json:"offline_for"`
	// ClockSkew devices stamp readings up to SkewBy off the true time.
	ClockSkew float64       `yaml:"clock_skew" json:"clock_skew"`
	SkewBy    time.Duration `yaml:"skew_by" json:"skew_by"`
	// ReconnectStormAt drops every connection at once and reconnects (MQTT).
	ReconnectStormAt time.Duration `yaml:"reconnect_storm_at" json:"reconnect_storm_at"`
	// Malformed messages are garbage the server must reject and count.
	Malformed float64 `yaml:"malformed" json:"malformed"`
}

// Measure configures the latency probes and the store check.
type Measure struct {
	// QueryableSample is the share of messages whose first reading is polled
	// on the query API until it is visible.
	QueryableSample float64       `yaml:"queryable_sample" json:"queryable_sample"`
	QueryablePoll   time.Duration `yaml:"queryable_poll" json:"queryable_poll"`
	// Webhook is the address of the harness's signed-webhook receiver; the
	// server's rules.notify receiver must point at http://<Webhook>/hook.
	Webhook       string `yaml:"webhook" json:"webhook"`
	WebhookSecret string `yaml:"webhook_secret" json:"-"`
	// Check counts lost, duplicated and unexpected readings in the store.
	Check bool `yaml:"check" json:"check"`
}

// DefaultScenario is a small city that runs for 30 s.
func DefaultScenario() Scenario {
	return Scenario{
		Name: "default",
		Seed: 1,
		Fleet: Fleet{
			Districts: 4,
			PerDistrict: map[devices.Kind]int{
				devices.KindPipe: 5, devices.KindPower: 5, devices.KindWater: 2,
				devices.KindTrafficLight: 5, devices.KindParking: 5,
			},
			Prefix:    "lt",
			Unique:    true,
			Interval:  10 * time.Second,
			Noise:     0.01,
			TimeOfDay: 3 * time.Hour,
		},
		Transport:          Transport{Protocol: "mqtt", QoS: 1, Confirmable: true, InFlight: 32},
		Target:             Target{MQTT: "127.0.0.1:1883", CoAP: "127.0.0.1:5683", HTTP: "127.0.0.1:8080", Provision: true},
		Rate:               1000,
		ReadingsPerMessage: 10,
		Format:             "senml-json",
		Duration:           30 * time.Second,
		Settle:             30 * time.Second,
		Hostile:            Hostile{LateBy: 5 * time.Minute, SkewBy: 2 * time.Second, OfflineFor: time.Minute},
		Measure:            Measure{QueryableSample: 0.001, QueryablePoll: 5 * time.Millisecond, Check: true},
	}
}

// LoadScenario reads a scenario file over the defaults; unknown keys are errors.
func LoadScenario(path string) (Scenario, error) {
	sc := DefaultScenario()
	if path == "" {
		return sc, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return sc, err
	}
	sc.Fleet.PerDistrict = nil // a file's fleet replaces the default one, not merges into it
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&sc); err != nil {
		return sc, fmt.Errorf("scenario %s: %w", path, err)
	}
	sc.fillDefaults()
	return sc, nil
}

// fillDefaults completes what a scenario may leave out.
func (s *Scenario) fillDefaults() {
	if s.Fleet.PerDistrict == nil {
		s.Fleet.PerDistrict = DefaultScenario().Fleet.PerDistrict
	}
	for i := range s.Incidents {
		if s.Incidents[i].Per == "" {
			s.Incidents[i].Per = defaultPer[s.Incidents[i].Type]
		}
	}
}

func share(name string, v float64) error {
	if v < 0 || v > 1 {
		return fmt.Errorf("%s = %g: want a share between 0 and 1", name, v)
	}
	return nil
}

// Validate reports every problem of the scenario at once.
func (s Scenario) Validate() error {
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if s.Fleet.Districts < 1 || s.Fleet.Districts > 1000 {
		add(fmt.Errorf("fleet.districts = %d: want 1..1000", s.Fleet.Districts))
	}
	total := 0
	for k, n := range s.Fleet.PerDistrict {
		if _, ok := devices.SchemaOf(k); !ok {
			add(fmt.Errorf("fleet.per_district: unknown kind %q", k))
		}
		if n < 0 {
			add(fmt.Errorf("fleet.per_district.%s = %d: want >= 0", k, n))
		}
		total += n
	}
	if total == 0 {
		add(errors.New("fleet.per_district: the fleet has no devices"))
	}
	if s.Fleet.Interval <= 0 {
		add(fmt.Errorf("fleet.interval = %v: want > 0", s.Fleet.Interval))
	}
	if s.Fleet.TimeOfDay < 0 || s.Fleet.TimeOfDay >= 24*time.Hour {
		add(fmt.Errorf("fleet.time_of_day = %v: want 0s..23h59m", s.Fleet.TimeOfDay))
	}
	switch s.Transport.Protocol {
	case "mqtt":
		if s.Transport.QoS > 1 {
			add(fmt.Errorf("transport.qos = %d: want 0 or 1", s.Transport.QoS))
		}
	case "coap":
	default:
		add(fmt.Errorf("transport.protocol %q: want mqtt or coap", s.Transport.Protocol))
	}
	if s.Transport.Connections < 0 {
		add(fmt.Errorf("transport.connections = %d: want >= 0 (0 = one per device)", s.Transport.Connections))
	}
	if s.Transport.InFlight < 1 {
		add(fmt.Errorf("transport.in_flight = %d: want >= 1", s.Transport.InFlight))
	}
	switch s.Format {
	case "senml-json", "senml-cbor", "json":
	default:
		add(fmt.Errorf("format %q: want senml-json, senml-cbor or json", s.Format))
	}
	if s.ReadingsPerMessage < 1 || s.ReadingsPerMessage > 1000 {
		add(fmt.Errorf("readings_per_message = %d: want 1..1000", s.ReadingsPerMessage))
	}
	if s.Rate < 0 {
		add(fmt.Errorf("rate = %g: want >= 0 (0 = open loop)", s.Rate))
	}
	if s.Duration <= 0 || s.Duration > 24*time.Hour {
		add(fmt.Errorf("duration = %v: want > 0 and <= 24h (every run stops by itself)", s.Duration))
	}
	if s.MaxMessages < 0 {
		add(fmt.Errorf("max_messages = %d: want >= 0", s.MaxMessages))
	}
	for i, in := range s.Incidents {
		if _, ok := sim.IncidentKinds[in.Type]; !ok {
			add(fmt.Errorf("incidents[%d].type %q: want burst_main, substation_trip, dark_junction or car_park_filling", i, in.Type))
		}
		if in.Per != "" && in.Per != "device" && in.Per != "district" {
			add(fmt.Errorf("incidents[%d].per %q: want device or district", i, in.Per))
		}
		if in.Type == "substation_trip" && in.Per == "device" {
			add(fmt.Errorf("incidents[%d]: a substation trip silences devices; its alert is per district", i))
		}
		if in.Lasts <= 0 {
			add(fmt.Errorf("incidents[%d].lasts = %v: want > 0", i, in.Lasts))
		}
		if in.Devices < 0 || in.District < 0 {
			add(fmt.Errorf("incidents[%d]: devices (%d) and district (%d) must be >= 0", i, in.Devices, in.District))
		}
		if in.Every != 0 && in.Every <= in.Lasts {
			add(fmt.Errorf("incidents[%d].every = %v: want more than lasts (%v)", i, in.Every, in.Lasts))
		}
	}
	h := s.Hostile
	for name, v := range map[string]float64{"duplicates": h.Duplicates, "out_of_order": h.OutOfOrder, "late": h.Late,
		"offline": h.Offline, "clock_skew": h.ClockSkew, "malformed": h.Malformed} {
		add(share("hostile."+name, v))
	}
	add(share("measure.queryable_sample", s.Measure.QueryableSample))
	if s.Target.HTTP == "" && (s.Measure.Check || s.Target.Provision || s.Measure.QueryableSample > 0) {
		add(errors.New("target.http is empty: turn off measure.check, measure.queryable_sample and target.provision for a bare broker"))
	}
	if s.Fleet.Unique && !s.Target.Provision {
		add(errors.New("fleet.unique needs target.provision: the run's device ids are new each run"))
	}
	if len(s.Incidents) > 0 && s.Measure.Webhook == "" {
		add(errors.New("incidents need measure.webhook (the harness's receiver) to measure alert latency"))
	}
	if s.Measure.Webhook != "" && len(s.Measure.WebhookSecret) < 16 {
		add(errors.New("measure.webhook_secret: want the receiver's shared secret (16+ bytes) to verify signatures"))
	}
	if !s.Target.AllowRemote {
		for _, a := range []string{s.Target.MQTT, s.Target.CoAP, s.Target.HTTP, s.Measure.Webhook} {
			if a != "" && !isLoopback(a) {
				add(fmt.Errorf("target %q is not loopback; set target.allow_remote to load a remote server", a))
			}
		}
	}
	return errors.Join(errs...)
}

package opendata

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/pipeline"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var t0 = time.Date(2026, 12, 1, 8, 0, 0, 0, time.UTC)

type deviceList []devices.Device

func (l deviceList) List() []devices.Device { return l }

func loc(lat, lon float64) *devices.Location { return &devices.Location{Lat: lat, Lon: lon} }

// city is a small public fleet: two bays of car park "central", a bay on the
// street that never reported, a car-park counter, two junctions, and a pipe
// that is not public.
var city = deviceList{
	{ID: "bay-0001", Kind: devices.KindParking, District: "gulou", Interval: 30 * time.Second, Secret: "secret-bay-0001", Group: "central", Location: loc(32.0601, 118.7801)},
	{ID: "bay-0002", Kind: devices.KindParking, District: "gulou", Interval: 30 * time.Second, Secret: "secret-bay-0002", Group: "central", Location: loc(32.0603, 118.7803)},
	{ID: "bay-0003", Kind: devices.KindParking, District: "xuanwu", Interval: 30 * time.Second, Secret: "secret-bay-0003", Location: loc(32.05, 118.79)},
	{ID: "lot-0001", Kind: devices.KindParking, District: "gulou", Interval: 60 * time.Second, Secret: "secret-lot-0001", Location: loc(32.07, 118.77)},
	{ID: "tl-0001", Kind: devices.KindTrafficLight, District: "gulou", Interval: 10 * time.Second, Secret: "secret-tl-0001", Group: "zhongshan-road", Location: loc(32.061, 118.781)},
	{ID: "tl-0002", Kind: devices.KindTrafficLight, District: "gulou", Interval: 10 * time.Second, Secret: "secret-tl-0002", Location: loc(32.062, 118.782)},
	{ID: "pipe-0001", Kind: devices.KindPipe, District: "gulou", Interval: 10 * time.Second, Secret: "secret-pipe-0001", Location: loc(32.0, 118.7)},
}

func reading(dev, kind, metric string, v float64, ago time.Duration) pipeline.Reading {
	return pipeline.Reading{Device: dev, Kind: kind, District: "gulou", Metric: metric, Value: v, Time: t0.Add(-ago).UnixNano()}
}

// newCityFeed returns a feed over city with its devices' readings observed.
func newCityFeed(t *testing.T, cfg Config) *Feed {
	t.Helper()
	f := New(Options{Config: cfg, Devices: city, Registerer: prometheus.NewRegistry(), Now: func() time.Time { return t0 }})
	f.Observe(0, []pipeline.Reading{reading("bay-0001", "parking", "occupied", 1, 10*time.Second)})
	f.Observe(0, []pipeline.Reading{reading("bay-0002", "parking", "occupied", 0, 20*time.Second)})
	f.Observe(0, []pipeline.Reading{
		reading("lot-0001", "parking", "available_spot_number", 12, 30*time.Second),
		reading("lot-0001", "parking", "total_spot_number", 200, 30*time.Second),
	})
	f.Observe(0, []pipeline.Reading{reading("tl-0001", "traffic_light", "state", 3, 5*time.Second), reading("tl-0001", "traffic_light", "queue_length", 7, 5*time.Second)})
	// tl-0002 reported "off" long ago: stale, so unknown, not dark.
	f.Observe(0, []pipeline.Reading{reading("tl-0002", "traffic_light", "state", 0, 10*time.Minute)})
	f.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "pressure", 400, time.Second)})
	return f
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("..", "testdata", "opendata", name)
	if *update {
		require.NoError(t, os.WriteFile(path, got, 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err)
	require.JSONEq(t, string(want), string(got))
}

func TestEntitiesMatchTheGoldenFiles(t *testing.T) {
	f := newCityFeed(t, Default())
	es := f.snapshot().entities(0.9)
	for _, form := range []string{"normalized", "keyValues"} {
		var out []map[string]any
		for _, e := range es {
			if form == "keyValues" {
				out = append(out, e.keyValues())
			} else {
				out = append(out, e.normalized())
			}
		}
		b, err := json.MarshalIndent(out, "", "  ")
		require.NoError(t, err)
		golden(t, "entities."+form+".json", append(b, '\n'))
	}
}

func TestStatusRules(t *testing.T) {
	kv := func(f *Feed, id string) map[string]any {
		for _, e := range f.snapshot().entities(0.9) {
			if e.id == id {
				return e.keyValues()
			}
		}
		t.Fatalf("no entity %s", id)
		return nil
	}
	cases := []struct {
		name string
		obs  []pipeline.Reading
		id   string
		key  string
		want any
		gone []string // keys that must be absent
	}{
		{name: "an occupied bay is occupied", id: "urn:ngsi-ld:ParkingSpot:bay-0001", key: "status", want: "occupied"},
		{name: "a bay never heard from is unknown", id: "urn:ngsi-ld:ParkingSpot:bay-0003", key: "status", want: "unknown"},
		{name: "a late reading does not replace a newer one",
			obs: []pipeline.Reading{reading("bay-0001", "parking", "occupied", 0, 25*time.Second)},
			id:  "urn:ngsi-ld:ParkingSpot:bay-0001", key: "status", want: "occupied"},
		{name: "a car park of bays counts its free bays", id: "urn:ngsi-ld:OffStreetParking:central", key: "availableSpotNumber", want: float64(1)},
		{name: "a car park counter gives its own figures", id: "urn:ngsi-ld:OffStreetParking:lot-0001", key: "occupancy", want: 0.94},
		{name: "a car park at 94 % is almost full", id: "urn:ngsi-ld:OffStreetParking:lot-0001", key: "status", want: []any{"almostFull"}},
		{name: "a green junction is working", id: "urn:ngsi-ld:TrafficSignal:tl-0001", key: "status", want: "working"},
		{name: "a stale dark junction is unknown, not dark", id: "urn:ngsi-ld:TrafficSignal:tl-0002", key: "signalState", want: "unknown"},
		{name: "a faulted junction is faulty",
			obs: []pipeline.Reading{reading("tl-0001", "traffic_light", "fault", 1, time.Second)},
			id:  "urn:ngsi-ld:TrafficSignal:tl-0001", key: "status", want: "faulty"},
		{name: "a car park with every bay occupied is full",
			obs: []pipeline.Reading{reading("bay-0002", "parking", "occupied", 1, 0)},
			id:  "urn:ngsi-ld:OffStreetParking:central", key: "status", want: []any{"full"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newCityFeed(t, Default())
			f.Observe(0, c.obs)
			got, err := json.Marshal(kv(f, c.id)[c.key])
			require.NoError(t, err)
			want, err := json.Marshal(c.want)
			require.NoError(t, err)
			require.JSONEq(t, string(want), string(got))
		})
	}
	t.Run("a stale bay makes its car park's availability unknown", func(t *testing.T) {
		f := newCityFeed(t, Default())
		f.now = func() time.Time { return t0.Add(85 * time.Second) } // bay-0002 (20 s old at t0) is now 105 s old: > 90 s
		m := kv(f, "urn:ngsi-ld:OffStreetParking:central")
		require.NotContains(t, m, "availableSpotNumber")
		require.NotContains(t, m, "status")
		require.Equal(t, "unknown", kv(f, "urn:ngsi-ld:ParkingSpot:bay-0002")["status"])
	})
}

func TestNothingPrivateIsPublished(t *testing.T) {
	cfg := Default()
	cfg.Kinds = []string{"parking"}
	f := newCityFeed(t, cfg)
	srv := httptest.NewServer(f.Handler())
	defer srv.Close()
	var all bytes.Buffer
	for _, q := range []string{"type=ParkingSpot,OffStreetParking,TrafficSignal&limit=1000", "type=ParkingSpot&options=keyValues"} {
		resp, err := http.Get(srv.URL + "/ngsi-ld/v1/entities?" + q)
		require.NoError(t, err)
		_, _ = all.ReadFrom(resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}
	body := all.String()
	for _, private := range []string{"secret", "pipe", "tl-0001", "queue_length"} {
		require.NotContains(t, body, private)
	}
	require.Contains(t, body, "bay-0001")
}

func TestMain(m *testing.M) {
	flag.Parse()
	goleak.VerifyTestMain(m)
}

// With an id key, no entity id or name carries a device id (which is also its
// MQTT user name and DTLS identity), and an entity is found by its alias.
func TestPublicIDsAreAliasesUnderTheIDKey(t *testing.T) {
	cfg := Default()
	cfg.IDKey = "a city's secret"
	f := newCityFeed(t, cfg)
	srv := httptest.NewServer(f.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/ngsi-ld/v1/entities?type=ParkingSpot,OffStreetParking,TrafficSignal&limit=1000")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	for _, device := range []string{"bay-0001", "bay-0002", "lot-0001", "tl-0001", "tl-0002"} {
		require.NotContains(t, string(body), device)
	}
	alias := func(id string) string { return Alias(cfg.IDKey, id) }
	require.Len(t, alias("bay-0001"), 16)
	require.NotEqual(t, alias("bay-0001"), Alias("another key", "bay-0001"), "the alias depends on the key")
	for _, id := range []string{"urn:ngsi-ld:ParkingSpot:" + alias("bay-0001"), "urn:ngsi-ld:OffStreetParking:" + alias("lot-0001"),
		"urn:ngsi-ld:TrafficSignal:" + alias("tl-0001"), "urn:ngsi-ld:OffStreetParking:central"} {
		resp, err := http.Get(srv.URL + "/ngsi-ld/v1/entities/" + id)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, id)
	}
}

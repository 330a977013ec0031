package devices

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func dev(id string) Device {
	return Device{ID: id, Kind: KindPipe, District: "gulou", Interval: 10 * time.Second, Secret: "secret-" + id}
}

func TestDeviceValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Device)
		want   string
	}{
		{"an upper-case id is refused", func(d *Device) { d.ID = "Pipe-1" }, "device id"},
		{"an unknown kind is refused", func(d *Device) { d.Kind = "toaster" }, "unknown kind"},
		{"an empty district is refused", func(d *Device) { d.District = "" }, "district"},
		{"a sub-second interval is refused", func(d *Device) { d.Interval = time.Millisecond }, "interval"},
		{"a short secret is refused", func(d *Device) { d.Secret = "short" }, "secret"},
		{"a group with spaces is refused", func(d *Device) { d.Group = "car park" }, "group"},
		{"a latitude past the pole is refused", func(d *Device) { d.Location = &Location{Lat: 91, Lon: 0} }, "location"},
		{"a longitude past the antimeridian is refused", func(d *Device) { d.Location = &Location{Lat: 0, Lon: -181} }, "location"},
	}
	require.NoError(t, dev("pipe-0001").Validate())
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := dev("pipe-0001")
			tc.mutate(&d)
			require.ErrorContains(t, d.Validate(), tc.want)
		})
	}
}

func TestTheDemoFleetLoads(t *testing.T) {
	list, err := LoadFile("../configs/devices.yaml")
	require.NoError(t, err)
	kinds := map[Kind]bool{}
	for _, d := range list {
		kinds[d.Kind] = true
	}
	require.Len(t, kinds, len(Kinds()), "the demo fleet has every kind")
}

func TestLoadFileRejectsDuplicatesAndUnknownKeys(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "d.yaml")
		require.NoError(t, os.WriteFile(p, []byte(s), 0o600))
		return p
	}
	_, err := LoadFile(write("devices:\n- {id: a-1, kind: pipe, district: x, interval: 10s, secret: 12345678}\n- {id: a-1, kind: pipe, district: x, interval: 10s, secret: 12345678}\n"))
	require.ErrorIs(t, err, ErrDuplicate)
	_, err = LoadFile(write("devices:\n- {id: a-1, kind: pipe, district: x, interval: 10s, secret: 12345678, colour: red}\n"))
	require.ErrorContains(t, err, "colour")
}

func TestRegistryAuthenticates(t *testing.T) {
	r, err := NewRegistry([]Device{dev("pipe-0001")}, "")
	require.NoError(t, err)
	_, ok := r.Authenticate("pipe-0001", "secret-pipe-0001")
	require.True(t, ok)
	_, ok = r.Authenticate("pipe-0001", "wrong")
	require.False(t, ok)
	_, ok = r.Authenticate("pipe-9999", "secret-pipe-0001")
	require.False(t, ok)
}

func TestRuntimeChangesSurviveARestart(t *testing.T) {
	state := filepath.Join(t.TempDir(), "overlay.json")
	base := []Device{dev("pipe-0001"), dev("pipe-0002")}
	r, err := NewRegistry(base, state)
	require.NoError(t, err)
	require.NoError(t, r.Add(dev("pipe-0003")))
	require.ErrorIs(t, r.Add(dev("pipe-0003")), ErrDuplicate)
	require.NoError(t, r.Remove("pipe-0001"))
	require.ErrorIs(t, r.Remove("pipe-0001"), ErrUnknownDevice)

	r2, err := NewRegistry(base, state)
	require.NoError(t, err)
	ids := []string{}
	for _, d := range r2.List() {
		ids = append(ids, d.ID)
	}
	require.Equal(t, []string{"pipe-0002", "pipe-0003"}, ids)
}

func TestMetricCheck(t *testing.T) {
	s, ok := SchemaOf(KindTrafficLight)
	require.True(t, ok)
	st, _ := s.Metric("state")
	require.NoError(t, st.Check(KindTrafficLight, 4))
	require.Error(t, st.Check(KindTrafficLight, 5), "only five states")
	require.Error(t, st.Check(KindTrafficLight, 1.5), "a state is a whole number")
	v, ok := st.StateIndex("flashing")
	require.True(t, ok)
	require.Equal(t, float64(4), v)
	p, _ := SchemaOf(KindPipe)
	pr, _ := p.Metric("pressure")
	var re *RangeError
	require.ErrorAs(t, pr.Check(KindPipe, -1), &re)
}

func TestTheAPINeverReturnsSecrets(t *testing.T) {
	r, err := NewRegistry([]Device{dev("pipe-0001")}, filepath.Join(t.TempDir(), "o.json"))
	require.NoError(t, err)
	api := NewAPI(r, nil)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v1/devices", api.List)
	mux.HandleFunc("POST /api/v1/devices", api.Add)
	mux.HandleFunc("DELETE /api/v1/devices/{id}", api.Remove)

	body, _ := json.Marshal(map[string]string{"id": "tl-0001", "kind": "traffic_light", "district": "xuanwu", "interval": "5s", "secret": "very-secret-value"})
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("POST", "/api/v1/devices", bytes.NewReader(body)))
	require.Equal(t, http.StatusCreated, rec.Code, rec.Body.String())
	require.NotContains(t, rec.Body.String(), "very-secret-value")

	rec = httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("POST", "/api/v1/devices", strings.NewReader(`{"id":"BAD"}`)))
	require.Equal(t, http.StatusBadRequest, rec.Code)

	rec = httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("GET", "/api/v1/devices", nil))
	require.Equal(t, http.StatusOK, rec.Code)
	require.Contains(t, rec.Body.String(), "tl-0001")
	require.NotContains(t, rec.Body.String(), "secret")

	rec = httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("DELETE", "/api/v1/devices/tl-0001", nil))
	require.Equal(t, http.StatusNoContent, rec.Code)
}

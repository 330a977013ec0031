package opendata

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

func get(t *testing.T, url, accept string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	require.NoError(t, err)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(b)
}

func TestNGSILDEndpoints(t *testing.T) {
	srv := httptest.NewServer(newCityFeed(t, Default()).Handler())
	defer srv.Close()
	base := srv.URL + "/ngsi-ld/v1/entities"
	cases := []struct {
		name, url, accept string
		code              int
		ctype             string
		has, hasNot       []string
	}{
		{name: "a type query answers its entities with a Link to the context", url: base + "?type=OffStreetParking",
			code: 200, ctype: "application/json", has: []string{`"id":"urn:ngsi-ld:OffStreetParking:central"`, `"observedAt":"2026-12-01T07:59:50.000Z"`}, hasNot: []string{"@context", "ParkingSpot:"}},
		{name: "JSON-LD puts the context in the body", url: base + "?type=TrafficSignal", accept: "application/ld+json",
			code: 200, ctype: "application/ld+json", has: []string{`"@context"`, "ngsi-ld-core-context"}},
		{name: "keyValues drops the attribute wrappers", url: base + "?type=ParkingSpot&options=keyValues",
			code: 200, has: []string{`"status":"occupied"`}, hasNot: []string{`"Property"`}},
		{name: "one entity by id", url: base + "/urn:ngsi-ld:ParkingSpot:bay-0002?options=keyValues",
			code: 200, has: []string{`"status":"free"`}},
		{name: "an unknown id is ResourceNotFound", url: base + "/urn:ngsi-ld:ParkingSpot:nope",
			code: 404, has: []string{"errors/ResourceNotFound"}},
		{name: "a query without type or id is BadRequestData", url: base,
			code: 400, has: []string{"errors/BadRequestData"}},
		{name: "paging: limit and offset", url: base + "?type=ParkingSpot&limit=1&offset=2&options=keyValues",
			code: 200, has: []string{"bay-0003"}, hasNot: []string{"bay-0001", "bay-0002"}},
		{name: "a limit past the maximum is refused", url: base + "?type=ParkingSpot&limit=100000",
			code: 400},
		{name: "an Accept the API cannot answer is NotAcceptable", url: base + "?type=ParkingSpot", accept: "text/html",
			code: 406},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, body := get(t, c.url, c.accept)
			require.Equal(t, c.code, resp.StatusCode, body)
			if c.ctype != "" {
				require.Equal(t, c.ctype, resp.Header.Get("Content-Type"))
			}
			if c.ctype == "application/json" {
				require.Contains(t, resp.Header.Get("Link"), `rel="http://www.w3.org/ns/json-ld#context"`)
			}
			compact := strings.ReplaceAll(body, " ", "")
			for _, s := range c.has {
				require.Contains(t, compact, s)
			}
			for _, s := range c.hasNot {
				require.NotContains(t, compact, s)
			}
		})
	}
}

func TestRateLimitPerClient(t *testing.T) {
	cfg := Default()
	cfg.RatePerSecond, cfg.Burst = 1, 3
	f := newCityFeed(t, cfg) // the feed's clock stands still: no token comes back
	srv := httptest.NewServer(f.Handler())
	defer srv.Close()
	codes := []int{}
	for range 5 {
		resp, _ := get(t, srv.URL+"/ngsi-ld/v1/entities?type=ParkingSpot", "")
		codes = append(codes, resp.StatusCode)
		if resp.StatusCode == http.StatusTooManyRequests {
			require.Equal(t, "1", resp.Header.Get("Retry-After"))
		}
	}
	require.Equal(t, []int{200, 200, 200, 429, 429}, codes)

	cfg.MaxClients = 1
	f = newCityFeed(t, cfg)
	req := httptest.NewRequest(http.MethodGet, "/ngsi-ld/v1/entities?type=ParkingSpot", nil)
	req.RemoteAddr = "192.0.2.1:1000"
	ok, _ := f.lim.allow(req)
	require.True(t, ok)
	req.RemoteAddr = "192.0.2.2:1000"
	ok, reason := f.lim.allow(req)
	require.False(t, ok, "a second address does not fit while the first is active")
	require.Equal(t, "clients_full", reason)
}

// The live stream starts with a snapshot and then carries each change once.
func TestLiveStreamCarriesChanges(t *testing.T) {
	cfg := Default()
	cfg.StreamInterval = 100 * time.Millisecond
	f := newCityFeed(t, cfg)
	srv := httptest.NewServer(f.Handler())
	defer srv.Close()
	ctx := t.Context()
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/ngsi-ld/v1/stream?type=ParkingSpot&options=keyValues", nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	br := bufio.NewReader(resp.Body)
	next := func() map[string]any {
		for {
			line, err := br.ReadString('\n')
			require.NoError(t, err)
			if d, ok := strings.CutPrefix(line, "data: "); ok {
				var n map[string]any
				require.NoError(t, json.Unmarshal([]byte(d), &n))
				return n
			}
		}
	}
	first := next()
	require.Equal(t, "Notification", first["type"])
	require.Len(t, first["data"], 3, "the snapshot has the three bays")

	// The feed's Run sends every entity once to a new client (it has sent
	// nothing yet); then only changes.
	seen := map[string]string{}
	deadline := time.Now().Add(10 * time.Second)
	changed := false
	for time.Now().Before(deadline) {
		n := next()
		e := n["data"].([]any)[0].(map[string]any)
		seen[e["id"].(string)] = e["status"].(string)
		if len(seen) == 3 && !changed {
			f.Observe(0, []pipeline.Reading{reading("bay-0002", "parking", "occupied", 1, 0)})
			changed = true
			continue
		}
		if changed && e["id"] == "urn:ngsi-ld:ParkingSpot:bay-0002" {
			require.Equal(t, "occupied", e["status"], fmt.Sprint(n))
			return
		}
	}
	t.Fatalf("no notification of bay-0002 turning occupied; saw %v", seen)
}

func TestClientsAreCountedByAddressAndIPv6Slash64(t *testing.T) {
	for _, c := range []struct{ remote, want string }{
		{"192.0.2.7:4000", "192.0.2.7"},
		{"[2001:db8:1:2:aaaa::1]:4000", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:bbbb::9]:5000", "2001:db8:1:2::/64"},
	} {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.RemoteAddr = c.remote
		require.Equal(t, c.want, clientKey(r))
	}
	f := newCityFeed(t, Default())
	for range f.cfg.MaxStreamsPerClient {
		require.True(t, f.lim.openStream("2001:db8:1:2::/64"))
	}
	require.False(t, f.lim.openStream("2001:db8:1:2::/64"), "one more stream from the same /64 is refused")
	require.True(t, f.lim.openStream("192.0.2.7"), "another address is not")
	f.lim.closeStream("2001:db8:1:2::/64")
	require.True(t, f.lim.openStream("2001:db8:1:2::/64"), "a closed stream gives its place back")
}

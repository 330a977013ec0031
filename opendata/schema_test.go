package opendata

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/stretchr/testify/require"
)

// localSchemas resolves the Smart Data Models' schema URLs to the copies in
// testdata/opendata/schemas (see SOURCE.md there): the test needs no network.
type localSchemas struct{ dir string }

func (l localSchemas) Load(url string) (any, error) {
	name := url[strings.LastIndex(url, "/")+1:]
	if name == "common-schema.json" || strings.HasSuffix(url, ".schema.json") {
		f, err := os.Open(filepath.Join(l.dir, name))
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return jsonschema.UnmarshalJSON(f)
	}
	return nil, os.ErrNotExist
}

// Every entity served, in its simplified (keyValues) form, is valid against the
// Smart Data Models schema of its type (TrafficSignal: CityPulse's own).
func TestEntitiesValidateAgainstTheSmartDataModels(t *testing.T) {
	dir := filepath.Join("..", "testdata", "opendata", "schemas")
	c := jsonschema.NewCompiler()
	c.UseLoader(localSchemas{dir})
	schemas := map[string]*jsonschema.Schema{}
	for _, typ := range []string{TypeParkingSpot, TypeOffStreetParking, TypeTrafficSignal} {
		s, err := c.Compile("file:///schemas/" + typ + ".schema.json")
		require.NoError(t, err, typ)
		schemas[typ] = s
	}
	f := newCityFeed(t, Default())
	seen := map[string]int{}
	for _, e := range f.snapshot().entities(0.9) {
		b, err := json.Marshal(e.keyValues())
		require.NoError(t, err)
		v, err := jsonschema.UnmarshalJSON(strings.NewReader(string(b)))
		require.NoError(t, err)
		require.NoError(t, schemas[e.typ].Validate(v), "%s: %s", e.id, b)
		seen[e.typ]++
	}
	require.Equal(t, map[string]int{TypeParkingSpot: 3, TypeOffStreetParking: 2, TypeTrafficSignal: 2}, seen)

	// And the schemas are strict enough to catch a wrong entity.
	bad := `{"id":"urn:ngsi-ld:ParkingSpot:x","type":"ParkingSpot","status":"maybe","category":["offStreet"],"refParkingSite":"y","location":{"type":"Point","coordinates":[1,2]}}`
	v, err := jsonschema.UnmarshalJSON(strings.NewReader(bad))
	require.NoError(t, err)
	require.Error(t, schemas[TypeParkingSpot].Validate(v))
}

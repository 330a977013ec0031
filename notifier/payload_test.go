package notifier

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// The bodies sent to a webhook (Alertmanager webhook v4) and to a real
// Alertmanager (POST /api/v2/alerts), for a firing and a resolved event.
func TestPayloadsGolden(t *testing.T) {
	at := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	firing := Event{Kind: KindFiring, At: at, StartsAt: at, Fingerprint: "0f1e2d3c4b5a6978", Key: "0f1e2d3c4b5a6978-firing-x",
		Labels:      map[string]string{"alertname": "burst_main", "device": "pipe-0042", "district": "gulou", "severity": "critical"},
		Annotations: map[string]string{"summary": "Pressure at pipe-0042 (gulou) fell 96 kPa in 1m0s"}}
	resolved := firing
	resolved.Kind, resolved.At, resolved.EndsAt = KindResolved, at.Add(5*time.Minute), at.Add(5*time.Minute)
	for _, tc := range []struct {
		name, typ, url, target string
	}{
		{"webhook", "webhook", "https://ops.example/hook", "https://ops.example/hook"},
		{"alertmanager", "alertmanager", "https://am.example:9093/", "https://am.example:9093/api/v2/alerts"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := ReceiverConfig{Name: "ops", Type: tc.typ, URL: tc.url}
			var got []json.RawMessage
			for _, ev := range []Event{firing, resolved} {
				target, body, err := encode(r, ev, "https://citypulse.example")
				require.NoError(t, err)
				require.Equal(t, tc.target, target)
				got = append(got, body)
			}
			b, err := json.MarshalIndent(got, "", "  ")
			require.NoError(t, err)
			golden := filepath.Join("..", "testdata", "notifier", tc.name+".golden.json")
			if *update {
				require.NoError(t, os.MkdirAll(filepath.Dir(golden), 0o755))
				require.NoError(t, os.WriteFile(golden, append(b, '\n'), 0o644))
			}
			want, err := os.ReadFile(golden)
			require.NoError(t, err, "run go test ./notifier -update")
			require.Equal(t, string(want), string(b)+"\n")
		})
	}
}

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/opendata"
)

const (
	liveRead     = "read-token-0123456789"
	liveOperator = "operator-token-0123456789"
)

// readSSE returns the next event of an SSE stream whose name is one of names.
func readSSE(t *testing.T, br *bufio.Reader, names ...string) (string, string) {
	t.Helper()
	name := ""
	for {
		line, err := br.ReadString('\n')
		require.NoError(t, err)
		line = strings.TrimRight(line, "\n")
		switch {
		case strings.HasPrefix(line, "event: "):
			name = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			for _, n := range names {
				if n == name {
					return name, strings.TrimPrefix(line, "data: ")
				}
			}
		case line == "":
			name = ""
		}
	}
}

// The operations screen's stream carries alert transitions and vital signs;
// an operator silences and acknowledges with the operator token (the read
// token may not); the alerts API shows both; the public feed needs no token.
func TestTheOperationsStreamSilencesAndThePublicFeed(t *testing.T) {
	p := newInproc(t, fmt.Sprintf("http: {read_token: %s, operator_token: %s}\nvitals: {interval: 1s}\n", liveRead, liveOperator))
	p.run()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url+"/api/v1/events", nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode, "the stream needs a token")
	resp.Body.Close()
	req.Header.Set("Authorization", "Bearer "+liveRead)
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	br := bufio.NewReader(resp.Body)

	c, err := mqttConnect(p.mqtt, "pipe-0001", "secret-pipe-0001", false)
	require.NoError(t, err)
	defer c.Disconnect(100)
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`[{"n":"gas_concentration","v":35},{"n":"pressure","v":420}]`))

	_, data := readSSE(t, br, "alert")
	var ev struct {
		Kind        string            `json:"kind"`
		Labels      map[string]string `json:"labels"`
		Fingerprint string            `json:"fingerprint"`
	}
	require.NoError(t, json.Unmarshal([]byte(data), &ev))
	require.Equal(t, "gas_leak", ev.Labels["alertname"])
	require.Equal(t, "firing", ev.Kind)
	_, data = readSSE(t, br, "vitals")
	require.Contains(t, data, `"name":"city_`)

	// Silence and acknowledge: the operator may, the read token may not.
	silence := `{"matchers":[{"name":"alertname","value":"gas_leak","isEqual":true}],"endsAt":"` +
		time.Now().Add(time.Hour).UTC().Format(time.RFC3339) + `","createdBy":"ops-anna","comment":"crew on site"}`
	code, _ := p.do("POST", "/api/v1/silences", liveRead, silence)
	require.Equal(t, http.StatusUnauthorized, code)
	code, body := p.do("POST", "/api/v1/silences", liveOperator, silence)
	require.Equal(t, http.StatusOK, code, body)
	code, body = p.do("GET", "/api/v1/alerts", liveRead, "")
	require.Equal(t, http.StatusOK, code)
	var alerts struct {
		Data struct {
			Alerts []struct {
				Labels      map[string]string `json:"labels"`
				ActiveAt    time.Time         `json:"activeAt"`
				Fingerprint string            `json:"fingerprint"`
				SilencedBy  string            `json:"silencedBy"`
				Ack         map[string]any    `json:"ack"`
			} `json:"alerts"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &alerts))
	require.Len(t, alerts.Data.Alerts, 1, body)
	a := alerts.Data.Alerts[0]
	require.Equal(t, ev.Fingerprint, a.Fingerprint)
	require.NotEmpty(t, a.SilencedBy, "the alert shows its silence")
	ack := fmt.Sprintf(`{"fingerprint":%q,"startsAt":%q,"by":"ops-anna","comment":"on it"}`, a.Fingerprint, a.ActiveAt.Format(time.RFC3339Nano))
	code, body = p.do("POST", "/api/v1/acks", liveOperator, ack)
	require.Equal(t, http.StatusOK, code, body)
	_, body = p.do("GET", "/api/v1/alerts", liveRead, "")
	require.Contains(t, body, `"by":"ops-anna"`, "the alert shows its acknowledgement")

	// The public feed: no token, the bay's state.
	bay, err := mqttConnect(p.mqtt, "bay-0001", "secret-bay-0001", false)
	require.NoError(t, err)
	defer bay.Disconnect(100)
	publish(t, bay, "devices/bay-0001/readings", 1, []byte(`{"occupied":true}`))
	key, err := os.ReadFile(filepath.Join(p.cfg.DataDir, "opendata-id.key"))
	require.NoError(t, err, "the server made the public id key")
	code, _ = p.do("GET", "/ngsi-ld/v1/entities/urn:ngsi-ld:ParkingSpot:bay-0001", "", "")
	require.Equal(t, http.StatusNotFound, code, "a device id is not a public id")
	alias := opendata.Alias(strings.TrimSpace(string(key)), "bay-0001")
	eventually(t, 10*time.Second, func() error {
		code, body := p.do("GET", "/ngsi-ld/v1/entities/urn:ngsi-ld:ParkingSpot:"+alias+"?options=keyValues", "", "")
		if code != http.StatusOK || !strings.Contains(body, `"status":"occupied"`) {
			return fmt.Errorf("%d %s", code, body)
		}
		return nil
	})
	p.stop()
}

// An alert that fires while silenced is held back, and notified once the
// silence ends while it still fires (as Alertmanager does), not only at its
// next repeat.
func TestAnAlertStillFiringIsNotifiedWhenItsSilenceEnds(t *testing.T) {
	var mu sync.Mutex
	var firings []string
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		if strings.Contains(string(b), `"gas_leak"`) && strings.Contains(string(b), `"firing"`) {
			firings = append(firings, string(b))
		}
		mu.Unlock()
	}))
	defer hook.Close()
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(firings) }
	p := newInproc(t, fmt.Sprintf(`http: {read_token: %s, operator_token: %s}
rules:
  notify:
    receivers:
      - {name: ops, type: webhook, url: %q, secret: "live-test-webhook-secret-01"}
    allow_hosts: ["127.0.0.1"]
`, liveRead, liveOperator, hook.URL+"/hook"))
	p.run()

	silence := `{"matchers":[{"name":"alertname","value":"gas_leak","isEqual":true}],"endsAt":"` +
		time.Now().Add(time.Hour).UTC().Format(time.RFC3339) + `","createdBy":"ops-anna","comment":"crew on site"}`
	code, body := p.do("POST", "/api/v1/silences", liveOperator, silence)
	require.Equal(t, http.StatusOK, code, body)
	var sl struct {
		Data struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &sl), body)
	require.NotEmpty(t, sl.Data.ID, body)

	c, err := mqttConnect(p.mqtt, "pipe-0001", "secret-pipe-0001", false)
	require.NoError(t, err)
	defer c.Disconnect(100)
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`[{"n":"gas_concentration","v":35}]`))
	eventually(t, 10*time.Second, func() error {
		if _, body := p.do("GET", "/api/v1/alerts", liveRead, ""); !strings.Contains(body, `"gas_leak"`) {
			return fmt.Errorf("no gas_leak alert yet: %s", body)
		}
		return nil
	})
	time.Sleep(2 * time.Second) // the release loop runs every second: it must keep holding
	require.Zero(t, count(), "silenced: not notified")

	code, body = p.do("DELETE", "/api/v1/silences/"+sl.Data.ID, liveOperator, "")
	require.Equal(t, http.StatusOK, code, body)
	eventually(t, 10*time.Second, func() error {
		if count() == 0 {
			return errors.New("the still-firing alert was not notified after its silence ended")
		}
		return nil
	})
	time.Sleep(2 * time.Second)
	require.Equal(t, 1, count(), "notified once")
	p.stop()
}

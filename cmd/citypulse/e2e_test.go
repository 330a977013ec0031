package main

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/fxamacker/cbor/v2"
	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/udp"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/internal/servers"
)

func TestMQTTReadingsOfEveryFormatComeBackFromTheQueryAPI(t *testing.T) {
	skipShort(t)
	s := newProc(t, "")
	s.start()
	defer s.stop()

	now := time.Now()
	cases := []struct {
		name    string
		device  string
		payload []byte
		query   string
		want    float64
	}{
		{"SenML JSON with a base name", "pipe-0001",
			fmt.Appendf(nil, `[{"bn":"urn:dev:pipe-0001:","bt":%d,"n":"pressure","u":"kPa","v":412.5},{"n":"flow","v":33}]`, now.Unix()),
			`pipe_pressure{device="pipe-0001",district="gulou",kind="pipe"}`, 412.5},
		{"SenML CBOR", "pipe-0002",
			mustCBOR(t, []map[int]any{{-2: "pipe-0002/", 0: "pressure", 2: 388.0}}),
			`pipe_pressure{device="pipe-0002"}`, 388},
		{"plain JSON with an enumerated state", "tl-0001",
			fmt.Appendf(nil, `{"time":%d,"state":"green","queue_length":7}`, now.UnixNano()),
			`traffic_light_state{device="tl-0001"}`, 3},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := mqttConnect(s.mqtt, tc.device, "secret-"+tc.device, false)
			require.NoError(t, err)
			defer c.Disconnect(100)
			publish(t, c, "devices/"+tc.device+"/readings", 1, tc.payload)
			eventually(t, 10*time.Second, func() error {
				v, err := latest(t, s.http, tc.query)
				if err != nil {
					return err
				}
				if v != tc.want {
					return fmt.Errorf("got %v, want %v", v, tc.want)
				}
				return nil
			})
		})
	}
	t.Run("QoS 0 is accepted too", func(t *testing.T) {
		c, err := mqttConnect(s.mqtt, "bay-0001", "secret-bay-0001", false)
		require.NoError(t, err)
		defer c.Disconnect(100)
		publish(t, c, "devices/bay-0001/readings", 0, []byte(`{"occupied":true}`))
		eventually(t, 10*time.Second, func() error {
			v, err := latest(t, s.http, `parking_occupied{device="bay-0001"}`)
			if err == nil && v != 1 {
				err = fmt.Errorf("got %v", v)
			}
			return err
		})
	})
}

func mustCBOR(t *testing.T, v any) []byte {
	t.Helper()
	b, err := cbor.Marshal(v)
	require.NoError(t, err)
	return b
}

func TestMQTTRefusesWrongCredentialsAndForeignTopics(t *testing.T) {
	skipShort(t)
	s := newProc(t, "")
	s.start()
	defer s.stop()

	_, err := mqttConnect(s.mqtt, "pipe-0001", "wrong-password", false)
	require.Error(t, err, "a wrong password is refused")
	_, err = mqttConnect(s.mqtt, "", "", false)
	require.Error(t, err, "anonymous access is refused")
	_, err = mqttConnect(s.mqtt, "pipe-9999", "secret-pipe-9999", false)
	require.Error(t, err, "an unknown device is refused")

	// pipe-0001 publishes as pipe-0002: the message must not be stored. A v5
	// client is told by a PUBACK with "not authorized"; a v3.1.1 client, which
	// has no negative PUBACK, is disconnected.
	for _, v5 := range []bool{false, true} {
		c, err := mqttConnect(s.mqtt, "pipe-0001", "secret-pipe-0001", v5)
		require.NoError(t, err)
		tok := c.Publish("devices/pipe-0002/readings", 1, false, []byte(`{"pressure":999}`))
		tok.WaitTimeout(5 * time.Second)
		if v5 {
			require.Error(t, tok.Error(), "a v5 client is told its publish was refused")
		}
		c.Disconnect(100)
	}
	// A device may not subscribe: not to another device's topic, not to "#".
	spy, err := mqttConnect(s.mqtt, "pipe-0002", "secret-pipe-0002", false)
	require.NoError(t, err)
	defer spy.Disconnect(100)
	var seen atomic.Int64
	for _, topic := range []string{"devices/pipe-0001/readings", "#"} {
		tok := spy.Subscribe(topic, 1, func(mqtt.Client, mqtt.Message) { seen.Add(1) })
		require.True(t, tok.WaitTimeout(5*time.Second))
		st, ok := tok.(*mqtt.SubscribeToken)
		require.True(t, ok)
		require.Equal(t, byte(0x80), st.Result()[topic], "SUBACK refuses %s", topic)
	}

	// A marker from the right device proves the server processed what came before.
	c, err := mqttConnect(s.mqtt, "pipe-0001", "secret-pipe-0001", false)
	require.NoError(t, err)
	defer c.Disconnect(100)
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`{"pressure":111}`))
	eventually(t, 10*time.Second, func() error {
		_, err := latest(t, s.http, `pipe_pressure{device="pipe-0001"}`)
		return err
	})
	require.Empty(t, query(t, s.http, `pipe_pressure{device="pipe-0002"}`), "a device cannot write another device's series")
	require.Zero(t, seen.Load(), "no device reading reaches a subscriber")

	metrics := get(t, "http://"+s.http+"/metrics")
	require.Contains(t, metrics, `citypulse_readings_rejected_total{reason="unauthorized"}`)
	require.Contains(t, metrics, `citypulse_readings_rejected_total{reason="forbidden"}`)
	require.NotContains(t, s.Logs(), "secret-pipe-0001", "secrets never reach the log")
}

func get(t *testing.T, u string) string {
	t.Helper()
	resp, err := http.Get(u)
	require.NoError(t, err)
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	return b.String()
}

func TestCoAPOverUDPAndDTLS(t *testing.T) {
	skipShort(t)
	s := newProc(t, "")
	s.start()
	defer s.stop()

	t.Run("UDP with the device key", func(t *testing.T) {
		co, err := udp.Dial(s.coap)
		require.NoError(t, err)
		defer co.Close()
		body := []byte(`[{"n":"pressure","v":501}]`)
		resp, err := co.Post(ctxT(t, 5*time.Second), "/devices/pipe-0001/readings", message.AppSenmlJSON, bytes.NewReader(body),
			message.Option{ID: message.URIQuery, Value: []byte("key=secret-pipe-0001")})
		require.NoError(t, err)
		require.Equal(t, codes.Changed, resp.Code())
		eventually(t, 10*time.Second, func() error {
			v, err := latest(t, s.http, `pipe_pressure{device="pipe-0001"}`)
			if err == nil && v != 501 {
				err = fmt.Errorf("got %v", v)
			}
			return err
		})

		resp, err = co.Post(ctxT(t, 5*time.Second), "/devices/pipe-0001/readings", message.AppSenmlJSON, bytes.NewReader(body),
			message.Option{ID: message.URIQuery, Value: []byte("key=wrong")})
		require.NoError(t, err)
		require.Equal(t, codes.Unauthorized, resp.Code(), "a wrong key is refused")

		resp, err = co.Post(ctxT(t, 5*time.Second), "/devices/pipe-0001/readings", message.AppSenmlJSON, bytes.NewReader([]byte(`[{"n":`)),
			message.Option{ID: message.URIQuery, Value: []byte("key=secret-pipe-0001")})
		require.NoError(t, err)
		require.Equal(t, codes.BadRequest, resp.Code(), "a malformed payload is a bad request")
	})

	dtlsOpts := func(id, key string) []piondtls.ClientOption {
		return []piondtls.ClientOption{
			piondtls.WithPSK(func([]byte) ([]byte, error) { return []byte(key), nil }),
			piondtls.WithPSKIdentityHint([]byte(id)),
			piondtls.WithCipherSuites(piondtls.TLS_PSK_WITH_AES_128_CCM_8),
		}
	}
	t.Run("DTLS-PSK with the device identity", func(t *testing.T) {
		co, err := dtls.Dial(s.dtls, dtls.NewDTLSClientOptions(dtlsOpts("pipe-0002", "secret-pipe-0002")...))
		require.NoError(t, err)
		defer co.Close()
		cborBody := mustCBOR(t, []map[int]any{{0: "pressure", 2: 277.0}})
		resp, err := co.Post(ctxT(t, 5*time.Second), "/devices/pipe-0002/readings", message.AppSenmlCbor, bytes.NewReader(cborBody))
		require.NoError(t, err)
		require.Equal(t, codes.Changed, resp.Code())
		eventually(t, 10*time.Second, func() error {
			v, err := latest(t, s.http, `pipe_pressure{device="pipe-0002"}`)
			if err == nil && v != 277 {
				err = fmt.Errorf("got %v", v)
			}
			return err
		})
		resp, err = co.Post(ctxT(t, 5*time.Second), "/devices/pipe-0001/readings", message.AppJSON, bytes.NewReader([]byte(`{"pressure":1}`)))
		require.NoError(t, err)
		require.Equal(t, codes.Forbidden, resp.Code(), "a device cannot post as another")
	})
	t.Run("DTLS with a wrong key fails the handshake", func(t *testing.T) {
		raddr, err := net.ResolveUDPAddr("udp", s.dtls)
		require.NoError(t, err)
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(t, err)
		defer pc.Close()
		conn, err := piondtls.ClientWithOptions(pc, raddr, dtlsOpts("pipe-0002", "not-the-key")...)
		require.NoError(t, err)
		defer conn.Close()
		// A wrong PSK surfaces as a failed or timed-out handshake, never a session.
		require.Error(t, conn.HandshakeContext(ctxT(t, 3*time.Second)))
	})
}

// TestExternalBrokerMode runs a real mosquitto; CityPulse subscribes to it with
// a shared subscription and acknowledges only journaled messages.
func TestExternalBrokerMode(t *testing.T) {
	skipShort(t)
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		t.Fatal("mosquitto not found: run `make test` (it installs it)")
	}
	port := freePort(t, "tcp")
	dir := t.TempDir()
	conf := filepath.Join(dir, "mosquitto.conf")
	require.NoError(t, os.WriteFile(conf, []byte(servers.MosquittoConf(port)), 0o644))
	mq := exec.Command(bin, "-c", conf)
	var mqLog syncBuffer
	mq.Stdout, mq.Stderr = &mqLog, &mqLog
	require.NoError(t, mq.Start())
	defer func() { _ = mq.Process.Kill(); _ = mq.Wait() }()
	broker := fmt.Sprintf("127.0.0.1:%d", port)
	waitListening(t, broker)

	s := newProc(t, "ingest:\n  mqtt:\n    enabled: false\n  external:\n    enabled: true\n    url: tcp://"+broker+"\n")
	s.start()
	defer s.stop()

	// round publishes through the broker: a probe until the (asynchronous)
	// subscription delivers it, then 100 readings of pipe-0002 that must all
	// arrive; want is the count expected in the store afterwards.
	round := func(probe float64, base int, want float64) {
		t.Helper()
		pub := mqtt.NewClient(mqtt.NewClientOptions().AddBroker("tcp://" + broker).SetClientID("field-gateway"))
		tok := pub.Connect()
		require.True(t, tok.WaitTimeout(5*time.Second))
		require.NoError(t, tok.Error())
		defer pub.Disconnect(100)
		eventually(t, 15*time.Second, func() error {
			publish(t, pub, "devices/pipe-0001/readings", 1, fmt.Appendf(nil, `[{"n":"pressure","v":%g}]`, probe))
			v, err := latest(t, s.http, `pipe_pressure{device="pipe-0001"}`)
			if err == nil && v != probe {
				err = fmt.Errorf("got %v", v)
			}
			return err
		})
		for i := 0; i < 100; i++ {
			// base shifts the times so that the two rounds never share one
			at := time.Now().Add(-time.Duration(100-i)*time.Second - time.Duration(base)*time.Millisecond)
			publish(t, pub, "devices/pipe-0002/readings", 1, fmt.Appendf(nil, `{"time":%d,"pressure":%d}`, at.UnixNano(), base+i))
		}
		eventually(t, 15*time.Second, func() error {
			v, err := latest(t, s.http, `count_over_time(pipe_pressure{device="pipe-0002"}[10m])`)
			if err == nil && v != want {
				err = fmt.Errorf("got %v samples, want %v", v, want)
			}
			return err
		})
	}
	round(321, 200, 100)

	// The broker goes away and comes back on the same port: CityPulse
	// reconnects and subscribes again by itself, and nothing published after
	// the broker is back is missed.
	require.NoError(t, mq.Process.Kill())
	_ = mq.Wait()
	cut := time.Now()
	eventually(t, 10*time.Second, func() error {
		if !strings.Contains(get(t, "http://"+s.http+"/metrics"), "citypulse_external_mqtt_connected 0") {
			return fmt.Errorf("CityPulse has not noticed the broker is gone")
		}
		return nil
	})
	mq = exec.Command(bin, "-c", conf)
	mq.Stdout, mq.Stderr = &mqLog, &mqLog
	require.NoError(t, mq.Start())
	back := time.Now()
	eventually(t, 30*time.Second, func() error {
		if !strings.Contains(get(t, "http://"+s.http+"/metrics"), "citypulse_external_mqtt_connected 1") {
			return fmt.Errorf("not reconnected yet")
		}
		return nil
	})
	t.Logf("external broker cut for %v and restored: CityPulse reconnected %v after it came back",
		back.Sub(cut).Round(time.Millisecond), time.Since(back).Round(time.Millisecond))
	waitListening(t, broker)
	round(654, 300, 200)
}

// TestAcknowledgedReadingsSurviveSIGKILL publishes QoS 1 readings with a
// per-device sequence number from several clients, kills the server with
// SIGKILL at random moments, restarts it, and finally checks that every
// acknowledged (device, seq) is in the store.
func TestAcknowledgedReadingsSurviveSIGKILL(t *testing.T) {
	skipShort(t)
	kills := 20
	if v, err := strconv.Atoi(os.Getenv("CITYPULSE_TEST_KILLS")); err == nil {
		kills = v
	}
	s := newProc(t, "", "CITYPULSE_PIPELINE_FSYNC=never")
	devs := []string{"pipe-0001", "pipe-0002", "tl-0001", "bay-0001"}
	metric := map[string]string{"pipe-0001": "pressure", "pipe-0002": "pressure", "tl-0001": "queue_length", "bay-0001": "available_spot_number"}
	base := time.Now().Add(-time.Hour).Truncate(time.Second)

	var mu sync.Mutex
	acked := map[string]map[int]bool{}
	next := map[string]int{}
	for _, d := range devs {
		acked[d] = map[int]bool{}
	}
	var total atomic.Int64
	var replayTotal, replayMax float64
	for round := 0; round <= kills; round++ {
		s.start()
		if round > 0 {
			// what the store sink re-reads from its saved cursor: the bound on
			// what it may write twice (the TSDB keeps one copy)
			r := metricValue(t, s.http, `citypulse_sink_replay_bytes_total{sink="tsdb"}`)
			replayTotal += r
			replayMax = max(replayMax, r)
		}
		var wg sync.WaitGroup
		stop := make(chan struct{})
		for _, d := range devs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := mqttConnect(s.mqtt, d, "secret-"+d, false)
				if err != nil {
					return
				}
				defer c.Disconnect(0)
				for {
					select {
					case <-stop:
						return
					default:
					}
					mu.Lock()
					seq := next[d]
					next[d]++
					mu.Unlock()
					// A seq that was sent but not acknowledged may or may not be
					// stored: it is "unexpected" only if it was never sent.
					payload := fmt.Appendf(nil, `{"time":%d,"%s":%d}`, base.Add(time.Duration(seq)*time.Millisecond).UnixNano(), metric[d], seq%1000)
					tok := c.Publish("devices/"+d+"/readings", 1, false, payload)
					if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
						return
					}
					mu.Lock()
					acked[d][seq] = true
					mu.Unlock()
					total.Add(1)
				}
			}()
		}
		time.Sleep(time.Duration(200+time.Now().UnixNano()%800) * time.Millisecond)
		if round < kills {
			s.kill()
			close(stop)
			wg.Wait()
		} else {
			close(stop)
			wg.Wait()
		}
	}
	// Final run: everything acknowledged must be queryable.
	lost, dup, unexpectedTotal := 0, 0, 0
	for _, d := range devs {
		want := acked[d]
		var times map[int]int
		eventually(t, 30*time.Second, func() error {
			res := query(t, s.http, fmt.Sprintf(`%s{device=%q}[3h]`, seriesOf(d, metric[d]), d))
			times = map[int]int{}
			for _, r := range res {
				for _, v := range r.Values {
					ts := v[0].(float64)
					seq := int((ts*1000 - float64(base.UnixMilli())) + 0.5)
					times[seq]++
				}
			}
			missing := 0
			for seq := range want {
				if times[seq] == 0 {
					missing++
				}
			}
			if missing > 0 {
				return fmt.Errorf("%s: %d of %d acknowledged readings not (yet) in the store", d, missing, len(want))
			}
			return nil
		})
		for seq := range want {
			if times[seq] == 0 {
				lost++
			}
		}
		for _, n := range times {
			if n > 1 {
				dup += n - 1
			}
		}
		unexpected := 0
		for seq := range times {
			if seq < 0 || seq >= next[d] {
				unexpected++
			}
		}
		unexpectedTotal += unexpected
	}
	t.Logf("SIGKILL test: %d kills, %d acknowledged readings: lost %d, duplicated %d, unexpected %d (the TSDB stores a replayed identical sample once, so duplicates cannot show here)",
		kills, total.Load(), lost, dup, unexpectedTotal)
	t.Logf("SIGKILL test: the store sink re-read %.0f journal bytes in all after %d kills (at most %.0f after one kill): the bound on re-delivered readings",
		replayTotal, kills, replayMax)
	require.Zero(t, lost, "acknowledged readings lost")
	require.Zero(t, unexpectedTotal, "readings in the store that were never sent")
	s.stop()
}

// waitListening waits until something accepts TCP connections on addr.
func waitListening(t *testing.T, addr string) {
	t.Helper()
	eventually(t, 10*time.Second, func() error {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// metricValue reads one sample of the server's /metrics (0 when absent).
func metricValue(t *testing.T, httpAddr, series string) float64 {
	t.Helper()
	for _, line := range strings.Split(get(t, "http://"+httpAddr+"/metrics"), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			require.NoError(t, err)
			return f
		}
	}
	return 0
}

func seriesOf(dev, metric string) string {
	switch {
	case strings.HasPrefix(dev, "pipe"):
		return "pipe_" + metric
	case strings.HasPrefix(dev, "tl"):
		return "traffic_light_" + metric
	}
	return "parking_" + metric
}

func TestVitalSignsAreComputedAndQueryable(t *testing.T) {
	skipShort(t)
	s := newProc(t, "vitals:\n  interval: 1s\n")
	s.start()
	defer s.stop()
	for dev, p := range map[string]float64{"pipe-0001": 420, "pipe-0002": 180} {
		c, err := mqttConnect(s.mqtt, dev, "secret-"+dev, false)
		require.NoError(t, err)
		publish(t, c, "devices/"+dev+"/readings", 1, fmt.Appendf(nil, `{"pressure":%g}`, p))
		c.Disconnect(100)
	}
	eventually(t, 15*time.Second, func() error {
		v, err := latest(t, s.http, `city_pipe_pressure_min{district="city"}`)
		if err == nil && v != 180 {
			err = fmt.Errorf("city-wide minimum pressure %v, want 180", v)
		}
		return err
	})
	v, err := latest(t, s.http, `city_pipe_pressure_min{district="gulou"}`)
	require.NoError(t, err)
	require.Equal(t, 420.0, v)
	v, err = latest(t, s.http, `city_fleet_traffic_light_silent{district="gulou"}`)
	require.NoError(t, err)
	require.Equal(t, 1.0, v, "tl-0001 never reported")
}

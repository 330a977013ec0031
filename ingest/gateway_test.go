package ingest

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"
	"github.com/stretchr/testify/require"
)

// runGateway runs g until the test ends and waits for it to stop.
func runGateway(t *testing.T, g interface{ Run(context.Context) error }) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); require.NoError(t, g.Run(ctx)) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
}

func startBroker(t *testing.T, rec *recorder) *Broker {
	t.Helper()
	h := NewHandler(rec, HandlerOptions{})
	b, err := NewBroker(MQTTConfig{Enabled: true, Addr: "127.0.0.1:0"}, testRegistry(t), h, nil, nil)
	require.NoError(t, err)
	runGateway(t, b)
	return b
}

func newClient(addr, id, secret string) paho.Client {
	return paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).
		SetUsername(id).SetPassword(secret).SetAutoReconnect(false))
}

func connect(t *testing.T, addr, id, secret string) paho.Client {
	t.Helper()
	c := newClient(addr, id, secret)
	tok := c.Connect()
	require.True(t, tok.WaitTimeout(5*time.Second))
	require.NoError(t, tok.Error())
	t.Cleanup(func() { c.Disconnect(50) })
	return c
}

func TestBrokerAcknowledgesOnlyAfterTheJournalWrite(t *testing.T) {
	rec := &recorder{hold: make(chan struct{})}
	b := startBroker(t, rec)
	c := connect(t, b.Addr().String(), "pipe-0001", "secret-pipe-0001")
	tok := c.Publish("devices/pipe-0001/readings", 1, false, []byte(`[{"n":"pressure","v":300}]`))
	require.False(t, tok.WaitTimeout(300*time.Millisecond), "no PUBACK while the submission is not journaled")
	close(rec.hold)
	require.True(t, tok.WaitTimeout(5*time.Second))
	require.NoError(t, tok.Error())
	require.Len(t, rec.readings(), 1)
}

func TestBrokerHoldsAV311PublishUnderBackpressure(t *testing.T) {
	rec := &recorder{pushBack: 3}
	b := startBroker(t, rec)
	c := connect(t, b.Addr().String(), "pipe-0001", "secret-pipe-0001")
	tok := c.Publish("devices/pipe-0001/readings", 1, false, []byte(`[{"n":"pressure","v":300}]`))
	require.True(t, tok.WaitTimeout(10*time.Second))
	require.NoError(t, tok.Error())
	require.Len(t, rec.readings(), 1, "journaled exactly once after the pushback cleared")
	require.Equal(t, 4, rec.calls)
}

func startCoAP(t *testing.T, rec *recorder) *CoAPServer {
	t.Helper()
	h := NewHandler(rec, HandlerOptions{})
	s, err := NewCoAP(CoAPConfig{Enabled: true, Addr: "127.0.0.1:0"}, testRegistry(t), h, nil, nil)
	require.NoError(t, err)
	runGateway(t, s)
	return s
}

func post(t *testing.T, addr, path, key string, body []byte) *message.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	var wg sync.WaitGroup
	co, err := udp.Dial(addr, options.WithPeriodicRunner(ownedRunner(ctx, &wg)))
	require.NoError(t, err)
	defer func() { co.Close(); cancel(); wg.Wait() }()
	resp, err := co.Post(ctx, path, message.AppSenmlJSON, bytes.NewReader(body),
		message.Option{ID: message.URIQuery, Value: []byte("key=" + key)})
	require.NoError(t, err)
	code := resp.Code()
	var maxAge uint32
	if v, err := resp.GetOptionUint32(message.MaxAge); err == nil {
		maxAge = v
	}
	return &message.Message{Code: code, Options: message.Options{{ID: message.MaxAge, Value: []byte{byte(maxAge)}}}}
}

func TestCoAPAnswers(t *testing.T) {
	rec := &recorder{}
	s := startCoAP(t, rec)
	addr := s.Addr().String()
	good := []byte(`[{"n":"pressure","v":300}]`)
	tests := []struct {
		name, path, key string
		body            []byte
		want            codes.Code
	}{
		{"a valid post is changed", "/devices/pipe-0001/readings", "secret-pipe-0001", good, codes.Changed},
		{"a wrong key is unauthorized", "/devices/pipe-0001/readings", "nope", good, codes.Unauthorized},
		{"an unknown device is unauthorized", "/devices/pipe-9999/readings", "x", good, codes.Unauthorized},
		{"a malformed payload is a bad request", "/devices/pipe-0001/readings", "secret-pipe-0001", []byte(`[{`), codes.BadRequest},
		{"another path is not found", "/other", "", good, codes.NotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, post(t, addr, tc.path, tc.key, tc.body).Code)
		})
	}
	require.Len(t, rec.readings(), 1)
}

func TestCoAPPushesBackWithMaxAge(t *testing.T) {
	rec := &recorder{pushBack: 1}
	s := startCoAP(t, rec)
	m := post(t, s.Addr().String(), "/devices/pipe-0001/readings", "secret-pipe-0001", []byte(`[{"n":"pressure","v":1}]`))
	require.Equal(t, codes.ServiceUnavailable, m.Code)
	require.Equal(t, byte(backpressureMaxAge), m.Options[0].Value[0])
	m = post(t, s.Addr().String(), "/devices/pipe-0001/readings", "secret-pipe-0001", []byte(`[{"n":"pressure","v":1}]`))
	require.Equal(t, codes.Changed, m.Code, "the retry succeeds")
}

func TestCoAPAnswersOnlyAfterTheJournalWrite(t *testing.T) {
	rec := &recorder{hold: make(chan struct{})}
	s := startCoAP(t, rec)
	done := make(chan codes.Code, 1)
	go func() {
		done <- post(t, s.Addr().String(), "/devices/pipe-0001/readings", "secret-pipe-0001", []byte(`[{"n":"pressure","v":1}]`)).Code
	}()
	select {
	case <-done:
		t.Fatal("answered before the journal write")
	case <-time.After(300 * time.Millisecond):
	}
	close(rec.hold)
	require.Equal(t, codes.Changed, <-done)
}

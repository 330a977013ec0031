package ingest

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/ingest/payload"
	"github.com/citypulse/citypulse/pipeline"
)

// External subscribes to a broker the city already runs (external-broker mode).
// The broker authenticates the devices; the device id is the topic level after
// "devices/". A message is acknowledged (paho manual ack) only after the
// pipeline has journaled it, or after it was rejected for good (bad payload,
// unknown device: counted); under backpressure it is held and retried, so the
// broker keeps it until it is journaled.
//
// Handling is in order (paho's OrderMatters): per-device order holds.
type External struct {
	cfg  ExternalConfig
	devs Devices
	h    *Handler
	log  *slog.Logger
	m    *externalMetrics
	ctx  context.Context
}

type externalMetrics struct {
	messages   *prometheus.CounterVec
	connected  prometheus.Gauge
	reconnects prometheus.Counter
}

// NewExternal validates the config and builds the subscriber; it connects
// nothing and starts no goroutines.
func NewExternal(cfg ExternalConfig, devs Devices, h *Handler, log *slog.Logger, reg prometheus.Registerer) (*External, error) {
	if cfg.URL == "" || cfg.Topic == "" || cfg.ClientID == "" {
		return nil, errors.New("ingest.external: url, topic and client_id are required")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &externalMetrics{
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_external_mqtt_messages_total", Help: "Messages received from the external broker, by result."}, []string{"result"}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "citypulse_external_mqtt_connected", Help: "1 while connected to the external broker."}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_external_mqtt_connection_lost_total", Help: "Connections to the external broker lost."}),
	}
	if reg != nil {
		reg.MustRegister(m.messages, m.connected, m.reconnects)
	}
	return &External{cfg: cfg, devs: devs, h: h, log: log, m: m}, nil
}

// Run connects (retrying), subscribes on every (re)connect, and handles
// messages until ctx is done; then it disconnects.
func (x *External) Run(ctx context.Context) error {
	x.ctx = ctx
	o := paho.NewClientOptions().
		AddBroker(x.cfg.URL).
		SetClientID(x.cfg.ClientID).
		SetUsername(x.cfg.Username).
		SetPassword(x.cfg.Password).
		// A persistent session: the broker keeps QoS 1 messages while we are away.
		SetCleanSession(false).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(time.Second).
		SetMaxReconnectInterval(10 * time.Second).
		SetAutoAckDisabled(true).
		SetOrderMatters(true).
		SetKeepAlive(30 * time.Second)
	o.SetOnConnectHandler(func(c paho.Client) {
		x.m.connected.Set(1)
		// paho runs this handler in its own goroutine: waiting here is fine.
		tok := c.Subscribe(x.cfg.Topic, x.cfg.QoS, x.handle)
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			x.log.Error("external broker: subscribe failed; reconnecting will retry", "topic", x.cfg.Topic, "err", tok.Error())
			return
		}
		x.log.Info("external broker: subscribed", "url", x.cfg.URL, "topic", x.cfg.Topic)
	})
	o.SetConnectionLostHandler(func(_ paho.Client, err error) {
		x.m.connected.Set(0)
		x.m.reconnects.Inc()
		x.log.Warn("external broker: connection lost; reconnecting", "url", x.cfg.URL, "err", err)
	})
	c := paho.NewClient(o)
	c.Connect() // with ConnectRetry it keeps trying in the background
	<-ctx.Done()
	c.Disconnect(500)
	x.m.connected.Set(0)
	return nil
}

// handle journals one message, then acknowledges it.
func (x *External) handle(_ paho.Client, msg paho.Message) {
	id, ok := deviceOfTopic(msg.Topic())
	dev, known := x.devs.Get(id)
	if !ok || !known {
		x.m.messages.WithLabelValues("unknown_device").Inc()
		x.h.Reject(ReasonUnknownDevice, 1, "transport", "external-mqtt", "topic", msg.Topic())
		msg.Ack()
		return
	}
	wait := 10 * time.Millisecond
	for {
		_, err := x.h.Handle(x.ctx, dev, payload.Unknown, msg.Payload())
		var pe *payload.Error
		switch {
		case err == nil:
			x.m.messages.WithLabelValues("accepted").Inc()
			msg.Ack()
			return
		case errors.As(err, &pe):
			x.m.messages.WithLabelValues("bad_payload").Inc()
			msg.Ack() // counted and logged; re-delivery would not fix it
			return
		case errors.Is(err, ErrRateLimited):
			// The city's broker acknowledged it to the device already; holding
			// it back would stall every other device behind this subscription.
			x.m.messages.WithLabelValues("rate_limited").Inc()
			msg.Ack() // counted (rate_limited) and logged
			return
		case errors.Is(err, pipeline.ErrBackpressure):
			x.m.messages.WithLabelValues("backpressure").Inc()
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-x.ctx.Done():
				t.Stop()
				return // not acknowledged: the broker re-delivers after we reconnect
			}
			wait = min(wait*2, 5*time.Second)
		default:
			x.m.messages.WithLabelValues("not_acknowledged").Inc()
			return
		}
	}
}

// deviceOfTopic returns the device id of devices/<id>/readings.
func deviceOfTopic(topic string) (string, bool) {
	rest, ok := strings.CutPrefix(topic, "devices/")
	if !ok {
		return "", false
	}
	id, tail, ok := strings.Cut(rest, "/")
	if !ok || tail != "readings" || id == "" {
		return "", false
	}
	return id, true
}

package ingest

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/devices"
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
// paho delivers the messages in order on one goroutine, which decodes each
// and queues its readings (Handler.Begin) without waiting for the journal:
// up to externalWindow messages are being journaled at a time (one at a
// time would cap the subscriber at one journal commit per message), a
// device's in the order they came. The acker acknowledges them strictly in
// the order they arrived (MQTT 3.1.1 §4.6), each once it is durable.
type External struct {
	cfg  ExternalConfig
	devs Devices
	h    *Handler
	log  *slog.Logger
	m    *externalMetrics
	ctx  context.Context

	// inflight holds the received messages in arrival order for the acker.
	inflight chan inflightMsg
	// cur is the connection paho reads now (the one open made last).
	cur atomic.Pointer[bufferedConn]
}

// externalWindow bounds the messages being journaled or waiting for their
// acknowledgement.
const externalWindow = 256

// inflightMsg is one received message: its readings being journaled (p), or
// (p nil) whether to acknowledge it, decided already. It came from paho
// (msg) or from the subscription reader (id, qos), on conn.
type inflightMsg struct {
	msg  paho.Message
	conn *bufferedConn
	id   uint16
	qos  byte
	p    *Pending
	ack  bool
}

// acknowledge sends the message's PUBACK.
func (m *inflightMsg) acknowledge() {
	switch {
	case m.msg != nil:
		m.msg.Ack()
	case m.qos == 1:
		m.conn.writePuback(m.id)
	}
}

type externalMetrics struct {
	messages   *prometheus.CounterVec
	accepted   prometheus.Counter // messages{result="accepted"}, resolved once
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
	m.accepted = m.messages.WithLabelValues("accepted")
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
		SetKeepAlive(30 * time.Second).
		SetCustomOpenConnectionFn(x.open)
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
	x.inflight = make(chan inflightMsg, externalWindow)
	ackerDone := make(chan struct{})
	go func() { defer close(ackerDone); x.acker(ctx) }()
	c := paho.NewClient(o)
	c.Connect() // with ConnectRetry it keeps trying in the background
	<-ctx.Done()
	c.Disconnect(500)
	<-ackerDone
	x.m.connected.Set(0)
	return nil
}

// acker acknowledges messages in arrival order, each once it is journaled
// (or rejected for good). Once shutting down it acknowledges nothing more:
// the broker re-delivers the rest after the next connect.
func (x *External) acker(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-x.inflight:
			ok := m.ack
			if m.p != nil {
				_, err := m.p.Wait(ctx)
				if ok = x.settle(err); !ok && ctx.Err() == nil {
					x.abandon(m.conn, err)
				}
			}
			if ok && ctx.Err() == nil && (m.conn == nil || !m.conn.failed.Load()) {
				m.acknowledge()
			}
		}
	}
}

// abandon closes c after a message read from it could not be journaled
// (the journal write failed): acknowledging the later ones would skip it
// (MQTT 3.1.1 §4.6), and the broker re-sends what was not acknowledged
// only on a new connection. paho reconnects; nothing more read from c is
// acknowledged.
func (x *External) abandon(c *bufferedConn, err error) {
	if c == nil || !c.failed.CompareAndSwap(false, true) {
		return
	}
	x.log.Warn("external broker: a message could not be journaled; reconnecting so that the broker sends it and those after it again",
		"err", err)
	_ = c.Close()
}

// handle is paho's message handler (called in arrival order from one
// goroutine), for what the subscription reader leaves to paho.
func (x *External) handle(_ paho.Client, msg paho.Message) {
	x.queue(inflightMsg{msg: msg, conn: x.cur.Load(), ack: true}, msg.Topic(), msg.Payload())
}

// fromReader handles a PUBLISH the subscription reader took out of c's
// stream (on paho's reading goroutine, in arrival order).
func (x *External) fromReader(c *bufferedConn, pub inboundPublish) {
	m := inflightMsg{conn: c, id: pub.ID, qos: pub.QoS, ack: true}
	if pub.TooBig {
		x.m.messages.WithLabelValues("bad_payload").Inc()
		x.h.Reject(payload.ReasonTooLarge, 1, "transport", "external-mqtt", "topic", string(pub.Topic))
		x.push(m)
		return
	}
	x.queue(m, string(pub.Topic), pub.Payload)
}

// queue decodes a message, queues its readings and hands it to the acker.
// It blocks while externalWindow messages wait (backpressure to the broker)
// and while the journal is full.
func (x *External) queue(m inflightMsg, topic string, body []byte) {
	id, ok := deviceOfTopic(topic)
	dev, known := x.devs.Get(id)
	if !ok || !known {
		x.m.messages.WithLabelValues("unknown_device").Inc()
		x.h.Reject(ReasonUnknownDevice, 1, "transport", "external-mqtt", "topic", topic)
	} else {
		m.p, m.ack = x.begin(dev, body)
	}
	x.push(m)
}

func (x *External) push(m inflightMsg) {
	select {
	case x.inflight <- m:
	case <-x.ctx.Done(): // not acknowledged: re-delivered after the next connect
	}
}

// begin queues one message's readings, retrying while the journal is full;
// without a Pending it reports whether to acknowledge the message.
func (x *External) begin(dev devices.Device, body []byte) (*Pending, bool) {
	wait := 10 * time.Millisecond
	for {
		p, _, err := x.h.Begin(x.ctx, dev, payload.Unknown, body)
		if p != nil || !errors.Is(err, pipeline.ErrBackpressure) {
			return p, p != nil || x.settle(err)
		}
		x.m.messages.WithLabelValues("backpressure").Inc()
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-x.ctx.Done():
			t.Stop()
			return nil, false // not acknowledged: the broker re-delivers after we reconnect
		}
		wait = min(wait*2, 5*time.Second)
	}
}

// settle counts a message's fate and reports whether to acknowledge it.
func (x *External) settle(err error) bool {
	var pe *payload.Error
	switch {
	case err == nil:
		x.m.accepted.Inc()
		return true
	case errors.As(err, &pe):
		x.m.messages.WithLabelValues("bad_payload").Inc()
		return true // counted and logged; re-delivery would not fix it
	case errors.Is(err, ErrRateLimited):
		// The city's broker acknowledged it to the device already; holding
		// it back would stall every other device behind this subscription.
		x.m.messages.WithLabelValues("rate_limited").Inc()
		return true // counted (rate_limited) and logged
	default:
		// Backpressure after queueing (the journal write failed), stopping:
		// not acknowledged; the acker closes the connection (abandon) and
		// the broker re-sends after paho reconnects.
		x.m.messages.WithLabelValues("not_acknowledged").Inc()
		return false
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

// bufferedConn reads through a bufio.Reader and coalesces writes. paho reads
// each packet straight from its connection: one read for the fixed header's
// first byte, one per remaining-length byte and one for the rest, so at least
// three system calls per message; a flood of small PUBLISH packets spent 14 %
// of the external mode's CPU there. Buffered, one read(2) fetches many
// packets. paho also writes each PUBACK with its own write(2) (16 % of the
// CPU under a flood once reads were buffered): writes are gathered for up to
// externalWriteDelay and sent with one. A PUBACK leaves at most that much
// later; it is sent only after the message was journaled, so a crash in
// between means a re-delivery, never a loss.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader

	// deliver, when set, receives the subscription's QoS 0/1 PUBLISH
	// packets (subscription.go); paho gets the rest: head, then passLeft
	// bytes from r.
	deliver  func(inboundPublish)
	head     []byte
	headBuf  [5]byte
	passLeft int
	big      []byte      // a PUBLISH larger than r's buffer
	failed   atomic.Bool // abandoned: nothing more read from it is acknowledged

	wmu     sync.Mutex
	w       []byte      // written, not yet sent
	pending bool        // flush is scheduled
	flusher *time.Timer // runs flush
	werr    error       // the first failed send: every later Write fails
}

// Write queues p; it is sent within externalWriteDelay, or at once when the
// buffer is full.
func (c *bufferedConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return 0, c.werr
	}
	if len(c.w)+len(p) > externalWriteBuffer {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) > externalWriteBuffer {
			return c.Conn.Write(p)
		}
	}
	c.w = append(c.w, p...)
	if !c.pending {
		c.pending = true
		if c.flusher == nil {
			c.flusher = time.AfterFunc(externalWriteDelay, c.flush)
		} else {
			c.flusher.Reset(externalWriteDelay)
		}
	}
	return len(p), nil
}

func (c *bufferedConn) flush() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.flushLocked()
}

func (c *bufferedConn) flushLocked() error {
	c.pending = false
	if len(c.w) == 0 || c.werr != nil {
		return c.werr
	}
	_, err := c.Conn.Write(c.w)
	c.w = c.w[:0]
	if err != nil {
		c.werr = err
	}
	return err
}

// Close sends what is queued (a DISCONNECT), then closes.
func (c *bufferedConn) Close() error {
	c.wmu.Lock()
	_ = c.flushLocked()
	if c.flusher != nil {
		c.flusher.Stop()
	}
	c.wmu.Unlock()
	return c.Conn.Close()
}

// externalWriteDelay bounds how long a written packet waits to be sent with
// others; externalWriteBuffer bounds how much waits.
const (
	externalWriteDelay  = 500 * time.Microsecond
	externalWriteBuffer = 16 << 10
)

// externalReadBuffer holds many small PUBLISH packets, or a large one in
// a few reads.
const externalReadBuffer = 64 << 10

// open is paho's connection opener: a buffered connection whose
// subscription reader hands the PUBLISH packets to fromReader. paho's own
// path for them (its packet structs, four goroutine hand-offs per message,
// its acknowledgement queue) cost about 1.3 µs of CPU per reading under a
// flood, a third of the external mode's; paho keeps the session: connect,
// subscribe, keep-alive, reconnect.
func (x *External) open(u *url.URL, o paho.ClientOptions) (net.Conn, error) {
	c, err := openBuffered(u, o)
	if err != nil {
		return nil, err
	}
	bc := c.(*bufferedConn)
	bc.deliver = func(pub inboundPublish) { x.fromReader(bc, pub) }
	x.cur.Store(bc)
	return bc, nil
}

// openBuffered is paho's connection opener for the schemes ingest.external.url
// allows (tcp, mqtt; ssl, tls), returning the connection read through a
// buffer. It dials as paho does (its Dialer, its TLS config) except that it
// does not consult the all_proxy environment variable.
func openBuffered(u *url.URL, o paho.ClientOptions) (net.Conn, error) {
	d := o.Dialer
	if d == nil {
		d = &net.Dialer{Timeout: 30 * time.Second}
	}
	var c net.Conn
	var err error
	switch u.Scheme {
	case "tcp", "mqtt":
		c, err = d.Dial("tcp", u.Host)
	case "ssl", "tls":
		c, err = tls.DialWithDialer(d, "tcp", u.Host, o.TLSConfig)
	default:
		return nil, fmt.Errorf("ingest.external.url scheme %q: want tcp, mqtt, ssl or tls", u.Scheme)
	}
	if err != nil {
		return nil, err
	}
	return &bufferedConn{Conn: c, r: bufio.NewReaderSize(c, externalReadBuffer)}, nil
}

package ingest

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/ingest/payload"
)

// Broker is the embedded MQTT broker (mochi-mqtt). Devices connect with
// username = device id and password = secret, and may publish only to
// devices/<their id>/readings; everything else is denied.
//
// Acknowledgement: the client's reader queues a publish's readings and reads
// on; the client's acker (brokeracks.go) writes the PUBACK once they are
// journaled, in the order the publishes came: a PUBACK means durable. mochi
// writes no answer to a publish itself.
type Broker struct {
	srv    *mqtt.Server
	ln     net.Listener
	tlsLn  net.Listener // nil when MQTT over TLS is off
	log    *slog.Logger
	m      *brokerMetrics
	h      *Handler
	devs   Devices
	gate   *preAuthGate
	runCtx context.Context
	stop   context.CancelFunc
	once   sync.Once

	acksMu sync.Mutex
	acks   map[*mqtt.Client]*clientAcks // a client's acker, from its first QoS 1 publish to its disconnect
	ackers sync.WaitGroup
}

// Time a v3.1.1 publish is held (not acknowledged) while the journal is full,
// before the client is disconnected so that it re-sends later.
const backpressureHold = 30 * time.Second

type brokerMetrics struct {
	connects *prometheus.CounterVec
	messages *prometheus.CounterVec
	accepted prometheus.Counter // messages{result="accepted"}, resolved once
	clients  prometheus.GaugeFunc
	accept   prometheus.Counter
}

// NewBroker builds the broker and binds its TCP listener on cfg.Addr (so a port
// in use fails here, and Addr is known); it starts no goroutines.
func NewBroker(cfg MQTTConfig, devs Devices, h *Handler, log *slog.Logger, reg prometheus.Registerer) (*Broker, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = payload.MaxPayloadBytes + 4096
	caps.MaximumQos = 1 // QoS 2 publishes are refused (OnPacketRead)
	caps.RetainAvailable = 0
	clients, pending, perAddr := connectionBudget(cfg, connectionsAllowedByOpenFiles())
	caps.MaximumClients = clients
	if int64(cfg.MaxConnections) != clients || cfg.MaxPendingConnections != pending {
		// Past the open-files limit accept(2) fails and devices wait unanswered;
		// under it, the broker answers "server unavailable" and they back off.
		log.Info("MQTT connection limits lowered to what the process's open-files limit leaves for connections",
			"max_connections", cfg.MaxConnections, "effective", clients,
			"max_pending_connections", cfg.MaxPendingConnections, "effective_pending", pending)
	}
	timeout := cfg.ConnectTimeout
	if timeout <= 0 {
		timeout = defaultConnectTimeout
	}
	gate := newPreAuthGate(timeout, pending, perAddr, log)
	srv := mqtt.New(&mqtt.Options{Capabilities: caps, Logger: slog.New(connLogHandler{log.Handler()}), InlineClient: false})
	ctx, cancel := context.WithCancel(context.Background())
	b := &Broker{srv: srv, log: log, h: h, devs: devs, gate: gate, runCtx: ctx, stop: cancel, acks: map[*mqtt.Client]*clientAcks{}}
	b.m = &brokerMetrics{
		connects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_mqtt_connects_total", Help: "MQTT connection attempts to the embedded broker, by result."}, []string{"result"}),
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_mqtt_messages_total", Help: "MQTT publishes handled by the embedded broker, by result."}, []string{"result"}),
		clients: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "citypulse_mqtt_clients", Help: "Clients connected to the embedded broker."},
			func() float64 { return float64(srv.Clients.Len()) }),
		accept: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_mqtt_accept_errors_total",
			Help: "Failed accepts on the MQTT listeners (such as running out of file descriptors); the listener retries."}),
	}
	b.m.accepted = b.m.messages.WithLabelValues("accepted")
	if reg != nil {
		reg.MustRegister(b.m.connects, b.m.messages, b.m.clients, b.m.accept)
		reg.MustRegister(gate.collectors()...)
	}
	if err := srv.AddHook(&brokerHook{b: b}, nil); err != nil {
		cancel()
		return nil, err
	}
	if cfg.Addr != "" {
		ln, err := net.Listen("tcp", cfg.Addr)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("ingest.mqtt.addr %s: %w", cfg.Addr, err)
		}
		b.ln = newEnduringListener(ln, log, b.m.accept, gate)
		if err := srv.AddListener(listeners.NewNet("mqtt", b.ln)); err != nil {
			ln.Close()
			cancel()
			return nil, err
		}
	}
	if cfg.TLSAddr != "" {
		if err := b.listenTLS(cfg); err != nil {
			if b.ln != nil {
				b.ln.Close()
			}
			cancel()
			return nil, err
		}
	}
	if b.ln == nil && b.tlsLn == nil {
		cancel()
		return nil, errors.New("ingest.mqtt: neither addr nor tls_addr is set")
	}
	return b, nil
}

// connectionsAllowedByOpenFiles is the open-files limit less a reserve for
// the journal, the store, HTTP and outgoing connections: a tenth of the
// limit, at least 256.
func connectionsAllowedByOpenFiles() int64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur > math.MaxInt64/2 {
		return math.MaxInt64
	}
	n := int64(lim.Cur)
	return max(n-max(256, n/10), 1)
}

// connectionBudget shares the descriptors that allowed leaves for connections
// between authenticated clients and connections not authenticated yet (at most
// a quarter), so that the two together cannot eat the reserve. Zero values in
// cfg take the defaults (max_connections 0: as many as the budget leaves).
func connectionBudget(cfg MQTTConfig, allowed int64) (clients int64, pending, perAddr int) {
	pending, perAddr = cfg.MaxPendingConnections, cfg.MaxPendingPerAddress
	if pending <= 0 {
		pending = defaultMaxPending
	}
	if perAddr <= 0 {
		perAddr = defaultMaxPendingPerAddress
	}
	pending = int(min(int64(pending), max(allowed/4, 1)))
	perAddr = min(perAddr, pending)
	clients = max(allowed-int64(pending), 1)
	if cfg.MaxConnections > 0 {
		clients = min(clients, int64(cfg.MaxConnections))
	}
	return clients, pending, perAddr
}

// listenTLS binds the MQTT-over-TLS listener (TLS 1.2 or later).
func (b *Broker) listenTLS(cfg MQTTConfig) error {
	cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return fmt.Errorf("ingest.mqtt.cert_file/key_file: %w", err)
	}
	raw, err := net.Listen("tcp", cfg.TLSAddr)
	if err != nil {
		return fmt.Errorf("ingest.mqtt.tls_addr %s: %w", cfg.TLSAddr, err)
	}
	b.tlsLn = tls.NewListener(newEnduringListener(raw, b.log, b.m.accept, b.gate), &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	if err := b.srv.AddListener(listeners.NewNet("mqtts", b.tlsLn)); err != nil {
		b.tlsLn.Close()
		return err
	}
	return nil
}

// Addr returns the bound plain-MQTT address, or nil when only TLS is on.
func (b *Broker) Addr() net.Addr {
	if b.ln == nil {
		return nil
	}
	return b.ln.Addr()
}

// TLSAddr returns the bound MQTT-over-TLS address, or nil when it is off.
func (b *Broker) TLSAddr() net.Addr {
	if b.tlsLn == nil {
		return nil
	}
	return b.tlsLn.Addr()
}

// Run serves until ctx is done, then disconnects every client and stops.
func (b *Broker) Run(ctx context.Context) error {
	if err := b.srv.Serve(); err != nil {
		return fmt.Errorf("start MQTT broker: %w", err)
	}
	<-ctx.Done()
	return b.Close()
}

// Close stops the broker; it is idempotent.
func (b *Broker) Close() error {
	var err error
	b.once.Do(func() {
		b.stop() // releases publishes held by backpressure
		err = b.srv.Close()
		b.ackers.Wait() // every client disconnected: their ackers end
	})
	return err
}

// brokerHook authenticates devices, enforces the topic ACL and hands readings
// to the Handler.
type brokerHook struct {
	mqtt.HookBase
	b *Broker
}

func (hk *brokerHook) ID() string { return "citypulse-devices" }

func (hk *brokerHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnPublish, mqtt.OnPacketRead, mqtt.OnDisconnect}, []byte{b})
}

// ReasonUnsupportedQoS counts QoS 2 publishes, which the broker refuses.
const ReasonUnsupportedQoS = "unsupported_qos"

// readingsTopic is the one topic a device may publish (and aim its will) to.
func readingsTopic(id string) string { return "devices/" + id + "/readings" }

// OnConnect refuses a will aimed anywhere but the device's own readings topic
// (the publish ACL applies to wills too) with CONNACK "not authorized".
func (hk *brokerHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	if !pk.Connect.WillFlag || pk.Connect.WillTopic == readingsTopic(string(pk.Connect.Username)) {
		return nil
	}
	hk.b.m.connects.WithLabelValues("forbidden_will").Inc()
	hk.b.h.Reject(ReasonForbidden, 1, "transport", "mqtt", "device", string(pk.Connect.Username), "remote", cl.Net.Remote,
		"err", fmt.Sprintf("a device may not set a will on %q", pk.Connect.WillTopic))
	code := packets.ErrNotAuthorized
	if cl.Properties.ProtocolVersion < 5 {
		code = packets.ErrBadUsernameOrPassword // sent as 3.1.1's 0x05 "not authorized"
	}
	_ = hk.b.srv.SendConnack(cl, code, false, nil)
	return packets.ErrNotAuthorized
}

// OnConnectAuthenticate: username = device id, password = secret; no anonymous access.
// A device's sessions are its own: the session key is "<device id>/<client id>"
// (ids have no "/"), so a device that presents another's client id neither
// disconnects it nor inherits its session.
func (hk *brokerHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	id := string(pk.Connect.Username)
	if id == "" {
		hk.b.m.connects.WithLabelValues("anonymous").Inc()
		hk.b.h.Reject(ReasonUnauthorized, 1, "transport", "mqtt", "remote", cl.Net.Remote, "err", "anonymous connect refused")
		return false
	}
	if _, known := hk.b.devs.Get(id); !known {
		hk.b.m.connects.WithLabelValues("unknown_device").Inc()
		hk.b.h.Reject(ReasonUnknownDevice, 1, "transport", "mqtt", "device", id, "remote", cl.Net.Remote)
		return false
	}
	if _, ok := hk.b.devs.Authenticate(id, string(pk.Connect.Password)); !ok {
		hk.b.m.connects.WithLabelValues("bad_credentials").Inc()
		hk.b.h.Reject(ReasonUnauthorized, 1, "transport", "mqtt", "device", id, "remote", cl.Net.Remote, "err", "wrong password")
		return false
	}
	hk.b.m.connects.WithLabelValues("ok").Inc()
	cl.ID = id + "/" + cl.ID
	authenticated(cl.Net.Conn)
	return true
}

// OnPacketRead refuses, before mochi handles them, the publishes mochi would
// get wrong: QoS 2 (mochi would downgrade it and answer PUBACK) is refused per
// the spec, v5 DISCONNECT 0x9B "QoS not supported", v3.1.1 by closing; a topic
// mochi reserves ($SYS/...), which it drops without an answer, is refused like
// any forbidden topic: v5 PUBACK 0x87, v3.1.1 disconnect. A well-formed
// publish to the device's own readings topic is taken here (direct).
func (hk *brokerHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Publish {
		return pk, nil
	}
	b, dev := hk.b, string(cl.Properties.Username)
	if pk.FixedHeader.Qos > 1 {
		b.m.messages.WithLabelValues(ReasonUnsupportedQoS).Inc()
		b.h.Reject(ReasonUnsupportedQoS, 1, "transport", "mqtt", "device", dev, "err", "QoS 2 is not supported")
		_ = b.srv.DisconnectClient(cl, packets.ErrQosNotSupported)
		return pk, packets.ErrRejectPacket
	}
	if hk.direct(cl, &pk) {
		// handled: mochi drops a publish to $SYS/... at once, answering nothing
		pk.TopicName = handledTopic
		return pk, nil
	}
	if mqtt.IsValidFilter(pk.TopicName, true) || strings.ContainsAny(pk.TopicName, "+#") {
		// OnPublish decides; a wildcard is a protocol violation, which mochi
		// answers after this hook (v5 DISCONNECT 0x82, v3.1.1 close)
		return pk, nil
	}
	b.m.messages.WithLabelValues("forbidden").Inc()
	b.h.Reject(ReasonForbidden, 1, "transport", "mqtt", "device", dev, "err", fmt.Sprintf("a device may not publish to %q", pk.TopicName))
	switch {
	case pk.FixedHeader.Qos == 0:
		return pk, nil // mochi drops it
	case cl.Properties.ProtocolVersion == 5:
		// a negative PUBACK, in its turn after the publishes before it
		// (the acker); mochi then drops the publish
		hk.b.acksOf(hk, cl).q <- ackItem{err: errForbiddenTopic, id: pk.PacketID}
		return pk, nil
	default:
		_ = b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		return pk, packets.ErrRejectPacket
	}
}

// OnACLCheck lets a device subscribe to nothing. Its publishes are let
// through to OnPublish, which refuses any but those to devices/<its
// id>/readings in the order of the client's acknowledgements (a v5 refusal
// written here would overtake the PUBACKs of earlier publishes still being
// journaled).
func (hk *brokerHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if write {
		return true
	}
	hk.forbidden(cl, fmt.Sprintf("a device may not subscribe to %q", topic))
	return false
}

// forbidden counts and logs a refused publish or subscription.
func (hk *brokerHook) forbidden(cl *mqtt.Client, why string) {
	hk.b.m.messages.WithLabelValues("forbidden").Inc()
	hk.b.h.Reject(ReasonForbidden, 1, "transport", "mqtt", "device", string(cl.Properties.Username), "err", why)
}

// errForbiddenTopic answers a v5 publish to a topic the device may not use
// (PUBACK 0x87); it is counted where it is found.
var errForbiddenTopic = errors.New("a device may publish only to devices/<its id>/readings")

// OnPublish takes the publishes OnPacketRead left to mochi (see direct):
// those to another topic are refused, in the order of the client's
// acknowledgements for v5.
func (hk *brokerHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	b := hk.b
	id := string(cl.Properties.Username)
	if pk.TopicName != readingsTopic(id) {
		hk.forbidden(cl, fmt.Sprintf("a device may not publish to %q", pk.TopicName))
		switch {
		case pk.FixedHeader.Qos == 0: // dropped
		case cl.Properties.ProtocolVersion == 5:
			b.acksOf(hk, cl).q <- ackItem{err: errForbiddenTopic, id: pk.PacketID}
		default:
			_ = b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		}
		return pk, packets.ErrRejectPacket
	}
	hk.accept(cl, &pk)
	return pk, packets.ErrRejectPacket
}

// direct accepts, straight from the packet reader, a well-formed publish
// to the device's own readings topic without a topic alias (nearly all):
// mochi's publish path before OnPublish (the ACL, its inflight table, a
// copy of the packet boxed for a debug log) was 13 % of the embedded mode's
// CPU under a flood, for publishes it neither forwards nor answers here.
func (hk *brokerHook) direct(cl *mqtt.Client, pk *packets.Packet) bool {
	id := string(cl.Properties.Username)
	t := pk.TopicName
	if pk.Properties.TopicAliasFlag || len(t) != len("devices/")+len(id)+len("/readings") ||
		!strings.HasPrefix(t, "devices/") || !strings.HasSuffix(t, "/readings") || t[len("devices/"):len(t)-len("/readings")] != id ||
		pk.PublishValidate(hk.b.srv.Options.Capabilities.TopicAliasMaximum) != packets.CodeSuccess {
		return false
	}
	hk.accept(cl, pk)
	return true
}

// handledTopic is what a publish taken by direct is renamed to: mochi drops
// a publish to $SYS/... without an answer (processPublish's first check).
const handledTopic = "$SYS/citypulse/accepted"

// accept queues the readings of a publish to the device's readings topic.
// A QoS 1 publish is answered by the client's acker once they are durable
// (see clientAcks); QoS 0 is journaled here.
func (hk *brokerHook) accept(cl *mqtt.Client, pk *packets.Packet) {
	b := hk.b
	id := string(cl.Properties.Username)
	dev, ok := b.devs.Get(id)
	if !ok {
		// Removed since it connected: refuse and drop the connection.
		b.h.Reject(ReasonUnknownDevice, 1, "transport", "mqtt", "device", id)
		b.m.messages.WithLabelValues("unknown_device").Inc()
		_ = b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		return
	}
	format := payload.FromContentType(pk.Properties.ContentType)
	if pk.FixedHeader.Qos == 0 {
		_, err := b.h.Handle(b.runCtx, dev, format, pk.Payload)
		hk.settle(cl, 0, 0, err)
		// Readings are not forwarded to MQTT subscribers (the query API and
		// sinks are the way out), which keeps device data private.
		return
	}
	p, err := hk.beginPublish(cl, dev, format, pk.Payload)
	b.acksOf(hk, cl).q <- ackItem{p: p, err: err, id: pk.PacketID} // waits while maxUnanswered are
}

// OnDisconnect ends the client's acker once its reader has returned.
func (hk *brokerHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	hk.b.endAcks(cl)
}

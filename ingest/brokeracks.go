package ingest

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/ingest/payload"
	"github.com/citypulse/citypulse/pipeline"
)

// clientAcks answers one client's QoS 1 publishes in the order they came
// (MQTT 3.1.1 §4.6), each once its fate is known: journaled (PUBACK),
// refused (v5: a negative PUBACK) or not journaled (v3.1.1 has no way to say
// no: a disconnect, and the device re-sends). Its goroutine waits for the
// journal while the client's reader reads on, so the shard loop's group
// commit carries many of a device's messages instead of one per commit, and
// the PUBACKs of one commit leave in one write(2).
type clientAcks struct {
	hk   *brokerHook
	cl   *mqtt.Client
	conn *coalescingConn // nil when the connection is not a coalescing one
	q    chan ackItem
}

// ackItem is one QoS 1 publish read: its pending journal write, or (p nil)
// the error decided before queueing (nil: nothing was left to journal).
type ackItem struct {
	p   *Pending
	err error
	id  uint16
}

// maxUnanswered bounds a client's publishes read but not yet answered; past
// it the client's reader waits (TCP backpressure), as it waited for each
// journal write before. It is small beside a shard's queue
// (pipeline.queue_size, 4,096), so that a few busy clients cannot fill it and
// push the other devices of their shard back.
const maxUnanswered = 64

// acksOf returns cl's acker, starting it with cl's first QoS 1 publish (its
// reader calls this; OnDisconnect ends it).
func (b *Broker) acksOf(hk *brokerHook, cl *mqtt.Client) *clientAcks {
	b.acksMu.Lock()
	defer b.acksMu.Unlock()
	if a := b.acks[cl]; a != nil {
		return a
	}
	a := &clientAcks{hk: hk, cl: cl, conn: coalescerOf(cl.Net.Conn), q: make(chan ackItem, maxUnanswered)}
	b.acks[cl] = a
	b.ackers.Add(1)
	go a.run(b.runCtx)
	return a
}

// endAcks lets cl's acker answer what was read and stop: cl's reader has
// returned, so nothing more is queued.
func (b *Broker) endAcks(cl *mqtt.Client) {
	b.acksMu.Lock()
	a := b.acks[cl]
	delete(b.acks, cl)
	b.acksMu.Unlock()
	if a != nil {
		close(a.q)
	}
}

// run answers the queued publishes in order. The PUBACKs of publishes already
// journaled are gathered and sent together; before waiting for one that is not,
// what was gathered is sent.
func (a *clientAcks) run(ctx context.Context) {
	defer a.hk.b.ackers.Done()
	held := false
	for it := range a.q {
		if held && it.p != nil && !it.p.Ready() {
			a.conn.release()
			held = false
		}
		err := it.err
		if it.p != nil {
			_, err = it.p.Wait(ctx)
		}
		if !held {
			a.conn.hold()
			held = true
		}
		a.hk.settle(a.cl, 1, it.id, err)
		if len(a.q) == 0 {
			a.conn.release()
			held = false
		}
	}
	if held {
		a.conn.release()
	}
}

// beginPublish decodes a QoS 1 publish and queues its readings. A v3.1.1
// client under backpressure (journal full) has only one signal, no
// acknowledgement: its publish is held (blocking only this client's reader,
// so TCP pushes back) and retried for up to backpressureHold.
func (hk *brokerHook) beginPublish(cl *mqtt.Client, dev devices.Device, f payload.Format, body []byte) (*Pending, error) {
	b := hk.b
	var deadline time.Time
	wait := 10 * time.Millisecond
	for {
		p, _, err := b.h.Begin(b.runCtx, dev, f, body)
		if !errors.Is(err, pipeline.ErrBackpressure) || cl.Properties.ProtocolVersion == 5 || b.runCtx.Err() != nil {
			return p, err
		}
		if deadline.IsZero() {
			deadline = time.Now().Add(backpressureHold)
		} else if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(wait)
		wait = min(wait*2, time.Second)
	}
}

// settle answers one publish whose fate err is known (nil: journaled, or
// nothing to journal) and counts it. QoS 0 has no answer; where v3.1.1
// cannot refuse, the client is disconnected and re-sends after reconnecting.
func (hk *brokerHook) settle(cl *mqtt.Client, qos byte, id uint16, err error) {
	b := hk.b
	v5 := cl.Properties.ProtocolVersion == 5
	code, result, disconnect := packets.CodeSuccess, "accepted", false
	var pe *payload.Error
	var rl *RateLimitError
	switch {
	case err == nil:
	case errors.Is(err, errForbiddenTopic): // counted where it was found
		result, code, disconnect = "", packets.ErrNotAuthorized, !v5
	case errors.As(err, &pe):
		// v3.1.1 has no negative PUBACK: acknowledged (re-sending a malformed
		// message helps no one); the reject is counted and logged.
		result = "bad_payload"
		if v5 {
			code = packets.ErrPayloadFormatInvalid
		}
	case errors.As(err, &rl):
		result = "rate_limited"
		switch {
		case rl.Never() && v5: // larger than the burst: no wait helps
			code = packets.ErrPacketTooLarge
		case rl.Never(): // so like a bad payload
		case v5:
			code = packets.ErrQuotaExceeded // back off
		default:
			// v3.1.1: no PUBACK and a disconnect, the device's back-off; QoS 0
			// has no acknowledgement to withhold.
			disconnect = qos > 0
		}
	case errors.Is(err, pipeline.ErrBackpressure):
		result = "backpressure"
		code, disconnect = packets.ErrQuotaExceeded, !v5 || qos == 0
	default:
		// Shutting down (ErrClosed or the context): not acknowledged, so the
		// device re-sends after reconnecting.
		result, disconnect = "not_acknowledged", true
	}
	switch {
	case err == nil:
		b.m.accepted.Inc()
	case result != "":
		b.m.messages.WithLabelValues(result).Inc()
	}
	switch {
	case disconnect:
		_ = b.srv.DisconnectClient(cl, packets.ErrServerBusy)
	case qos > 0:
		ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: id, ReasonCode: code.Code}
		if code.Code >= packets.ErrUnspecifiedError.Code {
			ack.Properties.ReasonString = code.Reason
		}
		_ = cl.WritePacket(ack)
	}
}

// coalescerOf returns the coalescing connection under c (mochi holds a
// *pendingConn, or a *tls.Conn over one), or nil.
func coalescerOf(c net.Conn) *coalescingConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if pc, ok := c.(*pendingConn); ok {
		c = pc.Conn
	}
	cc, _ := c.(*coalescingConn)
	return cc
}

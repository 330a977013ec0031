package ingest

import (
	"bytes"
	"errors"
	"hash/maphash"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/udp/coder"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/ingest/payload"
)

// The direct path of the CoAP/UDP gateway (issue 13). Nearly every datagram
// a city's devices send is the same request: a POST of a whole body to
// /devices/<id>/readings?key=<its key>, CON or NON. The UDP reader takes
// such a request itself: it parses it, checks the key, claims its message id
// in the deduplication cache and queues the readings (Handler.Begin), then
// reads on; an answerer sends the piggybacked answer once the readings are
// journaled (or refused) and keeps it for deduplication. Everything else
// (another path or method, block-wise bodies, other options, a failed
// authentication, pings, resets, DTLS) goes to go-coap as before.
//
// go-coap handles a peer's requests one at a time in the peer's goroutine,
// each until its journal write, so a peer got one answer per journal write;
// and while a peer's queue (16) was full the reader, shared by all peers,
// waited for it: one device sending fast enough held up every other. The
// direct path waits for nothing but the pipeline's own backpressure.

// directRequest is a request taken by the direct path, parsed from the
// reader's buffer (its slices point into it until Begin returns).
type directRequest struct {
	typ    message.Type
	mid    uint16
	token  [8]byte
	tkl    int
	id     string // the device id, from the path
	key    string
	format payload.Format
	body   []byte
}

// parseDirect parses a datagram the direct path can take, and reports
// false for anything else. opts is scratch space for the options.
func parseDirect(data []byte, opts *message.Options) (directRequest, bool) {
	var r directRequest
	if len(data) < 4 || data[0]>>6 != 1 || data[1] != byte(codes.POST) {
		return r, false
	}
	r.typ = message.Type((data[0] >> 4) & 3)
	r.tkl = int(data[0] & 0xf)
	if (r.typ != message.Confirmable && r.typ != message.NonConfirmable) || r.tkl > 8 || len(data) < 4+r.tkl {
		return r, false
	}
	r.mid = uint16(data[2])<<8 | uint16(data[3])
	copy(r.token[:], data[4:4+r.tkl])
	*opts = (*opts)[:0]
	n, err := opts.Unmarshal(data[4+r.tkl:], message.CoapOptionDefs)
	if err != nil {
		return r, false
	}
	r.body = data[4+r.tkl+n:]
	if len(r.body) == 0 || len(r.body) > payload.MaxPayloadBytes {
		return r, false
	}
	path := 0
	r.format = payload.Unknown
	for _, o := range *opts {
		switch o.ID {
		case message.URIPath:
			if !pathSegment(path, string(o.Value)) {
				return r, false
			}
			if path == 1 {
				r.id = string(o.Value)
			}
			path++
		case message.URIQuery:
			if k, ok := bytes.CutPrefix(o.Value, []byte("key=")); ok {
				r.key = string(k)
			}
		case message.ContentFormat:
			cf, _, err := message.DecodeUint32(o.Value)
			if err != nil || cf > 0xffff {
				return r, false
			}
			if r.format = payload.FromCoAP(uint16(cf)); r.format == payload.Unknown {
				return r, false // go-coap's path answers 4.15
			}
		default:
			return r, false
		}
	}
	return r, path == 3
}

// pathSegment reports whether seg may be segment i of /devices/<id>/readings.
func pathSegment(i int, seg string) bool {
	switch i {
	case 0:
		return seg == "devices"
	case 1: // a device id: what deviceOfPath takes from the joined path
		return seg != "" && !strings.Contains(seg, "/")
	case 2:
		return seg == "readings"
	}
	return false
}

// directAnswer is a request being journaled, for an answerer.
type directAnswer struct {
	p     *Pending
	to    *net.UDPAddr
	cm    *coapnet.ControlMessage
	req   directRequest // body not kept
	start time.Time
}

// direct is the CoAP server's direct path: the UDP reader (one goroutine)
// calls take; the answerers run in Run's goroutines (runAnswerers).
type direct struct {
	s     *CoAPServer
	l     *coapnet.UDPConn
	dedup *dedupCache
	seed  maphash.Seed
	queue []chan directAnswer // one per answerer, by device

	opts message.Options // the reader's scratch space
	buf  []byte
}

// directAnswerers answer in parallel; one device's answers go through one,
// in order. directQueue is each one's queue: the pipeline's backpressure
// (a shard's queue of 4,096 submissions) bounds what is waiting anyway.
const (
	directAnswerers = 4
	directQueue     = 4096
)

func newDirect(s *CoAPServer, l *coapnet.UDPConn, dedup *dedupCache) *direct {
	d := &direct{s: s, l: l, dedup: dedup, seed: maphash.MakeSeed(), opts: make(message.Options, 0, 8), buf: make([]byte, 0, 256)}
	for range directAnswerers {
		d.queue = append(d.queue, make(chan directAnswer, directQueue))
	}
	return d
}

// take handles the datagram from raddr if it is a request the direct path
// takes (see above), and reports whether it did.
func (d *direct) take(raddr *net.UDPAddr, cm *coapnet.ControlMessage, data []byte) bool {
	req, ok := parseDirect(data, &d.opts)
	if !ok {
		return false
	}
	dev, known, keyOK := d.s.auth.check(req.id, req.key)
	if !known || (!keyOK && !d.s.cfg.AllowUnauthenticated) {
		return false // go-coap's path refuses it and counts why
	}
	start := time.Now()
	raw, st := d.dedup.claim(d.buf[:0], raddr.AddrPort(), req.mid, start)
	switch st {
	case busy:
		return true // its answer is on its way
	case answered:
		d.resend(raw, req, raddr, cm)
		return true
	}
	p, res, err := d.s.h.Begin(d.s.runCtx, dev, req.format, req.body)
	req.body = nil
	if p == nil {
		d.answer(outcome(res, err), req, raddr, cm, start)
		return true
	}
	d.queue[d.answerer(dev)] <- directAnswer{p: p, to: raddr, cm: cm, req: req, start: start}
	return true
}

func (d *direct) answerer(dev devices.Device) int {
	return int(maphash.String(d.seed, dev.ID) % directAnswerers)
}

// resend sends a kept answer again, as the answer to this copy of the request.
func (d *direct) resend(raw []byte, req directRequest, to *net.UDPAddr, cm *coapnet.ControlMessage) {
	if len(raw) < 4 {
		return
	}
	typ := message.NonConfirmable
	if req.typ == message.Confirmable {
		typ = message.Acknowledgement
	}
	raw[0] = raw[0]&^0x30 | byte(typ)<<4
	raw[2], raw[3] = byte(req.mid>>8), byte(req.mid)
	d.write(raw, to, cm)
}

// run answers the requests of queue q once they are journaled, until q is closed.
func (d *direct) run(q <-chan directAnswer) {
	for a := range q {
		res, err := a.p.Wait(d.s.runCtx)
		d.answer(outcome(res, err), a.req, a.to, a.cm, a.start)
	}
}

// answer encodes a, keeps it for deduplication and sends it: piggybacked on
// the ACK of a CON request, or as a NON.
func (d *direct) answer(a answer, req directRequest, to *net.UDPAddr, cm *coapnet.ControlMessage, start time.Time) {
	m := message.Message{Token: req.token[:req.tkl], Code: a.code, Type: message.Acknowledgement, MessageID: int32(req.mid)}
	if req.typ == message.NonConfirmable {
		m.Type, m.MessageID = message.NonConfirmable, message.GetMID()
	}
	var optBuf [4]message.Option
	var cf [2]byte
	m.Options = optBuf[:0]
	m.Options, _, _ = m.Options.SetContentFormat(cf[:], message.TextPlain)
	for _, o := range a.opts {
		m.Options = m.Options.Add(o)
	}
	if a.diag != "" {
		m.Payload = []byte(a.diag)
	}
	var buf [256]byte
	raw, err := encodeAnswer(buf[:], m)
	if err != nil {
		// never seen: the message is built above from valid parts. Give the
		// id back, so that a copy is handled rather than dropped until the
		// exchange lifetime ends.
		d.s.log.Error("coap: cannot encode an answer", "err", err, "code", a.code)
		d.dedup.release(to.AddrPort(), req.mid)
		return
	}
	d.dedup.store(to.AddrPort(), req.mid, raw, time.Now())
	d.write(raw, to, cm)
	d.s.m.requests.WithLabelValues(a.code.String()).Inc()
	d.s.m.duration.Observe(time.Since(start).Seconds())
}

// encodeAnswer encodes m into buf, or into a new buffer of the right size
// if buf is too small (a long diagnostic).
func encodeAnswer(buf []byte, m message.Message) ([]byte, error) {
	n, err := coder.DefaultCoder.Encode(m, buf)
	if errors.Is(err, message.ErrTooSmall) {
		buf = make([]byte, n)
		n, err = coder.DefaultCoder.Encode(m, buf)
	}
	if err != nil {
		return nil, err
	}
	return buf[:n], nil
}

func (d *direct) write(b []byte, to *net.UDPAddr, cm *coapnet.ControlMessage) {
	err := d.l.WriteWithOptions(b, coapnet.WithContext(d.s.runCtx), coapnet.WithRemoteAddr(to), coapnet.WithControlMessage(cm))
	if err != nil {
		d.s.log.Debug("coap: cannot answer", "peer", to, "err", err)
	}
}

// runAnswerers runs the answerers until readerDone is closed (the reader
// takes no more requests) and every request queued is answered.
func (d *direct) runAnswerers(readerDone <-chan struct{}) {
	var wg sync.WaitGroup
	for _, q := range d.queue {
		wg.Go(func() { d.run(q) })
	}
	<-readerDone
	for _, q := range d.queue {
		close(q)
	}
	wg.Wait()
}

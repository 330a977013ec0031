package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"
)

// rawCoAPConn is a CoAP client over plain UDP written against RFC 7252's
// message layer, for the load generator (issue 13): go-coap's client cost
// more CPU per request than the server it measured. One connected UDP socket
// (one source port), a 16-bit message ID and a token per request, CON
// retransmission with exponential back-off, responses matched by token
// (piggybacked on the ACK, or separate: an empty ACK, then a CON response
// that is acknowledged). One reader goroutine per socket, started by connect
// and stopped by close, also drives the retransmissions (its read deadline is
// the next one due). DTLS stays with go-coap (coapConn).
type rawCoAPConn struct {
	addr   string
	typ    byte   // coapCON or coapNON
	cf     uint16 // Content-Format
	tm     coapTiming
	window chan struct{}
	out    sync.WaitGroup // requests without an outcome yet

	// retransmits counts the CON copies sent again (all sockets of the
	// conn); midWaits the times a request waited for its message ID to be
	// reusable
	retransmits, midWaits atomic.Int64

	mu      sync.Mutex
	sock    *net.UDPConn
	reader  chan struct{} // closed when the reader of sock has returned
	pending map[uint32]*rawExchange
	free    []*rawExchange
	mid     uint16
	// midBlock[b] is when message IDs b*256 … b*256+255 were last taken
	// into use: a block is reused only EXCHANGE_LIFETIME later
	midBlock [256]time.Time
	token    uint32
	deadline time.Time // the reader's read deadline (zero: none)
}

// coapTiming is RFC 7252's transmission parameters (section 4.8).
type coapTiming struct {
	AckTimeout    time.Duration
	RandomFactor  float64
	MaxRetransmit int
	// ExchangeLifetime is how long a server deduplicates by message ID, so
	// how long before a client may reuse one (247 s with these defaults)
	ExchangeLifetime time.Duration
}

var defaultCoAPTiming = coapTiming{AckTimeout: 2 * time.Second, RandomFactor: 1.5, MaxRetransmit: 4,
	ExchangeLifetime: 247 * time.Second}

// maxWait is MAX_TRANSMIT_WAIT: how long a request may wait for its answer
// (also the bound for a separate response or a NON request's answer).
func (t coapTiming) maxWait() time.Duration {
	return time.Duration(float64(t.AckTimeout) * t.RandomFactor * float64(int(1)<<(t.MaxRetransmit+1)-1))
}

const (
	coapCON byte = 0
	coapNON byte = 1
	coapACK byte = 2
	coapRST byte = 3

	optURIPath       = 11
	optContentFormat = 12
	optURIQuery      = 15
)

// rawExchange is one request waiting for its outcome.
type rawExchange struct {
	token    uint32
	mid      uint16
	msg      []byte // the datagram, kept for retransmission
	attempts int    // retransmissions so far
	timeout  time.Duration
	due      time.Time // next retransmission (CON, not yet acknowledged)
	expires  time.Time // no answer by then: the request failed
	acked    bool      // an empty ACK came: a separate response follows
	done     func(bool, error)
}

func dialRawCoAP(ctx context.Context, sc Scenario, _ []*simDevice, _ int) (conn, error) {
	c := newRawCoAP(sc, defaultCoAPTiming)
	return c, c.connect(ctx)
}

func newRawCoAP(sc Scenario, tm coapTiming) *rawCoAPConn {
	c := &rawCoAPConn{addr: sc.Target.CoAP, typ: coapNON, cf: 110, tm: tm,
		window: make(chan struct{}, sc.Transport.InFlight), pending: map[uint32]*rawExchange{}}
	if sc.Transport.Confirmable {
		c.typ = coapCON
	}
	switch sc.Format {
	case "senml-cbor":
		c.cf = 112
	case "json":
		c.cf = 50
	}
	return c
}

// connect opens the socket and starts its reader.
func (c *rawCoAPConn) connect(ctx context.Context) error {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "udp", c.addr)
	if err != nil {
		return fmt.Errorf("coap dial %s: %w", c.addr, err)
	}
	sock := nc.(*net.UDPConn)
	done := make(chan struct{})
	c.mu.Lock()
	c.sock, c.reader = sock, done
	c.resetIDs(uint16(rand.Uint32()), rand.Uint32(), time.Now())
	c.deadline = time.Time{}
	c.mu.Unlock()
	go func() {
		defer close(done)
		c.read(sock)
	}()
	return nil
}

// resetIDs starts a new socket's message IDs after mid and its tokens after
// token, with c.mu held. The block of the first ID is taken into use now,
// unless the first ID opens its block: start takes that one. (Marking it
// here as well made start wait EXCHANGE_LIFETIME before the socket's first
// request, one socket in 256.)
func (c *rawCoAPConn) resetIDs(mid uint16, token uint32, now time.Time) {
	c.mid, c.token = mid, token
	c.midBlock = [256]time.Time{}
	if first := mid + 1; first&0xff != 0 {
		c.midBlock[first>>8] = now
	}
}

func (c *rawCoAPConn) send(ctx context.Context, dev *simDevice, body []byte, done func(bool, error)) error {
	if err := acquire(ctx, c.window); err != nil {
		return err
	}
	c.out.Add(1)
	for {
		wait, err := c.start(dev, body, done)
		if err == nil && wait > 0 {
			c.midWaits.Add(1)
			sleepCtx(ctx, wait)
			err = ctx.Err()
		}
		if err != nil {
			c.out.Done()
			<-c.window
			return err // not sent: done is not called
		}
		if wait == 0 {
			return nil
		}
	}
}

// start registers and sends one request, or says how long to wait until
// its message ID may be used again.
func (c *rawCoAPConn) start(dev *simDevice, body []byte, done func(bool, error)) (time.Duration, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sock == nil {
		return 0, errors.New("coap: not connected")
	}
	now := time.Now()
	if next := c.mid + 1; next&0xff == 0 {
		// a new block of message IDs: the server keeps the answers to
		// the block's last use for EXCHANGE_LIFETIME and would answer a
		// request reusing one from that cache, so one client sends at
		// most 65,536 requests per 247 s (265/s)
		b := &c.midBlock[next>>8]
		if !b.IsZero() && now.Sub(*b) < c.tm.ExchangeLifetime {
			return b.Add(c.tm.ExchangeLifetime).Sub(now), nil
		}
		*b = now
	}
	ex := c.exchange()
	c.token++
	for c.pending[c.token] != nil {
		c.token++
	}
	c.mid++
	ex.token, ex.mid, ex.done, ex.acked, ex.attempts = c.token, c.mid, done, false, 0
	ex.msg = appendRequest(ex.msg[:0], c.typ, c.mid, c.token, dev.ID, dev.Secret, c.cf, body)
	ex.timeout = time.Duration(float64(c.tm.AckTimeout) * (1 + rand.Float64()*(c.tm.RandomFactor-1)))
	ex.expires = now.Add(c.tm.maxWait())
	ex.due = ex.expires
	if c.typ == coapCON {
		ex.due = now.Add(ex.timeout)
	}
	c.pending[ex.token] = ex
	if _, err := c.sock.Write(ex.msg); err != nil {
		delete(c.pending, ex.token)
		c.free = append(c.free, ex)
		return 0, fmt.Errorf("coap: send: %w", err)
	}
	if c.deadline.IsZero() || ex.due.Before(c.deadline) {
		c.deadline = ex.due
		_ = c.sock.SetReadDeadline(ex.due)
	}
	return 0, nil
}

func (c *rawCoAPConn) exchange() *rawExchange {
	if n := len(c.free); n > 0 {
		ex := c.free[n-1]
		c.free = c.free[:n-1]
		return ex
	}
	return &rawExchange{}
}

// read is the socket's reader: it dispatches the answers and, when its
// deadline passes, retransmits or fails what is due. It returns when the
// socket is closed, after failing whatever is still pending.
func (c *rawCoAPConn) read(sock *net.UDPConn) {
	buf := make([]byte, 1500)
	for {
		n, err := sock.Read(buf)
		var ne net.Error
		switch {
		case err == nil:
			c.handle(sock, buf[:n])
		case errors.Is(err, net.ErrClosed):
			c.failAll(errors.New("coap: connection closed"))
			return
		case errors.As(err, &ne) && ne.Timeout():
			c.expire(sock, time.Now())
		default:
			// ECONNREFUSED (an ICMP port unreachable on the connected
			// socket) and the like: the retransmissions decide
		}
	}
}

// handle dispatches one datagram from the server.
func (c *rawCoAPConn) handle(sock *net.UDPConn, b []byte) {
	m, err := parseCoAP(b)
	if err != nil {
		return // not CoAP: ignored (RFC 7252 4.2 allows silently ignoring)
	}
	if m.typ == coapCON {
		// a separate response (or anything the server wants acknowledged)
		var ack [4]byte
		ack[0] = 1<<6 | coapACK<<4
		binary.BigEndian.PutUint16(ack[2:], m.mid)
		_, _ = sock.Write(ack[:])
	}
	c.mu.Lock()
	var ex *rawExchange
	switch {
	case m.typ == coapRST || (m.typ == coapACK && m.code == 0):
		ex = c.byMID(m.mid)
		if ex != nil && m.typ == coapACK {
			ex.acked = true // the answer follows separately: stop retransmitting
			ex = nil
		}
	case m.code>>5 >= 2 && len(m.token) == 4:
		ex = c.pending[binary.BigEndian.Uint32(m.token)]
		if ex != nil && m.typ == coapACK && ex.mid != m.mid {
			ex = nil // an ACK must carry the request's message ID
		}
	}
	if ex == nil {
		c.mu.Unlock()
		return
	}
	done := ex.done
	c.finish(ex) // ex may be reused once mu is released
	c.mu.Unlock()
	switch {
	case m.typ == coapRST:
		c.complete(done, false, errors.New("coap: reset by the server"))
	case codes.Code(m.code) != codes.Changed:
		c.complete(done, false, coapError{codes.Code(m.code)})
	default:
		c.complete(done, true, nil)
	}
}

func (c *rawCoAPConn) byMID(mid uint16) *rawExchange {
	for _, ex := range c.pending {
		if ex.mid == mid {
			return ex
		}
	}
	return nil
}

// finish removes ex from the pending set and recycles it (under mu; the
// caller keeps what it needs of ex first).
func (c *rawCoAPConn) finish(ex *rawExchange) {
	delete(c.pending, ex.token)
	c.free = append(c.free, ex)
}

// complete reports an outcome and frees its in-flight slot.
func (c *rawCoAPConn) complete(done func(bool, error), ok bool, err error) {
	done(ok, err)
	<-c.window
	c.out.Done()
}

type outcome struct {
	done func(bool, error)
	err  error
}

// expire retransmits the CON requests that are due and fails those that ran
// out of attempts or time, then sets the next read deadline.
func (c *rawCoAPConn) expire(sock *net.UDPConn, now time.Time) {
	var failed []outcome
	c.mu.Lock()
	var next time.Time
	for _, ex := range c.pending {
		switch {
		case !now.Before(ex.expires) || (!ex.acked && c.typ == coapCON && ex.attempts >= c.tm.MaxRetransmit && !now.Before(ex.due)):
			failed = append(failed, outcome{ex.done, c.failure(ex)})
			c.finish(ex)
			continue
		case !ex.acked && c.typ == coapCON && !now.Before(ex.due):
			ex.attempts++
			ex.timeout *= 2
			ex.due = now.Add(ex.timeout)
			c.retransmits.Add(1)
			_, _ = sock.Write(ex.msg)
		}
		due := ex.expires
		if !ex.acked && c.typ == coapCON {
			due = ex.due
		}
		if next.IsZero() || due.Before(next) {
			next = due
		}
	}
	if c.sock == sock {
		c.deadline = next
	}
	_ = sock.SetReadDeadline(next)
	c.mu.Unlock()
	for _, f := range failed {
		c.complete(f.done, false, f.err)
	}
}

func (c *rawCoAPConn) failure(ex *rawExchange) error {
	switch {
	case ex.acked:
		return fmt.Errorf("coap: acknowledged, but no separate response within %s", c.tm.maxWait().Round(time.Millisecond))
	case c.typ == coapCON:
		return fmt.Errorf("coap: no acknowledgement after %d retransmissions", ex.attempts)
	}
	return fmt.Errorf("coap: no response within %s", c.tm.maxWait().Round(time.Millisecond))
}

func (c *rawCoAPConn) failAll(err error) {
	c.mu.Lock()
	var failed []func(bool, error)
	for _, ex := range c.pending {
		failed = append(failed, ex.done)
		c.finish(ex)
	}
	c.mu.Unlock()
	for _, done := range failed {
		c.complete(done, false, err)
	}
}

// retransmissions counts the CON copies sent again since the conn was made.
func (c *rawCoAPConn) retransmissions() int64 { return c.retransmits.Load() }

// messageIDWaits counts the requests that waited for a reusable message ID.
func (c *rawCoAPConn) messageIDWaits() int64 { return c.midWaits.Load() }

// reconnect waits for every outcome, then opens a new socket (a new source
// port, as a rebooted device would).
func (c *rawCoAPConn) reconnect(ctx context.Context) error {
	c.close()
	return c.connect(ctx)
}

// close waits for every outstanding request's outcome (at most
// MAX_TRANSMIT_WAIT), then closes the socket and waits for its reader.
func (c *rawCoAPConn) close() {
	c.out.Wait()
	c.mu.Lock()
	sock, reader := c.sock, c.reader
	c.sock = nil
	c.mu.Unlock()
	if sock != nil {
		_ = sock.Close()
		<-reader
	}
}

// appendRequest encodes a POST of body to /devices/<id>/readings with the key
// in the URI query (RFC 7252 section 3: header, 4-byte token, options in
// number order with delta encoding, payload marker, payload).
func appendRequest(b []byte, typ byte, mid uint16, token uint32, id, key string, cf uint16, body []byte) []byte {
	b = append(b, 1<<6|typ<<4|4, byte(codes.POST), byte(mid>>8), byte(mid))
	b = binary.BigEndian.AppendUint32(b, token)
	b = appendOption(b, optURIPath, 0, "devices")
	b = appendOption(b, optURIPath, optURIPath, id)
	b = appendOption(b, optURIPath, optURIPath, "readings")
	switch {
	case cf == 0:
		b = appendOption(b, optContentFormat, optURIPath, "")
	case cf < 256:
		b = appendOption(b, optContentFormat, optURIPath, string([]byte{byte(cf)}))
	default:
		b = appendOption(b, optContentFormat, optURIPath, string([]byte{byte(cf >> 8), byte(cf)}))
	}
	b = appendOptionKV(b, optURIQuery, optContentFormat, "key=", key)
	if len(body) > 0 {
		b = append(b, 0xff)
		b = append(b, body...)
	}
	return b
}

func appendOption(b []byte, num, prev int, v string) []byte {
	return appendOptionKV(b, num, prev, v, "")
}

// appendOptionKV encodes option num (after option prev) with the value k+v.
func appendOptionKV(b []byte, num, prev int, k, v string) []byte {
	delta, n := num-prev, len(k)+len(v)
	dn, dx := optNibble(delta)
	ln, lx := optNibble(n)
	b = append(b, dn<<4|ln)
	b = appendOptExt(b, dn, dx)
	b = appendOptExt(b, ln, lx)
	b = append(b, k...)
	return append(b, v...)
}

// optNibble is the 4-bit field for an option delta or length and its
// extended value (13: one more byte, minus 13; 14: two more bytes, minus 269).
func optNibble(v int) (byte, int) {
	switch {
	case v < 13:
		return byte(v), 0
	case v < 269:
		return 13, v - 13
	}
	return 14, v - 269
}

func appendOptExt(b []byte, nib byte, x int) []byte {
	switch nib {
	case 13:
		return append(b, byte(x))
	case 14:
		return append(b, byte(x>>8), byte(x))
	}
	return b
}

// coapMsg is what the client needs of a datagram from the server.
type coapMsg struct {
	typ   byte
	code  byte
	mid   uint16
	token []byte // aliases the datagram
}

var errNotCoAP = errors.New("coap: malformed message")

// parseCoAP decodes a datagram's header and token and checks that its
// options are well formed (RFC 7252 section 3); options themselves are not
// needed by the client.
func parseCoAP(b []byte) (coapMsg, error) {
	if len(b) < 4 || b[0]>>6 != 1 {
		return coapMsg{}, errNotCoAP
	}
	tkl := int(b[0] & 0x0f)
	if tkl > 8 || len(b) < 4+tkl {
		return coapMsg{}, errNotCoAP
	}
	m := coapMsg{typ: b[0] >> 4 & 3, code: b[1], mid: binary.BigEndian.Uint16(b[2:]), token: b[4 : 4+tkl]}
	if m.code == 0 && (len(b) > 4 || tkl > 0) {
		return coapMsg{}, errNotCoAP // an empty message is 4 bytes
	}
	for rest := b[4+tkl:]; len(rest) > 0; {
		if rest[0] == 0xff {
			if len(rest) == 1 {
				return coapMsg{}, errNotCoAP // a marker without a payload
			}
			break
		}
		dn, ln := int(rest[0]>>4), int(rest[0]&0x0f)
		rest = rest[1:]
		var ok bool
		if _, rest, ok = optExt(dn, rest); !ok {
			return coapMsg{}, errNotCoAP
		}
		var n int
		if n, rest, ok = optExt(ln, rest); !ok || n > len(rest) {
			return coapMsg{}, errNotCoAP
		}
		rest = rest[n:]
	}
	return m, nil
}

// optExt reads an option delta or length whose 4-bit field is nib.
func optExt(nib int, b []byte) (int, []byte, bool) {
	switch {
	case nib < 13:
		return nib, b, true
	case nib == 13 && len(b) >= 1:
		return int(b[0]) + 13, b[1:], true
	case nib == 14 && len(b) >= 2:
		return int(binary.BigEndian.Uint16(b)) + 269, b[2:], true
	}
	return 0, b, false // 15 is reserved, or the datagram is cut short
}

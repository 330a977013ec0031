package ingest

import (
	"net"
	"sync"
	"time"
)

// coalescingConn gathers what the embedded broker writes to a connection
// and sends it with fewer write(2) calls: under a flood of small QoS 1
// messages one write per PUBACK was 18 % of the embedded mode's CPU.
//
// Nothing waits long: what is gathered is sent before the connection's next
// read(2) (the reader has run out of packets and is about to wait), when it
// reaches coalesceMax bytes, or at the next write once the oldest byte is
// coalesceAge old. A write made while a read is blocked (another goroutine
// publishing to a subscriber) goes out at once, unless a hold is on: a
// client's acker holds the connection while it writes the PUBACKs of one
// journal commit and sends them together at release. A PUBACK is only ever
// written after the journal write, so sending it a little later can cause a
// re-delivery, never a loss. A send that the peer does not take within
// coalesceWriteTimeout fails (and the connection with it): a client that
// stops reading cannot hold the goroutines writing to it, or Close.
type coalescingConn struct {
	net.Conn

	mu      sync.Mutex
	buf     []byte
	since   time.Time // when buf got its first byte
	reading bool      // a Read is waiting for the peer
	held    bool      // hold: gather even while a Read waits, until release

	// dmu guards the deadlines (not mu: a send blocked under mu must not
	// hold SetDeadline or Close up).
	dmu     sync.Mutex
	armed   time.Time // the deadline last set by SetDeadline
	writeBy time.Time // the write deadline on the connection (zero: none)
	closing bool      // Close set the last write deadline
	err     error     // the first failed send: every later Write fails
}

const (
	coalesceMax = 16 << 10
	coalesceAge = time.Millisecond
)

func newCoalescingConn(c net.Conn) *coalescingConn { return &coalescingConn{Conn: c} }

// Read sends what was gathered, then reads.
func (c *coalescingConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	err := c.flushLocked()
	c.reading = err == nil
	c.mu.Unlock()
	if err != nil {
		return 0, err
	}
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.reading = false
	c.mu.Unlock()
	return n, err
}

// Write gathers p, or sends it (with what was gathered) when a read is
// waiting, the buffer would overflow or its oldest byte is coalesceAge old.
func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if c.reading && !c.held || len(c.buf)+len(p) > coalesceMax || len(c.buf) > 0 && time.Since(c.since) >= coalesceAge {
		c.buf = append(c.buf, p...)
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if len(c.buf) == 0 {
		c.since = time.Now()
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

// SetDeadline sets the connection's deadline unless one at most
// deadlineSlack later is set already: mochi moves a client's keep-alive
// deadline (1.5 × keep-alive) at every packet it reads, and re-arming the
// runtime's timers per packet was 1-2 % of the CPU under a flood. A client
// that falls silent is closed after its deadline, never before, and at most
// deadlineSlack after it. A first deadline (the pre-authentication one), one
// less than deadlineSlack away, or none, is set as it is.
func (c *coalescingConn) SetDeadline(t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	moved := !t.IsZero() && !c.armed.IsZero() && time.Until(t) >= deadlineSlack
	if moved && !t.After(c.armed) && c.armed.Sub(t) <= deadlineSlack {
		return nil
	}
	if moved && t.After(c.armed) {
		t = t.Add(deadlineSlack) // the next moves within the slack are skipped
	}
	c.armed, c.writeBy = t, t
	return c.Conn.SetDeadline(t)
}

// SetReadDeadline and SetWriteDeadline set one deadline; the next
// SetDeadline is then applied as it comes.
func (c *coalescingConn) SetReadDeadline(t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	c.armed = time.Time{}
	return c.Conn.SetReadDeadline(t)
}

func (c *coalescingConn) SetWriteDeadline(t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	c.armed, c.writeBy = time.Time{}, t
	return c.Conn.SetWriteDeadline(t)
}

// armWrite makes sure a send fails if the peer takes none of it for
// coalesceWriteTimeout (re-armed when less than half of it is left).
func (c *coalescingConn) armWrite() {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	now := time.Now()
	if c.closing {
		return
	}
	if left := c.writeBy.Sub(now); c.writeBy.IsZero() || left < coalesceWriteTimeout/2 || left > coalesceWriteTimeout {
		c.writeBy = now.Add(coalesceWriteTimeout)
		_ = c.Conn.SetWriteDeadline(c.writeBy)
	}
}

// coalesceWriteTimeout bounds how long a send may wait for the peer.
const coalesceWriteTimeout = 30 * time.Second

// deadlineSlack is how late SetDeadline may close a silent connection.
const deadlineSlack = time.Second

// hold makes writes gather even while a Read waits (a client's acker
// writing the PUBACKs of one journal commit) until release sends them. Both
// do nothing on a nil c.
func (c *coalescingConn) hold() {
	if c == nil {
		return
	}
	c.mu.Lock()
	c.held = true
	c.mu.Unlock()
}

// release ends a hold and sends what was gathered: the reader may be
// blocked elsewhere (a full journal) and not read again soon.
func (c *coalescingConn) release() {
	if c == nil {
		return
	}
	c.mu.Lock()
	c.held = false
	_ = c.flushLocked()
	c.mu.Unlock()
}

func (c *coalescingConn) flushLocked() error {
	if c.err != nil || len(c.buf) == 0 {
		return c.err
	}
	c.armWrite()
	_, err := c.Conn.Write(c.buf)
	if cap(c.buf) > 4*coalesceMax {
		c.buf = nil // one huge packet passed: do not keep its buffer
	} else {
		c.buf = c.buf[:0]
	}
	c.err = err
	return err
}

// Close sends what was gathered (a DISCONNECT, a TLS close_notify), then
// closes.
func (c *coalescingConn) Close() error {
	// A send blocked on a peer that reads nothing gives up within a second.
	c.dmu.Lock()
	c.closing, c.writeBy = true, time.Now().Add(time.Second)
	_ = c.Conn.SetWriteDeadline(c.writeBy)
	c.dmu.Unlock()
	c.mu.Lock()
	_ = c.flushLocked()
	c.mu.Unlock()
	return c.Conn.Close()
}

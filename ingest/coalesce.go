package ingest

import (
	"net"
	"sync"
	"time"
)

// coalescingConn gathers what the embedded broker writes to a connection
// between two reads of it and sends it with one write(2). mochi answers each
// QoS 1 PUBLISH with a PUBACK written on its own, right after the journal
// commit, then reads the next packet, often already buffered: under a flood
// of small messages those writes were 18 % of the embedded mode's CPU.
//
// Nothing waits long: what is gathered is sent before the connection's next
// read(2) (the reader has run out of packets and is about to wait), when it
// reaches coalesceMax bytes, or at the next write once the oldest byte is
// coalesceAge old. A write made while a read is blocked (another goroutine
// publishing to a subscriber) goes out at once. A PUBACK is only ever written
// after the journal write, so sending it a little later can cause a
// re-delivery, never a loss.
type coalescingConn struct {
	net.Conn

	mu      sync.Mutex
	buf     []byte
	since   time.Time // when buf got its first byte
	reading bool      // a Read is waiting for the peer
	armed   time.Time // the deadline last set on the connection (SetDeadline)
	held    bool      // hold: gather even while a Read waits, until release
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
// that falls silent is closed up to deadlineSlack after its deadline, never
// before. A first deadline (the pre-authentication one), one less than
// deadlineSlack away, or none, is set as it is.
func (c *coalescingConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	if !t.IsZero() && !c.armed.IsZero() && !t.After(c.armed) && time.Until(t) >= deadlineSlack {
		c.mu.Unlock()
		return nil
	}
	if !t.IsZero() && !c.armed.IsZero() && time.Until(t) >= deadlineSlack {
		t = t.Add(deadlineSlack) // moving a deadline: the next moves within the slack are skipped
	}
	c.armed = t
	c.mu.Unlock()
	return c.Conn.SetDeadline(t)
}

// SetReadDeadline and SetWriteDeadline set one deadline; the next
// SetDeadline is then applied as it comes.
func (c *coalescingConn) SetReadDeadline(t time.Time) error {
	c.forgetDeadline()
	return c.Conn.SetReadDeadline(t)
}

func (c *coalescingConn) SetWriteDeadline(t time.Time) error {
	c.forgetDeadline()
	return c.Conn.SetWriteDeadline(t)
}

func (c *coalescingConn) forgetDeadline() {
	c.mu.Lock()
	c.armed = time.Time{}
	c.mu.Unlock()
}

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
	c.mu.Lock()
	_ = c.flushLocked()
	c.mu.Unlock()
	return c.Conn.Close()
}

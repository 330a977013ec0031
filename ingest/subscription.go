package ingest

import (
	"errors"
	"fmt"
	"io"
)

// inboundPublish is one QoS 0 or 1 PUBLISH from the city's broker, taken out
// of the stream before paho sees it. Topic and Payload point into the read
// buffer: valid only during the deliver call.
type inboundPublish struct {
	Topic   []byte
	Payload []byte
	ID      uint16 // QoS 1
	QoS     byte
	TooBig  bool // over maxInboundPublish: its body was skipped, Payload is empty
}

// maxInboundPublish bounds a PUBLISH body the subscription reader holds: a
// payload the handler accepts and a long topic. A larger one is skipped as
// it streams past and delivered with TooBig (refused, counted).
const maxInboundPublish = 256<<10 + 64<<10

// errMalformedPacket ends a connection whose broker sent what is not MQTT.
var errMalformedPacket = errors.New("malformed MQTT packet from the broker")

// Read gives paho every packet but the PUBLISHes it takes out (see
// takePublishes). Without a deliver function it reads straight through the
// buffer.
func (c *bufferedConn) Read(p []byte) (int, error) {
	if c.deliver == nil {
		return c.r.Read(p)
	}
	for len(c.head) == 0 && c.passLeft == 0 {
		if err := c.nextPacket(); err != nil {
			return 0, err
		}
	}
	if len(c.head) > 0 {
		n := copy(p, c.head)
		c.head = c.head[n:]
		return n, nil
	}
	n, err := c.r.Read(p[:min(len(p), c.passLeft)])
	c.passLeft -= n
	return n, err
}

// nextPacket reads one packet's fixed header. A QoS 0 or 1 PUBLISH is read
// whole and delivered; anything else is queued for paho (its header in head,
// passLeft bytes of body still in the reader).
func (c *bufferedConn) nextPacket() error {
	first, err := c.r.ReadByte()
	if err != nil {
		return err
	}
	var hdr [5]byte
	hdr[0] = first
	n, length := 1, 0
	for shift := 0; ; shift += 7 {
		if n == len(hdr) {
			return fmt.Errorf("%w: remaining length over 4 bytes", errMalformedPacket)
		}
		b, err := c.r.ReadByte()
		if err != nil {
			return noEOF(err)
		}
		hdr[n] = b
		n++
		length |= int(b&0x7f) << shift
		if b&0x80 == 0 {
			break
		}
	}
	qos := first >> 1 & 3
	if first>>4 != 3 || qos > 1 { // not a PUBLISH we take: paho's
		c.head = append(c.headBuf[:0], hdr[:n]...)
		c.passLeft = length
		return nil
	}
	return c.takePublish(qos, length)
}

// takePublish reads a PUBLISH body of length bytes and delivers it.
func (c *bufferedConn) takePublish(qos byte, length int) error {
	pub := inboundPublish{QoS: qos}
	if length > maxInboundPublish {
		// Only the topic and id are kept; the rest streams past.
		pub.TooBig = true
	}
	var body []byte
	var err error
	if pub.TooBig {
		body, err = c.readN(min(length, 2+64<<10+2))
	} else {
		body, err = c.readN(length)
	}
	if err != nil {
		return noEOF(err)
	}
	if len(body) < 2 {
		return fmt.Errorf("%w: PUBLISH shorter than its topic length", errMalformedPacket)
	}
	tl := int(body[0])<<8 | int(body[1])
	rest := body[2:]
	if tl > len(rest) || qos == 1 && tl+2 > len(rest) {
		return fmt.Errorf("%w: PUBLISH topic or packet id past its end", errMalformedPacket)
	}
	pub.Topic, rest = rest[:tl], rest[tl:]
	if qos == 1 {
		pub.ID, rest = uint16(rest[0])<<8|uint16(rest[1]), rest[2:]
	}
	if !pub.TooBig {
		pub.Payload = rest
	}
	c.deliver(pub)
	if pub.TooBig {
		_, err := c.r.Discard(length - len(body))
		return noEOF(err)
	}
	return nil
}

// readN returns the next n bytes, from the reader's buffer when they fit
// (valid until the next read), else copied into c.big.
func (c *bufferedConn) readN(n int) ([]byte, error) {
	if n <= c.r.Size() {
		b, err := c.r.Peek(n)
		if err != nil {
			return nil, err
		}
		_, _ = c.r.Discard(n)
		return b, nil
	}
	if cap(c.big) < n {
		c.big = make([]byte, n)
	}
	c.big = c.big[:n]
	_, err := io.ReadFull(c.r, c.big)
	return c.big, err
}

// noEOF turns an end of stream inside a packet into io.ErrUnexpectedEOF.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// writePuback queues the PUBACK of packet id (sent with the coalesced writes).
func (c *bufferedConn) writePuback(id uint16) {
	_, _ = c.Write([]byte{0x40, 2, byte(id >> 8), byte(id)})
}

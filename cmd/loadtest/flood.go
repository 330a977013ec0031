package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

// The flood generator of `loadtest efficiency` is a minimal MQTT 3.1.1 QoS 1
// publisher: every PUBLISH packet is encoded before the clock starts, so that
// during the flood the harness only writes prepared bytes and reads PUBACKs
// (it shares the machine with the server it measures). The paho client of
// `loadtest run` spends a goroutine and a token per message; here a message
// costs a copy into a write buffer.

// floodConn is one device's connection and its prepared packets.
type floodConn struct {
	dev     *simDevice
	packets [][]byte
	msgs    []*pubMsg // msgs[i] is carried by packets[i]
}

// publishPacket encodes a QoS 1 PUBLISH of body to topic with packet id id.
func publishPacket(topic string, id uint16, body []byte) []byte {
	rem := 2 + len(topic) + 2 + len(body)
	b := make([]byte, 0, 1+4+rem)
	b = append(b, 0x32) // PUBLISH, QoS 1
	b = appendRemLen(b, rem)
	b = binary.BigEndian.AppendUint16(b, uint16(len(topic)))
	b = append(b, topic...)
	b = binary.BigEndian.AppendUint16(b, id)
	return append(b, body...)
}

// connectPacket encodes a clean-session CONNECT with username and password.
func connectPacket(clientID, user, pass string) []byte {
	var v []byte
	v = append(v, 0, 4, 'M', 'Q', 'T', 'T', 4, 0xC2, 0, 0) // v3.1.1; username, password, clean session; no keep-alive
	for _, s := range []string{clientID, user, pass} {
		v = binary.BigEndian.AppendUint16(v, uint16(len(s)))
		v = append(v, s...)
	}
	b := appendRemLen([]byte{0x10}, len(v))
	return append(b, v...)
}

func appendRemLen(b []byte, n int) []byte {
	for {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			return b
		}
	}
}

// packetID is the id of a connection's i-th message: 1..65535, cycling. A
// window below 65535 never has two messages with one id in flight.
func packetID(i int) uint16 { return uint16(i%65535) + 1 }

// floodResult is what one flood did.
type floodResult struct {
	Messages int64
	// End is when the last PUBACK arrived.
	End time.Time
}

// flood connects every device, publishes its prepared packets with at most
// window unacknowledged per connection, and returns when every message is
// acknowledged; any failure ends the flood with an error (a benchmark that
// lost messages has no figure). Each acknowledged message is marked acked.
func flood(ctx context.Context, addr string, conns []*floodConn, window int) (floodResult, error) {
	if window < 1 || window >= 65535 {
		return floodResult{}, fmt.Errorf("flood window %d: want 1..65534", window)
	}
	nets := make([]net.Conn, len(conns))
	defer func() {
		for _, c := range nets {
			if c != nil {
				c.Close()
			}
		}
	}()
	for i, fc := range conns {
		c, err := mqttHandshake(ctx, addr, fc.dev)
		if err != nil {
			return floodResult{}, err
		}
		nets[i] = c
	}
	g, gctx := errgroup.WithContext(ctx)
	stop := context.AfterFunc(gctx, func() { // unblocks reads and writes on error or interrupt
		for _, c := range nets {
			_ = c.SetDeadline(time.Unix(1, 0))
		}
	})
	defer stop()
	var mu sync.Mutex
	var res floodResult
	for i, fc := range conns {
		g.Go(func() error {
			n, err := fc.run(gctx, nets[i], window)
			mu.Lock()
			res.Messages += n
			if now := time.Now(); now.After(res.End) {
				res.End = now
			}
			mu.Unlock()
			return err
		})
	}
	err := g.Wait()
	if err == nil {
		err = ctx.Err()
	}
	return res, err
}

// mqttHandshake dials addr and connects as dev.
func mqttHandshake(ctx context.Context, addr string, dev *simDevice) (net.Conn, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("flood: dial %s: %w", addr, err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var ack [4]byte
	if _, err = c.Write(connectPacket(dev.ID+"-flood", dev.ID, dev.Secret)); err == nil {
		_, err = io.ReadFull(c, ack[:])
	}
	if err == nil && (ack[0] != 0x20 || ack[1] != 2 || ack[3] != 0) {
		err = fmt.Errorf("CONNACK % x (return code %d)", ack, ack[3])
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("flood: connect %s as %s: %w", addr, dev.ID, err)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// run writes the packets and reads their PUBACKs; it returns the number of
// messages acknowledged.
func (fc *floodConn) run(ctx context.Context, c net.Conn, window int) (int64, error) {
	slots := make(chan struct{}, window)
	acked := make(chan error, 1)
	var n int64
	go func() { // the reader: PUBACKs, in any order
		acked <- fc.readAcks(c, slots, &n)
	}()
	w := bufio.NewWriterSize(c, 64<<10)
	var werr error
	for _, p := range fc.packets {
		select {
		case slots <- struct{}{}:
		default: // the window is full: send what is buffered, then wait
			if werr = w.Flush(); werr != nil {
				break
			}
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				werr = ctx.Err()
			}
		}
		if werr != nil {
			break
		}
		if _, werr = w.Write(p); werr != nil {
			break
		}
	}
	if werr == nil {
		werr = w.Flush()
	}
	if werr != nil {
		_ = c.SetDeadline(time.Unix(1, 0)) // ends the reader
		<-acked
		return n, fmt.Errorf("flood %s: write: %w", fc.dev.ID, werr)
	}
	if err := <-acked; err != nil {
		return n, fmt.Errorf("flood %s: %w after %d of %d PUBACKs", fc.dev.ID, err, n, len(fc.packets))
	}
	return n, nil
}

// readAcks reads a PUBACK per packet, marks its message acked and frees its
// window slot.
func (fc *floodConn) readAcks(c net.Conn, slots chan struct{}, n *int64) error {
	r := bufio.NewReaderSize(c, 16<<10)
	var ids [65536]int32 // packet id → index of the message in flight, +1
	for i := range fc.packets {
		if i < 65535 {
			ids[packetID(i)] = int32(i + 1)
		}
	}
	var pkt [4]byte
	for done := 0; done < len(fc.packets); done++ {
		if _, err := io.ReadFull(r, pkt[:]); err != nil {
			return fmt.Errorf("read PUBACK: %w", err)
		}
		if pkt[0] != 0x40 || pkt[1] != 2 {
			return fmt.Errorf("unexpected packet % x (want a PUBACK)", pkt)
		}
		id := binary.BigEndian.Uint16(pkt[2:])
		i := int(ids[id]) - 1
		if i < 0 {
			return fmt.Errorf("PUBACK for packet id %d, not in flight", id)
		}
		fc.msgs[i].status.Store(msgAcked)
		ids[id] = 0
		if next := i + 65535; next < len(fc.packets) {
			ids[id] = int32(next + 1)
		}
		*n++
		<-slots
	}
	return nil
}

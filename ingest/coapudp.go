package ingest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/pool"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/net/monitor/inactivity"
	"github.com/plgd-dev/go-coap/v3/net/responsewriter"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
)

// udpServer serves CoAP over one UDP socket with go-coap's per-peer
// connection (udp/client.Conn: deduplication, piggybacked answers, the
// handler) as go-coap's udp/server.Server does, with two differences that
// keep the cost of a request flat (issue 13):
//
//   - a peer's expirations are checked once a second by the periodic runner,
//     not on every packet (go-coap's server calls Conn.CheckExpirations per
//     packet, which walks the peer's whole response cache);
//   - the response cache (EXCHANGE_LIFETIME, 247 s, for deduplication) is a
//     FIFO shared by all peers: every entry lives equally long, so expiring
//     walks only what expired; and it is bounded per peer and in total
//     (dedupCache).
//
// It uses go-coap's exported extension points only (udp/client.NewConnWithOpts,
// WithResponseMessageCache, Session): no fork.
type udpServer struct {
	l       *coapnet.UDPConn
	handler func(*responsewriter.ResponseWriter[*udpclient.Conn], *pool.Message)
	maxMsg  uint32
	idle    time.Duration
	errs    func(error)
	runner  func(func(time.Time) bool)

	ctx    context.Context
	cancel context.CancelFunc
	dedup  *dedupCache
	// direct, when set, is offered every datagram first; it reports whether
	// it handled it (see coapdirect.go).
	direct func(raddr *net.UDPAddr, cm *coapnet.ControlMessage, data []byte) bool

	mu    sync.Mutex
	conns map[string]*udpclient.Conn
}

// udpIdleTimeout closes a peer's state after this long without a packet
// (go-coap's server default).
const udpIdleTimeout = 16 * time.Second

func newUDPServer(l *coapnet.UDPConn, handler func(*responsewriter.ResponseWriter[*udpclient.Conn], *pool.Message),
	maxMsg uint32, runner func(func(time.Time) bool), errs func(error)) *udpServer {
	ctx, cancel := context.WithCancel(context.Background())
	return &udpServer{l: l, handler: handler, maxMsg: maxMsg, idle: udpIdleTimeout, errs: errs, runner: runner,
		ctx: ctx, cancel: cancel, conns: map[string]*udpclient.Conn{}, dedup: newDedupCache(coapDedupMaxEntries)}
}

// Serve reads datagrams until Stop; each goes to its peer's connection.
func (s *udpServer) Serve() error {
	s.runner(func(now time.Time) bool {
		for _, cc := range s.snapshot() {
			cc.CheckExpirations(now) // closes the idle ones
		}
		s.dedup.expire(now)
		return s.ctx.Err() == nil
	})
	buf := make([]byte, s.maxMsg)
	for {
		var raddr *net.UDPAddr
		var cm *coapnet.ControlMessage
		n, err := s.l.ReadWithOptions(buf, coapnet.WithContext(s.ctx), coapnet.WithGetControlMessage(&cm), coapnet.WithGetRemoteAddr(&raddr))
		if err != nil {
			if s.ctx.Err() != nil || coapnet.IsCancelOrCloseError(err) {
				return nil
			}
			return err
		}
		if raddr == nil {
			continue
		}
		if s.direct != nil && s.direct(raddr, cm, buf[:n]) {
			continue
		}
		cc := s.conn(raddr)
		if err := cc.Process(cm, buf[:n]); err != nil {
			_ = cc.Close()
			s.errs(fmt.Errorf("%v: cannot process packet: %w", raddr, err))
		}
	}
}

// Stop ends Serve and closes every peer's connection; it is idempotent.
func (s *udpServer) Stop() {
	s.cancel()
	_ = s.l.Close()
	for _, cc := range s.snapshot() {
		_ = cc.Close()
	}
}

func (s *udpServer) snapshot() []*udpclient.Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*udpclient.Conn, 0, len(s.conns))
	for _, cc := range s.conns {
		out = append(out, cc)
	}
	return out
}

// conn returns raddr's connection, made on its first packet.
func (s *udpServer) conn(raddr *net.UDPAddr) *udpclient.Conn {
	key := raddr.String()
	s.mu.Lock()
	defer s.mu.Unlock()
	if cc := s.conns[key]; cc != nil && cc.Context().Err() == nil {
		return cc
	}
	cfg := udpclient.DefaultConfig
	cfg.Handler = s.handler
	cfg.Errors = s.errs
	sess := newUDPSession(s.ctx, s.l, raddr, s.maxMsg)
	cc := udpclient.NewConnWithOpts(sess, &cfg,
		udpclient.WithResponseMessageCache(s.dedup.forPeer(raddr.AddrPort())),
		udpclient.WithInactivityMonitor(inactivity.New(s.idle, func(cc *udpclient.Conn) { _ = cc.Close() })))
	cc.AddOnClose(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.conns[key] == cc {
			delete(s.conns, key)
		}
	})
	s.conns[key] = cc
	return cc
}

// udpSession is one peer of the shared socket (udp/client.Session).
type udpSession struct {
	l      *coapnet.UDPConn
	raddr  *net.UDPAddr
	maxMsg uint32
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once

	mu      sync.Mutex
	ctx     context.Context
	onClose []udpclient.EventFunc
}

func newUDPSession(parent context.Context, l *coapnet.UDPConn, raddr *net.UDPAddr, maxMsg uint32) *udpSession {
	ctx, cancel := context.WithCancel(parent)
	s := &udpSession{l: l, raddr: raddr, maxMsg: maxMsg, cancel: cancel, done: make(chan struct{}), ctx: ctx}
	return s
}

func (s *udpSession) Context() context.Context {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ctx
}

func (s *udpSession) SetContextValue(key, val any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ctx = context.WithValue(s.ctx, key, val)
}

// Close ends the session: its context, then the close callbacks, then Done.
func (s *udpSession) Close() error {
	s.once.Do(func() {
		s.cancel()
		s.mu.Lock()
		fs := s.onClose
		s.onClose = nil
		s.mu.Unlock()
		for _, f := range fs {
			f()
		}
		close(s.done)
	})
	return nil
}

func (s *udpSession) AddOnClose(f udpclient.EventFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onClose = append(s.onClose, f)
}

func (s *udpSession) Done() <-chan struct{}  { return s.done }
func (s *udpSession) MaxMessageSize() uint32 { return s.maxMsg }
func (s *udpSession) RemoteAddr() net.Addr   { return s.raddr }
func (s *udpSession) LocalAddr() net.Addr    { return s.l.LocalAddr() }
func (s *udpSession) NetConn() net.Conn      { return s.l.NetConn() }

func (s *udpSession) WriteMessage(req *pool.Message) error {
	data, err := req.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		return fmt.Errorf("cannot marshal: %w", err)
	}
	return s.l.WriteWithOptions(data, coapnet.WithContext(req.Context()), coapnet.WithRemoteAddr(s.raddr),
		coapnet.WithControlMessage(req.ControlMessage()))
}

func (s *udpSession) WriteMulticastMessage(*pool.Message, *net.UDPAddr, ...coapnet.MulticastOption) error {
	return errors.New("coap: multicast is not served")
}

// Run is for a dialled session reading its own socket; the server reads for it.
func (s *udpSession) Run(*udpclient.Conn) error {
	return errors.New("coap: a server session is not run")
}

package ingest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/dtls"
	dtlsserver "github.com/plgd-dev/go-coap/v3/dtls/server"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/mux"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/ingest/payload"
	"github.com/citypulse/citypulse/pipeline"
)

// CoAPServer is the CoAP gateway: POST /devices/<id>/readings over UDP and
// DTLS-PSK (identity = device id, key = its secret). It answers 2.04 Changed
// only after the pipeline has journaled the readings; 4.00 for a bad payload,
// 4.01 for unknown devices or bad credentials, 4.03 when an authenticated device
// posts for another, 4.29 with Max-Age over the device's rate limit, 5.03 with
// Max-Age under backpressure.
//
// Plain UDP carries no credentials of its own: unless AllowUnauthenticated, a
// request must carry the device's secret as the URI query "key=<secret>".
// Every failed authentication gets the same 4.01, whatever failed.
//
// Bodies larger than a datagram come block-wise (RFC 7959 Block1): each block
// is authenticated and answered 2.31 Continue until the last, and the blocks
// of one body are matched by endpoint, URI and Request-Tag (see uploads).
type CoAPServer struct {
	cfg     CoAPConfig
	devs    Devices
	auth    *authenticator
	uploads *uploads
	h       *Handler
	log     *slog.Logger
	m       *coapMetrics
	udpL    *coapnet.UDPConn
	dtlsL   *coapnet.DTLSListener
	udpS    *udpServer
	direct  *direct
	dtlsS   *dtlsserver.Server
	runCtx  context.Context
	cancel  context.CancelFunc
	once    sync.Once
	// runners are go-coap's periodic checks, owned by this server.
	runners sync.WaitGroup
}

// Max-Age (seconds) sent with 5.03 under backpressure: when to retry.
const backpressureMaxAge = 5

type coapMetrics struct {
	requests      *prometheus.CounterVec
	duration      prometheus.Histogram
	blockRejected *prometheus.CounterVec
}

// NewCoAP binds the UDP socket and, if cfg.DTLSAddr is set, the DTLS listener;
// it starts no goroutines.
func NewCoAP(cfg CoAPConfig, devs Devices, h *Handler, log *slog.Logger, reg prometheus.Registerer) (*CoAPServer, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Blockwise == (BlockwiseConfig{}) {
		cfg.Blockwise = DefaultBlockwise()
	}
	if err := cfg.Blockwise.Validate(); err != nil {
		return nil, err
	}
	a, err := newAuthenticator(devs)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &CoAPServer{cfg: cfg, devs: devs, auth: a, h: h, log: log, runCtx: ctx, cancel: cancel}
	s.m = newCoAPMetrics()
	s.uploads = newUploads(cfg.Blockwise, payload.MaxPayloadBytes, func(reason string) {
		s.m.blockRejected.WithLabelValues(reason).Inc()
	})
	if reg != nil {
		reg.MustRegister(s.m.requests, s.m.duration, s.m.blockRejected,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "citypulse_coap_blockwise_uploads",
				Help: "Unfinished block-wise uploads held (bounded by ingest.coap.blockwise.max_uploads)."},
				func() float64 { n, _ := s.uploads.held(); return float64(n) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "citypulse_coap_blockwise_bytes",
				Help: "Bytes held by unfinished block-wise uploads (bounded by ingest.coap.blockwise.max_bytes)."},
				func() float64 { _, b := s.uploads.held(); return float64(b) }))
	}
	if err := s.listen(); err != nil {
		cancel()
		return nil, err
	}
	// go-coap's own block-wise layer matches blocks by token, which RFC 7959
	// lets a client change with every block (libcoap does): it is off, and
	// serve reassembles Block1 bodies in a bounded table instead.
	noBlockwise := options.WithBlockwise(false, blockwise.SZX1024, cfg.Blockwise.Timeout)
	runner := options.WithPeriodicRunner(ownedRunner(ctx, &s.runners))
	router := mux.NewRouter()
	router.DefaultHandle(mux.HandlerFunc(s.serve))
	// Not go-coap's udp.NewServer: see udpServer (issue 13).
	s.udpS = newUDPServer(s.udpL, mux.ToHandler[*udpclient.Conn](router), maxCoAPMessage, ownedRunner(ctx, &s.runners),
		func(err error) { log.Debug("coap", "err", err) })
	s.direct = newDirect(s, s.udpL, s.udpS.dedup)
	s.udpS.direct = s.direct.take
	if reg != nil {
		d := s.udpS.dedup
		reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "citypulse_coap_dedup_answers",
				Help: "Answers kept for CoAP/UDP deduplication (EXCHANGE_LIFETIME; at most 900,000 over all peers)."},
				func() float64 { n, _, _ := d.stats(); return float64(n) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "citypulse_coap_dedup_bytes",
				Help: "Encoded bytes of the answers kept for CoAP/UDP deduplication."},
				func() float64 { _, b, _ := d.stats(); return float64(b) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "citypulse_coap_dedup_evicted_total",
				Help: "Deduplication answers dropped before EXCHANGE_LIFETIME because the cache was full."},
				func() float64 { _, _, e := d.stats(); return float64(e) }))
	}
	if s.dtlsL != nil {
		s.dtlsS = dtls.NewServer(options.WithMux(router), options.WithMaxMessageSize(maxCoAPMessage),
			options.WithDTLSHandshakeTimeout(10*time.Second), runner, noBlockwise,
			options.WithErrors(func(err error) { log.Debug("coap-dtls", "err", err) }))
	}
	return s, nil
}

// udpReadBuffer is the socket receive buffer asked for the CoAP/UDP socket.
// The kernel's default (208 KiB on Linux) holds a few hundred small
// datagrams (each is charged about a kilobyte): a burst of a few hundred
// clients' requests overflowed it, and every request dropped there cost its
// client a retransmission 2–3 s later (issue 13). Linux caps the size at
// net.core.rmem_max.
const udpReadBuffer = 4 << 20

// maxCoAPMessage bounds one message (a UDP datagram carries at most 64 KiB;
// larger bodies come in blocks).
const maxCoAPMessage = payload.MaxPayloadBytes + 1024

func newCoAPMetrics() *coapMetrics {
	return &coapMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_coap_requests_total", Help: "CoAP requests, by response code."}, []string{"code"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "citypulse_coap_request_duration_seconds", Help: "Time from request to response (journal write included).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 9)}),
		blockRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_coap_blockwise_rejected_total",
			Help: "Blocks of block-wise uploads refused, and unfinished uploads dropped, by reason."}, []string{"reason"}),
	}
}

// listen binds the UDP socket and, if configured, the DTLS listener.
func (s *CoAPServer) listen() error {
	l, err := coapnet.NewListenUDP("udp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("ingest.coap.addr %s: %w", s.cfg.Addr, err)
	}
	if uc, ok := l.NetConn().(*net.UDPConn); ok {
		// Best effort: Linux caps it at net.core.rmem_max.
		_ = uc.SetReadBuffer(udpReadBuffer)
	}
	s.udpL = l
	if s.cfg.DTLSAddr == "" {
		return nil
	}
	dl, err := coapnet.NewDTLSListener("udp", s.cfg.DTLSAddr, coapnet.NewDTLSServerOptions(
		piondtls.WithPSK(s.psk),
		piondtls.WithCipherSuites(
			piondtls.TLS_PSK_WITH_AES_128_CCM_8, // CoAP's mandatory suite (RFC 7252 §9.1.3.1)
			piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256,
		),
	))
	if err != nil {
		l.Close()
		return fmt.Errorf("ingest.coap.dtls_addr %s: %w", s.cfg.DTLSAddr, err)
	}
	s.dtlsL = dl
	return nil
}

// psk returns the DTLS pre-shared key of identity. An unknown identity gets a
// key derived from a per-process secret, so that its handshake fails exactly
// as one with a wrong key: a client cannot tell unknown device ids from known ones.
func (s *CoAPServer) psk(identity []byte) ([]byte, error) {
	d, ok := s.devs.Get(string(identity))
	if !ok {
		s.h.Reject(ReasonUnknownDevice, 1, "transport", "coap-dtls", "identity", string(identity))
		return s.auth.dummyKey(nil, identity), nil
	}
	return []byte(d.Secret), nil
}

// Addr returns the bound UDP address.
func (s *CoAPServer) Addr() net.Addr { return s.udpL.LocalAddr() }

// DTLSAddr returns the bound DTLS address, or nil when DTLS is off.
func (s *CoAPServer) DTLSAddr() net.Addr {
	if s.dtlsL == nil {
		return nil
	}
	return s.dtlsL.Addr()
}

// Run serves until ctx is done.
func (s *CoAPServer) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	errc := make(chan error, 2)
	readerDone := make(chan struct{})
	wg.Add(2)
	go func() { defer wg.Done(); defer close(readerDone); errc <- s.udpS.Serve() }()
	go func() { defer wg.Done(); s.direct.runAnswerers(readerDone) }()
	if s.dtlsS != nil {
		wg.Add(1)
		go func() { defer wg.Done(); errc <- s.dtlsS.Serve(s.dtlsL) }()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	s.Close()
	wg.Wait()
	s.runners.Wait()
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("coap: %w", err)
	}
	return nil
}

// Close stops the servers and closes the sockets; it is idempotent.
func (s *CoAPServer) Close() error {
	s.once.Do(func() {
		s.cancel()
		s.udpS.Stop()
		if s.dtlsS != nil {
			s.dtlsS.Stop()
		}
		_ = s.udpL.Close()
		if s.dtlsL != nil {
			_ = s.dtlsL.Close()
		}
	})
	return nil
}

func (s *CoAPServer) serve(w mux.ResponseWriter, r *mux.Message) {
	start := time.Now()
	a := s.handle(w, r)
	if err := w.SetResponse(a.code, message.TextPlain, bytes.NewReader([]byte(a.diag)), a.opts...); err != nil {
		s.log.Debug("coap: cannot respond", "err", err)
	}
	s.m.requests.WithLabelValues(a.code.String()).Inc()
	s.m.duration.Observe(time.Since(start).Seconds())
}

// answer is a CoAP response: code, diagnostic payload and options.
type answer struct {
	code codes.Code
	diag string
	opts []message.Option
}

func (s *CoAPServer) handle(w mux.ResponseWriter, r *mux.Message) answer {
	path, _ := r.Path()
	id, ok := deviceOfPath(path)
	if !ok {
		return answer{code: codes.NotFound, diag: "not found: POST /devices/<id>/readings"}
	}
	if r.Code() != codes.POST {
		return answer{code: codes.MethodNotAllowed, diag: "use POST"}
	}
	dev, refused := s.authenticate(w, r, id)
	if refused != nil {
		return *refused
	}
	format := payload.Unknown
	if cf, err := r.ContentFormat(); err == nil {
		if format = payload.FromCoAP(uint16(cf)); format == payload.Unknown {
			return answer{code: codes.UnsupportedMediaType, diag: "content-format: want 110 (senml+json), 112 (senml+cbor) or 50 (json)"}
		}
	}
	body, blockOpts, pending := s.readBody(w, r, dev)
	if pending != nil {
		return *pending
	}
	res, err := s.h.Handle(s.runCtx, dev, format, body)
	a := outcome(res, err)
	if a.code == codes.Changed {
		a.opts = append(a.opts, blockOpts...)
	}
	return a
}

// outcome turns the handler's result into the answer.
func outcome(res Result, err error) answer {
	var pe *payload.Error
	switch {
	case err == nil:
		if res.Rejected > 0 {
			return answer{code: codes.Changed, diag: fmt.Sprintf("accepted %d, rejected %d", res.Accepted, res.Rejected)}
		}
		return answer{code: codes.Changed}
	case errors.As(err, &pe):
		return answer{code: codes.BadRequest, diag: truncate(pe.Error(), 200)}
	case errors.Is(err, ErrRateLimited):
		var rl *RateLimitError
		errors.As(err, &rl)
		if rl == nil || rl.Never() {
			return answer{code: codes.RequestEntityTooLarge, diag: "message larger than the device's rate-limit burst"}
		}
		secs := min(255, int(rl.RetryAfter/time.Second)+1)
		return answer{codes.TooManyRequests, "rate limit: retry after Max-Age seconds",
			[]message.Option{{ID: message.MaxAge, Value: []byte{byte(secs)}}}}
	case errors.Is(err, pipeline.ErrBackpressure):
		return answer{codes.ServiceUnavailable, "journal full, retry later",
			[]message.Option{{ID: message.MaxAge, Value: []byte{backpressureMaxAge}}}}
	default:
		return answer{codes.ServiceUnavailable, "shutting down, retry later",
			[]message.Option{{ID: message.MaxAge, Value: []byte{backpressureMaxAge}}}}
	}
}

// readBody returns the request's whole body: its payload or, with a Block1
// option (RFC 7959), the body reassembled from its blocks, with the Block1
// option for the final answer. While blocks are missing, or when the
// message or a block is refused, it returns the answer instead (2.31
// Continue, 4.08, 4.13, 5.03).
func (s *CoAPServer) readBody(w mux.ResponseWriter, r *mux.Message, dev devices.Device) ([]byte, []message.Option, *answer) {
	var data []byte
	if r.Body() != nil {
		b, err := io.ReadAll(io.LimitReader(r.Body(), payload.MaxPayloadBytes+1))
		if err != nil {
			return nil, nil, &answer{code: codes.BadRequest, diag: "cannot read payload"}
		}
		data = b
	}
	v, err := r.GetOptionUint32(message.Block1)
	if err != nil { // a whole message
		if len(data) > payload.MaxPayloadBytes {
			s.h.Reject(payload.ReasonTooLarge, 1, "transport", "coap", "device", dev.ID)
			return nil, nil, &answer{codes.RequestEntityTooLarge, fmt.Sprintf("payload over %d bytes", payload.MaxPayloadBytes),
				[]message.Option{size1(payload.MaxPayloadBytes)}}
		}
		return data, nil, nil
	}
	szx, num, more, err := blockwise.DecodeBlockOption(v)
	if err != nil {
		s.m.blockRejected.WithLabelValues(BlockReasonBadBlock).Inc()
		return nil, nil, &answer{code: codes.BadRequest, diag: "bad Block1 option: " + err.Error()}
	}
	k := s.uploadKey(w, r)
	if size, err := r.GetOptionUint32(message.Size1); err == nil && int64(size) > s.uploads.maxUpload() {
		s.uploads.drop(k)
		return nil, nil, s.refuseBlock(dev, tooLarge(s.uploads.maxUpload()))
	}
	body, err := s.uploads.add(k, sourceOf(w.Conn().RemoteAddr()), block{num: num, more: more, szx: szx, data: data}, time.Now())
	var be *blockError
	if errors.As(err, &be) {
		return nil, nil, s.refuseBlock(dev, be)
	}
	opt := blockOption(szx, num, more)
	if more {
		return nil, nil, &answer{code: codes.Continue, opts: []message.Option{opt}}
	}
	return body, []message.Option{opt}, nil
}

// refuseBlock counts a refused block and answers it.
func (s *CoAPServer) refuseBlock(dev devices.Device, be *blockError) *answer {
	s.m.blockRejected.WithLabelValues(be.reason).Inc()
	if be.reason == BlockReasonTooLarge {
		s.h.Reject(payload.ReasonTooLarge, 1, "transport", "coap", "device", dev.ID)
	}
	a := &answer{code: be.code, diag: be.msg}
	switch be.code {
	case codes.RequestEntityTooLarge:
		a.opts = []message.Option{size1(s.uploads.maxUpload())}
	case codes.ServiceUnavailable:
		a.opts = []message.Option{{ID: message.MaxAge, Value: uintBytes(uint32(s.cfg.Blockwise.Timeout / time.Second))}}
	}
	return a
}

// uploadKey is what matches the blocks of one body: the transport and remote
// endpoint, the URI (path and query) and the Request-Tag; not the token.
func (s *CoAPServer) uploadKey(w mux.ResponseWriter, r *mux.Message) uploadKey {
	k := uploadKey{endpoint: "udp " + w.Conn().RemoteAddr().String()}
	if _, ok := w.Conn().NetConn().(*piondtls.Conn); ok {
		k.endpoint = "dtls " + w.Conn().RemoteAddr().String()
	}
	var uri strings.Builder
	for _, o := range r.Options() {
		switch o.ID {
		case message.URIPath:
			uri.WriteByte('/')
			uri.Write(o.Value)
		case message.URIQuery:
			uri.WriteByte('?')
			uri.Write(o.Value)
		case optionRequestTag:
			k.tag, k.tagged = string(o.Value), true
		}
	}
	k.uri = uri.String()
	return k
}

// sourceOf is the address bounded by max_uploads_per_source: the IP, not the port.
func sourceOf(a net.Addr) string {
	if ua, ok := a.(*net.UDPAddr); ok {
		return ua.IP.String()
	}
	if host, _, err := net.SplitHostPort(a.String()); err == nil {
		return host
	}
	return a.String()
}

func blockOption(szx blockwise.SZX, num int64, more bool) message.Option {
	v, _ := blockwise.EncodeBlockOption(szx, num, more) // decoded from a valid option
	return message.Option{ID: message.Block1, Value: uintBytes(v)}
}

func size1(n int64) message.Option {
	return message.Option{ID: message.Size1, Value: uintBytes(uint32(n))}
}

// authenticate returns the device, or the refusal. An unknown device and a
// wrong key get the same answer after the same work, so device ids cannot be
// enumerated; the counted reason (server side only) tells them apart.
func (s *CoAPServer) authenticate(w mux.ResponseWriter, r *mux.Message, id string) (devices.Device, *answer) {
	if dc, ok := w.Conn().NetConn().(*piondtls.Conn); ok {
		st, ok := dc.ConnectionState()
		identity := string(st.IdentityHint)
		if !ok || identity == "" {
			s.h.Reject(ReasonUnauthorized, 1, "transport", "coap-dtls", "err", "no PSK identity")
			return devices.Device{}, &answer{code: codes.Unauthorized, diag: unauthorizedDiag}
		}
		if identity != id {
			s.h.Reject(ReasonForbidden, 1, "transport", "coap-dtls", "device", identity, "err", "posted for "+id)
			return devices.Device{}, &answer{code: codes.Forbidden, diag: "a device may only post its own readings"}
		}
		dev, known := s.devs.Get(id)
		if !known { // removed since the handshake
			s.h.Reject(ReasonUnknownDevice, 1, "transport", "coap-dtls", "device", id)
			return devices.Device{}, &answer{code: codes.Unauthorized, diag: unauthorizedDiag}
		}
		return dev, nil
	}
	key := ""
	if qs, err := r.Queries(); err == nil {
		for _, q := range qs {
			if v, ok := strings.CutPrefix(q, "key="); ok {
				key = v
			}
		}
	}
	dev, known, keyOK := s.auth.check(id, key)
	switch {
	case !known:
		s.h.Reject(ReasonUnknownDevice, 1, "transport", "coap", "device", id)
		return devices.Device{}, &answer{code: codes.Unauthorized, diag: unauthorizedDiag}
	case !keyOK && !s.cfg.AllowUnauthenticated:
		s.h.Reject(ReasonUnauthorized, 1, "transport", "coap", "device", id, "err", "missing or wrong key")
		return devices.Device{}, &answer{code: codes.Unauthorized, diag: unauthorizedDiag}
	}
	return dev, nil
}

// unauthorizedDiag answers every failed authentication, whatever failed.
const unauthorizedDiag = "unauthorized: unknown device or missing or wrong key (URI query key=<secret>, or use DTLS-PSK)"

// ownedRunner replaces go-coap's default periodic runner (a goroutine that
// sleeps 4 s between checks and so outlives Stop) with one that stops with ctx
// and is waited for through wg.
func ownedRunner(ctx context.Context, wg *sync.WaitGroup) func(f func(time.Time) bool) {
	return func(f func(time.Time) bool) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case now := <-t.C:
					if !f(now) {
						return
					}
				case <-ctx.Done():
					return
				}
			}
		}()
	}
}

// deviceOfPath returns the id of devices/<id>/readings.
func deviceOfPath(p string) (string, bool) {
	return deviceOfTopic(strings.TrimPrefix(p, "/"))
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

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
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"
	udpserver "github.com/plgd-dev/go-coap/v3/udp/server"
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
type CoAPServer struct {
	cfg    CoAPConfig
	devs   Devices
	h      *Handler
	log    *slog.Logger
	m      *coapMetrics
	udpL   *coapnet.UDPConn
	dtlsL  *coapnet.DTLSListener
	udpS   *udpserver.Server
	dtlsS  *dtlsserver.Server
	runCtx context.Context
	cancel context.CancelFunc
	once   sync.Once
	// runners are go-coap's periodic checks, owned by this server.
	runners sync.WaitGroup
}

// Max-Age (seconds) sent with 5.03 under backpressure: when to retry.
const backpressureMaxAge = 5

type coapMetrics struct {
	requests *prometheus.CounterVec
	duration prometheus.Histogram
}

// NewCoAP binds the UDP socket and, if cfg.DTLSAddr is set, the DTLS listener;
// it starts no goroutines.
func NewCoAP(cfg CoAPConfig, devs Devices, h *Handler, log *slog.Logger, reg prometheus.Registerer) (*CoAPServer, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &CoAPServer{cfg: cfg, devs: devs, h: h, log: log, runCtx: ctx, cancel: cancel}
	s.m = &coapMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_coap_requests_total", Help: "CoAP requests, by response code."}, []string{"code"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "citypulse_coap_request_duration_seconds", Help: "Time from request to response (journal write included).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 9)}),
	}
	if reg != nil {
		reg.MustRegister(s.m.requests, s.m.duration)
	}
	l, err := coapnet.NewListenUDP("udp", cfg.Addr)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("ingest.coap.addr %s: %w", cfg.Addr, err)
	}
	s.udpL = l
	if cfg.DTLSAddr != "" {
		dl, err := coapnet.NewDTLSListener("udp", cfg.DTLSAddr, coapnet.NewDTLSServerOptions(
			piondtls.WithPSK(func(identity []byte) ([]byte, error) {
				d, ok := devs.Get(string(identity))
				if !ok {
					h.Reject(ReasonUnknownDevice, 1, "transport", "coap-dtls", "identity", string(identity))
					return nil, fmt.Errorf("unknown device %q", identity)
				}
				return []byte(d.Secret), nil
			}),
			piondtls.WithCipherSuites(
				piondtls.TLS_PSK_WITH_AES_128_CCM_8, // CoAP's mandatory suite (RFC 7252 §9.1.3.1)
				piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256,
			),
		))
		if err != nil {
			l.Close()
			cancel()
			return nil, fmt.Errorf("ingest.coap.dtls_addr %s: %w", cfg.DTLSAddr, err)
		}
		s.dtlsL = dl
	}
	runner := options.WithPeriodicRunner(ownedRunner(ctx, &s.runners))
	router := mux.NewRouter()
	router.DefaultHandle(mux.HandlerFunc(s.serve))
	s.udpS = udp.NewServer(options.WithMux(router), options.WithMaxMessageSize(payload.MaxPayloadBytes+1024), runner,
		options.WithErrors(func(err error) { log.Debug("coap", "err", err) }))
	if s.dtlsL != nil {
		s.dtlsS = dtls.NewServer(options.WithMux(router), options.WithMaxMessageSize(payload.MaxPayloadBytes+1024),
			options.WithDTLSHandshakeTimeout(10*time.Second), runner,
			options.WithErrors(func(err error) { log.Debug("coap-dtls", "err", err) }))
	}
	return s, nil
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
	wg.Add(1)
	go func() { defer wg.Done(); errc <- s.udpS.Serve(s.udpL) }()
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
	code, diag, opts := s.handle(w, r)
	if err := w.SetResponse(code, message.TextPlain, bytes.NewReader([]byte(diag)), opts...); err != nil {
		s.log.Debug("coap: cannot respond", "err", err)
	}
	s.m.requests.WithLabelValues(code.String()).Inc()
	s.m.duration.Observe(time.Since(start).Seconds())
}

func (s *CoAPServer) handle(w mux.ResponseWriter, r *mux.Message) (codes.Code, string, []message.Option) {
	path, _ := r.Path()
	id, ok := deviceOfPath(path)
	if !ok {
		return codes.NotFound, "not found: POST /devices/<id>/readings", nil
	}
	if r.Code() != codes.POST {
		return codes.MethodNotAllowed, "use POST", nil
	}
	dev, code, diag := s.authenticate(w, r, id)
	if code != 0 {
		return code, diag, nil
	}
	format := payload.Unknown
	if cf, err := r.ContentFormat(); err == nil {
		if format = payload.FromCoAP(uint16(cf)); format == payload.Unknown {
			return codes.UnsupportedMediaType, "content-format: want 110 (senml+json), 112 (senml+cbor) or 50 (json)", nil
		}
	}
	var body []byte
	if r.Body() != nil {
		b, err := io.ReadAll(io.LimitReader(r.Body(), payload.MaxPayloadBytes+1))
		if err != nil {
			return codes.BadRequest, "cannot read payload", nil
		}
		body = b
	}
	if len(body) > payload.MaxPayloadBytes {
		s.h.Reject(payload.ReasonTooLarge, 1, "transport", "coap", "device", dev.ID)
		return codes.RequestEntityTooLarge, fmt.Sprintf("payload over %d bytes", payload.MaxPayloadBytes), nil
	}
	res, err := s.h.Handle(s.runCtx, dev, format, body)
	var pe *payload.Error
	switch {
	case err == nil:
		if res.Rejected > 0 {
			return codes.Changed, fmt.Sprintf("accepted %d, rejected %d", res.Accepted, res.Rejected), nil
		}
		return codes.Changed, "", nil
	case errors.As(err, &pe):
		return codes.BadRequest, truncate(pe.Error(), 200), nil
	case errors.Is(err, ErrRateLimited):
		var rl *RateLimitError
		errors.As(err, &rl)
		if rl == nil || rl.Never() {
			return codes.RequestEntityTooLarge, "message larger than the device's rate-limit burst", nil
		}
		secs := min(255, int(rl.RetryAfter/time.Second)+1)
		return codes.TooManyRequests, "rate limit: retry after Max-Age seconds",
			[]message.Option{{ID: message.MaxAge, Value: []byte{byte(secs)}}}
	case errors.Is(err, pipeline.ErrBackpressure):
		return codes.ServiceUnavailable, "journal full, retry later",
			[]message.Option{{ID: message.MaxAge, Value: []byte{backpressureMaxAge}}}
	default:
		return codes.ServiceUnavailable, "shutting down, retry later",
			[]message.Option{{ID: message.MaxAge, Value: []byte{backpressureMaxAge}}}
	}
}

// authenticate returns the device, or a non-zero code for a refusal.
func (s *CoAPServer) authenticate(w mux.ResponseWriter, r *mux.Message, id string) (devices.Device, codes.Code, string) {
	if dc, ok := w.Conn().NetConn().(*piondtls.Conn); ok {
		st, ok := dc.ConnectionState()
		identity := string(st.IdentityHint)
		if !ok || identity == "" {
			s.h.Reject(ReasonUnauthorized, 1, "transport", "coap-dtls", "err", "no PSK identity")
			return devices.Device{}, codes.Unauthorized, "no PSK identity"
		}
		if identity != id {
			s.h.Reject(ReasonForbidden, 1, "transport", "coap-dtls", "device", identity, "err", "posted for "+id)
			return devices.Device{}, codes.Forbidden, "a device may only post its own readings"
		}
		dev, known := s.devs.Get(id)
		if !known {
			s.h.Reject(ReasonUnknownDevice, 1, "transport", "coap-dtls", "device", id)
			return devices.Device{}, codes.Unauthorized, "unknown device"
		}
		return dev, 0, ""
	}
	dev, known := s.devs.Get(id)
	if !known {
		s.h.Reject(ReasonUnknownDevice, 1, "transport", "coap", "device", id)
		return devices.Device{}, codes.Unauthorized, "unknown device"
	}
	if s.cfg.AllowUnauthenticated {
		return dev, 0, ""
	}
	key := ""
	if qs, err := r.Queries(); err == nil {
		for _, q := range qs {
			if v, ok := strings.CutPrefix(q, "key="); ok {
				key = v
			}
		}
	}
	if _, ok := s.devs.Authenticate(id, key); !ok {
		s.h.Reject(ReasonUnauthorized, 1, "transport", "coap", "device", id, "err", "missing or wrong key")
		return devices.Device{}, codes.Unauthorized, "missing or wrong key (URI query key=<secret>, or use DTLS)"
	}
	return dev, 0, ""
}

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

package stream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Event is one message to clients. Data is sent as SSE data lines (one per
// line of Data; JSON encoded without indentation is one line).
type Event struct {
	Topic string // what a client filters on, e.g. "alert" or "OffStreetParking"
	Name  string // the SSE event name; empty means the default "message"
	Data  []byte
}

// Options bound a Hub.
type Options struct {
	// MaxClients is the most clients connected at once; one more is answered
	// 503 with Retry-After.
	MaxClients int
	// Buffer is how many events a client may have waiting; a client that falls
	// that far behind is dropped.
	Buffer int
	// Heartbeat is how often an idle stream gets a comment line, so proxies
	// keep it open and the page can tell a live stream from a dead one.
	Heartbeat time.Duration
	// WriteTimeout bounds one write to a client: a client that stops reading
	// is dropped after it, whatever its buffer.
	WriteTimeout time.Duration
	// Registerer gets the hub's metrics, named citypulse_<Subsystem>_stream_*.
	Registerer prometheus.Registerer
	Subsystem  string
}

func (o *Options) defaults() {
	if o.MaxClients <= 0 {
		o.MaxClients = 1000
	}
	if o.Buffer <= 0 {
		o.Buffer = 256
	}
	if o.Heartbeat <= 0 {
		o.Heartbeat = 15 * time.Second
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
	if o.Subsystem == "" {
		o.Subsystem = "events"
	}
}

// Hub is the set of connected clients. The zero value is not usable; use New.
type Hub struct {
	o       Options
	mu      sync.Mutex
	clients map[*client]struct{}
	closed  bool
	m       metrics
}

type client struct {
	ch      chan Event
	filter  func(Event) bool
	dropped chan struct{} // closed when the hub drops the client
	once    sync.Once
}

func (c *client) drop() { c.once.Do(func() { close(c.dropped) }) }

type metrics struct {
	clients   prometheus.Gauge
	dropped   prometheus.Counter
	refused   prometheus.Counter
	published prometheus.Counter
}

// New builds a hub; it starts nothing.
func New(o Options) *Hub {
	o.defaults()
	h := &Hub{o: o, clients: make(map[*client]struct{})}
	ns := "citypulse_" + o.Subsystem + "_stream_"
	h.m = metrics{
		clients:   prometheus.NewGauge(prometheus.GaugeOpts{Name: ns + "clients", Help: "Clients connected to the event stream."}),
		dropped:   prometheus.NewCounter(prometheus.CounterOpts{Name: ns + "clients_dropped_total", Help: "Clients dropped because they fell behind (buffer full or a write timed out)."}),
		refused:   prometheus.NewCounter(prometheus.CounterOpts{Name: ns + "clients_refused_total", Help: "Clients refused because the stream had its maximum of clients."}),
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: ns + "events_total", Help: "Events published to the stream."}),
	}
	if o.Registerer != nil {
		o.Registerer.MustRegister(h.m.clients, h.m.dropped, h.m.refused, h.m.published)
	}
	return h
}

// Publish hands ev to every client whose filter takes it. It never blocks: a
// client with a full buffer is dropped.
func (h *Hub) Publish(ev Event) {
	h.m.published.Inc()
	h.mu.Lock()
	defer h.mu.Unlock()
	for c := range h.clients {
		if c.filter != nil && !c.filter(ev) {
			continue
		}
		select {
		case c.ch <- ev:
		default:
			h.removeLocked(c)
		}
	}
}

// Clients is the number of connected clients.
func (h *Hub) Clients() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.clients)
}

// ErrFull says the hub has MaxClients clients already.
var ErrFull = errors.New("event stream has its maximum of clients")

// ErrClosed says the hub is closed (the server is stopping).
var ErrClosed = errors.New("event stream is closed: the server is stopping")

// Close ends every stream and refuses new ones: the server is stopping, and
// an open stream would hold its graceful shutdown until the timeout.
func (h *Hub) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for c := range h.clients {
		delete(h.clients, c)
		c.drop()
	}
	h.m.clients.Set(0)
}

func (h *Hub) add(filter func(Event) bool) (*client, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, ErrClosed
	}
	if len(h.clients) >= h.o.MaxClients {
		h.m.refused.Inc()
		return nil, ErrFull
	}
	c := &client{ch: make(chan Event, h.o.Buffer), filter: filter, dropped: make(chan struct{})}
	h.clients[c] = struct{}{}
	h.m.clients.Set(float64(len(h.clients)))
	return c, nil
}

// removeLocked drops c as a slow client.
func (h *Hub) removeLocked(c *client) {
	if _, ok := h.clients[c]; !ok {
		return
	}
	delete(h.clients, c)
	h.m.clients.Set(float64(len(h.clients)))
	h.m.dropped.Inc()
	c.drop()
}

func (h *Hub) leave(c *client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.clients[c]; ok {
		delete(h.clients, c)
		h.m.clients.Set(float64(len(h.clients)))
	}
}

// Serve streams events to one client until its request is done or the hub
// drops it. snapshot (may be nil) is called once the client is subscribed,
// and what it returns is written first: a change published while the
// snapshot is taken is then in the snapshot, or queued after it, never
// missed. filter (may be nil) selects what the client gets.
func (h *Hub) Serve(w http.ResponseWriter, r *http.Request, filter func(Event) bool, snapshot func() []Event) {
	c, err := h.add(filter)
	if err != nil {
		w.Header().Set("Retry-After", "5")
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	defer h.leave(c)
	rc := http.NewResponseController(w)
	// A stream outlives the server's read timeout, which would otherwise end
	// it (net/http cancels the request when its read deadline passes); each
	// write below sets its own deadline instead of the server's write timeout.
	_ = rc.SetReadDeadline(time.Time{})
	hd := w.Header()
	hd.Set("Content-Type", "text/event-stream")
	hd.Set("Cache-Control", "no-store")
	hd.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	write := func(f func() error) bool {
		_ = rc.SetWriteDeadline(time.Now().Add(h.o.WriteTimeout))
		if err := f(); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if !write(func() error { _, err := fmt.Fprint(w, "retry: 2000\n\n"); return err }) {
		h.dropSlow(c)
		return
	}
	var snap []Event
	if snapshot != nil {
		snap = snapshot()
	}
	for _, ev := range snap {
		if !write(func() error { return writeEvent(w, ev) }) {
			h.dropSlow(c)
			return
		}
	}
	h.loop(r.Context(), w, c, write)
}

func (h *Hub) loop(ctx context.Context, w http.ResponseWriter, c *client, write func(func() error) bool) {
	tick := time.NewTicker(h.o.Heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.dropped:
			return
		case ev := <-c.ch:
			if !write(func() error { return writeEvent(w, ev) }) {
				h.dropSlow(c)
				return
			}
		case <-tick.C:
			if !write(func() error { _, err := fmt.Fprintf(w, ": ping %d\n\n", time.Now().Unix()); return err }) {
				h.dropSlow(c)
				return
			}
		}
	}
}

// dropSlow drops a client whose write failed or timed out.
func (h *Hub) dropSlow(c *client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.removeLocked(c)
}

func writeEvent(w http.ResponseWriter, ev Event) error {
	var b strings.Builder
	if ev.Name != "" {
		b.WriteString("event: ")
		b.WriteString(ev.Name)
		b.WriteByte('\n')
	}
	for _, line := range bytes.Split(ev.Data, []byte("\n")) {
		b.WriteString("data: ")
		b.Write(line)
		b.WriteByte('\n')
	}
	b.WriteByte('\n')
	_, err := w.Write([]byte(b.String()))
	return err
}

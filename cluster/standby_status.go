package cluster

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
)

// StandbyStatus is this site's disaster-recovery state, for /api/v1/cluster.
type StandbyStatus struct {
	Site       string `json:"site"`
	Role       string `json:"role"`
	ActiveSite string `json:"active_site"`
	Epoch      uint64 `json:"epoch"`
	// PeerReachable: the other site's fence record could be read through the link.
	PeerReachable    bool           `json:"peer_reachable"`
	RPOBudgetSeconds float64        `json:"rpo_budget_seconds"`
	WithinRPO        bool           `json:"within_rpo"`
	Streams          []MirrorStatus `json:"streams"`
	// StoreFollower is this node's store follower (nil where none is
	// built): how far the site's store is behind its mirror.
	StoreFollower *FollowerStatus `json:"store_follower,omitempty"`
}

// MirrorStatus is one stream at this site. While it mirrors the active
// site's stream, LagMessages is the source's count of messages not yet
// mirrored as of the last contact (stale while the link is down),
// LastContactSeconds the time since that contact, and SecondsBehind an upper
// bound on the age of what this site may lack: the time since the mirror
// last held everything its source had (Lag 0 at the last contact) or, while
// it catches up, since the newest message it holds was stored at the source
// (the source's clock). It is what would be lost, in time, if the active site
// were lost now.
type MirrorStatus struct {
	Stream             string  `json:"stream"`
	Mirror             bool    `json:"mirror"`
	Source             string  `json:"source,omitempty"`
	Msgs               uint64  `json:"msgs"`
	LastSeq            uint64  `json:"last_seq"`
	LagMessages        uint64  `json:"lag_messages"`
	SecondsBehind      float64 `json:"seconds_behind"`
	LastContactSeconds float64 `json:"last_contact_seconds"`
	LinkUp             bool    `json:"link_up"`
	Error              string  `json:"error,omitempty"`
}

// Status is the state as of the last Sync.
func (s *Standby) Status() StandbyStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.status
	st.Streams = append([]MirrorStatus(nil), st.Streams...)
	return st
}

// CheckRPO returns nil while every mirror is within the RPO budget (and
// always on the active site), else an error naming the worst stream.
func (s *Standby) CheckRPO() error {
	st := s.Status()
	for _, m := range st.Streams {
		if m.Mirror && (m.Error != "" || m.SecondsBehind > st.RPOBudgetSeconds) {
			return fmt.Errorf("stream %s is %.1f s behind the active site (budget %.0f s, lag %d messages, link up: %v)%s",
				m.Stream, m.SecondsBehind, st.RPOBudgetSeconds, m.LagMessages, m.LinkUp, errSuffix(m.Error))
		}
	}
	return nil
}

func errSuffix(e string) string {
	if e == "" {
		return ""
	}
	return ": " + e
}

// syncFence reads both records and applies the rule (fence.go): the higher
// epoch wins, and the active site fences a reachable peer with a lower one.
func (s *Standby) syncFence(ctx context.Context) (Record, string, error) {
	lf, err := openFence(ctx, s.js, true, s.cfg.Replicas)
	if err != nil {
		return Record{}, RoleStandby, err
	}
	local, lrev, err := lf.read(ctx)
	if err != nil {
		return Record{}, RoleStandby, err
	}
	peer, prev, pf, perr := s.readPeer(ctx)
	s.setPeerReachable(perr == nil)
	switch {
	case perr == nil && peer.Wins(local):
		if err := lf.write(ctx, peer, lrev); err != nil {
			return local, RoleStandby, err
		}
		s.log.Warn("fence: the other site's record has a higher epoch; this site stops acknowledging",
			"active_site", peer.Site, "epoch", peer.Epoch)
		local = peer
	case pf != nil && local.Site == s.cfg.Site && local.Wins(peer):
		if err := pf.write(ctx, local, prev); err != nil {
			return local, RoleStandby, err
		}
		s.m.fenced.Inc()
		s.log.Warn("fence: wrote this site's record into the other site's bucket", "epoch", local.Epoch, "peer_epoch", peer.Epoch)
	}
	switch {
	case perr == nil && local.Conflicts(peer):
		return local, RoleConflict, fmt.Errorf("fence conflict: both sites claim epoch %d (%s, %s)", local.Epoch, local.Site, peer.Site)
	case local.Site == s.cfg.Site:
		return local, RoleActive, nil
	}
	return local, RoleStandby, nil
}

// readPeer reads the other site's record through the link; pf is nil when
// its bucket does not exist (yet).
func (s *Standby) readPeer(ctx context.Context) (Record, uint64, *fence, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.LinkTimeout)
	defer cancel()
	pf, err := openFence(ctx, s.peer, false, 0)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return Record{}, 0, nil, nil
	}
	if err != nil {
		return Record{}, 0, nil, err
	}
	r, rev, err := pf.read(ctx)
	return r, rev, pf, err
}

func (s *Standby) setPeerReachable(ok bool) {
	s.mu.Lock()
	s.status.PeerReachable = ok
	s.mu.Unlock()
}

// readLag reads each stream's state at this site.
func (s *Standby) readLag(ctx context.Context) []MirrorStatus {
	now := time.Now()
	out := make([]MirrorStatus, 0, len(s.cfg.Streams))
	for _, name := range s.cfg.Streams {
		ms := MirrorStatus{Stream: name}
		st, err := s.js.Stream(ctx, name)
		if err != nil {
			ms.Error = err.Error()
			ms.Mirror = true // missing: not (yet) a copy of anything
			ms.SecondsBehind = now.Sub(s.started).Seconds()
			out = append(out, ms)
			continue
		}
		info := st.CachedInfo()
		ms.Msgs, ms.LastSeq = info.State.Msgs, info.State.LastSeq
		if info.Mirror != nil {
			s.mirrorLag(&ms, info, now)
		}
		out = append(out, ms)
	}
	return out
}

func (s *Standby) mirrorLag(ms *MirrorStatus, info *jetstream.StreamInfo, now time.Time) {
	mi := info.Mirror
	ms.Mirror, ms.Source, ms.LagMessages = true, mi.Name, mi.Lag
	if mi.Error != nil {
		ms.Error = mi.Error.Error()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	asOf := s.asOf[ms.Stream]
	if asOf.IsZero() {
		asOf = s.started
	}
	if mi.Active >= 0 {
		ms.LastContactSeconds = mi.Active.Seconds()
		ms.LinkUp = mi.Active < s.cfg.LinkTimeout
		if mi.Lag == 0 {
			asOf = later(asOf, now.Add(-mi.Active))
		}
	} else {
		ms.LastContactSeconds = now.Sub(s.started).Seconds() // never in contact
	}
	if mi.Lag > 0 && !info.State.LastTime.IsZero() {
		asOf = later(asOf, info.State.LastTime) // everything stored before it is here: mirrors keep order
	}
	s.asOf[ms.Stream] = asOf
	ms.SecondsBehind = max(0, now.Sub(asOf).Seconds())
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// publish stores the round's result and sets the metrics.
func (s *Standby) publish(rec Record, role string, streams []MirrorStatus) {
	s.mu.Lock()
	s.status.Role, s.status.ActiveSite, s.status.Epoch, s.status.Streams = role, rec.Site, rec.Epoch, streams
	s.mu.Unlock()
	err := s.CheckRPO()
	s.mu.Lock()
	s.status.WithinRPO = err == nil
	s.mu.Unlock()
	for _, r := range []string{RoleActive, RoleStandby, RoleConflict} {
		s.m.role.WithLabelValues(r).Set(b2f(r == role))
	}
	s.m.epoch.Set(float64(rec.Epoch))
	s.m.exceeded.Set(b2f(err != nil))
	for _, m := range streams {
		s.m.lagMsgs.WithLabelValues(m.Stream).Set(float64(m.LagMessages))
		s.m.lagSeconds.WithLabelValues(m.Stream).Set(m.SecondsBehind)
		s.m.contact.WithLabelValues(m.Stream).Set(m.LastContactSeconds)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// StandbyMetrics are the disaster-recovery metrics; labels are a site role
// or a stream name (a handful), never a device.
type StandbyMetrics struct {
	role       *prometheus.GaugeVec
	epoch      prometheus.Gauge
	lagMsgs    *prometheus.GaugeVec
	lagSeconds *prometheus.GaugeVec
	contact    *prometheus.GaugeVec
	budget     prometheus.Gauge
	exceeded   prometheus.Gauge
	promotions prometheus.Counter
	fenced     prometheus.Counter
}

// NewStandbyMetrics builds the metrics and registers them with reg (nil: not registered).
func NewStandbyMetrics(reg prometheus.Registerer) *StandbyMetrics {
	g := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	}
	gv := func(name, help, label string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, []string{label})
	}
	m := &StandbyMetrics{
		role:       gv("citypulse_dr_role", "1 for this site's current role (active, standby, conflict), 0 for the others.", "role"),
		epoch:      g("citypulse_dr_epoch", "Epoch of the fence record this site follows."),
		lagMsgs:    gv("citypulse_dr_replication_lag_messages", "Messages of the active site's stream not yet mirrored here, as of the last contact.", "stream"),
		lagSeconds: gv("citypulse_dr_replication_lag_seconds", "Upper bound on the age of what this site's mirror may lack (what a disaster now would lose, in time).", "stream"),
		contact:    gv("citypulse_dr_link_last_contact_seconds", "Time since the mirror last heard from the active site's stream.", "stream"),
		budget:     g("citypulse_dr_rpo_budget_seconds", "The configured RPO budget (standby.rpo_budget)."),
		exceeded:   g("citypulse_dr_rpo_exceeded", "1 while a mirror is further behind than the RPO budget (or missing)."),
		promotions: prometheus.NewCounter(prometheus.CounterOpts{Name: "citypulse_dr_promotions_total", Help: "Promotions of this site to active."}),
		fenced:     prometheus.NewCounter(prometheus.CounterOpts{Name: "citypulse_dr_peer_fenced_total", Help: "Times this site wrote its fence record into the other site's bucket."}),
	}
	if reg != nil {
		reg.MustRegister(m.role, m.epoch, m.lagMsgs, m.lagSeconds, m.contact, m.budget, m.exceeded, m.promotions, m.fenced)
	}
	return m
}

package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// StandbyConfig configures disaster recovery between two sites, each its own
// NATS cluster with its own JetStream domain, linked by a leaf-node
// connection. The same configuration runs at both sites, Site and PeerDomain
// swapped; which one is active is decided by the fence record, not by config.
type StandbyConfig struct {
	// Site is this site's name and JetStream domain; PeerDomain the other's.
	Site       string `mapstructure:"site" yaml:"site"`
	PeerDomain string `mapstructure:"peer_domain" yaml:"peer_domain"`
	// Streams are kept in step at the standby by mirrors of the active site's:
	// the readings stream and the key-value buckets' streams (KV_<bucket>).
	Streams []string `mapstructure:"streams" yaml:"streams"`
	// Salvage are the streams (of Streams) that hold what devices were
	// acknowledged for: the readings. A returning old active site's tail of
	// these is copied by Salvage, and Demote refuses to delete it unsalvaged.
	// The other streams' tail there (alert state, notifications, buckets) is
	// state the active site has superseded since: Salvage leaves it (an old
	// snapshot copied after a newer one would be restored as the newest) and
	// Demote discards it, logged. Names that are not among Streams are not
	// mirrored, hence have nothing to salvage.
	Salvage []string `mapstructure:"salvage" yaml:"salvage"`
	// Replicas of the mirrors and of the fence bucket at this site.
	Replicas int `mapstructure:"replicas" yaml:"replicas"`
	// RPOBudget is the replication lag (seconds behind) above which the
	// standby is out of its recovery point budget.
	RPOBudget time.Duration `mapstructure:"rpo_budget" yaml:"rpo_budget"`
	// PollInterval is how often lag and the fence records are read.
	PollInterval time.Duration `mapstructure:"poll_interval" yaml:"poll_interval"`
	// LinkTimeout bounds each request to the other site; no word from the
	// active site's streams for this long counts as the link being down.
	LinkTimeout time.Duration `mapstructure:"link_timeout" yaml:"link_timeout"`
	// CatchUpTimeout bounds a planned switch-over's wait for the mirrors to
	// hold everything the fenced site stored.
	CatchUpTimeout time.Duration `mapstructure:"catch_up_timeout" yaml:"catch_up_timeout"`
}

// DefaultStandby returns the defaults for a site: the readings stream and
// the buckets of cluster mode, R3, a 30 s RPO budget.
func DefaultStandby(site, peer string) StandbyConfig {
	return StandbyConfig{
		Site: site, PeerDomain: peer,
		Streams:        []string{Default().Stream},
		Salvage:        []string{Default().Stream},
		Replicas:       3,
		RPOBudget:      30 * time.Second,
		PollInterval:   time.Second,
		LinkTimeout:    3 * time.Second,
		CatchUpTimeout: 30 * time.Second,
	}
}

// Validate checks the config; messages name the key.
func (c StandbyConfig) Validate() error {
	var errs []error
	if c.Site == "" || c.PeerDomain == "" || c.Site == c.PeerDomain {
		errs = append(errs, fmt.Errorf("cluster.standby.site (%q) and cluster.standby.peer_domain (%q) must be set and differ", c.Site, c.PeerDomain))
	}
	if len(c.Streams) == 0 || slices.Contains(c.Streams, "") {
		errs = append(errs, errors.New("cluster.standby.streams must name at least one stream, none empty"))
	}
	if c.Replicas != 1 && c.Replicas != 3 && c.Replicas != 5 {
		errs = append(errs, fmt.Errorf("cluster.standby.replicas must be 1, 3 or 5, got %d", c.Replicas))
	}
	if c.RPOBudget <= 0 || c.PollInterval <= 0 || c.LinkTimeout <= 0 || c.CatchUpTimeout <= 0 {
		errs = append(errs, errors.New("cluster.standby.rpo_budget, poll_interval, link_timeout and catch_up_timeout must be > 0"))
	}
	if c.PollInterval >= c.RPOBudget {
		errs = append(errs, fmt.Errorf("cluster.standby.poll_interval (%v) must be below cluster.standby.rpo_budget (%v)", c.PollInterval, c.RPOBudget))
	}
	return errors.Join(errs...)
}

// Roles of a site.
const (
	RoleActive   = "active"   // its record names it: its gateways acknowledge devices
	RoleStandby  = "standby"  // mirrors the active site; acknowledges nothing
	RoleConflict = "conflict" // both records claim the same epoch: nobody acknowledges
)

// Standby keeps this site's side of disaster recovery: while the other site
// is active it creates and watches the mirrors of the other site's streams
// (lag as metrics and Status); it keeps the fence records of both sites in
// agreement (the higher epoch wins); and it promotes, salvages and demotes
// (promote.go). Run does the periodic work; the rest is called by an operator.
type Standby struct {
	cfg  StandbyConfig
	js   jetstream.JetStream // this site
	peer jetstream.JetStream // the other site, through the link ($JS.<peer>.API)
	log  *slog.Logger
	m    *StandbyMetrics

	op sync.Mutex // one promote, demote or salvage at a time, and not during a sync

	mu      sync.Mutex
	status  StandbyStatus
	asOf    map[string]time.Time // per mirror: when it last held all the source had
	started time.Time
}

// NewStandby builds the site's disaster-recovery keeper on nc. It starts nothing.
func NewStandby(nc *nats.Conn, cfg StandbyConfig, m *StandbyMetrics, log *slog.Logger) (*Standby, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	peer, err := jetstream.NewWithDomain(nc, cfg.PeerDomain)
	if err != nil {
		return nil, err
	}
	if m == nil {
		m = NewStandbyMetrics(nil)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m.budget.Set(cfg.RPOBudget.Seconds())
	return &Standby{cfg: cfg, js: js, peer: peer, log: log, m: m, asOf: map[string]time.Time{}, started: time.Now(),
		status: StandbyStatus{Site: cfg.Site, Role: RoleStandby, RPOBudgetSeconds: cfg.RPOBudget.Seconds()}}, nil
}

// Run syncs every poll interval until ctx is done.
func (s *Standby) Run(ctx context.Context) error {
	t := time.NewTicker(s.cfg.PollInterval)
	defer t.Stop()
	for {
		if err := s.Sync(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("standby sync", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Sync does one round of Run: agree on the fence records, create missing
// mirrors while standby, read the replication lag.
func (s *Standby) Sync(ctx context.Context) error {
	s.op.Lock()
	defer s.op.Unlock()
	ctx, cancel := context.WithTimeout(ctx, syncTimeout(s.cfg))
	defer cancel()
	rec, role, ferr := s.syncFence(ctx)
	var errs []error
	if ferr != nil {
		errs = append(errs, ferr)
	}
	// Mirror only once a record names the other site: before the first
	// installation's Activate, a site that is to be the primary must not
	// create mirrors of the other's streams in place of its own.
	if role == RoleStandby && rec.Site != "" && rec.Site != s.cfg.Site {
		errs = append(errs, s.ensureMirrors(ctx))
	}
	streams := s.readLag(ctx)
	s.publish(rec, role, streams)
	return errors.Join(errs...)
}

// syncTimeout bounds a Sync round: requests to this site, and to the other
// through the link (each bounded by link_timeout).
func syncTimeout(c StandbyConfig) time.Duration { return 3*c.LinkTimeout + 5*time.Second }

// MayAcknowledge returns nil when this site's gateways may acknowledge
// devices: its own fence record names it (as of the last Sync).
func (s *Standby) MayAcknowledge() error {
	st := s.Status()
	if st.Role != RoleActive {
		return fmt.Errorf("site %s is %s (active site: %q, epoch %d): not acknowledging devices", st.Site, st.Role, st.ActiveSite, st.Epoch)
	}
	return nil
}

// ensureMirrors creates the mirror of each stream not yet present here, with
// the source's limits (read through the link).
func (s *Standby) ensureMirrors(ctx context.Context) error {
	var errs []error
	for _, name := range s.cfg.Streams {
		if _, err := s.js.Stream(ctx, name); err == nil {
			continue
		} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
			errs = append(errs, err)
			continue
		}
		if err := s.createMirror(ctx, name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// subjectsKey is the mirror's metadata key holding the source's subjects,
// which the stream takes back when promoted.
const subjectsKey = "citypulse.dr.subjects"

func (s *Standby) createMirror(ctx context.Context, name string) error {
	rctx, cancel := context.WithTimeout(ctx, s.cfg.LinkTimeout)
	defer cancel()
	src, err := s.peer.Stream(rctx, name)
	if err != nil {
		return fmt.Errorf("mirror %s: read the source at %s: %w", name, s.cfg.PeerDomain, err)
	}
	c := src.CachedInfo().Config
	mc := jetstream.StreamConfig{
		Name: name, Retention: c.Retention, MaxMsgs: c.MaxMsgs, MaxBytes: c.MaxBytes, MaxAge: c.MaxAge,
		MaxMsgsPerSubject: c.MaxMsgsPerSubject, MaxMsgSize: c.MaxMsgSize, Discard: c.Discard, Storage: c.Storage,
		Replicas: s.cfg.Replicas, Duplicates: c.Duplicates, DenyDelete: c.DenyDelete, DenyPurge: c.DenyPurge,
		AllowRollup: c.AllowRollup, AllowDirect: c.AllowDirect, MirrorDirect: c.AllowDirect, AllowMsgTTL: c.AllowMsgTTL,
		Mirror:   &jetstream.StreamSource{Name: name, Domain: s.cfg.PeerDomain},
		Metadata: map[string]string{subjectsKey: strings.Join(c.Subjects, " ")},
	}
	if _, err := s.js.CreateStream(ctx, mc); err != nil {
		return fmt.Errorf("create mirror %s of %s: %w", name, s.cfg.PeerDomain, err)
	}
	s.log.Info("mirror created", "stream", name, "source_domain", s.cfg.PeerDomain, "subjects", c.Subjects)
	return nil
}

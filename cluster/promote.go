package cluster

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrPeerNotFenced: promotion refused because the other site could not be
// fenced (unreachable) and the operator did not state that it is down.
var ErrPeerNotFenced = errors.New("the other site could not be fenced")

// ErrUnreplicatedTail: demotion refused because this site's stream holds
// messages the active site never received (neither mirrored nor salvaged).
var ErrUnreplicatedTail = errors.New("stream holds messages the active site lacks")

// Activate makes this site the active one on first installation: it writes
// the record (epoch 1) only if neither site has one. The other site may be
// unreachable (not installed yet).
func (s *Standby) Activate(ctx context.Context) error {
	s.op.Lock()
	defer s.op.Unlock()
	lf, err := openFence(ctx, s.js, true, s.cfg.Replicas)
	if err != nil {
		return err
	}
	if peer, _, _, err := s.readPeer(ctx); err == nil && peer.Epoch > 0 {
		return fmt.Errorf("activate %s: the other site has a record already (%s, epoch %d)", s.cfg.Site, peer.Site, peer.Epoch)
	}
	return lf.write(ctx, Record{Site: s.cfg.Site, Epoch: 1, Since: time.Now().UTC()}, 0)
}

// PromoteOptions are the operator's statements for a promotion.
type PromoteOptions struct {
	// PeerDown states that the other site is down or cut off from every
	// device (powered off, isolated at the load balancer): needed when it
	// cannot be fenced through the link.
	PeerDown bool
}

// Promote makes this site the active one. If the other site is reachable,
// this is a planned switch-over: its record is replaced (compare-and-set) by
// this site's at epoch+1, so its gateways stop acknowledging, and the mirrors
// are drained until they hold everything it stored; nothing is lost.
// Otherwise it needs opts.PeerDown, and whatever the mirrors lacked is the
// loss (the RPO). Then each mirror becomes a writable stream with its
// source's subjects, and last this site's own record names it, so its
// gateways acknowledge only once the streams take writes.
func (s *Standby) Promote(ctx context.Context, opts PromoteOptions) error {
	s.op.Lock()
	defer s.op.Unlock()
	lf, err := openFence(ctx, s.js, true, s.cfg.Replicas)
	if err != nil {
		return err
	}
	local, lrev, err := lf.read(ctx)
	if err != nil {
		return err
	}
	if local.Site == s.cfg.Site {
		return nil // active already
	}
	peer, prev, pf, perr := s.readPeer(ctx)
	rec := Record{Site: s.cfg.Site, Epoch: max(local.Epoch, peer.Epoch) + 1, Since: time.Now().UTC(), Diverged: map[string]uint64{}}
	switch {
	case perr == nil && pf != nil:
		if err := pf.write(ctx, rec, prev); err != nil {
			return fmt.Errorf("promote %s: fence %s: %w", s.cfg.Site, s.cfg.PeerDomain, err)
		}
		s.m.fenced.Inc()
		s.log.Warn("promote: the other site is fenced", "epoch", rec.Epoch)
		if err := s.drain(ctx); err != nil {
			return fmt.Errorf("promote %s: the other site is fenced (nobody acknowledges now) but the mirrors did not catch up; retry: %w", s.cfg.Site, err)
		}
	case !opts.PeerDown:
		return fmt.Errorf("promote %s: %w (%v); promote only when it is down or cut off from devices, stating so", s.cfg.Site, ErrPeerNotFenced, perr)
	}
	for _, name := range s.cfg.Streams {
		seq, err := s.promoteStream(ctx, name)
		if err != nil {
			return err
		}
		rec.Diverged[name] = seq
	}
	if err := lf.write(ctx, rec, lrev); err != nil {
		return err
	}
	s.m.promotions.Inc()
	s.log.Warn("promoted: this site is active", "epoch", rec.Epoch, "peer_down_stated", opts.PeerDown, "diverged", rec.Diverged)
	s.mu.Lock()
	s.status.Role, s.status.ActiveSite, s.status.Epoch = RoleActive, rec.Site, rec.Epoch
	s.mu.Unlock()
	return nil
}

// drain waits until each mirror holds the fenced source's last message.
func (s *Standby) drain(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.CatchUpTimeout)
	defer cancel()
	for _, name := range s.cfg.Streams {
		for {
			src, serr := s.peer.Stream(ctx, name)
			st, err := s.js.Stream(ctx, name)
			if err == nil && serr == nil && st.CachedInfo().State.LastSeq >= src.CachedInfo().State.LastSeq {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("stream %s: %w (%w)", name, ctx.Err(), errors.Join(err, serr))
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

// promoteStream turns a mirror into a writable stream with its source's
// subjects (JetStream 2.12+ accepts removing the mirror from the config) and
// returns its last sequence: where this site's history diverges from the
// old active site's.
func (s *Standby) promoteStream(ctx context.Context, name string) (uint64, error) {
	st, err := s.js.Stream(ctx, name)
	if err != nil {
		return 0, fmt.Errorf("promote stream %s: %w", name, err)
	}
	info := st.CachedInfo()
	c := info.Config
	if c.Mirror == nil {
		return info.State.LastSeq, nil
	}
	c.Mirror, c.MirrorDirect = nil, false
	c.Subjects = strings.Fields(c.Metadata[subjectsKey])
	if len(c.Subjects) == 0 {
		return 0, fmt.Errorf("promote stream %s: its metadata lacks the source's subjects (%s)", name, subjectsKey)
	}
	if _, err := s.js.UpdateStream(ctx, c); err != nil {
		return 0, fmt.Errorf("promote stream %s (mirror → writable, subjects %v): %w", name, c.Subjects, err)
	}
	st, err = s.js.Stream(ctx, name)
	if err != nil {
		return 0, err
	}
	return st.CachedInfo().State.LastSeq, nil
}

// Salvage runs at the active site after the old active site returned (and
// was fenced): it copies into each stream what the old site had stored after
// the point of divergence and this site never received — acknowledged
// readings that were lost to this site — by sourcing them through the link,
// then records how far it copied. Only the Salvage streams (the readings)
// are copied: the others' tail is state this site has superseded since (an
// old write must not overwrite a newer value, an old snapshot must not be
// restored as the newest). The copies are new messages here (new sequences,
// later than readings acknowledged since); consumers drop duplicates by
// device and reading time.
func (s *Standby) Salvage(ctx context.Context) (copied map[string]uint64, err error) {
	s.op.Lock()
	defer s.op.Unlock()
	lf, err := openFence(ctx, s.js, true, s.cfg.Replicas)
	if err != nil {
		return nil, err
	}
	rec, rev, err := lf.read(ctx)
	if err != nil {
		return nil, err
	}
	if rec.Site != s.cfg.Site {
		return nil, fmt.Errorf("salvage: site %s is not active", s.cfg.Site)
	}
	if rec.Salvaged == nil {
		rec.Salvaged = map[string]uint64{}
	}
	copied = map[string]uint64{}
	for _, name := range s.cfg.Streams {
		if !slices.Contains(s.cfg.Salvage, name) {
			continue
		}
		from := max(rec.Diverged[name], rec.Salvaged[name])
		upTo, n, err := s.salvageStream(ctx, name, from)
		if err != nil {
			return copied, err
		}
		rec.Salvaged[name], copied[name] = upTo, n
	}
	return copied, lf.write(ctx, rec, rev)
}

// salvageStream sources the other site's stream name from sequence from+1
// until it has copied that stream's last message, then removes the source.
// It returns that last sequence and how many sequences it covered.
func (s *Standby) salvageStream(ctx context.Context, name string, from uint64) (upTo, n uint64, err error) {
	rctx, cancel := context.WithTimeout(ctx, s.cfg.LinkTimeout)
	src, err := s.peer.Stream(rctx, name)
	cancel()
	if err != nil {
		return from, 0, fmt.Errorf("salvage %s: read it at %s: %w", name, s.cfg.PeerDomain, err)
	}
	if c := src.CachedInfo().Cluster; c != nil && c.Leader == "" {
		return from, 0, fmt.Errorf("salvage %s: the stream at %s has no leader yet (recovering); retry", name, s.cfg.PeerDomain)
	}
	last := src.CachedInfo().State.LastSeq
	if last <= from {
		return from, 0, nil
	}
	st, err := s.js.Stream(ctx, name)
	if err != nil {
		return from, 0, err
	}
	c := st.CachedInfo().Config
	base := c.Sources
	c.Sources = append(base[:len(base):len(base)], &jetstream.StreamSource{Name: name, Domain: s.cfg.PeerDomain, OptStartSeq: from + 1})
	if _, err := s.js.UpdateStream(ctx, c); err != nil {
		return from, 0, fmt.Errorf("salvage %s: add the source: %w", name, err)
	}
	got, werr := s.waitSourced(ctx, name, last)
	c.Sources = base
	if _, err := s.js.UpdateStream(ctx, c); err != nil {
		return from, 0, errors.Join(werr, fmt.Errorf("salvage %s: remove the source: %w", name, err))
	}
	if werr != nil {
		return from, 0, werr
	}
	s.log.Warn("salvaged the old active site's unreplicated messages", "stream", name, "from", from+1, "to", got)
	return got, got - from, nil
}

// waitSourced waits until the source of name from the other site has read
// sequence last, or has nothing left to read: Lag 0 at a recent contact, for
// two seconds. (Sourced messages whose Nats-Msg-Id the stream has seen within
// its duplicate window, e.g. readings the devices resent here, are dropped
// and do not advance the source's position.) It returns the sequence up to
// which the source has read.
func (s *Standby) waitSourced(ctx context.Context, name string, last uint64) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.CatchUpTimeout)
	defer cancel()
	var idleSince time.Time
	for {
		si := s.sourceInfo(ctx, name)
		switch {
		case si != nil && si.Seq >= last:
			return si.Seq, nil
		case si != nil && si.Lag == 0 && si.Active >= 0 && si.Active < s.cfg.LinkTimeout:
			if idleSince.IsZero() {
				idleSince = time.Now()
			} else if time.Since(idleSince) > 2*time.Second {
				return last, nil
			}
		default:
			idleSince = time.Time{}
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("salvage %s: source did not reach sequence %d: %w", name, last, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (s *Standby) sourceInfo(ctx context.Context, name string) *jetstream.StreamSourceInfo {
	st, err := s.js.Stream(ctx, name)
	if err != nil {
		return nil
	}
	for _, si := range st.CachedInfo().Sources {
		if si.Name == name {
			return si
		}
	}
	return nil
}

// DemoteOptions are the operator's statements for a demotion.
type DemoteOptions struct {
	// DiscardTail deletes streams even though they hold messages the active
	// site lacks (after the point of divergence, not salvaged).
	DiscardTail bool
}

// Demote runs at a site that was active, has returned and is fenced (its
// record names the other site): it replaces each of its streams by a mirror
// of the active site's (the re-sync for a fail-back). It refuses while a
// stream holds messages after the point of divergence that the active site
// has not salvaged (Salvage), unless opts.DiscardTail.
func (s *Standby) Demote(ctx context.Context, opts DemoteOptions) error {
	s.op.Lock()
	defer s.op.Unlock()
	lf, err := openFence(ctx, s.js, true, s.cfg.Replicas)
	if err != nil {
		return err
	}
	local, _, err := lf.read(ctx)
	if err != nil {
		return err
	}
	peer, _, _, err := s.readPeer(ctx)
	if err != nil {
		return fmt.Errorf("demote %s: the active site must be reachable: %w", s.cfg.Site, err)
	}
	if local.Site == s.cfg.Site || peer.Site != s.cfg.PeerDomain || peer.Epoch != local.Epoch {
		return fmt.Errorf("demote %s: the records must both name the other site (here: %s epoch %d, there: %s epoch %d)",
			s.cfg.Site, local.Site, local.Epoch, peer.Site, peer.Epoch)
	}
	for _, name := range s.cfg.Streams {
		o := opts
		o.DiscardTail = o.DiscardTail || !slices.Contains(s.cfg.Salvage, name) // superseded state
		if err := s.demoteStream(ctx, name, max(peer.Diverged[name], peer.Salvaged[name]), o); err != nil {
			return err
		}
	}
	s.log.Warn("demoted: this site mirrors the active site", "active_site", peer.Site, "epoch", peer.Epoch)
	return nil
}

func (s *Standby) demoteStream(ctx context.Context, name string, held uint64, opts DemoteOptions) error {
	st, err := s.js.Stream(ctx, name)
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		return s.createMirror(ctx, name)
	case err != nil:
		return err
	}
	info := st.CachedInfo()
	if info.Config.Mirror != nil {
		return nil
	}
	if tail := info.State.LastSeq; tail > held && !opts.DiscardTail {
		return fmt.Errorf("demote %s: stream %s: %w: sequences %d..%d (salvage them at the active site first)",
			s.cfg.Site, name, ErrUnreplicatedTail, held+1, tail)
	}
	if tail := info.State.LastSeq; tail > held {
		s.log.Warn("demote: discarding this site's tail the active site does not have", "stream", name,
			"from", held+1, "to", tail, "salvaged", slices.Contains(s.cfg.Salvage, name))
	}
	if err := s.js.DeleteStream(ctx, name); err != nil {
		return fmt.Errorf("demote %s: delete stream %s: %w", s.cfg.Site, name, err)
	}
	return s.createMirror(ctx, name)
}

// Diverged returns the last sequence stream held when this site became the
// active one (its fence record's Diverged), and false while the record does
// not name this site or has none for stream (a site installed active). What
// the other site handled after it is not in this site's stream: a position
// carried over in the mirrored state must not go beyond it.
func (s *Standby) Diverged(ctx context.Context, stream string) (uint64, bool, error) {
	lf, err := openFence(ctx, s.js, false, s.cfg.Replicas)
	if err != nil {
		return 0, false, err
	}
	rec, _, err := lf.read(ctx)
	if err != nil || rec.Site != s.cfg.Site {
		return 0, false, err
	}
	seq, ok := rec.Diverged[stream]
	return seq, ok, nil
}

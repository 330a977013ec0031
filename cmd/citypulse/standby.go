package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/clusterstate"
	"github.com/citypulse/citypulse/internal/httpapi"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/storage"
)

// The standby site (cluster.standby.enabled, docs/disaster-recovery.md): the
// node runs its site's cluster.Standby (mirrors of the other site's streams,
// their lag, the fence records). Its gateways acknowledge devices only while
// the site's fence record names it, and everything that writes to the
// site's streams and buckets (the owners and their consumers, the state
// store, the device bucket, the roll-up lease) starts only once it does: at
// a standby those streams are mirrors, which take no writes, and nothing is
// evaluated or notified there.

// buildStandby builds the site's keeper on the node's connection and fences
// the gateways' publisher with it.
func (s *server) buildStandby(n *clusterNode) error {
	if !n.cfg.Standby.Enabled {
		return nil
	}
	dr, err := cluster.NewStandby(n.nc, n.cfg.standby(), cluster.NewStandbyMetrics(s.reg), n.log.With("component", "standby"))
	if err != nil {
		return err
	}
	n.dr = dr
	n.pub.SetFence(dr.MayAcknowledge)
	if n.follow, err = cluster.NewFollower(n.nc, n.cfg.Config, s.sharedSinks(), s.reg, n.log.With("component", "store-follower")); err != nil {
		return err
	}
	if s.gate != nil { // the rules' receivers and silences carry the operations alert
		notify := s.alertNotifier()
		// One node of the site raises it: the holder of a lease in the
		// site's own lease bucket (not mirrored).
		lease, err := cluster.NewLease(n.nc, n.cfg.State.Leases, "dr-rpo-alert", n.cfg.NodeID, n.cfg.State.LeaseTTL,
			n.cfg.State.Replicas, n.log.With("component", "standby"))
		if err != nil {
			return err
		}
		alert := &clusterstate.RPOAlert{HoldOff: n.cfg.Standby.RPOAlertHoldOff, Leader: lease.Leader}
		s.gateways = append(s.gateways, runFunc(lease.Run), runFunc(func(ctx context.Context) error {
			return alert.Run(ctx, dr, n.cfg.Standby.PollInterval, notify)
		}))
	} else {
		n.log.Warn("standby site without rules: the replication lag is exported, but no alert is sent when it exceeds the RPO budget (enable rules and a receiver)")
	}
	n.log.Info("standby site: gateways acknowledge and owners consume only while the fence record names this site",
		"site", n.cfg.Standby.Site, "peer_domain", n.cfg.Standby.PeerDomain, "streams", n.cfg.standby().Streams)
	return nil
}

// whenActive returns r as a runner that starts only once this site may
// acknowledge devices (at once without cluster.standby). It does not stop
// r again on a demotion: a site is demoted with its CityPulse nodes stopped
// (the fail-back runbook).
func (n *clusterNode) whenActive(r runner) runner {
	if n.dr == nil {
		return r
	}
	return runFunc(func(ctx context.Context) error {
		t := time.NewTicker(max(n.cfg.Standby.PollInterval/4, 10*time.Millisecond))
		defer t.Stop()
		for n.dr.MayAcknowledge() != nil {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
			}
		}
		n.log.Info("this site is active: starting", "role", n.dr.Status().Role, "epoch", n.dr.Status().Epoch)
		return r.Run(ctx)
	})
}

// notReady says why a load balancer must not send devices to this node
// ("" when it may): the server is starting or stopping, JetStream is not
// reachable, or (cluster.standby) this site may not acknowledge devices:
// "standby: this site is fenced, epoch N (active site: X)". /healthz
// (liveness) stays 200 throughout.
func (s *server) notReady() string {
	switch {
	case !s.ready.Load():
		return "not ready: starting or stopping"
	case s.cluster == nil:
		return ""
	}
	if dr := s.cluster.dr; dr != nil { // the role first: a standby's mirrors appear only after a while
		switch st := dr.Status(); st.Role {
		case cluster.RoleActive:
		case cluster.RoleStandby:
			return fmt.Sprintf("standby: this site is fenced, epoch %d (active site: %q)", st.Epoch, st.ActiveSite)
		default:
			return fmt.Sprintf("%s: this site may not acknowledge devices, epoch %d (active site: %q)", st.Role, st.Epoch, st.ActiveSite)
		}
	}
	if !s.cluster.ready.Load() {
		return "not ready: JetStream is not reachable"
	}
	return ""
}

// standbyStatus is the disaster-recovery part of /api/v1/cluster (nil
// without cluster.standby).
func (n *clusterNode) standbyStatus() *cluster.StandbyStatus {
	if n.dr == nil {
		return nil
	}
	st := n.dr.Status()
	if n.follow != nil {
		f := n.follow.Status()
		st.StoreFollower = &f
	}
	return &st
}

// sharedSinks are the sinks writing to the site's shared stores (the
// remote-write receiver, InfluxDB): what the store follower writes to. The
// embedded TSDB and the archive hold what this node's owners handled.
func (s *server) sharedSinks() []pipeline.Sink {
	var out []pipeline.Sink
	for _, spec := range s.sinks {
		switch spec.Sink.(type) {
		case *storage.RemoteWrite, *storage.Influx:
			out = append(out, spec.Sink)
		}
	}
	return out
}

// followThenOwn runs the store follower while this site is a standby whose
// fence record names the other site, and once this site may acknowledge
// devices stops it, then runs the owner (whose partition consumers start
// no later than the follower's ack floor: startAfter).
func (n *clusterNode) followThenOwn(owner runner) runner {
	return runFunc(func(ctx context.Context) error {
		fctx, stop := context.WithCancel(ctx)
		defer stop()
		var done chan error
		t := time.NewTicker(max(n.cfg.Standby.PollInterval/4, 10*time.Millisecond))
		defer t.Stop()
		for n.dr.MayAcknowledge() != nil {
			if st := n.dr.Status(); done == nil && st.Role == cluster.RoleStandby && st.ActiveSite != "" && st.ActiveSite != st.Site {
				done = make(chan error, 1)
				go func() { done <- n.follow.Run(fctx) }()
				n.log.Info("standby site: following the readings mirror into the site's store", "active_site", st.ActiveSite)
			}
			select {
			case <-ctx.Done():
				stop()
				if done != nil {
					<-done
				}
				return nil
			case <-t.C:
			}
		}
		stop()
		if done != nil {
			<-done
			n.log.Info("this site is active: the store follower stopped", "store_follower", n.follow.Status())
		}
		n.log.Info("this site is active: starting", "role", n.dr.Status().Role, "epoch", n.dr.Status().Epoch)
		return owner.Run(ctx)
	})
}

// drOpTimeout bounds an operator's promote, salvage or demote: requests
// through the link and a switch-over's catch-up.
func (n *clusterNode) drOpTimeout() time.Duration {
	c := n.cfg.Standby
	return c.CatchUpTimeout + 4*c.LinkTimeout + 30*time.Second
}

// serveDR answers POST /api/v1/cluster/{activate,promote,salvage,demote}
// (admin token): the operator's disaster-recovery actions. promote takes
// ?peer_down=true (the other site is down or cut off from every device),
// demote ?discard_tail=true.
func (n *clusterNode) serveDR(w http.ResponseWriter, r *http.Request) {
	if n.dr == nil {
		httpapi.WriteError(w, http.StatusNotFound, "not_found", "cluster.standby is not enabled on this node")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), n.drOpTimeout())
	defer cancel()
	action := r.PathValue("action")
	start := time.Now()
	var err error
	var salvaged map[string]uint64
	switch action {
	case "activate":
		if err = n.dr.Activate(ctx); err == nil {
			err = n.dr.Sync(ctx) // the role as of now, not as of the next poll
		}
	case "promote":
		err = n.dr.Promote(ctx, cluster.PromoteOptions{PeerDown: r.URL.Query().Get("peer_down") == "true"})
	case "salvage":
		salvaged, err = n.dr.Salvage(ctx)
	case "demote":
		err = n.dr.Demote(ctx, cluster.DemoteOptions{DiscardTail: r.URL.Query().Get("discard_tail") == "true"})
	default:
		httpapi.WriteError(w, http.StatusNotFound, "not_found", "unknown action "+action+" (activate, promote, salvage, demote)")
		return
	}
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, cluster.ErrPeerNotFenced) || errors.Is(err, cluster.ErrUnreplicatedTail) {
			code = http.StatusConflict
		}
		n.log.Warn("disaster recovery: "+action+" failed", "err", err)
		httpapi.WriteError(w, code, action+"_failed", err.Error())
		return
	}
	n.log.Warn("disaster recovery: "+action+" done", "seconds", time.Since(start).Seconds())
	httpapi.WriteData(w, http.StatusOK, map[string]any{"action": action, "seconds": time.Since(start).Seconds(),
		"salvaged": salvaged, "dr": n.dr.Status()})
}

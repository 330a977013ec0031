package main

import (
	"errors"
	"fmt"
	"slices"

	"github.com/citypulse/citypulse/pipeline"
)

// sinkBatches is each configured sink's batch policy, by the sink's name
// (its pipeline.Sink Name, as openStores adds them).
func (c Config) sinkBatches() map[string]pipeline.BatchPolicy {
	m := map[string]pipeline.BatchPolicy{"tsdb": c.Pipeline.Batch}
	if b := c.Storage.TSDB.BatchPolicy(); b != nil {
		m["tsdb"] = *b
	}
	if c.Storage.Influx.Enabled {
		m["influx"] = c.Storage.Influx.Batch
	}
	if c.Storage.RemoteWrite.Enabled {
		m["remote_write"] = c.Storage.RemoteWrite.Batch
	}
	if c.Storage.Archive.Enabled {
		m["archive"] = c.Storage.Archive.Batch
	}
	return m
}

// checkAckAfterSinks checks cluster.ack_after_sinks: configured sinks, each
// once, each flushing within a third of cluster.ack_wait. A partition's
// owner acknowledges a batch only once they wrote it; a batch waiting longer
// than ack_wait/2 is kept from redelivery with InProgress, which costs a
// message per batch: that must stay the exception (a slow or failing
// store), not every batch's lot.
func (c Config) checkAckAfterSinks() error {
	batches := c.sinkBatches()
	var errs []error
	for i, name := range c.Cluster.AckAfterSinks {
		b, ok := batches[name]
		switch {
		case !ok:
			known := make([]string, 0, len(batches))
			for n := range batches {
				known = append(known, n)
			}
			slices.Sort(known)
			errs = append(errs, fmt.Errorf("cluster.ack_after_sinks: %q is not a configured sink (configured: %v)", name, known))
		case slices.Contains(c.Cluster.AckAfterSinks[:i], name):
			errs = append(errs, fmt.Errorf("cluster.ack_after_sinks names %q twice", name))
		case b.MaxAge > c.Cluster.AckWait/3:
			errs = append(errs, fmt.Errorf("cluster.ack_after_sinks: the %s sink flushes after up to %v (its batch.max_age), more than a third of cluster.ack_wait (%v): batches would wait for it close to ack_wait before their acknowledgement; lower its batch.max_age or raise cluster.ack_wait (and cluster.pinned_ttl above it)",
				name, b.MaxAge, c.Cluster.AckWait))
		}
	}
	return errors.Join(errs...)
}

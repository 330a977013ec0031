// Package cluster owns the building blocks of cluster mode on NATS JetStream:
// the replicated log that gateways append reading batches to (Log), the
// assignment of partitions to nodes, one owner at a time (Owner), and the
// clean-up a new owner needs after a hand-over (Dedupe); the store of the
// state that moves with a partition (StateStore: snapshots in an object
// store, transitions and pending notifications in a stream); the lease that
// elects one node for a task (Lease); and disaster recovery between two sites
// (Standby): mirrors of the active site's streams and key-value buckets at the
// standby site, their lag against an RPO budget, the fence record deciding
// which site may acknowledge devices, promotion, salvage and demotion
// (docs/disaster-recovery.md).
//
// Readings are partitioned by device: partition = FNV-1a(device id) mod P, and
// partition p is the subject citypulse.readings.<p> of the stream
// CITYPULSE_READINGS. Each partition has a durable pull consumer in a priority
// group with the pinned-client policy, so JetStream itself guarantees one
// consumer at a time per partition; heartbeats between nodes only decide who
// should pull: the live nodes are those whose heartbeats (keyed by
// cluster.node_id) were heard recently, and each prefers the partitions that
// rendezvous hashing with bounded loads assigns it among them (Assign), so
// nodes join and leave without a restart of the others.
//
// The data path of cluster mode is built from these: a gateway submits to a
// Publisher (readings coalesced per partition into batches, AppendBatch,
// Log.Append; Submit returns once JetStream acknowledged them), and the
// Owner hands a partition's batches to a Feed (DecodeBatch, Dedupe, Submit
// into the node's local pipeline through the Submitter interface defined
// here); the batches are acknowledged once the pipeline's sinks named in
// FeedOptions.AckAfter (the shared store's) wrote their readings (Committer,
// acker.go), or once journaled when none are named.
//
// It must not know the server's wiring (transports, rules, stores, config
// files): it sees readings only as pipeline.Reading values and the pipeline
// only as a Submitter and a Committer (sinks by name). It does not embed a NATS server or use NATS's MQTT
// listener (whose acknowledgement does not mean stored in our stream).
package cluster

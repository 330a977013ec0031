// Package cluster owns the building blocks of cluster mode on NATS JetStream:
// the replicated log that gateways append reading batches to (Log), the
// assignment of partitions to nodes, one owner at a time (Owner), and the
// clean-up a new owner needs after a hand-over (Dedupe); and disaster
// recovery between two sites (Standby): mirrors of the active site's streams
// and key-value buckets at the standby site, their lag against an RPO budget,
// the fence record deciding which site may acknowledge devices, promotion,
// salvage and demotion (docs/disaster-recovery.md).
//
// Readings are partitioned by device: partition = FNV-1a(device id) mod P, and
// partition p is the subject citypulse.readings.<p> of the stream
// CITYPULSE_READINGS. Each partition has a durable pull consumer in a priority
// group with the pinned-client policy, so JetStream itself guarantees one
// consumer at a time per partition; heartbeats between nodes only decide who
// should pull (a node prefers the partitions p with p mod N = its index).
//
// It must not know the server's wiring (transports, pipeline, rules): payloads
// are opaque bytes here, and a handler decides what a message means. It does
// not embed a NATS server or use NATS's MQTT listener.
package cluster

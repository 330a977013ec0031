// Package pipeline owns the path of a reading from a gateway to the sinks:
// the Reading type, sharding by device, the per-shard journal with group commit,
// acknowledgement after the journal write, batching, per-sink cursors and
// backpressure.
//
// It must not know about any protocol (MQTT, CoAP) or any store: gateways call
// Submit, stores implement Sink.
package pipeline

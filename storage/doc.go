// Package storage owns the sinks that write readings to time-series stores and
// the Prometheus-compatible query API over the embedded store (the Prometheus
// TSDB library, queried with its own PromQL engine).
//
// It must not re-implement a TSDB, and knows nothing of transports.
package storage

package cluster

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the cluster's Prometheus metrics; one value is shared by a
// node's Log, Owner and Dedupe helpers. No label carries a device or node id.
type Metrics struct {
	published   *prometheus.CounterVec
	ackSeconds  prometheus.Histogram
	owned       prometheus.Gauge
	alive       prometheus.Gauge
	preferred   prometheus.Gauge
	changes     *prometheus.CounterVec
	redelivered prometheus.Counter
	duplicates  prometheus.Counter
	late        prometheus.Counter
	handlerErrs prometheus.Counter

	submitSeconds prometheus.Histogram
	submitFailed  *prometheus.CounterVec
	batchReadings prometheus.Histogram
	fed           prometheus.Counter
	badBatches    prometheus.Counter

	awaitingStore prometheus.Gauge
	storeWait     prometheus.Histogram
	ackExtended   prometheus.Counter
}

// NewMetrics builds the metrics and registers them with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_cluster_log_appends_total",
			Help: "Batches appended to the cluster log, by result (ok, duplicate: JetStream had it already, error: not acknowledged)."},
			[]string{"result"}),
		ackSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "citypulse_cluster_log_ack_seconds",
			Help:    "Time from publishing a batch to JetStream's acknowledgement.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		owned: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "citypulse_cluster_partitions_owned",
			Help: "Partitions this node consumes now (pinned to it)."}),
		alive: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "citypulse_cluster_members_alive",
			Help: "Nodes this node counts as alive (itself and those heard of within cluster.alive_timeout)."}),
		preferred: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "citypulse_cluster_partitions_preferred",
			Help: "Partitions rendezvous hashing assigns to this node among the live nodes (it owns them once the hand-over is done)."}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_cluster_partition_handovers_total",
			Help: "Changes of partition ownership on this node: gained, lost (another node was pinned) or released (handed back to its preferred node, or shutdown)."},
			[]string{"change"}),
		redelivered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_cluster_redeliveries_total",
			Help: "Batches delivered more than once (an owner failed before acknowledging them)."}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_cluster_duplicates_dropped_total",
			Help: "Readings dropped as duplicates (same device, metric and time) after a hand-over."}),
		late: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_cluster_readings_late_total",
			Help: "Readings passed on older than a reading of the same device already passed on (order could not be restored within the window)."}),
		handlerErrs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_cluster_handler_errors_total",
			Help: "Handler calls that failed; the batches are retried, not acknowledged."}),
		submitSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "citypulse_cluster_submit_seconds",
			Help:    "Time a gateway waits for JetStream to acknowledge a device's readings (queueing and coalescing included), for the submissions acknowledged.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		submitFailed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_cluster_submit_failures_total",
			Help: "Gateway submissions not acknowledged by JetStream (the device is not acknowledged and sends again), by reason: not_acknowledged (no quorum, stream full, ...), timeout, canceled, full (too many readings waiting), stopped, fenced (a disaster-recovery site that is not the active one)."},
			[]string{"reason"}),
		batchReadings: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "citypulse_cluster_batch_readings",
			Help:    "Readings per batch published to the log (submissions coalesced while the partition's previous batch awaited its acknowledgement).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 12)}),
		fed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_cluster_readings_fed_total",
			Help: "Readings of owned partitions journaled into this node's pipeline (duplicates dropped not included)."}),
		badBatches: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_cluster_bad_batches_total",
			Help: "Batches in the log that could not be decoded (not written by a gateway of this version); skipped."}),
		awaitingStore: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "citypulse_cluster_batches_awaiting_store",
			Help: "Batches of owned partitions in the local journal and not yet acknowledged to JetStream: waiting for the sinks of cluster.ack_after_sinks to write their readings."}),
		storeWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "citypulse_cluster_store_wait_seconds",
			Help:    "Time from a batch in the local journal to its readings written by the sinks of cluster.ack_after_sinks (then it is acknowledged to JetStream).",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14)}),
		ackExtended: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_cluster_ack_extensions_total",
			Help: "Batches kept from redelivery (InProgress) because the sinks of cluster.ack_after_sinks had not written them within ack_wait/2: a slow or unavailable store."}),
	}
	if reg != nil {
		reg.MustRegister(m.published, m.ackSeconds, m.owned, m.alive, m.preferred, m.changes, m.redelivered, m.duplicates, m.late, m.handlerErrs,
			m.submitSeconds, m.submitFailed, m.batchReadings, m.fed, m.badBatches, m.awaitingStore, m.storeWait, m.ackExtended)
	}
	return m
}

// AckSeconds is the publish-acknowledgement latency histogram (for a summary
// on the node's status page).
func (m *Metrics) AckSeconds() prometheus.Histogram { return m.ackSeconds }

package pipeline

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	submitted     prometheus.Counter
	records       prometheus.Counter
	groupCommits  prometheus.Counter
	perWrite      prometheus.Histogram
	fsyncs        prometheus.Histogram
	backpressure  *prometheus.CounterVec
	journalBytes  *prometheus.GaugeVec
	recoveredRecs prometheus.Counter
	droppedBytes  prometheus.Counter
	segmentsFreed prometheus.Counter
	sinkWritten   *prometheus.CounterVec
	sinkBatches   *prometheus.CounterVec
	sinkErrors    *prometheus.CounterVec
	sinkDropped   *prometheus.CounterVec
	sinkLag       *prometheus.GaugeVec
	sinkReplay    *prometheus.CounterVec
	// sinkJournalReads: readings a sink read back from the journal (catching
	// up, or after a restart) instead of the shard's tail in memory.
	sinkJournalReads *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		submitted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_pipeline_readings_journaled_total", Help: "Readings written to the journal."}),
		records: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_pipeline_journal_records_total", Help: "Journal records (one per submission) written."}),
		groupCommits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_pipeline_journal_writes_total", Help: "Group commits: write(2) calls carrying one or more records."}),
		fsyncs: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "citypulse_pipeline_journal_fsync_duration_seconds", Help: "Duration of journal fsyncs.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 8)}),
		backpressure: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_pipeline_backpressure_total", Help: "Submissions refused (not acknowledged), by cause."},
			[]string{"cause"}),
		journalBytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "citypulse_pipeline_journal_bytes", Help: "Journal size on disk, by shard."}, []string{"shard"}),
		recoveredRecs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_pipeline_journal_recovered_records_total", Help: "Valid records found when opening the journal."}),
		droppedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_pipeline_journal_damaged_bytes_total", Help: "Bytes cut off damaged or torn journal segments at start-up."}),
		segmentsFreed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_pipeline_journal_segments_deleted_total", Help: "Segments deleted after every sink read past them."}),
		sinkWritten: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_sink_readings_written_total", Help: "Readings a sink wrote."}, []string{"sink"}),
		sinkBatches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_sink_batches_total", Help: "Batches a sink wrote."}, []string{"sink"}),
		sinkErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_sink_write_errors_total", Help: "Failed sink writes (retried unless permanent)."}, []string{"sink"}),
		sinkDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_sink_readings_dropped_total", Help: "Readings a sink refused permanently (ErrPermanent)."}, []string{"sink"}),
		sinkLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "citypulse_sink_lag_bytes", Help: "Journal bytes a sink has yet to write, summed over shards."}, []string{"sink"}),
		perWrite: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "citypulse_pipeline_journal_records_per_write",
			Help:    "Journal records (submissions) per group commit: how much one write(2) carries.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11)}),
		sinkReplay: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_sink_replay_bytes_total",
			Help: "Journal bytes a sink re-reads at start-up from its saved cursor: after a crash, an upper bound on what it may write a second time (the stores keep one copy)."},
			[]string{"sink"}),
		sinkJournalReads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_sink_journal_readings_total",
			Help: "Readings a sink read back from the journal (catching up after an outage or a restart) rather than from the newest records kept in memory."},
			[]string{"sink"}),
	}
	if reg != nil {
		reg.MustRegister(m.submitted, m.records, m.groupCommits, m.perWrite, m.fsyncs, m.backpressure, m.journalBytes,
			m.recoveredRecs, m.droppedBytes, m.segmentsFreed, m.sinkWritten, m.sinkBatches, m.sinkErrors,
			m.sinkDropped, m.sinkLag, m.sinkReplay, m.sinkJournalReads)
	}
	return m
}

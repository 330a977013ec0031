// Package history keeps what happened to each alert, for the operations
// screen's alert view: its transitions (pending, firing, resolved, repeat,
// flapping; with the silence that held a notification back) and the
// notifications sent for them, with each receiver's result (delivered,
// retrying, refused, dead). It is bounded (the last MaxEntries entries of the
// MaxAlerts alerts most recently changed) and saved to one file every few
// seconds and at the end, so a restart keeps it.
//
// It owns the store, its file and GET /api/v1/alerts/{fingerprint}/history.
// It must not decide what is notified or deliver anything: it only listens to
// the rules engine's events (as a notifier does) and to the outbox's delivery
// results. Recording is in memory only and never blocks (the shard loops call
// it); only Run writes the file.
package history

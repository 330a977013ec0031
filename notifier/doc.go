// Package notifier owns the delivery of alert notifications: the durable
// outbox (one file per notification and receiver, removed after a 2xx), the
// delivery workers with retries, the webhook and Alertmanager payloads, their
// HMAC signature, and the SSRF guard on every connection.
//
// It must not decide what is notified or when (package rules does, and hands
// it Events), and Enqueue must never block: the rules engine calls it from
// the pipeline's shard loops. It knows nothing of rules, devices or readings.
package notifier

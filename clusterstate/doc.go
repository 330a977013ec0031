// Package clusterstate joins a node's state to the cluster (package cluster)
// in cluster mode:
//   - partitions.go: the rules engine's alerts and the outbox's pending
//     notifications move with their partition (restored by a new owner before
//     it evaluates anything, checkpointed on release);
//   - registry.go: runtime device changes shared by every node through a KV
//     bucket;
//   - silences.go: the operators' silences and acknowledgements shared by
//     every node through a KV bucket (read from its mirror at a standby site);
//   - rpoalert.go: a standby site's replication lag over the RPO budget as an
//     operations alert, notified like the rules' alerts;
//   - rollup.go: district partial aggregates published by each owner and
//     combined into the city-wide vital signs by one elected node;
//   - fleet.go: the fleet rules' counts per partition published by each
//     owner, combined and judged by the holder of the fleet lease, which
//     alone owns the fleet alerts (their state moves with the lease).
//
// It translates between the packages that own the state (rules, notifier,
// devices, silence) and the JetStream stores of package cluster, which see opaque
// bytes. It must not decide what an alert, a device or an aggregate is, and it
// starts no goroutine outside a Run method.
package clusterstate

// Package rules owns what CityPulse concludes from readings: the city's vital-
// sign roll-ups (per district and city-wide), and the threshold, rate, state,
// deadman and fleet rules with their alert lifecycle.
//
// By concern:
//   - rule.go, eval.go: the rules as written and the pure lifecycle
//     (State.Step / Advance: pending, firing, resolved, flapping);
//   - engine.go, tick.go: evaluation in the shard loops (Observe) and on the
//     tick (timers, deadman, fleet), and Run;
//   - state.go: persistence, the alert snapshot and the transition log;
//   - alert.go, api.go: labels, fingerprints, the one template-data builder
//     the notifications and the API share, and the HTTP API;
//   - vitals.go, vitals_partial.go: the roll-ups (a Partial of the owned
//     devices, Combine of partials), submitted back into the pipeline;
//   - partition.go: cluster mode: state exported, imported and dropped by
//     owner, the Journal transitions are recorded in first, Flush, SetOwns.
//
// It must not deliver notifications (it hands notifier.Events to a Notifier;
// package notifier delivers them), and work in the shard loop (Observe) is
// in-memory only: it must never block on disk or network I/O. Its state is
// sharded like the pipeline's (pipeline.ShardOf), so a device's alerts live
// with the loop that evaluates it.
package rules

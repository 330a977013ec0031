// Package rules owns what CityPulse concludes from readings: the city's vital-
// sign roll-ups (per district and city-wide), and the threshold rules, alert
// lifecycle and notifications built on them.
//
// Work in the shard loop (Observe) is in-memory only: it must never block on
// network I/O.
package rules

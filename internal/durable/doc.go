// Package durable owns how CityPulse replaces a small state file (a sink
// cursor, the device overlay, the alert snapshot, an outbox entry) so that a
// crash leaves the old content or the new, never a mix: write a temporary
// file, rename it over the old one and, when the caller asks, fsync the file
// before the rename and the directory after it.
//
// It must not choose a durability level (each caller says whether a write
// must survive a power loss, and why), encode data (callers pass bytes) or
// create directories.
package durable

// Package opendata is the public guidance feed: the latest state of parking
// bays, car parks and signalled junctions as NGSI-LD entities (ETSI GS CIM 009,
// a read-only subset) shaped as FIWARE Smart Data Models (ParkingSpot,
// OffStreetParking) and one type of its own (TrafficSignal), with a live
// server-sent-events stream for guidance screens.
//
// It owns the in-memory latest value of each public metric (fed as a pipeline
// Observer, in the shard loop: a map update, no I/O), the entity shapes, the
// NGSI-LD HTTP endpoints and the per-client rate limit in front of them.
//
// It must not publish anything private: no secrets, no district internals, no
// metric beyond what the entity types define, and only the device kinds the
// configuration makes public. A value it does not know (never reported, or
// older than its staleness bound) is "unknown" or absent, never a guess.
package opendata

// Package signals judges whether signalled corridors run as green waves. From
// each junction's traffic_light state transitions it derives the cycle length
// and the green share, and for each configured corridor (junctions in order,
// the distance between them and a design speed) how far the offset between
// consecutive greens is from the travel time between them.
//
// It owns the per-junction timing state (fed as a pipeline Observer: in memory,
// no I/O) and the corridor configuration; it submits its results back into the
// pipeline as city series, like the vital signs, so every sink stores them and
// rules can alert on them. It must not decide what is an incident: that is a
// rule's job.
package signals

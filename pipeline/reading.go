package pipeline

// Reading is one measurement of one metric from one device. It is plain data,
// passed by value in slices; strings repeat across readings of a series and are
// interned by whoever builds them.
type Reading struct {
	Device   string
	Kind     string
	District string
	Metric   string
	Value    float64
	Time     int64 // unix ns: when the device measured it
	Received int64 // unix ns: when CityPulse received it
	// Seq is the position of the reading's journal record in its shard, assigned by
	// the pipeline when the reading is journaled (zero before).
	Seq uint64
}

// Millis converts a unix ns time to ms, rounding to the nearest ms (halves
// away from zero), never truncating: a store of ms keeps the ms the device
// meant even when its time arrived a few ns off (a float time, a clock in µs).
func Millis(ns int64) int64 {
	ms, rem := ns/1e6, ns%1e6
	switch {
	case rem >= 5e5:
		ms++
	case rem <= -5e5:
		ms--
	}
	return ms
}

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

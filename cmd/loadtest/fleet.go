package main

import (
	"fmt"
	"math/bits"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"time"

	"github.com/citypulse/citypulse/sim"
)

// simDevice is one device of the sim model with what the harness keeps of
// it. Everything but the acks is owned by the single goroutine of the
// connection that serves it.
type simDevice struct {
	*sim.Device
	skew     time.Duration // this device's clock error
	offline  bool          // goes silent at hostile.offline_at, then backfills
	cursor   int           // next metric within the current point
	lastTS   int64         // ms of the last normal point
	lateTS   int64         // ms of the last late point
	readings []sentReading // every reading generated, in order
	outcomes outcomeLog    // every message's outcome, by message number
	enc      []sim.Reading // build's scratch for one message
}

// sentReading is one reading as generated: (device, seq) is the device and the
// index into readings; ts is unique per (device, metric).
//
// A run keeps every reading it sent, tens of millions in a long one, so a
// sentReading holds no pointer and the collector does not scan the record.
// When each held its *pubMsg, the generator's collections took 1–3 s of
// marking at a 3–5 GB heap late in a 330 s CoAP run, and it sent too few
// requests while they ran (two 10 s windows at 11,800–17,900 instead of
// 20,000 requests/s).
type sentReading struct {
	ts     int64 // unix ms
	value  float64
	metric uint8
	msg    uint32 // the number of the device's message that carried it (outcomeLog)
}

// outcomeLog holds a device's messages' outcomes (msgPending, msgAcked,
// msgFailed) by message number, in chunks that never move: the callbacks of
// the transports store into them while the device's goroutine adds more.
// The chunks double from 64 outcomes to 8,192, so that a large fleet of
// devices that each send little costs little.
type outcomeLog struct {
	chunks [][]atomic.Uint32
	n      int
}

const (
	outcomeFirst   = 64
	outcomeMax     = 8192
	outcomeDoubled = outcomeFirst * (outcomeMax/outcomeFirst*2 - 1) // outcomes in the doubling chunks
)

// outcomeSlot is where outcome i is: its chunk, its index there, and the
// chunk's size.
func outcomeSlot(i int) (chunk, off, size int) {
	if i < outcomeDoubled {
		k := bits.Len(uint(i/outcomeFirst+1)) - 1
		return k, i - outcomeFirst*(1<<k-1), outcomeFirst << k
	}
	i -= outcomeDoubled
	return bits.Len(outcomeMax/outcomeFirst) + i/outcomeMax, i % outcomeMax, outcomeMax
}

// next is the outcome of the device's next message and its number; only
// the device's goroutine calls it.
func (l *outcomeLog) next() (*atomic.Uint32, uint32) {
	k, off, size := outcomeSlot(l.n)
	if off == 0 {
		l.chunks = append(l.chunks, make([]atomic.Uint32, size))
	}
	l.n++
	return &l.chunks[k][off], uint32(l.n - 1)
}

// load is message i's outcome, once the run's goroutines are done.
func (l *outcomeLog) load(i uint32) uint32 {
	k, off, _ := outcomeSlot(int(i))
	return l.chunks[k][off].Load()
}

// Points are stamped on a 4 ms grid so that late readings (ts ≡ 1 mod 4) can
// never land on the timestamp of a normal one (ts ≡ 0 mod 4).
const grid = 4

func districtName(i int) string { return fmt.Sprintf("d%02d", i) }

// fleetSpec is the scenario's fleet in the sim model's terms.
func fleetSpec(sc Scenario) sim.Spec {
	names := make([]string, sc.Fleet.Districts)
	for i := range names {
		names[i] = districtName(i)
	}
	return sim.Spec{Seed: sc.Seed, Prefix: sc.Fleet.Prefix, Districts: names, PerDistrict: sc.Fleet.PerDistrict,
		Default: sc.Fleet.Interval}
}

// buildFleet creates the scenario's devices in a stable order and picks the
// hostile ones (clock skew, offline) with the scenario's seed.
func buildFleet(sc Scenario) []*simDevice {
	rng := rand.New(rand.NewPCG(uint64(sc.Seed), 0x5eed))
	var out []*simDevice
	for _, d := range sim.NewFleet(fleetSpec(sc)) {
		dev := &simDevice{Device: d}
		if rng.Float64() < sc.Hostile.ClockSkew {
			dev.skew = time.Duration((rng.Float64()*2 - 1) * float64(sc.Hostile.SkewBy))
		}
		dev.offline = rng.Float64() < sc.Hostile.Offline
		out = append(out, dev)
	}
	return out
}

// malformed returns the i-th kind of garbage a broken device sends.
func malformed(i int) ([]byte, string) {
	all := []struct {
		body   string
		reason string
	}{
		{`[{"n":"pressure","v":`, "truncated SenML"},
		{"\xff\xfe not utf-8", "invalid UTF-8"},
		{`[{"n":"pressure","v":1e999}]`, "non-finite value"},
		{`[{"n":"no_such_metric","v":1}]`, "unknown metric"},
		{`{"time":"yesterday","pressure":1}`, "bad time"},
		{`[{"n":"pressure","v":-5}]`, "out of range"},
	}
	m := all[i%len(all)]
	return []byte(m.body), m.reason
}

// isLoopback reports whether host:port names a loopback address.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

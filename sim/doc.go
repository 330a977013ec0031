// Package sim owns the simulated city: the fleet of field devices of the five
// kinds (ids, secrets, places, declared intervals), the signal each one reports
// (daily shapes of demand, power load, traffic and parking, with sensor noise),
// the incidents that disturb it (a burst main, a district power cut, a dark
// junction, a car park filling up) and their schedule, and the encoding of a
// report as SenML or plain JSON. The load-test harness (cmd/loadtest) and the
// demo city (citypulse demo) drive the same model.
//
// Everything is deterministic given a seed and the times it is asked about: the
// clock is the caller's. It must not know the server's wiring or a transport:
// a City hands its reports to the small Publisher it is given.
package sim

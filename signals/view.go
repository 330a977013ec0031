package signals

import (
	"net/http"
	"time"

	"github.com/citypulse/citypulse/internal/httpapi"
)

// CorridorView is a corridor as the operations screen shows it: its
// junctions in driving order with their timing now. A figure that is not
// known (a junction without timing) is null, never a guess.
type CorridorView struct {
	Name  string  `json:"name"`
	Speed float64 `json:"speed_kmh"`
	// OffsetError is the worst |offset − travel time| (the series
	// city_corridor_offset_error_seconds), null when a junction has no timing.
	OffsetError *float64       `json:"offset_error_seconds"`
	Junctions   []JunctionView `json:"junctions"`
}

// JunctionView is one junction of a corridor. Distance, Travel, Offset and
// OffsetError are from the previous junction (absent for the first).
type JunctionView struct {
	Device      string   `json:"device"`
	District    string   `json:"district,omitempty"`
	Distance    float64  `json:"distance_m,omitempty"`
	Travel      float64  `json:"travel_seconds,omitempty"`
	Cycle       *float64 `json:"cycle_seconds"`
	GreenRatio  *float64 `json:"green_ratio"`
	Offset      *float64 `json:"offset_seconds,omitempty"`
	OffsetError *float64 `json:"offset_error_seconds,omitempty"`
}

// Corridors returns every configured corridor with its timing at now, the
// same figures Results stores as series.
func (a *Analyzer) Corridors(now time.Time) []CorridorView {
	a.mu.Lock()
	defer a.mu.Unlock()
	t := now.UnixNano()
	out := make([]CorridorView, 0, len(a.corridors))
	for _, c := range a.corridors {
		v := CorridorView{Name: c.Name, Speed: c.Speed, Junctions: make([]JunctionView, 0, len(c.Junctions))}
		if e, ok := a.corridorError(c, t); ok {
			v.OffsetError = &e
		}
		for i, stop := range c.Junctions {
			jv := JunctionView{Device: stop.Device}
			j := a.js[stop.Device]
			if j != nil {
				jv.District = j.district
			}
			if cycle, ratio, ok := j.timing(t); ok {
				jv.Cycle, jv.GreenRatio = ptr(seconds(cycle)), ptr(ratio)
			}
			if i > 0 {
				jv.Distance, jv.Travel = stop.Distance, c.Travel(i).Seconds()
				if off, diff, ok := a.offset(c, i, t); ok {
					jv.Offset, jv.OffsetError = ptr(seconds(off)), ptr(seconds(diff))
				}
			}
			v.Junctions = append(v.Junctions, jv)
		}
		out = append(out, v)
	}
	return out
}

func ptr(f float64) *float64 { return &f }

// Handler serves GET /api/v1/corridors: the corridors and their timing now.
func (a *Analyzer) Handler(w http.ResponseWriter, _ *http.Request) {
	httpapi.WriteData(w, http.StatusOK, map[string]any{"corridors": a.Corridors(time.Now())})
}

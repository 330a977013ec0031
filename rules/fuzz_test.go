package rules

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// FuzzParseRules feeds arbitrary rule files to the parser: rules or an error,
// never a panic; a parsed rule can be matched and evaluated. (Annotation
// templates are not executed here: a rules file is trusted operator input, and
// a template may legitimately loop for long.) Seeds: the shipped rules and
// testdata/fuzz/rules/*.yaml.
func FuzzParseRules(f *testing.F) {
	seeds, _ := filepath.Glob("../configs/*rules*.yaml")
	lt, _ := filepath.Glob("../configs/loadtest/rules.yaml")
	more, _ := filepath.Glob("../testdata/fuzz/rules/*.yaml")
	for _, p := range append(append(seeds, lt...), more...) {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("rules:\n  - {name: x, type: threshold, above: 1, below: 2}\n"))
	f.Add([]byte("rules:\n  - {name: x, type: rate, drop: 5, window: -1s}\n"))
	f.Add([]byte("rules:\n  - {name: x, type: state, select: {kind: traffic_light, metric: state}, equals: off, outside_hours: [25, -1]}\n"))
	now := time.Unix(1_700_000_000, 0)
	f.Fuzz(func(t *testing.T, b []byte) {
		rs, err := ParseRules(b, "fuzz")
		if err != nil {
			return
		}
		for _, r := range rs {
			r.Select.Matches("pipe", "pressure", "gulou", "pipe-0001")
			var st State
			flap := FlapPolicy{Window: time.Minute, Max: 4}
			for i, v := range []float64{0, 100, -100, 1e300, 50} {
				at := now.Add(time.Duration(i) * time.Second)
				bad, _ := r.condition(&st, v, at)
				st.Step(r, bad, at, flap)
				st.Advance(r, at.Add(time.Hour), flap)
			}
		}
	})
}

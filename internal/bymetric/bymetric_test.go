package bymetric

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// Whatever the order metrics come in, and however many (short list or
// map), each is found with its own entry and none twice.
func TestListFindsEachMetric(t *testing.T) {
	for _, n := range []int{1, 2, ShortList, ShortList + 1, 3 * ShortList} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			var l List[int]
			rng := rand.New(rand.NewPCG(uint64(n), 1))
			want := map[string]int{}
			for range 20 * n {
				m := fmt.Sprintf("m%d", rng.IntN(n))
				if rng.IntN(3) == 0 { // a device repeating its order
					m = fmt.Sprintf("m%d", len(want)%max(n, 1))
				}
				got, ok := l.Find(m)
				w, had := want[m]
				require.Equal(t, had, ok, m)
				if had {
					require.Equal(t, w, got, m)
				}
				v := rng.Int()
				l.Set(m, v)
				want[m] = v
			}
			require.Equal(t, len(want), l.Len())
			seen := map[string]bool{}
			l.All(func(m string, v int) {
				require.False(t, seen[m], "%s listed twice", m)
				seen[m] = true
				require.Equal(t, want[m], v)
			})
		})
	}
}

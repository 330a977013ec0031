package pipeline

import "iter"

// Runs splits rs into the longest runs of one device, kind and district: the
// unit Submit takes (a journal record stores them once). Order is kept.
func Runs(rs []Reading) iter.Seq[[]Reading] {
	return func(yield func([]Reading) bool) {
		for len(rs) > 0 {
			n := 1
			for n < len(rs) && rs[n].Device == rs[0].Device && rs[n].Kind == rs[0].Kind && rs[n].District == rs[0].District {
				n++
			}
			if !yield(rs[:n]) {
				return
			}
			rs = rs[n:]
		}
	}
}

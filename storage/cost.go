package storage

import (
	"fmt"
	"math"
	"net/http"
	"time"

	"github.com/prometheus/prometheus/promql/parser"
)

// defaultSubqueryStep is the step of a subquery written without one
// ("[30m:]"), as the engine evaluates it.
const defaultSubqueryStep = time.Minute

// subquerySamples estimates, before evaluation, how many samples per series
// the subqueries of expr make the engine produce and feed to range functions
// when expr is evaluated at steps timestamps spanning span. A subquery
// x[R:S] evaluated at n timestamps evaluates x at (span+R)/S timestamps and
// hands a window of R/S samples to its function at each of the n; nested
// subqueries multiply. The promql engine bounds only the samples it holds at
// once (query_max_samples), and it checks its deadline only between series:
// max_over_time(max_over_time(vector(1)[30d:1s])[30d:1s]) holds a few
// million samples but reads 6.7e12 of them on one series, for hours. The
// estimate is per series (one series at least), so a query over it cannot
// be cheaper.
func subquerySamples(expr parser.Node, steps int64, span time.Duration) float64 {
	var total float64
	if sq, ok := expr.(*parser.SubqueryExpr); ok {
		step := sq.Step
		if step <= 0 {
			step = defaultSubqueryStep
		}
		window := float64(sq.Range / step)
		inner := span + sq.Range
		innerSteps := int64(inner/step) + 1
		total += float64(steps)*window + float64(innerSteps)
		return total + subquerySamples(sq.Expr, innerSteps, inner)
	}
	for _, c := range parser.Children(expr) {
		total += subquerySamples(c, steps, span)
		if math.IsInf(total, 1) {
			break
		}
	}
	return total
}

// checkCost refuses a query whose subqueries would produce more samples per
// series than the query may hold (storage.tsdb.query_max_samples).
func (a *API) checkCost(query string, steps int64, span time.Duration) *apiError {
	expr, err := a.parser.ParseExpr(query)
	if err != nil {
		return nil // the engine reports it, in its own words
	}
	if n := subquerySamples(expr, steps, span); n > float64(a.opts.MaxSamples) {
		a.m.refused.WithLabelValues("too_many_samples").Inc()
		return &apiError{"execution", http.StatusUnprocessableEntity, fmt.Errorf(
			"query processing would load too many samples into memory: its subqueries alone would evaluate about %.3g samples per series, over storage.tsdb.query_max_samples (%d); use a larger subquery step or a shorter range",
			n, a.opts.MaxSamples)}
	}
	return nil
}

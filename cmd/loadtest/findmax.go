package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"time"
)

// Step is one rate tried by find-max.
type Step struct {
	Target    float64 `json:"target_msg_per_s"`
	Achieved  float64 `json:"achieved_msg_per_s"`
	Readings  float64 `json:"readings_per_s"`
	AckP50    float64 `json:"ack_p50_ms"`
	AckP99    float64 `json:"ack_p99_ms"`
	ErrorRate float64 `json:"error_rate"`
	OK        bool    `json:"ok"`
	Why       string  `json:"why,omitempty"`
}

// MaxReport is the result of find-max.
type MaxReport struct {
	Version     int      `json:"version"`
	Scenario    Scenario `json:"scenario"`
	P99Limit    float64  `json:"p99_limit_ms"`
	ErrorLimit  float64  `json:"error_limit"`
	Sustainable float64  `json:"sustainable_msg_per_s"`
	Readings    float64  `json:"sustainable_readings_per_s"`
	Steps       []Step   `json:"steps"`
}

// judge says whether a step held its target: achieved within 90 %, p99 and
// the error share under their limits.
func judge(target float64, rep Report, p99Limit time.Duration, errLimit float64) Step {
	st := Step{Target: target, Achieved: rep.Rates.Acked, Readings: rep.Rates.Readings,
		AckP50: ms(rep.Ack.P50), AckP99: ms(rep.Ack.P99)}
	if rep.Totals.Messages > 0 {
		st.ErrorRate = float64(rep.Totals.Failed) / float64(rep.Totals.Messages)
	}
	switch {
	case st.ErrorRate > errLimit:
		st.Why = fmt.Sprintf("error share %.4f over %.4f", st.ErrorRate, errLimit)
	case rep.Ack.P99 > p99Limit.Microseconds():
		st.Why = fmt.Sprintf("p99 %.1f ms over %v", st.AckP99, p99Limit)
	case rep.Rates.Acked < 0.9*target:
		st.Why = fmt.Sprintf("acked %.0f msg/s, under 90%% of the target", rep.Rates.Acked)
	case rep.Verdict != "pass":
		st.Why = rep.ExitReason
	default:
		st.OK = true
	}
	return st
}

// findMax doubles the rate from start until a step fails, then bisects
// between the last good and the first bad rate.
func findMax(ctx context.Context, sc Scenario, start, limit float64, p99Limit time.Duration, errLimit float64,
	log *slog.Logger, out io.Writer) (MaxReport, error) {
	mr := MaxReport{Version: ReportVersion, Scenario: sc, P99Limit: float64(p99Limit.Microseconds()) / 1000, ErrorLimit: errLimit}
	try := func(rate float64) (Step, error) {
		s := sc
		s.Rate = rate
		s.Incidents = nil
		rep, err := execute(ctx, s, log, nil)
		if err != nil {
			return Step{}, err
		}
		st := judge(rate, rep, p99Limit, errLimit)
		mr.Steps = append(mr.Steps, st)
		fmt.Fprintf(out, "rate %8.0f msg/s: acked %8.0f msg/s (%9.0f readings/s), p50 %6.2f ms, p99 %7.2f ms, errors %.4f  %s %s\n",
			rate, st.Achieved, st.Readings, st.AckP50, st.AckP99, st.ErrorRate, okWord(st.OK), st.Why)
		return st, nil
	}
	good, bad := 0.0, 0.0
	for rate := start; rate <= limit && ctx.Err() == nil; rate *= 2 {
		st, err := try(rate)
		if err != nil {
			return mr, err
		}
		if !st.OK {
			bad = rate
			break
		}
		good = rate
		mr.Sustainable, mr.Readings = st.Achieved, st.Readings
	}
	for i := 0; i < 3 && bad > 0 && good > 0 && ctx.Err() == nil; i++ {
		mid := (good + bad) / 2
		st, err := try(mid)
		if err != nil {
			return mr, err
		}
		if st.OK {
			good = mid
			mr.Sustainable, mr.Readings = st.Achieved, st.Readings
		} else {
			bad = mid
		}
	}
	return mr, ctx.Err()
}

func okWord(ok bool) string {
	if ok {
		return "ok"
	}
	return "FAIL"
}

func cmdFindMax(ctx context.Context, args []string, stdout, stderr io.Writer) (int, error) {
	f, apply := newRunFlags("find-max", stderr)
	start := f.fs.Float64("start", 1000, "first rate tried (msg/s)")
	limit := f.fs.Float64("limit", 1_000_000, "highest rate tried (msg/s)")
	p99 := f.fs.Duration("p99", 50*time.Millisecond, "ack p99 limit")
	errLimit := f.fs.Float64("errors", 0.001, "limit on the share of failed messages")
	step := f.fs.Duration("step", 10*time.Second, "duration of each step")
	sc, err := f.load(args, func(s *Scenario) {
		apply(s)
		s.Duration = *step
		s.Settle = min(s.Settle, 10*time.Second)
	})
	if err != nil {
		return exitSetup, err
	}
	mr, err := findMax(ctx, sc, *start, *limit, *p99, *errLimit, logger(stderr, f.verbose), stdout)
	if err != nil {
		return exitSetup, err
	}
	fmt.Fprintf(stdout, "sustainable: %.0f msg/s (%.0f readings/s) with ack p99 under %v and errors under %.4f\n",
		mr.Sustainable, mr.Readings, *p99, *errLimit)
	if f.jsonOut != "" {
		if err := writeJSON(f.jsonOut, mr); err != nil {
			return exitSetup, err
		}
	}
	return 0, nil
}

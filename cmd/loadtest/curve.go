package main

import (
	"fmt"
	"io"
	"os"
	"time"
)

// Window is one stretch of the run's timeline (the curve of a long run).
type Window struct {
	From, To int // seconds since start, [From, To)
	Messages int64
	Readings int64
	Acked    int64
	Errors   int64
	AckP99   float64 // the worst second's p99 in the window, ms
}

// MsgRate is the messages sent per second over the window.
func (w Window) MsgRate() float64 { return float64(w.Messages) / float64(w.To-w.From) }

// AckRate is the messages acknowledged per second over the window.
func (w Window) AckRate() float64 { return float64(w.Acked) / float64(w.To-w.From) }

// curve folds the per-second timeline into windows of width seconds.
func curve(tl []Second, width time.Duration) []Window {
	step := max(1, int(width/time.Second))
	var out []Window
	for _, s := range tl {
		from := (s.T - 1) / step * step // T counts from 1: second T covers [T-1, T)
		if len(out) == 0 || out[len(out)-1].From != from {
			out = append(out, Window{From: from, To: from})
		}
		w := &out[len(out)-1]
		w.To = s.T
		w.Messages += s.Messages
		w.Readings += s.Readings
		w.Acked += s.Acked
		w.Errors += s.Errors
		w.AckP99 = max(w.AckP99, s.AckP99)
	}
	return out
}

// printCurve writes the windows as a table.
func printCurve(w io.Writer, ws []Window) {
	fmt.Fprintf(w, "%-11s %10s %10s %12s %7s %12s\n", "window", "msg/s", "acked/s", "readings/s", "errors", "max ack p99")
	for _, x := range ws {
		fmt.Fprintf(w, "%4d-%4d s %10.0f %10.0f %12.0f %7d %9.1f ms\n", x.From, x.To, x.MsgRate(), x.AckRate(),
			float64(x.Readings)/float64(x.To-x.From), x.Errors, x.AckP99)
	}
}

// writeCurveCSV saves the windows as CSV.
func writeCurveCSV(path string, ws []Window) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	fmt.Fprintln(f, "from_s,to_s,messages,readings,acked,errors,msg_per_s,acked_per_s,max_ack_p99_ms")
	for _, x := range ws {
		fmt.Fprintf(f, "%d,%d,%d,%d,%d,%d,%.1f,%.1f,%.2f\n", x.From, x.To, x.Messages, x.Readings, x.Acked, x.Errors,
			x.MsgRate(), x.AckRate(), x.AckP99)
	}
	return f.Close()
}

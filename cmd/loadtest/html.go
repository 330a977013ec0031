package main

import (
	"fmt"
	"html/template"
	"io"
	"math"
	"strings"
)

// The HTML report is one self-contained file: inline CSS and SVG plots, no
// scripts, no fetches, so it opens anywhere and can be attached to a ticket.

type series struct {
	name  string
	color string
	ys    []float64
}

// lineChart plots series over xs (seconds) as an SVG.
func lineChart(title, unit string, xs []float64, ss []series) template.HTML {
	const w, h, l, b, t, r = 720.0, 240.0, 60.0, 30.0, 24.0, 12.0
	maxX, maxY := 1.0, 0.0
	for _, x := range xs {
		maxX = math.Max(maxX, x)
	}
	for _, s := range ss {
		for _, y := range s.ys {
			maxY = math.Max(maxY, y)
		}
	}
	if maxY == 0 {
		maxY = 1
	}
	maxY = niceCeil(maxY)
	px := func(x float64) float64 { return l + (w-l-r)*x/maxX }
	py := func(y float64) float64 { return h - b - (h-b-t)*y/maxY }
	var sb strings.Builder
	fmt.Fprintf(&sb, `<svg viewBox="0 0 %g %g" width="%g" height="%g" role="img" aria-label="%s">`, w, h, w, h, template.HTMLEscapeString(title))
	fmt.Fprintf(&sb, `<text x="%g" y="16" class="title">%s</text>`, l, template.HTMLEscapeString(title))
	for i := 0; i <= 4; i++ {
		y := maxY * float64(i) / 4
		fmt.Fprintf(&sb, `<line x1="%g" x2="%g" y1="%.1f" y2="%.1f" class="grid"/><text x="%g" y="%.1f" class="axis" text-anchor="end">%s</text>`,
			l, w-r, py(y), py(y), l-4, py(y)+4, humanize(y))
	}
	for i := 0; i <= 5; i++ {
		x := maxX * float64(i) / 5
		fmt.Fprintf(&sb, `<text x="%.1f" y="%g" class="axis" text-anchor="middle">%.0fs</text>`, px(x), h-b+16, x)
	}
	fmt.Fprintf(&sb, `<text x="4" y="%g" class="axis">%s</text>`, t-6, template.HTMLEscapeString(unit))
	for i, s := range ss {
		var pts []string
		for j, y := range s.ys {
			if j < len(xs) {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(xs[j]), py(y)))
			}
		}
		fmt.Fprintf(&sb, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`, s.color, strings.Join(pts, " "))
		fmt.Fprintf(&sb, `<rect x="%g" y="%g" width="10" height="10" fill="%s"/><text x="%g" y="%g" class="axis">%s</text>`,
			w-r-150, t+float64(i)*14, s.color, w-r-136, t+float64(i)*14+9, template.HTMLEscapeString(s.name))
	}
	sb.WriteString(`</svg>`)
	return template.HTML(sb.String())
}

// histChart draws a latency histogram on a log-scaled time axis.
func histChart(title string, s Summary) template.HTML {
	const w, h, l, b, t, r = 720.0, 200.0, 60.0, 30.0, 24.0, 12.0
	if s.Count == 0 {
		return template.HTML(fmt.Sprintf(`<p class="none">%s: no samples</p>`, template.HTMLEscapeString(title)))
	}
	lo, hi := math.Log10(math.Max(1, float64(s.Buckets[0][0]))), math.Log10(math.Max(10, float64(s.Max)))
	lo = math.Floor(lo)
	hi = math.Ceil(hi)
	if hi <= lo {
		hi = lo + 1
	}
	// regroup into 60 log-spaced bins
	const bins = 60
	counts := make([]int64, bins)
	var maxC int64
	for _, bk := range s.Buckets {
		x := (math.Log10(math.Max(1, float64(bk[0]))) - lo) / (hi - lo)
		i := min(bins-1, max(0, int(x*bins)))
		counts[i] += bk[1]
		maxC = max(maxC, counts[i])
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, `<svg viewBox="0 0 %g %g" width="%g" height="%g" role="img" aria-label="%s">`, w, h, w, h, template.HTMLEscapeString(title))
	fmt.Fprintf(&sb, `<text x="%g" y="16" class="title">%s (n=%d)</text>`, l, template.HTMLEscapeString(title), s.Count)
	bw := (w - l - r) / bins
	for i, c := range counts {
		if c == 0 {
			continue
		}
		bh := (h - b - t) * float64(c) / float64(maxC)
		fmt.Fprintf(&sb, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" class="bar"><title>%d</title></rect>`,
			l+float64(i)*bw, h-b-bh, bw-1, bh, c)
	}
	for e := lo; e <= hi; e++ {
		x := l + (w-l-r)*(e-lo)/(hi-lo)
		fmt.Fprintf(&sb, `<line x1="%.1f" x2="%.1f" y1="%g" y2="%g" class="grid"/><text x="%.1f" y="%g" class="axis" text-anchor="middle">%s</text>`,
			x, x, t, h-b, x, h-b+16, usLabel(math.Pow(10, e)))
	}
	for _, q := range []struct {
		name string
		v    int64
	}{{"p50", s.P50}, {"p99", s.P99}} {
		x := l + (w-l-r)*(math.Log10(math.Max(1, float64(q.v)))-lo)/(hi-lo)
		fmt.Fprintf(&sb, `<line x1="%.1f" x2="%.1f" y1="%g" y2="%g" class="q"/><text x="%.1f" y="%g" class="axis">%s</text>`, x, x, t, h-b, x+3, t+10, q.name)
	}
	sb.WriteString(`</svg>`)
	return template.HTML(sb.String())
}

func usLabel(us float64) string {
	switch {
	case us >= 1e6:
		return fmt.Sprintf("%gs", us/1e6)
	case us >= 1e3:
		return fmt.Sprintf("%gms", us/1e3)
	}
	return fmt.Sprintf("%gµs", us)
}

func niceCeil(v float64) float64 {
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func humanize(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.3gM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.3gk", v/1e3)
	}
	return fmt.Sprintf("%.3g", v)
}

var htmlTmpl = template.Must(template.New("report").Funcs(template.FuncMap{"ms": ms}).Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CityPulse load test: {{.R.Scenario.Name}}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:760px;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right;border-bottom:1px solid #eee}th:first-child,td:first-child{text-align:left}
.pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}
svg text{font:11px system-ui,sans-serif;fill:#444}svg .title{font-weight:bold;fill:#222}
svg .grid{stroke:#ddd}svg .bar{fill:#4c78a8}svg .q{stroke:#e45756;stroke-dasharray:3 2}
</style></head><body>
<h1>CityPulse load test: {{.R.Scenario.Name}}</h1>
<p>Verdict: <span class="{{.R.Verdict}}">{{.R.Verdict}}</span> — {{.R.ExitReason}}.<br>
Started {{.R.Started.Format "2006-01-02 15:04:05 MST"}}, {{printf "%.0f" .R.Duration}} s; {{.R.Fleet.Devices}} devices over {{.R.Fleet.Connections}} connections;
{{.R.Scenario.Transport.Protocol}}{{if eq .R.Scenario.Transport.Protocol "mqtt"}} QoS {{.R.Scenario.Transport.QoS}}{{end}}, {{.R.Scenario.Format}}, {{.R.Scenario.ReadingsPerMessage}} readings/message;
host {{.R.Host.GOOS}}/{{.R.Host.GOARCH}}, {{.R.Host.CPUs}} CPUs, {{.R.Host.Go}}.</p>
<h2>Throughput</h2>
<table><tr><th></th><th>messages</th><th>readings</th><th>per second</th></tr>
<tr><td>sent</td><td>{{.R.Totals.Messages}}</td><td>{{.R.Totals.Readings}}</td><td>{{printf "%.0f" .R.Rates.Messages}} msg/s, {{printf "%.0f" .R.Rates.Readings}} readings/s</td></tr>
<tr><td>acknowledged</td><td>{{.R.Totals.Acked}}</td><td>{{.R.Totals.ReadingsAcked}}</td><td>{{printf "%.0f" .R.Rates.Acked}} msg/s</td></tr>
<tr><td>failed</td><td>{{.R.Totals.Failed}}</td><td></td><td></td></tr></table>
{{.Rate}}
<h2>Latency</h2>
<table><tr><th></th><th>n</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>
{{range .Lat}}<tr><td>{{.Name}}</td><td>{{.S.Count}}</td><td>{{printf "%.2f" (ms .S.P50)}} ms</td><td>{{printf "%.2f" (ms .S.P90)}} ms</td><td>{{printf "%.2f" (ms .S.P99)}} ms</td><td>{{printf "%.2f" (ms .S.P999)}} ms</td><td>{{printf "%.2f" (ms .S.Max)}} ms</td></tr>
{{end}}</table>
{{.LatOverTime}}
{{range .Hists}}{{.}}{{end}}
<h2>Store check</h2>
{{if .R.Store.Checked}}<table>
<tr><td>readings generated</td><td>{{.R.Store.Expected}}</td></tr><tr><td>acknowledged</td><td>{{.R.Store.Acked}}</td></tr>
<tr><td>found in the store</td><td>{{.R.Store.Found}}</td></tr><tr><td><b>lost</b> (acknowledged, missing)</td><td><b>{{.R.Store.Lost}}</b></td></tr>
<tr><td>duplicated</td><td>{{.R.Store.Duplicated}}</td></tr><tr><td>unexpected</td><td>{{.R.Store.Unexpected}}</td></tr>
<tr><td>never acknowledged, missing</td><td>{{.R.Store.UnackedMissing}}</td></tr></table>
{{range .R.Store.Examples}}<pre>{{.}}</pre>{{end}}{{else}}<p>Not checked (no query API).</p>{{end}}
<h2>Hostile realities and alerts</h2>
<table><tr><td>duplicates sent</td><td>{{.R.Totals.Duplicates}}</td></tr><tr><td>out of order</td><td>{{.R.Totals.OutOfOrder}}</td></tr>
<tr><td>late</td><td>{{.R.Totals.Late}}</td></tr><tr><td>backfilled after offline</td><td>{{.R.Totals.Backfilled}}</td></tr>
<tr><td>malformed sent / refused</td><td>{{.R.Totals.Malformed}} / {{.R.Totals.MalformedRefused}}</td></tr><tr><td>reconnects (storm)</td><td>{{.R.Totals.Reconnects}}</td></tr>
<tr><td>incidents alerted</td><td>{{.R.Alerts.Matched}} / {{.R.Alerts.Expected}}</td></tr><tr><td>webhooks (bad signatures)</td><td>{{.R.Alerts.Webhooks}} ({{.R.Alerts.BadSignature}})</td></tr></table>
{{if .R.Rejects}}<h2>Server rejects by reason</h2><table>{{range $k, $v := .R.Rejects}}<tr><td>{{$k}}</td><td>{{$v}}</td></tr>{{end}}</table>{{end}}
{{if .R.Errors}}<h2>Errors</h2><table>{{range .R.Errors}}<tr><td>{{.Error}}</td><td>{{.Count}}</td></tr>{{end}}</table>{{end}}
</body></html>
`))

type namedSummary struct {
	Name string
	S    Summary
}

// writeHTML renders r as a self-contained page.
func writeHTML(w io.Writer, r Report) error {
	xs := make([]float64, len(r.Timeline))
	msgs, acked, readings, p50, p99, mx := make([]float64, len(xs)), make([]float64, len(xs)), make([]float64, len(xs)),
		make([]float64, len(xs)), make([]float64, len(xs)), make([]float64, len(xs))
	for i, s := range r.Timeline {
		xs[i] = float64(s.T)
		msgs[i], acked[i], readings[i] = float64(s.Messages), float64(s.Acked), float64(s.Readings)
		p50[i], p99[i], mx[i] = s.AckP50, s.AckP99, s.AckMax
	}
	lat := []namedSummary{{"publish → ack", r.Ack}, {"publish → queryable", r.Queryable}, {"incident → webhook", r.Alerts.Latency}}
	for _, k := range sortedKeys(r.Alerts.ByAlert) {
		lat = append(lat, namedSummary{"  webhook " + k, r.Alerts.ByAlert[k]})
	}
	data := map[string]any{
		"R": r,
		"Rate": lineChart("Rate over time", "per second", xs, []series{
			{"messages sent", "#4c78a8", msgs}, {"messages acked", "#54a24b", acked}, {"readings sent", "#f58518", readings}}),
		"LatOverTime": lineChart("Ack latency over time", "ms", xs, []series{
			{"p50", "#4c78a8", p50}, {"p99", "#e45756", p99}, {"max", "#bbbbbb", mx}}),
		"Hists": []template.HTML{histChart("publish → ack", r.Ack), histChart("publish → queryable", r.Queryable),
			histChart("incident → webhook", r.Alerts.Latency)},
		"Lat": lat,
	}
	return htmlTmpl.Execute(w, data)
}

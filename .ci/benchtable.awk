# Summarises `go test -bench -benchmem` output as a table: name, readings/s,
# ns/reading, allocs/reading, rules evaluated per reading, the share of the
# readings the sink had stored when the clock stopped, and the speed ratio to
# the same run's baseline: for BenchmarkRing/<queue>/producers=N the buffered
# channel ("chan") at the same producer count, for .../window the old rate
# window (".../baseline"). A benchmark that measures nothing shows it: 0 rules
# evaluated, 0 stored. Other custom metrics (state size, snapshot MB and ms
# per 100,000 alerts, by which snapshots are compared) follow the columns. With -count N a benchmark is shown
# once, by its median run (by ns/op); ratios are of medians.
/^Benchmark/ {
	name = $1; sub(/-[0-9]+$/, "", name)
	norm = ""; nsop = ""; rps = ""; nsr = ""; allocs = ""; apr = ""; rules = ""; stored = ""; extra = ""
	for (i = 3; i < NF; i++) {
		u = $(i+1)
		if (u == "ms/100k-alerts") norm = $i
		if (u == "ns/op") nsop = $i
		else if (u == "readings/s") rps = $i
		else if (u == "ns/reading") nsr = $i
		else if (u == "allocs/op") allocs = $i
		else if (u == "allocs/reading") apr = $i
		else if (u == "rules_evaluated/reading") rules = $i
		else if (u == "stored/reading") stored = $i
		else if ((u ~ /\// && u != "B/op" && u != "MB/s") || u == "state-bytes") extra = extra " " $i " " u
	}
	if (!(name in RUNS)) names[++n] = name
	r = ++RUNS[name]
	NSOP[name, r] = nsop; RPS[name, r] = rps; NSR[name, r] = nsr; ALLOCS[name, r] = allocs
	NORM[name, r] = norm; APR[name, r] = apr; RULES[name, r] = rules; STORED[name, r] = stored; EXTRA[name, r] = extra
}
# median returns the run of name whose ns/op is the median.
function median(name,    m, i, j, t, idx) {
	m = RUNS[name]
	for (i = 1; i <= m; i++) idx[i] = i
	for (i = 2; i <= m; i++)
		for (j = i; j > 1 && NSOP[name, idx[j-1]] + 0 > NSOP[name, idx[j]] + 0; j--) { t = idx[j]; idx[j] = idx[j-1]; idx[j-1] = t }
	return idx[int((m + 1) / 2)]
}
END {
	printf "%-44s %12s %12s %8s %7s %7s %9s  %s\n", "benchmark", "readings/s", "ns/reading", "allocs/r", "rules/r", "stored", "vs base", "other"
	for (k = 1; k <= n; k++) MED[names[k]] = median(names[k])
	for (k = 1; k <= n; k++) {
		name = names[k]; r = MED[name]
		apr = APR[name, r]
		if (apr == "" && ALLOCS[name, r] != "" && NSR[name, r] > 0 && NSOP[name, r] > 0) apr = sprintf("%.2f", ALLOCS[name, r] * NSR[name, r] / NSOP[name, r])
		base = ""
		if (name ~ /^BenchmarkRing\//) { base = name; sub(/Ring\/[a-z]+\//, "Ring/chan/", base) }
		if (name ~ /\/window$/) { base = name; sub(/\/window$/, "/baseline", base) }
		ratio = "-"
		if (base != "" && base != name && (base in MED) && NSOP[name, r] > 0) ratio = sprintf("%.2fx", NSOP[base, MED[base]] / NSOP[name, r])
		# snapshots of different alert counts compare per 100,000 alerts
		if (ratio != "-" && NORM[name, r] > 0 && NORM[base, MED[base]] > 0) ratio = sprintf("%.2fx", NORM[base, MED[base]] / NORM[name, r])
		runs = (RUNS[name] > 1 ? " (median of " RUNS[name] ")" : "")
		printf "%-44s %12s %12s %8s %7s %7s %9s %s%s\n", name, (RPS[name, r] == "" ? "-" : sprintf("%.0f", RPS[name, r])), \
			(NSR[name, r] == "" ? NSOP[name, r] " /op" : NSR[name, r]), (apr == "" ? "-" : apr), \
			(RULES[name, r] == "" ? "-" : RULES[name, r]), (STORED[name, r] == "" ? "-" : STORED[name, r]), ratio, EXTRA[name, r], runs
	}
}

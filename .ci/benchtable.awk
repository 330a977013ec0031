# Summarises `go test -bench -benchmem` output as a table: name, readings/s,
# ns/reading, allocs/reading, rules evaluated per reading, the share of the
# readings the sink had stored when the clock stopped, and the speed ratio to
# the same run's baseline: for BenchmarkRing/<queue>/producers=N the buffered
# channel ("chan") at the same producer count, for .../window the old rate
# window (".../baseline"). A benchmark that measures nothing shows it: 0 rules
# evaluated, 0 stored. Other custom metrics (state size, snapshot MB and ms
# per 100,000 alerts) are listed after the table's columns.
/^Benchmark/ {
	name = $1; sub(/-[0-9]+$/, "", name)
	nsop = ""; rps = ""; nsr = ""; allocs = ""; apr = ""; rules = ""; stored = ""; extra = ""
	for (i = 3; i < NF; i++) {
		u = $(i+1)
		if (u == "ns/op") nsop = $i
		else if (u == "readings/s") rps = $i
		else if (u == "ns/reading") nsr = $i
		else if (u == "allocs/op") allocs = $i
		else if (u == "allocs/reading") apr = $i
		else if (u == "rules_evaluated/reading") rules = $i
		else if (u == "stored/reading") stored = $i
		else if (u ~ /\// && u != "B/op" && u != "MB/s") extra = extra " " $i " " u
		else if (u == "state-bytes") extra = extra " " $i " " u
	}
	names[++n] = name; NSOP[name] = nsop; RPS[name] = rps; NSR[name] = nsr; ALLOCS[name] = allocs
	APR[name] = apr; RULES[name] = rules; STORED[name] = stored; EXTRA[name] = extra
}
END {
	printf "%-44s %12s %12s %8s %7s %7s %9s  %s\n", "benchmark", "readings/s", "ns/reading", "allocs/r", "rules/r", "stored", "vs base", "other"
	for (k = 1; k <= n; k++) {
		name = names[k]
		apr = APR[name]
		if (apr == "" && ALLOCS[name] != "" && NSR[name] != "" && NSR[name] > 0 && NSOP[name] > 0) apr = sprintf("%.2f", ALLOCS[name] * NSR[name] / NSOP[name])
		base = ""
		if (name ~ /^BenchmarkRing\//) { base = name; sub(/Ring\/[a-z]+\//, "Ring/chan/", base) }
		if (name ~ /\/window$/) { base = name; sub(/\/window$/, "/baseline", base) }
		ratio = "-"
		if (base != "" && base != name && NSOP[base] > 0 && NSOP[name] > 0) ratio = sprintf("%.2fx", NSOP[base] / NSOP[name])
		printf "%-44s %12s %12s %8s %7s %7s %9s %s\n", name, (RPS[name] == "" ? "-" : sprintf("%.0f", RPS[name])), \
			(NSR[name] == "" ? NSOP[name] " /op" : NSR[name]), (apr == "" ? "-" : apr), \
			(RULES[name] == "" ? "-" : RULES[name]), (STORED[name] == "" ? "-" : STORED[name]), ratio, EXTRA[name]
	}
}

# Summarises `go test -bench -benchmem` output as a table: name, readings/s,
# ns/reading, allocs/reading, and for the queue comparison the speed ratio to
# the buffered-channel baseline of the same producer count.
/^Benchmark/ {
	name = $1; sub(/-[0-9]+$/, "", name)
	nsop = ""; rps = ""; nsr = ""; allocs = ""
	for (i = 3; i < NF; i++) {
		if ($(i+1) == "ns/op") nsop = $i
		if ($(i+1) == "readings/s") rps = $i
		if ($(i+1) == "ns/reading") nsr = $i
		if ($(i+1) == "allocs/op") allocs = $i
	}
	names[++n] = name; NSOP[name] = nsop; RPS[name] = rps; NSR[name] = nsr; ALLOCS[name] = allocs
}
END {
	printf "%-48s %14s %12s %16s %10s\n", "benchmark", "readings/s", "ns/reading", "allocs/reading", "vs chan"
	for (k = 1; k <= n; k++) {
		name = names[k]
		apr = "-"
		if (ALLOCS[name] != "" && NSR[name] != "" && NSR[name] > 0) apr = sprintf("%.2f", ALLOCS[name] * NSR[name] / NSOP[name])
		ratio = "-"
		if (name ~ /^BenchmarkRing\//) {
			base = name; sub(/Ring\/[a-z]+\//, "Ring/chan/", base)
			if (NSOP[base] > 0) ratio = sprintf("%.2fx", NSOP[base] / NSOP[name])
		}
		printf "%-48s %14s %12s %16s %10s\n", name, (RPS[name] == "" ? "-" : sprintf("%.0f", RPS[name])), \
			(NSR[name] == "" ? NSOP[name] " /op" : NSR[name]), apr, ratio
	}
}

# CityPulse. `make demo` starts the server with a simulated city feeding it (a
# first look: live values, incidents, alerts); `make run` starts a clean server
# on configs/citypulse.yaml; `make test`
# installs what the tests need (mosquitto, VictoriaMetrics, influxd, nats-server, chromium) and runs every test, integration
# tests included.

SHELL       := /bin/bash
GO          ?= go
BIN         := bin
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
FUZZTIME    ?= 10s
# Minimising each new interesting input for the default 60 s starves the
# fuzzers whose seeds are whole config or rules files (a few execs/s); a few
# tries each keeps them at thousands of execs/s.
FUZZMIN     ?= 10x
# Servers the integration tests start themselves (apt-get does not start services):
# mosquitto (external-broker mode), VictoriaMetrics (InfluxDB v2 write API) and
# Alertmanager from Debian, and InfluxDB 1.8.10 (also serves /api/v2/write) built
# with go install; Debian's Chromium renders the dashboard headless.
APT_DEPS    := mosquitto victoria-metrics prometheus-alertmanager chromium libcoap3-bin
INFLUXD     := github.com/influxdata/influxdb/cmd/influxd@v1.8.10
# nats-server for the cluster tests (JetStream priority groups with pinned
# clients need 2.11+; Debian ships 2.9), built with go install.
NATS_SERVER := github.com/nats-io/nats-server/v2@v2.15.2
GOBIN       := $(shell $(GO) env GOPATH)/bin

.PHONY: all build run demo test test-short test-long test-cluster test-dr deps bench bench-e2e fuzz lint clean

all: build

build:
	$(GO) build -o $(BIN)/citypulse ./cmd/citypulse
	$(GO) build -o $(BIN)/loadtest ./cmd/loadtest

run: build
	./$(BIN)/citypulse serve --config configs/citypulse.yaml

# demo runs the server on its embedded defaults with the simulated city of
# package sim (324 devices in six districts, an incident every few minutes);
# it prints the dashboard's address and the tokens. Data in a temporary
# directory, removed on exit.
demo: build
	./$(BIN)/citypulse demo

# deps installs the servers the integration tests run (as root, as on CI).
deps:
	@missing=""; for p in $(APT_DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@test -x $(GOBIN)/influxd || command -v influxd >/dev/null 2>&1 || \
		(echo "installing: influxd 1.8.10 (go install, about a minute)"; GOFLAGS= $(GO) install $(INFLUXD))
	@test -x $(GOBIN)/nats-server || \
		(echo "installing: nats-server 2.15.2 (go install, about a minute)"; GOFLAGS= $(GO) install $(NATS_SERVER))

# test keeps the whole output in test.out and, on failure, ends with the
# failing tests and their messages (CI shows only the tail, which is otherwise
# the failing test's server log).
test: deps
	@set -o pipefail; $(GO) test -count=1 -timeout 15m ./... 2>&1 | tee test.out; rc=$$?; \
	if [ $$rc -ne 0 ]; then \
		echo "== failed tests (whole output in test.out):"; \
		grep -E -- '^\s*--- FAIL|^\s+[a-z_]+_test\.go:[0-9]+:|Error:|Messages:|^FAIL|panic:' test.out | head -60; \
	fi; exit $$rc

# test-long runs the long forms of the reliability tests (docs/reliability.md):
# 100 SIGKILLs, 10,000 idle MQTT connections, 20,000 idle sockets that never
# send CONNECT (bounded by the open-files limit), a store outage of 2 minutes,
# 10,000 malformed messages/s for a minute, a slow PromQL query (2.6e9 steps)
# against the default 2-minute query timeout.
LONG_ENV := CITYPULSE_TEST_KILLS=100 CITYPULSE_TEST_CONNS=10000 CITYPULSE_TEST_IDLE_SOCKETS=20000 CITYPULSE_TEST_OUTAGE=2m \
	LOADTEST_BAD_RATE=10000 LOADTEST_BAD_SECONDS=60 CITYPULSE_TEST_QUERY_TIMEOUT=2m
test-long: deps
	$(LONG_ENV) $(GO) test -count=1 -timeout 60m ./...

# test-cluster runs the cluster-mode tests (docs/cluster.md) verbosely, with
# their figures: TestClusterLosesNothingAcknowledged (3 NATS servers, 3
# CityPulse nodes, VictoriaMetrics; a node and the stream leader SIGKILLed;
# about a minute, also part of `make test`),
# TestClusterLosesNothingAcknowledgedWhenANodeNeverReturns (a node SIGKILLed
# for good with a 2 s remote-write flush; about 45 s, also part of `make
# test`), TestClusterQuorumLossIsNotAcknowledged
# (two of three NATS servers SIGKILLed: CoAP 5.03, /readyz 503, then back;
# about 40 s) and TestClusterThroughput (one machine vs 1 vs 3 cluster nodes,
# CITYPULSE_TEST_CLUSTER_SECONDS each, CITYPULSE_TEST_CLUSTER_DEVICES devices;
# about 2 minutes), TestClusterRebalancesWhenANodeJoinsAndWhenOneLeaves (a
# 3rd node joins 2 under load, then one stops: the rebalance times; about 45 s)
# and TestClusterFleetRuleJudgedCityWide (a district's fleet rule judged on
# every node's counts; the fleet lease holder SIGKILLed between firing and
# resolve; about a minute).
test-cluster: deps
	CITYPULSE_TEST_CLUSTER=1 $(GO) test -count=1 -v -timeout 20m -run '^TestCluster' ./cmd/citypulse/

# test-short skips the tests that start real servers.
test-short:
	$(GO) test -count=1 -short ./...

# bench runs the hot-path benchmarks (BenchmarkPipelineTSDB for 10 s: the
# sustained figure; rule evaluation and the rate window against the old window
# in the same run; one alert-state snapshot each) and prints a summary table;
# raw output in bench.out; then the end-to-end efficiency benchmark (bench-e2e).
bench:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2s ./pipeline/ ./ingest/... > bench.out
	$(GO) test -run '^$$' -bench 'BenchmarkRuleEvaluation|BenchmarkRate' -benchmem -benchtime 2s ./rules/ >> bench.out
	$(GO) test -run '^$$' -bench 'BenchmarkStateSnapshot' -benchmem -benchtime 1x ./rules/ >> bench.out
	$(GO) test -run '^$$' -bench 'BenchmarkTick' -benchmem -benchtime 50x ./rules/ >> bench.out
	$(GO) test -run '^$$' -bench 'BenchmarkTSDBWrite|BenchmarkActiveSeriesHeap' -benchmem -benchtime 2s ./storage/ >> bench.out
	$(GO) test -run '^$$' -bench 'BenchmarkPipelineTSDB' -benchmem -benchtime 10s ./storage/ >> bench.out
	@awk -f .ci/benchtable.awk bench.out
	@$(MAKE) --no-print-directory bench-e2e

# bench-e2e is the end-to-end efficiency benchmark (cmd/loadtest efficiency):
# E2E_MESSAGES QoS 1 messages of 4 readings from 16 devices, in external mode
# (mosquitto, VictoriaMetrics as the InfluxDB sink, embedded TSDB, default
# rules and vitals) and embedded mode; it prints readings per CPU-second of the
# citypulse process and the drain time after publishing ended, once every
# reading is verified in the stores. The previous release runs alternately in
# the same invocation and the ratio is printed: BASELINE_REF (default: the
# latest tag; none, no baseline) is built from `git archive` in a temporary
# directory as bin/citypulse-prev, or BASELINE names a binary. Output also in
# bench-e2e.out.
E2E_MESSAGES ?= 200000
E2E_ROUNDS   ?= 1
BASELINE_REF ?= $(shell git describe --tags --abbrev=0 2>/dev/null)
BASELINE     ?=
bench-e2e: deps build
	@set -o pipefail; base="$(BASELINE)"; \
	if [ -z "$$base" ] && [ -n "$(BASELINE_REF)" ]; then \
		tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		echo "building the baseline $(BASELINE_REF) as $(BIN)/citypulse-prev" && \
		git archive --format=tar "$(BASELINE_REF)" | tar -x -C "$$tmp" && \
		(cd "$$tmp" && $(GO) build -o "$(CURDIR)/$(BIN)/citypulse-prev" ./cmd/citypulse) || exit 1; \
		base=$(BIN)/citypulse-prev; \
	fi; \
	./$(BIN)/loadtest efficiency --citypulse $(BIN)/citypulse --messages $(E2E_MESSAGES) --rounds $(E2E_ROUNDS) \
		$${base:+--baseline $$base} 2>&1 | tee bench-e2e.out

# fuzz runs every fuzz target for FUZZTIME each.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
			echo "== $$pkg $$f"; \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMIN) $$pkg || exit 1; \
		done; \
	done

lint:
	@test -z "$$(gofmt -l .)" || (echo "gofmt needed:"; gofmt -l .; exit 1)
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

clean:
	rm -rf $(BIN)

# test-dr runs the disaster-recovery test (docs/disaster-recovery.md): a
# 3-server primary site and a 1-server standby site linked by a leaf node
# through a cuttable proxy; the link cut and restored under load, every
# primary server SIGKILLed, the standby promoted, loss and duplicates counted
# by device sequence, the primary salvaged and re-synced. About a minute per
# rate; DR_RATES are the write rates (readings/s), one run each. Then the
# same disaster through the server (cmd/citypulse/dr_test.go): 3 NATS servers
# and a CityPulse node per site, MQTT devices, the standby refusing them, an
# alert fired at the primary, the link cut, promoted with `citypulse standby
# promote --peer-down`, the alert resolved once from the standby, and the
# fail-back (about 2.5 minutes; CITYPULSE_TEST_DR_RATE / _DEVICES set the load);
# and the standby's operations (dr_ops_test.go: /readyz, mirrored silences,
# the RPO alert at a webhook, the dashboard's DR view in Chromium; ~20 s).
DR_RATES ?= 1000 5000
test-dr: deps
	@set -o pipefail; for r in $(DR_RATES); do \
		CITYPULSE_TEST_DR=1 CITYPULSE_TEST_DR_RATE=$$r $(GO) test -count=1 -timeout 10m -run 'TestDisasterPrimarySiteLostStandbyPromoted' -v ./cluster/ \
			| grep -E 'dr_test.go|^(--- |ok|FAIL|PASS)' || exit 1; \
	done
	@set -o pipefail; CITYPULSE_TEST_DR=1 $(GO) test -count=1 -timeout 10m -run 'TestStandbySiteTakesOverAfterThePrimarySiteIsLost|TestAStandbySiteIsNotReadyMirrorsSilencesAndAlertsOnReplicationLag' -v ./cmd/citypulse/ \
		| grep -E 'dr_(ops_)?test.go|^(--- |ok|FAIL|PASS)'

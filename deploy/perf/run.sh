#!/bin/sh
# Runs the benchmarks of issue 27 from a prebuilt test binary, on a machine
# without Go: the broker and the bare grpc-go floor each in a process of
# their own, pinned to one core, the load on other cores; then the memory per
# credential (10,000 credentials), /metrics, and ten reloads.
#
# Build (where Go is):   CGO_ENABLED=0 go test -c -o bin/server.test ./broker/server
# Run (repository root): deploy/perf/run.sh [bin/server.test]
#
# SERVER_CPU   the core the server under test runs on        (default 2)
# LOAD_CPUS    the cores of the load generator                (default 3-14)
# CALLS        calls of each kind per round, three rounds     (default 100000)
# CONNS        client connections the load is spread over     (default 1, as ghz)
# GHZ          path to a ghz binary: also run BenchmarkGhz    (default: skip)
# OUT          where the reports go                           (default perf-results)
set -eu
BIN=$(realpath "${1:-bin/server.test}")
SERVER_CPU=${SERVER_CPU:-2}
LOAD_CPUS=${LOAD_CPUS:-3-14}
CALLS=${CALLS:-100000}
OUT=$(realpath -m "${OUT:-perf-results}")
mkdir -p "$OUT"
export TOKENBROKER_PERF_SERVER_CPU="$SERVER_CPU" TOKENBROKER_PERF_CONNS="${CONNS:-1}"

cd "$(dirname "$0")/../../broker/server" # ghz reads the .proto files from here
taskset -c "$LOAD_CPUS" "$BIN" -test.run '^$' -test.bench '^BenchmarkBareFloor$' \
	-test.benchtime "${CALLS}x" -test.v 2>&1 | tee "$OUT/bare-floor.txt"
taskset -c "$LOAD_CPUS" "$BIN" -test.run '^$' -test.bench '^BenchmarkCredentialMemory$' \
	-test.benchtime 1x -test.v 2>&1 | tee "$OUT/memory.txt"
if [ -n "${GHZ:-}" ]; then
	TOKENBROKER_GHZ=$(realpath "$GHZ") taskset -c "$LOAD_CPUS" "$BIN" -test.run '^$' \
		-test.bench '^BenchmarkGhz$' -test.benchtime 1x -test.v 2>&1 | tee "$OUT/ghz.txt"
fi
echo "reports in $OUT"

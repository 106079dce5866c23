#!/usr/bin/env bash
# acks=all produce latency against offered load on a local three-node
# cluster (runnel dev, RF 3, min.insync.replicas=2, 1 KiB records): one
# unmeasured warm-up run, then each rate for SECONDS seconds, printing
# p50/p95/p99/max. Where the half-load goal of issue #5 sits depends on
# where the disk's write-back knee is; this shows the curve.
#
#   bash benches/latency.sh                      # rates 40000 80000 120000 160000
#   RATES="100000 150000" SECONDS_PER_RATE=5 bash benches/latency.sh
#
# Needs only cargo and python3. Uses 127.0.0.1 ports 39092-39094 (and the
# dev cluster's metrics ports) and a temporary directory it removes.
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-40000 80000 120000 160000}
SECONDS_PER_RATE=${SECONDS_PER_RATE:-3}
# shellcheck source=benches/lib.sh
source benches/lib.sh

"$R" dev --data-dir "$WORK/dev" --base-port 39092 >"$WORK/dev.out" 2>"$WORK/dev.err" &
PIDS+=($!)
wait_for "$WORK/dev.out" "bootstrap:"
D=127.0.0.1:39092,127.0.0.1:39093,127.0.0.1:39094
"$R" --bootstrap $D topic create lat --partitions 3 --replication-factor 3 --config min.insync.replicas=2 >/dev/null

produce() { # rate
    "$R" --bootstrap $D --output json perf produce --topic lat --records $(($1 * SECONDS_PER_RATE)) \
        --record-size 1024 --acks all --rate "$1"
}
# The first run on a fresh topic includes the followers' first fetches and
# the producer's setup: its p99 reaches about 130 ms whatever the rate.
produce 20000 >/dev/null

printf '%10s %12s %8s %8s %8s %8s\n' rate records/s p50_ms p95_ms p99_ms max_ms
for rate in $RATES; do
    sync # start without the previous rate's dirty pages
    produce "$rate" | python3 -c "
import json, sys
d = json.load(sys.stdin); l = d['latency']
print(f\"{$rate:10d} {d['records_per_sec']:12.0f} {l['p50_ms']:8.1f} {l['p95_ms']:8.1f} {l['p99_ms']:8.1f} {l['max_ms']:8.1f}\")"
done

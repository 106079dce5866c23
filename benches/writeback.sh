#!/usr/bin/env bash
# The three-node acks=all tail over consecutive runs on one cluster, for
# each `[broker] writeback_interval_ms` in INTERVALS, the settings
# alternated cluster by cluster (benches/RESULTS.md, session 5, rows 18-19).
# Each cluster: runnel dev, a 3-partition RF 3 topic with
# min.insync.replicas=2, a 200,000-record warm-up, then RUNS runs of
# RATE x 1 KiB records/s for 3 s each, with no `sync` in between: the
# dirty pages of one run are still there in the next, as on a broker
# that keeps going.
#
#   bash benches/writeback.sh                       # INTERVALS="0 100", 2 rounds
#   INTERVALS="0 200 100" ROUNDS=1 RATE=200000 bash benches/writeback.sh
#
# Needs only cargo and python3. Uses 127.0.0.1 ports 39092-39094 (and the
# dev cluster's metrics ports) and a temporary directory it removes.
set -euo pipefail
cd "$(dirname "$0")/.."

INTERVALS=${INTERVALS:-0 100}
ROUNDS=${ROUNDS:-2}
RUNS=${RUNS:-3}
RATE=${RATE:-150000}
# shellcheck source=benches/lib.sh
source benches/lib.sh
D=127.0.0.1:39092,127.0.0.1:39093,127.0.0.1:39094

printf '%9s %5s %4s %8s %8s %8s\n' interval round run p50_ms p99_ms max_ms
for round in $(seq "$ROUNDS"); do
    for interval in $INTERVALS; do
        rm -rf "$WORK/dev"
        # (`runnel dev` ignores RUNNEL_… variables: each node's config is
        # generated. An exported override measured the default twice.)
        "$R" dev --data-dir "$WORK/dev" --base-port 39092 \
            --set "broker.writeback_interval_ms=$interval" >"$WORK/dev.out" 2>"$WORK/dev.err" &
        PIDS=($!)
        wait_for "$WORK/dev.out" "bootstrap:"
        "$R" --bootstrap $D topic create wb --partitions 3 --replication-factor 3 --config min.insync.replicas=2 >/dev/null
        "$R" --bootstrap $D --output json perf produce --topic wb --records 200000 --record-size 1024 --acks all >/dev/null
        for run in $(seq "$RUNS"); do
            "$R" --bootstrap $D --output json perf produce --topic wb --records $((RATE * 3)) \
                --record-size 1024 --acks all --rate "$RATE" | python3 -c "
import json, sys
l = json.load(sys.stdin)['latency']
print(f\"{'$interval':>9} {'$round':>5} {'$run':>4} {l['p50_ms']:8.1f} {l['p99_ms']:8.1f} {l['max_ms']:8.1f}\")"
        done
        kill -TERM "${PIDS[0]}"
        wait "${PIDS[0]}" || true
        PIDS=()
    done
done

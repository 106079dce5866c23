#!/usr/bin/env bash
# Alternates release builds on one workload, a few rounds, so that two
# builds are compared under the same conditions on this noisy machine
# (benches/RESULTS.md, session 10). Prints one line per run.
#
#   bash benches/ab.sh consume OLD NEW   # one broker (OLD): produce once, consume with each client build
#   bash benches/ab.sh broker OLD NEW    # a fresh broker of each build: produce, consume twice
#   bash benches/ab.sh group OLD NEW     # one broker (OLD), 4 partitions: perf consume --group with each
#   bash benches/ab.sh e2e OLD NEW       # a fresh broker of each build: perf e2e at RATE records/s
#   bash benches/ab.sh three OLD NEW     # a fresh 3-node `runnel dev` of each build: RF 3, acks=all
#   bash benches/ab.sh rss OLD NEW       # a fresh broker of each build, 1,000 partitions: its peak
#                                        # resident memory after produce and after perf consume
#
# OLD and NEW are runnel binaries (copy each build aside first). ROUNDS
# (default 3), RECORDS (1,000,000 x 1 KiB), RATE (450,000). Uses
# 127.0.0.1:29092 (one broker runtime worker, as in scenarios.sh) and, for
# `three`, 39092-39094 (3 partitions, min.insync.replicas=2, a 200,000-record
# warm-up, as in scenarios.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: ab.sh consume|broker|group|e2e|three|rss BIN...}
shift
[ $# -ge 1 ] || { echo "give at least one runnel binary" >&2; exit 2; }
ROUNDS=${ROUNDS:-3}
RECORDS=${RECORDS:-1000000}
RATE=${RATE:-450000}
BENCH_BIN=$1
# shellcheck source=benches/lib.sh
source benches/lib.sh
S=127.0.0.1:29092
N=0

start() { # binary: a fresh single-worker broker in $WORK/N
    N=$((N + 1))
    RUNNEL_WORKER_THREADS=1 "$1" server --node-id 1 --listen $S --data-dir "$WORK/$N" >"$WORK/$N.out" 2>"$WORK/$N.err" &
    PIDS+=($!)
    wait_for "$WORK/$N.out" "runnel listening"
}
stop() {
    kill -TERM "${PIDS[-1]}"
    wait "${PIDS[-1]}" || true
    unset 'PIDS[-1]'
    rm -rf "$WORK/$N"
}
field() { # json field to print
    python3 -c "import json,sys; d=json.load(sys.stdin); l=d.get('latency') or {}; print(round(d['$1']) if '$1' in d else l.get('$1'))"
}
produce() { # binary topic
    "$1" --bootstrap $S --output json perf produce --topic "$2" --records "$RECORDS" --record-size 1024 --acks leader | field mb_per_sec
}
consume() { # binary topic [args]
    local b=$1 t=$2
    shift 2
    "$b" --bootstrap $S --output json perf consume --topic "$t" --records "$RECORDS" "$@" | field mb_per_sec
}

case $MODE in
consume | group)
    start "$1"
    if [ "$MODE" = group ]; then
        "$1" --bootstrap $S topic create t --partitions 4 >/dev/null
    fi
    echo "produce $(produce "$1" t) MB/s"
    for r in $(seq 1 "$ROUNDS"); do
        for b in "$@"; do
            extra=()
            [ "$MODE" = group ] && extra=(--group "g-$r-$(basename "$b")")
            echo "$(basename "$b") consume $(consume "$b" t "${extra[@]}") MB/s"
        done
    done
    ;;
broker)
    for _ in $(seq 1 "$ROUNDS"); do
        for b in "$@"; do
            start "$b"
            p=$(produce "$b" t)
            echo "$(basename "$b") produce $p MB/s, consume $(consume "$b" t) $(consume "$b" t) MB/s"
            stop
        done
    done
    ;;
e2e)
    for _ in $(seq 1 "$ROUNDS"); do
        for b in "$@"; do
            start "$b"
            "$b" --bootstrap $S --output json perf produce --topic w --records 200000 --record-size 1024 --acks leader >/dev/null
            "$b" --bootstrap $S topic delete w >/dev/null
            sync
            "$b" --bootstrap $S --output json perf e2e --topic e --records $((RATE * 3)) --record-size 1024 --acks leader --rate "$RATE" >"$WORK/e2e.json"
            echo "$(basename "$b") e2e p50 $(field p50_ms <"$WORK/e2e.json") ms, p99 $(field p99_ms <"$WORK/e2e.json") ms, max $(field max_ms <"$WORK/e2e.json") ms"
            stop
        done
    done
    ;;
three)
    D=127.0.0.1:39092,127.0.0.1:39093,127.0.0.1:39094
    for _ in $(seq 1 "$ROUNDS"); do
        for b in "$@"; do
            N=$((N + 1))
            "$b" dev --data-dir "$WORK/$N" --base-port 39092 >"$WORK/$N.out" 2>"$WORK/$N.err" &
            PIDS+=($!)
            wait_for "$WORK/$N.out" "bootstrap:"
            "$b" --bootstrap $D topic create r3 --partitions 3 --replication-factor 3 --config min.insync.replicas=2 >/dev/null
            "$b" --bootstrap $D --output json perf produce --topic r3 --records 200000 --record-size 1024 --acks all >/dev/null
            sync
            "$b" --bootstrap $D --output json perf produce --topic r3 --records "$RECORDS" --record-size 1024 --acks all >"$WORK/r.json"
            echo "$(basename "$b") 3 nodes acks=all $(field mb_per_sec <"$WORK/r.json") MB/s, p50 $(field p50_ms <"$WORK/r.json") ms, p99 $(field p99_ms <"$WORK/r.json") ms"
            stop
        done
    done
    ;;
rss)
    for _ in $(seq 1 "$ROUNDS"); do
        for b in "$@"; do
            start "$b"
            "$b" --bootstrap $S topic create k --partitions 1000 >/dev/null
            produce "$b" k >/dev/null
            hwm() { awk '/VmHWM/ {print int($2 / 1024)}' "/proc/${PIDS[-1]}/status"; }
            after=$(hwm)
            c=$(consume "$b" k)
            echo "$(basename "$b") 1,000 partitions: peak RSS $after MiB after produce, $(hwm) MiB after consume ($c MB/s)"
            stop
        done
    done
    ;;
*)
    echo "unknown mode $MODE (consume, broker, group, e2e, three, rss)" >&2
    exit 2
    ;;
esac

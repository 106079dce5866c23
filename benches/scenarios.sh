#!/usr/bin/env bash
# The fixed performance scenario set: a single local node and a local
# three-node cluster (runnel dev), with the same run's physical baselines
# (plain sequential file write, single-stream loopback TCP), printed as one
# table with each figure's ratio to its baseline.
#
#   bash benches/scenarios.sh            # about 3 minutes after the build
#   RECORDS=300000 bash benches/scenarios.sh
#
# Each cluster first gets one unmeasured warm-up run (its own topic): a
# fresh broker's first gigabyte pays for growing its heap and its first
# segment files, and a fresh cluster's first acks=all batches wait for the
# followers' first fetches.
#
# Finished topics are deleted, and the single node's data (about 5 GB)
# before the three-node phase. On the development VM (ext4 mounted with
# `discard`, free page reporting) that deletion stalls the next phase's
# half-load run: p99 144-285 ms against 3.5-12.3 ms for the same phase
# without it (benches/RESULTS.md, session 6). Keeping the data instead
# halved the three-node flat-out rate there, so the script deletes.
#
# STEADY_PAGE_CACHE=1 runs every phase on a page cache that is already
# full, as on a host that has been running a while: a file as large as
# the machine's memory is preallocated (fallocate, nothing written) in the
# temporary directory and read once before the baselines and again before
# the three-node phase, so that new page-cache pages come from reclaiming
# its clean pages. On the development VM free memory is handed back to the
# host (virtio free page reporting) and each page's first reuse faults on
# the host: with mostly free memory the three-node half-load phase
# collapses (benches/RESULTS.md, sessions 13 and 14). Needs free disk space
# the size of memory; the file is removed with the directory.
#
# Needs only cargo and python3. Uses 127.0.0.1 ports 29092 and 39092-39094
# and a temporary directory it removes afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

RECORDS=${RECORDS:-1000000}
SMALL_RECORDS=${SMALL_RECORDS:-2000000}
# shellcheck source=benches/lib.sh
source benches/lib.sh

J=$WORK/results.jsonl
fill_page_cache() {
    [ "${STEADY_PAGE_CACHE:-0}" = 1 ] || return 0
    local fill=$WORK/page-cache-fill
    if [ ! -e "$fill" ]; then
        fallocate -l "$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 1024))" "$fill"
    fi
    cat "$fill" >/dev/null
}
fill_page_cache
"$R" --output json perf baseline --dir "$WORK" --bytes 1073741824 >>"$J"

# Single node.
# The single node gets one runtime worker thread: the client takes the
# other core of this 2-core machine, and a second broker worker only added
# cross-thread wake-ups (benches/RESULTS.md, session 5). SINGLE_WORKERS=0
# gives it one per core.
RUNNEL_WORKER_THREADS=${SINGLE_WORKERS:-1} \
    "$R" server --node-id 1 --listen 127.0.0.1:29092 --data-dir "$WORK/single" >"$WORK/single.out" 2>"$WORK/single.err" &
PIDS+=($!)
wait_for "$WORK/single.out" "runnel listening"
S=127.0.0.1:29092
warm_up() { # bootstrap, topic, extra perf produce args...
    local bootstrap=$1 topic=$2
    shift 2
    "$R" --bootstrap "$bootstrap" --output json perf produce --topic "$topic" --records 200000 --record-size 1024 "$@" >/dev/null
}
run() { # label, runnel args...
    local label=$1
    shift
    # Each scenario starts with no dirty pages left by the one before (the
    # 1 GiB baseline write, earlier runs): otherwise it pays for their
    # writeback, and how much depends on the order of the table.
    sync
    "$R" --output json "$@" | python3 -c "import json,sys; d=json.load(sys.stdin); d['test']='$label'; print(json.dumps(d))" >>"$J"
}
# A topic whose scenarios are done is deleted, so that no scenario pays
# for the page cache of the ones before it: on this VM a page the guest
# has not used lately costs about 7x more to write than a recycled one
# (benches/RESULTS.md, "This VM's page cache"), and the table's figures
# would otherwise depend on their order.
drop() { # bootstrap, topic
    "$R" --bootstrap "$1" topic delete "$2" >/dev/null
    # The broker removes a deleted partition's files on a background thread
    # (benches/RESULTS.md, row 47); the next scenario starts once they are
    # gone, so that it does not share the disk with their removal.
    for _ in $(seq 1 600); do
        compgen -G "$WORK/single/*.deleted" >/dev/null || return 0
        sleep 0.05
    done
}
warm_up $S warm-up --acks leader
drop $S warm-up
run "1 node, acks=leader, 1 KiB" --bootstrap $S perf produce --topic p1k --records "$RECORDS" --record-size 1024 --acks leader
run "1 node, consume 1 KiB" --bootstrap $S perf consume --topic p1k --records "$RECORDS"
drop $S p1k
# A partition's appends run in order on one task; four partitions let the
# broker use both cores (Kafka's single-producer figures used six).
run "1 node, acks=leader, 1 KiB, 4 part." --bootstrap $S perf produce --topic p1k4 --partitions 4 --records "$RECORDS" --record-size 1024 --acks leader
drop $S p1k4
run "1 node, acks=leader, 100 B" --bootstrap $S perf produce --topic p100 --records "$SMALL_RECORDS" --record-size 100 --acks leader
drop $S p100
# End-to-end latency (record timestamp to receipt) at half the 1 KiB rate,
# measured over 2 s after a 1 s warm-up at the same rate, as the
# OpenMessaging Benchmark measures after its warm-up phase: in a fresh
# client's first 100 - 600 ms the produce round trip is about 3x the
# steady one, and the backlog built then drains slowly at half load
# (benches/RESULTS.md, session 13). The table prints the warm-up's largest
# latency too. 3 s in all, the volume the phase always wrote: on this VM
# a longer run at this rate can outrun the pool of recently freed pages
# and meet the host's fresh-page cost (the same RESULTS section).
HALF1=$(python3 -c "
import json
rows=[json.loads(l) for l in open('$J')]
print(int([r for r in rows if r['test']=='1 node, acks=leader, 1 KiB'][-1]['records_per_sec']/2))")
run "1 node, e2e, half load" --bootstrap $S perf e2e --topic e2e --records $((HALF1 * 2)) --warm-up-records "$HALF1" \
    --record-size 1024 --acks leader --rate "$HALF1" --timeline-ms 100
kill -TERM "${PIDS[0]}"
wait "${PIDS[0]}" || true
PIDS=()
# The three-node phase starts from a clean slate too: the single node's
# gigabytes are not needed any more, and their page cache would otherwise
# be what the next phase's writes have to reclaim.
rm -rf "$WORK/single"
fill_page_cache

# Three nodes, replication factor 3.
"$R" dev --data-dir "$WORK/dev" --base-port 39092 >"$WORK/dev.out" 2>"$WORK/dev.err" &
PIDS+=($!)
wait_for "$WORK/dev.out" "bootstrap:"
D=127.0.0.1:39092,127.0.0.1:39093,127.0.0.1:39094
"$R" --bootstrap $D topic create r3 --partitions 3 --replication-factor 3 --config min.insync.replicas=2 >/dev/null
warm_up $D r3 --acks all
run "3 nodes, RF 3, acks=all, 1 KiB" --bootstrap $D perf produce --topic r3 --records "$RECORDS" --record-size 1024 --acks all
HALF=$(python3 -c "
import json
rows=[json.loads(l) for l in open('$J')]
print(int([r for r in rows if r['test'].startswith('3 nodes')][-1]['records_per_sec']/2))")
# Measured the same way: 2 s after a 1 s warm-up.
run "3 nodes, acks=all, half load" --bootstrap $D perf produce --topic r3 --records $((HALF * 2)) --warm-up-records "$HALF" \
    --record-size 1024 --acks all --rate "$HALF" --timeline-ms 100

python3 - "$J" "${STEADY_PAGE_CACHE:-0}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {r["test"]: r for r in rows}
disk, tcp = by["disk-write"]["mb_per_sec"], by["loopback-tcp"]["mb_per_sec"]
single = by["1 node, acks=leader, 1 KiB"]["mb_per_sec"]
if sys.argv[2] == "1":
    print("page cache kept full (STEADY_PAGE_CACHE=1)")
print(f"{'scenario':36} {'MB/s':>9} {'records/s':>11} {'p50 ms':>8} {'p99 ms':>8}  ratio")
for r in rows:
    lat = r.get("latency") or {}
    t = r["test"]
    if t in ("disk-write", "disk-fdatasync-64k", "loopback-tcp"):
        ratio = "baseline"
    elif t.startswith("3 nodes"):
        ratio = f"{r['mb_per_sec'] / single:.3f} of 1-node acks=leader"
    elif "e2e" in t:
        ratio = "end-to-end latency"
    elif "consume" in t:
        ratio = f"{r['mb_per_sec'] / single:.2f} of 1-node produce"
    else:
        ratio = f"{r['mb_per_sec'] / tcp:.3f} of loopback TCP, {r['mb_per_sec'] / disk:.2f} of disk write"
    p50 = f"{lat['p50_ms']:.1f}" if lat else "-"
    p99 = f"{lat['p99_ms']:.1f}" if lat else "-"
    print(f"{t:36} {r['mb_per_sec']:9.1f} {r['records_per_sec']:11.0f} {p50:>8} {p99:>8}  {ratio}")
    tl = r.get("timeline") or []
    # perf e2e's windows have end-to-end latencies, perf produce's only
    # acknowledgement latencies.
    warm = [w.get("max_ms", w["ack_max_ms"]) for w in tl if w["start_ms"] < tl[0]["start_ms"] + 1000]
    if warm:
        print(f"{'  its 1 s warm-up':36} {'-':>9} {'-':>11} {'-':>8} {'-':>8}  largest latency {max(warm):.1f} ms, not counted")
        rest = sorted((w.get("max_ms", w["ack_max_ms"]) for w in tl if w["start_ms"] >= tl[0]["start_ms"] + 1000), reverse=True)
        worst = ", ".join(f"{ms:.1f}" for ms in rest[:3])
        print(f"{'  its measured 100 ms windows':36} {'-':>9} {'-':>11} {'-':>8} {'-':>8}  largest latencies {worst} ms")
PY

#!/usr/bin/env bash
# Instruction counts (valgrind callgrind) of one side of a fixed single-node
# workload: produce 1 KiB records, consume them, produce 100-byte records.
# Unlike wall-clock figures on this shared 2-core machine, instruction
# counts repeat to within a few per cent, so they show what a change saves.
#
#   bash benches/callgrind.sh [server|client] [BINARY]
#   N1=50000 N2=200000 bash benches/callgrind.sh server target/release/runnel
#
# Prints each phase's instructions (Ir) in total, per record and per byte;
# the callgrind files stay in $OUT (default /tmp/runnel-callgrind) for
# callgrind_annotate. Counts cover user space only (not the kernel's copy
# and scheduling work). Uses 127.0.0.1:29292.
set -euo pipefail
cd "$(dirname "$0")/.."
WHO=${1:-server}
BIN=${2:-${CARGO_TARGET_DIR:-target}/release/runnel}
N1=${N1:-50000}
N2=${N2:-200000}
OUT=${OUT:-/tmp/runnel-callgrind}
PORT=29292
mkdir -p "$OUT"
WORK=$(mktemp -d)
VG=(valgrind --tool=callgrind --read-inline-info=yes "--callgrind-out-file=$OUT/$WHO.%p.out")
if [ "$WHO" = server ]; then
    "${VG[@]}" "$BIN" server --node-id 1 --listen 127.0.0.1:$PORT --data-dir "$WORK/s" >"$WORK/out" 2>"$WORK/err" &
    CLIENT=("$BIN")
else
    "$BIN" server --node-id 1 --listen 127.0.0.1:$PORT --data-dir "$WORK/s" >"$WORK/out" 2>"$WORK/err" &
    CLIENT=("${VG[@]}" "$BIN")
fi
SP=$!
trap 'kill -TERM $SP 2>/dev/null || true; wait $SP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 300); do grep -q "runnel listening" "$WORK/out" 2>/dev/null && break; sleep 0.2; done
S=127.0.0.1:$PORT
"$BIN" --bootstrap $S topic create p1k --partitions 1 >/dev/null
"$BIN" --bootstrap $S topic create p100 --partitions 1 >/dev/null
phase() { # name records bytes-per-record runnel-args...
    local name=$1 records=$2 size=$3
    shift 3
    rm -f "$OUT"/client.[0-9]*.out
    [ "$WHO" = server ] && callgrind_control -z $SP >/dev/null
    "${CLIENT[@]}" --bootstrap $S --output json "$@" >"$WORK/$name.json" 2>>"$WORK/client.err"
    local file
    if [ "$WHO" = server ]; then
        callgrind_control -d "$name" $SP >/dev/null
        sleep 1
        file=$(grep -l "Trigger: dump $name" "$OUT"/server.$SP.out.* | tail -1)
    else
        file=$(ls "$OUT"/client.[0-9]*.out | tail -1)
        mv "$file" "$OUT/client.$name.out"
        file=$OUT/client.$name.out
    fi
    local ir
    ir=$(grep -m1 '^summary:' "$file" | awk '{print $2}')
    python3 -c "
ir, n, size = $ir, $records, $size
print(f'$WHO $name: {ir/1e6:9.1f} M instructions, {ir/n:8.0f} per record, {ir/(n*size):6.2f} per byte')"
}
phase produce1k "$N1" 1024 perf produce --topic p1k --records "$N1" --record-size 1024 --acks leader
phase consume1k "$N1" 1024 perf consume --topic p1k --records "$N1"
phase produce100 "$N2" 100 perf produce --topic p100 --records "$N2" --record-size 100 --acks leader

#!/usr/bin/env bash
# Controller figures on a local three-node cluster (each node broker and
# Raft voter, default timeouts: broker_session_timeout_ms = 9000):
#   - creating one topic with 1000 partitions in one request,
#   - metadata commands per second through the quorum (topic config
#     changes, one Raft entry each, 64 in flight),
#   - time from a broker's death (kill -9) to every partition it led
#     having a new leader, against the session timeout.
#
#   bash benches/controller.sh
#
# Needs only cargo and python3. Uses 127.0.0.1 ports 49092-49094 and a
# temporary directory it removes afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

PARTITIONS=${PARTITIONS:-1000}
META_PARTITIONS=${META_PARTITIONS:-$PARTITIONS}
COMMANDS=${COMMANDS:-5000}
cargo build --release --quiet --bin runnel
R=${CARGO_TARGET_DIR:-target}/release/runnel
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() { # file pattern
    for _ in $(seq 1 240); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.5; done
    echo "timed out waiting for '$2' in $1" >&2
    return 1
}

VOTERS='"1@127.0.0.1:49092", "2@127.0.0.1:49093", "3@127.0.0.1:49094"'
for id in 1 2 3; do
    cat >"$WORK/node-$id.toml" <<EOF
node_id = $id
listen = "127.0.0.1:$((49091 + id))"
data_dir = "$WORK/node-$id"
roles = ["broker", "controller"]
[controller]
voters = [$VOTERS]
EOF
    "$R" server --config "$WORK/node-$id.toml" >"$WORK/node-$id.out" 2>"$WORK/node-$id.err" &
    PIDS+=($!)
done
for id in 1 2 3; do wait_for "$WORK/node-$id.out" "runnel listening"; done
B=127.0.0.1:49092,127.0.0.1:49093,127.0.0.1:49094

echo "== metadata throughput (runnel perf metadata)"
"$R" --bootstrap $B perf metadata --partitions "$PARTITIONS" --replication-factor 3 --commands "$COMMANDS"

echo "== failover: broker death to new leaders"
"$R" --bootstrap $B topic create fo --partitions 30 --replication-factor 3 >/dev/null
describe() { "$R" --bootstrap $B --output json partition describe fo; }
# Every partition fully in sync first.
for _ in $(seq 1 200); do
    describe | python3 -c "
import json,sys; d=json.load(sys.stdin)
sys.exit(0 if all(len(p['isr'])==3 for p in d['partitions']) else 1)" && break
    sleep 0.1
done
VICTIM=$(describe | python3 -c "
import json,sys; d=json.load(sys.stdin); print(d['partitions'][0]['leader'])")
LED=$(describe | python3 -c "
import json,sys; d=json.load(sys.stdin); print(sum(p['leader']==$VICTIM for p in d['partitions']))")
kill -KILL "${PIDS[$((VICTIM - 1))]}"
KILLED=$(date +%s.%N)
B2=$(echo "$B" | tr ',' '\n' | grep -v ":$((49091 + VICTIM))$" | paste -sd,)
while true; do
    if "$R" --bootstrap "$B2" --output json partition describe fo 2>/dev/null | python3 -c "
import json,sys; d=json.load(sys.stdin)
sys.exit(0 if all(p['leader'] not in ($VICTIM, -1) for p in d['partitions']) else 1)"; then
        break
    fi
    sleep 0.05
done
DONE=$(date +%s.%N)
python3 -c "
t = $DONE - $KILLED
print(f'broker {$VICTIM} led {$LED} of 30 partitions; all had new leaders {t:.2f} s after kill -9'
      f' (session timeout 9.00 s; goal <= 10.00 s; excess over the timeout {t - 9:.2f} s)')"

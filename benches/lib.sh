# Shared by the benchmark scripts (source it from the repository root):
# builds the release binary into $R (or uses BENCH_BIN, e.g. an older
# build to compare against, without building; not RUNNEL_BIN, since the
# server reads every RUNNEL_* variable as a config key), makes a temporary
# $WORK under BENCH_DIR (default target/bench), and on exit
# stops every process in $PIDS (with $STOP_SIGNAL, default TERM) and
# removes $WORK. wait_for FILE PATTERN [PID] waits up to 2 minutes for
# PATTERN, and gives up as soon as PID (default: the last of $PIDS) has
# exited; either way it shows the end of FILE's .err sibling, which the
# exit trap then deletes with $WORK.
if [ -n "${BENCH_BIN:-}" ]; then
    R=$BENCH_BIN
else
    cargo build --release --quiet --bin runnel
    R=${CARGO_TARGET_DIR:-target}/release/runnel
fi
# On the disk under test, not in /tmp, which many systems mount as tmpfs
# (memory: the disk baselines would measure RAM, and gigabytes of topics
# would not fit). BENCH_DIR picks another place.
BENCH_DIR=${BENCH_DIR:-$PWD/target/bench}
mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d -p "$BENCH_DIR")
if [ "$(stat -f -c %T "$WORK")" = tmpfs ]; then
    echo "warning: $WORK is on tmpfs: disk figures measure memory (set BENCH_DIR)" >&2
fi
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -"${STOP_SIGNAL:-TERM}" "$p" 2>/dev/null || true; done
    # Only the processes started here: a bare wait also waited for
    # anything else still running (a tracer nobody signalled) for good.
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() { # file pattern [pid]
    local pid=${3:-${PIDS[-1]:-}} why="timed out waiting for '$2' in $1"
    for _ in $(seq 1 240); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            why="process $pid exited before '$2' appeared in $1"
            break
        fi
        sleep 0.5
    done
    echo "$why; the end of ${1%.out}.err:" >&2
    tail -n 30 "${1%.out}.err" >&2 2>/dev/null || true
    return 1
}

# Shared by the benchmark scripts (source it from the repository root):
# builds the release binary into $R (or uses BENCH_BIN, e.g. an older
# build to compare against, without building; not RUNNEL_BIN, since the
# server reads every RUNNEL_* variable as a config key), makes a temporary $WORK, and on exit
# stops every process in $PIDS (with $STOP_SIGNAL, default TERM) and
# removes $WORK. wait_for FILE PATTERN waits up to 2 minutes for PATTERN.
if [ -n "${BENCH_BIN:-}" ]; then
    R=$BENCH_BIN
else
    cargo build --release --quiet --bin runnel
    R=${CARGO_TARGET_DIR:-target}/release/runnel
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -"${STOP_SIGNAL:-TERM}" "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() { # file pattern
    for _ in $(seq 1 240); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.5; done
    echo "timed out waiting for '$2' in $1" >&2
    return 1
}

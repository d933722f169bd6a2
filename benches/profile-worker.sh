#!/usr/bin/env bash
# Profiles the worker's CPU per job: the release binary drains N pre-published
# jobs against the simulator at 0 ms, concurrency 64, and the script prints the
# worker's CPU time (user + system, from /proc) divided by the jobs. With
# PROFILE=perf it records the drain with `perf record` and prints the top
# symbols; with PROFILE=callgrind it runs the worker under valgrind's callgrind
# (instruction counts, repeatable on a noisy machine; ~50x slower, so use a few
# thousand jobs).
#
#   benches/profile-worker.sh                 # 30,000 jobs, CPU µs/job
#   JOBS=20000 PROFILE=perf benches/profile-worker.sh
#   JOBS=3000 PROFILE=callgrind benches/profile-worker.sh
#   REDIS=redis://127.0.0.1:6379 benches/profile-worker.sh   # with the send ledger
#   PROFILE=perf PERF_TARGET=simulator benches/profile-worker.sh  # the simulator's side (perf or callgrind)
#
# Needs RabbitMQ (MMSEND_AMQP_URL, default the local one); output goes to
# profile/ in cargo's target directory (target/, or CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-30000}
CONCURRENCY=${CONCURRENCY:-64}
PROFILE=${PROFILE:-none}
TARGET=${CARGO_TARGET_DIR:-target}
OUT=$TARGET/profile
mkdir -p "$OUT"
# MMSEND_BIN=<path>: profile another build (e.g. a copy of an earlier one)
if [ -z "${MMSEND_BIN:-}" ]; then cargo build --release --quiet; fi
BIN=${MMSEND_BIN:-$TARGET/release/mmsend}
PREFIX="mmsend-prof-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
SIM_PORT=$((20000 + RANDOM % 20000))
METRICS_PORT=$((SIM_PORT + 1))
export MMSEND_PREFIX="$PREFIX" MMSEND_LOG=${MMSEND_LOG:-warn}
export MMSEND_GRAPH_BASE_URL="http://127.0.0.1:$SIM_PORT" MMSEND_ACCESS_TOKEN=profile-token
export MMSEND_METRICS_ADDR="127.0.0.1:$METRICS_PORT" MMSEND_CONCURRENCY="$CONCURRENCY"
cat >"$OUT/mmsend.toml" <<'EOF'
[pacing]
per_page = 0
EOF
export MMSEND_CONFIG="$OUT/mmsend.toml"
if [ -n "${REDIS:-}" ]; then export MMSEND_REDIS_URL="$REDIS"; fi

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    # the bench topology's queues (rabbitmqctl, when this user may run it)
    "$BIN" topology show --json 2>/dev/null | python3 -c 'import json,sys; [print(q["name"]) for q in json.load(sys.stdin)["queues"]]' 2>/dev/null |
        while read -r q; do rabbitmqctl delete_queue "$q" </dev/null >/dev/null 2>&1 || true; done
    # the send ledger's keys of this run
    if [ -n "${REDIS:-}" ] && command -v redis-cli >/dev/null; then
        redis-cli -u "$REDIS" --scan --pattern "{$PREFIX}*" | xargs -r redis-cli -u "$REDIS" del >/dev/null || true
    fi
}
trap cleanup EXIT

# SIM_BIN=<path>: the simulator of another build (to compare simulators);
# PERF_TARGET=simulator with PROFILE=callgrind counts the simulator's
# instructions instead of the worker's
TARGET=${PERF_TARGET:-worker}
sim=("${SIM_BIN:-$BIN}" simulate --listen "127.0.0.1:$SIM_PORT")
if [ "$PROFILE" = callgrind ] && [ "$TARGET" = simulator ]; then
    valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" "${sim[@]}" >/dev/null 2>"$OUT/valgrind.log" &
    simpid=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$SIM_PORT/_sim/stats" >/dev/null && break; sleep 0.2; done
else
    "${sim[@]}" >/dev/null 2>&1 &
    simpid=$!
fi
pids+=($simpid)
python3 - "$JOBS" >"$OUT/jobs.jsonl" <<'EOF'
import json, sys
for i in range(int(sys.argv[1])):
    print(json.dumps({"v": 1, "job_id": f"p{i}", "ad_account_id": "1234567890",
        "page_id": "9876543210", "message_id": "120210000000000000",
        "subscription_token": f"r{i}", "message": {"text": "Hi {{first_name}}, new deals are in!"},
        "campaign": "profile"}))
EOF
"$BIN" enqueue --json "$OUT/jobs.jsonl" >/dev/null

case "$PROFILE" in
perf) "$BIN" worker & wpid=$!; sleep 0.2
      # PERF_TARGET=simulator records the simulator's process instead
      if [ "$TARGET" = simulator ]; then target=$simpid; else target=$wpid; fi
      perf record -F ${PERF_HZ:-1999} ${PERF_CALLGRAPH:--g} -o "$OUT/perf.data" -p "$target" 2>/dev/null & ppid=$! ;;
strace) strace -c -f -o "$OUT/strace.txt" "$BIN" worker & wpid=$! ;;
callgrind) if [ "$TARGET" = simulator ]; then "$BIN" worker & wpid=$!
           else valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" "$BIN" worker 2>"$OUT/valgrind.log" & wpid=$!; fi ;;
*) "$BIN" worker & wpid=$! ;;
esac
pids+=("$wpid")

# CPU ticks of a process (user + system), to show where the rest of the CPU goes
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
others() {
    for name in beam.smp redis-server; do
        for p in $(pgrep -x "$name" 2>/dev/null); do echo "$name $p $(ticks "$p")"; done
    done
    echo "simulator $simpid $(ticks "$simpid")"
}
depth() { "$BIN" topology show --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["queues"][0]["messages"])'; }
others >"$OUT/others.start"
start=$(date +%s.%N)
while [ "$(depth)" != 0 ]; do sleep 0.2; done
# the last jobs' acks
sleep 1
end=$(date +%s.%N)
read -r utime stime < <(awk '{print $14, $15}' "/proc/$wpid/stat")
# how often the worker slept and was woken (each costs a syscall and a switch)
switches=$(awk '/^voluntary_ctxt_switches/ {v=$2} /^nonvoluntary_ctxt_switches/ {n=$2} END {print v, n}' "/proc/$wpid/status")
others >"$OUT/others.end"
tick=$(getconf CLK_TCK)
# the worker's own view: its Graph calls' and Redis round trips' mean time
curl -sf "http://$MMSEND_METRICS_ADDR/metrics" >"$OUT/metrics.txt" || true
kill -TERM "$wpid"; wait "$wpid" 2>/dev/null || true
python3 - "$OUT/metrics.txt" <<'EOF2'
import sys, collections
sums, counts = collections.Counter(), collections.Counter()
for line in open(sys.argv[1]):
    for name in ("mmsend_graph_request_duration_seconds", "mmsend_redis_request_duration_seconds"):
        if line.startswith(name + "_sum"):
            sums[name] += float(line.split()[-1])
        elif line.startswith(name + "_count"):
            counts[name] += float(line.split()[-1])
for name in sorted(counts):
    if counts[name]:
        print(f"{name}: {counts[name]:.0f}, mean {sums[name] / counts[name] * 1e3:.2f} ms")
EOF2
if [ "$PROFILE" = perf ]; then
    # a recorded simulator keeps running: stop its recording
    if [ "$TARGET" = simulator ]; then kill -INT "$ppid" 2>/dev/null || true; fi
    wait "$ppid" 2>/dev/null || true
fi
python3 - "$utime" "$stime" "$tick" "$JOBS" "$start" "$end" "$OUT" $switches <<'EOF'
import sys
u, s, tick, jobs, t0, t1 = (float(x) for x in sys.argv[1:7])
voluntary, forced = (int(x) for x in sys.argv[8:10])
def read(name):
    out = {}
    for line in open(f"{sys.argv[7]}/others.{name}"):
        what, pid, t = line.split()
        out[(what, pid)] = float(t)
    return out
a, b = read("start"), read("end")
for key in sorted(b):
    if key in a and b[key] > a[key]:
        print(f"{key[0]}: {(b[key] - a[key]) / tick / jobs * 1e6:.1f} µs/job during the drain")
cpu = (u + s) / tick
print(f"worker: {jobs:.0f} jobs in {t1 - t0:.1f} s (including start-up and a 1 s tail); "
      f"CPU {cpu:.2f} s = {cpu / jobs * 1e6:.1f} µs/job (user {u / tick:.2f} s, system {s / tick:.2f} s); "
      f"{voluntary / jobs:.2f} sleeps and {forced / jobs:.2f} preemptions per job")
EOF
case "$PROFILE" in
perf) perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^#' | grep '%' | head -40 ;;
callgrind)
    if [ "$TARGET" = simulator ]; then
        # Ctrl-C: the simulator ends cleanly and callgrind writes its counts
        kill -INT "$simpid" 2>/dev/null || true
        wait "$simpid" 2>/dev/null || true
    fi
    callgrind_annotate "$OUT/callgrind.out" 2>/dev/null | head -60 ;;
esac

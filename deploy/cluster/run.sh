#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this host, a workload through it, and one node
# stopped mid-run: does mmsend lose anything?
#
#   deploy/cluster/run.sh [--jobs N] [--keep]
#
# What it does:
#   1. starts three RabbitMQ nodes (mmsend-c1..3@localhost on AMQP ports
#      5681-5683, distribution ports 25681-25683) in a private directory with
#      their own Erlang cookie, no plugins, and joins them into one cluster.
#      The broker on 5672 (if any) is not touched.
#   2. declares an mmsend topology through node 1, so node 1 leads every
#      quorum queue (3 replicas each);
#   3. starts the Graph API simulator, a worker connected to nodes 2, 3, 1
#      (MMSEND_AMQP_URL takes a comma-separated list) and `mmsend enqueue`
#      of N jobs through node 3;
#   4. when a fifth of the jobs are sent, stops node 1 (the leader of every
#      queue): leaders move to node 2 or 3 while jobs are being published and
#      consumed;
#   5. waits until every confirmed job is sent or dead, restarts node 1, and
#      prints the books: published (confirmed), sent (distinct jobs), repeats,
#      dead, still queued, lost. Exit 0 only when lost = 0.
#
# Needs: RabbitMQ 3.10+ installed (not necessarily running), Rust, curl, jq.
# Runs outside CI (it takes a minute and three Erlang VMs); the last result
# is in docs/src/deploying.md, "On a RabbitMQ cluster".
set -euo pipefail

jobs=20000
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) jobs="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "$0")/../.." && pwd)"
for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "cluster: needs $tool (Debian: apt-get install -y $tool)" >&2; exit 1; }
done
if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  rmq_bin=/usr/lib/rabbitmq/bin # Debian: bypass the wrapper that switches user
elif command -v rabbitmq-server >/dev/null; then
  rmq_bin="$(dirname "$(command -v rabbitmq-server)")"
else
  echo "cluster: RabbitMQ is not installed; run deploy/local/ensure-rabbitmq.sh first" >&2
  exit 1
fi

for port in 5681 5682 5683 25681 25682 25683; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "cluster: port $port is taken (a cluster node left from an earlier run?);" \
      "stop it first, e.g. pkill -f 'mmsend-c[123]@localhost'" >&2
    exit 1
  fi
done

echo "cluster: building mmsend"
(cd "$root" && cargo build --release --quiet)
# where cargo put it (CARGO_TARGET_DIR included)
mmsend="$(cd "$root" && cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release/mmsend"

work="$(mktemp -d -t mmsend-cluster.XXXXXX)"
export HOME="$work" # the nodes' and rabbitmqctl's Erlang cookie lives here
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/.erlang.cookie"
chmod 400 "$work/.erlang.cookie"
pids=()

node() { echo "mmsend-c$1@localhost"; }
url() { echo "amqp://guest:guest@127.0.0.1:$((5680 + $1))/%2f"; }
ctl() { local n="$1"; shift; "$rmq_bin/rabbitmqctl" -q -n "$(node "$n")" "$@"; }

start_node() {
  local i="$1" d="$work/n$1"
  mkdir -p "$d"
  echo '[].' > "$d/enabled_plugins"
  printf 'listeners.tcp.default = %s\nloopback_users = none\n' "$((5680 + i))" > "$d/rabbitmq.conf"
  RABBITMQ_NODENAME="$(node "$i")" RABBITMQ_NODE_PORT="$((5680 + i))" \
    RABBITMQ_DIST_PORT="$((25680 + i))" RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/pid" ERL_CRASH_DUMP="$d/erl_crash.dump" \
    nohup "$rmq_bin/rabbitmq-server" >"$d/stdout" 2>&1 &
  for _ in $(seq 1 120); do
    ctl "$i" await_startup --timeout 5 >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "cluster: node $i did not start in 2 minutes; its output:" >&2
  tail -20 "$d/stdout" >&2
  exit 1
}

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for i in 1 2 3; do ctl "$i" stop >/dev/null 2>&1 || true; done
  if [ "$keep" = 1 ]; then echo "cluster: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

echo "cluster: starting 3 nodes in $work"
for i in 1 2 3; do start_node "$i"; done
for i in 2 3; do
  ctl "$i" stop_app
  ctl "$i" join_cluster "$(node 1)"
  ctl "$i" start_app
done
ctl 1 cluster_status | grep -A4 "Running Nodes" || true

prefix="mmsend-cluster-$RANDOM"
export MMSEND_PREFIX="$prefix" MMSEND_LOG=warn
MMSEND_AMQP_URL="$(url 1)" "$mmsend" topology declare >/dev/null
echo "cluster: topology $prefix declared through node 1 (queue leaders on node 1)"

sim_port=$((18090 + RANDOM % 1000))
"$mmsend" simulate --listen "127.0.0.1:$sim_port" --latency 2ms >"$work/sim.log" 2>&1 &
pids+=($!)
stats() { curl -fsS "http://127.0.0.1:$sim_port/_sim/stats"; }
for _ in $(seq 1 50); do stats >/dev/null 2>&1 && break; sleep 0.1; done

printf '[pacing]\nper_page = 0\n' > "$work/mmsend.toml"
MMSEND_AMQP_URL="$(url 2),$(url 3),$(url 1)" MMSEND_CONFIG="$work/mmsend.toml" \
  MMSEND_GRAPH_BASE_URL="http://127.0.0.1:$sim_port" MMSEND_ACCESS_TOKEN=cluster-demo-token \
  MMSEND_METRICS_ADDR=127.0.0.1:0 MMSEND_CONCURRENCY=64 \
  "$mmsend" worker >"$work/worker.log" 2>&1 &
pids+=($!)

for i in $(seq 1 "$jobs"); do
  printf '{"v":1,"job_id":"cl-%d","ad_account_id":"1234567890","page_id":"9876543210","message_id":"120210000000000000","subscription_token":"cl-r%d","message":{"text":"hello"},"campaign":"cluster"}\n' "$i" "$i"
done > "$work/jobs.jsonl"
# few confirms in flight, so publishing is still going on when node 1 stops
MMSEND_AMQP_URL="$(url 3)" MMSEND_MAX_INFLIGHT=4 "$mmsend" enqueue "$work/jobs.jsonl" \
  >"$work/enqueue.log" 2>&1 &
enqueue_pid=$!

sent() { stats | jq '.sends_by_recipient | length'; }
while [ "$(sent)" -lt $((jobs / 5)) ]; do sleep 0.2; done
publishing=$(kill -0 "$enqueue_pid" 2>/dev/null && echo "still publishing" || echo "publishing done")
echo "cluster: $(sent) sent, $publishing; stopping node 1 (leader of every queue) mid-run"
stop_at=$(date +%s.%N)
ctl 1 stop

enqueue_rc=0
wait "$enqueue_pid" || enqueue_rc=$?
# the summary table's row: │ <lines> <published> <invalid> <failed> <seconds> <jobs/s> │
published=$(awk -F'│' '$2 ~ /^ *[0-9]+ +[0-9]+ / {split($2, f, " "); print f[2]}' "$work/enqueue.log" | tail -1)
published=${published:-0}
echo "cluster: enqueue exit $enqueue_rc, $published confirmed"

depths() { ctl 2 list_queues name messages | awk -v p="$prefix." 'index($1, p) == 1'; }
deadline=$((SECONDS + 300))
while :; do
  s=$(sent)
  dead=$(depths | awk -v q="$prefix.dead" '$1 == q {print $2}')
  [ "$((s + ${dead:-0}))" -ge "$published" ] && break
  if [ "$SECONDS" -ge "$deadline" ]; then echo "cluster: not settled after 300 s" >&2; break; fi
  sleep 0.5
done
done_at=$(date +%s.%N)

echo "cluster: restarting node 1"
start_node 1
queued=$(depths | awk -v q="$prefix.dead" '$1 != q {s += $2} END {print s + 0}')
dead=$(depths | awk -v q="$prefix.dead" '$1 == q {print $2 + 0}')
s=$(sent)
repeats=$(stats | jq '.duplicates')
lost=$((published - s - dead - queued))
leaders=$(ctl 2 list_queues name leader | awk -v p="$prefix." 'index($1, p) == 1 {print $2}' | sort | uniq -c | tr -s ' ' | paste -sd, -)

cat <<TABLE

 mmsend on a 3-node RabbitMQ cluster, node 1 stopped mid-run
 ------------------------------------------------------------
 jobs in the file            $jobs
 published (confirmed)       $published
 producer at the stop        $publishing
 sent (distinct jobs)        $s
 sent more than once         $repeats
 dead                        $dead
 still queued                $queued
 lost                        $lost
 stop → all settled          $(awk -v a="$stop_at" -v b="$done_at" 'BEGIN {printf "%.1f", b - a}') s
 queue leaders now           $leaders
TABLE
[ "$lost" = 0 ] && [ "$published" -gt 0 ]

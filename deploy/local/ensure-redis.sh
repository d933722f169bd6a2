#!/usr/bin/env bash
# Makes sure a Redis server answers on 127.0.0.1:6379 (or $MMSEND_REDIS_HOST:$MMSEND_REDIS_PORT),
# for the send ledger and fleet coordination (MMSEND_REDIS_URL) and the tests.
#
# 1. already answering        -> done
# 2. installed, not running   -> start it (no persistence: a throw-away local server)
# 3. not installed, root+apt  -> apt-get install redis-server, then start it
# 4. otherwise                -> print exactly what to do, exit 1
set -euo pipefail

name=redis
host="${MMSEND_REDIS_HOST:-127.0.0.1}"
port="${MMSEND_REDIS_PORT:-6379}"
# shellcheck source=service.sh
. "$(dirname "$0")/service.sh"

# the send ledger's claim is one SET with NX and GET, which Redis has had
# since 7.0
check_up() {
  command -v redis-cli >/dev/null 2>&1 || return 0
  local version
  version=$(redis-cli -h "$host" -p "$port" INFO server 2>/dev/null | tr -d '\r' | sed -n 's/^redis_version://p')
  case "$version" in
  "" | [7-9].* | [1-9][0-9].*) ;;
  *)
    echo "redis: $host:$port runs Redis $version; mmsend's send ledger needs Redis 7.0 or newer (SET with NX and GET)." >&2
    echo "Upgrade it, or point MMSEND_REDIS_URL (and MMSEND_TEST_REDIS_URL for the tests) at a Redis 7." >&2
    exit 1
    ;;
  esac
}

ready_to_start redis-server redis-server <<'HELP'
redis: not installed, and this script can only install it as root with apt-get.
Install and start Redis (7.0 or newer), then run this again:
  Debian/Ubuntu:  sudo apt-get install -y redis-server && sudo systemctl start redis-server
  macOS:          brew install redis && brew services start redis
  Docker:         docker run -d --name redis -p 6379:6379 redis:7
Or point MMSEND_REDIS_URL (and MMSEND_TEST_REDIS_URL for the tests) at a Redis you already have.
HELP

echo "redis: starting redis-server on $host:$port (no persistence)"
dir="${TMPDIR:-/tmp}/mmsend-redis"
mkdir -p "$dir"
redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
  --dir "$dir" --logfile "$dir/redis.log" >/dev/null
wait_up 30 "$dir/redis.log"

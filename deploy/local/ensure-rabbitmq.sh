#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672 (or $MMSEND_AMQP_HOST:$MMSEND_AMQP_PORT).
#
# 1. already answering        -> done
# 2. installed, not running   -> start it (rabbitmq-server -detached)
# 3. not installed, root+apt  -> apt-get install rabbitmq-server, then start it
# 4. otherwise                -> print exactly what to do, exit 1
set -euo pipefail

host="${MMSEND_AMQP_HOST:-127.0.0.1}"
port="${MMSEND_AMQP_PORT:-5672}"

answering() {
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

wait_up() {
  for _ in $(seq 1 60); do
    if answering; then
      echo "rabbitmq: up on $host:$port"
      return 0
    fi
    sleep 1
  done
  echo "rabbitmq: started but not answering on $host:$port after 60 s; see its log (rabbitmq-diagnostics status)" >&2
  return 1
}

if answering; then
  echo "rabbitmq: up on $host:$port"
  exit 0
fi

if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
  echo "rabbitmq: nothing answers on $host:$port, and it is not local, so this script cannot start it." >&2
  exit 1
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "rabbitmq: not installed; installing Debian's rabbitmq-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rabbitmq-server >/dev/null
  else
    cat >&2 <<'HELP'
rabbitmq: not installed, and this script can only install it as root with apt-get.
Install and start RabbitMQ (3.10 or newer), then run this again:
  Debian/Ubuntu:  sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached
  macOS:          brew install rabbitmq && brew services start rabbitmq
  Docker:         docker run -d --name rabbitmq -p 5672:5672 -p 15692:15692 rabbitmq:3.13-management
Or point MMSEND_AMQP_URL at a broker you already have.
HELP
    exit 1
  fi
fi

echo "rabbitmq: starting (rabbitmq-server -detached)"
if [ "$(id -u)" = "0" ] || [ -w /var/lib/rabbitmq ]; then
  rabbitmq-server -detached >/dev/null 2>&1 || true
else
  sudo rabbitmq-server -detached >/dev/null 2>&1 || true
fi
wait_up

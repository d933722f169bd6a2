#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672 (or $MMSEND_AMQP_HOST:$MMSEND_AMQP_PORT).
#
# 1. already answering        -> done
# 2. installed, not running   -> start it (rabbitmq-server -detached)
# 3. not installed, root+apt  -> apt-get install rabbitmq-server, then start it
# 4. otherwise                -> print exactly what to do, exit 1
set -euo pipefail

name=rabbitmq
host="${MMSEND_AMQP_HOST:-127.0.0.1}"
port="${MMSEND_AMQP_PORT:-5672}"
# shellcheck source=service.sh
. "$(dirname "$0")/service.sh"

ready_to_start rabbitmq-server rabbitmq-server <<'HELP'
rabbitmq: not installed, and this script can only install it as root with apt-get.
Install and start RabbitMQ (3.10 or newer), then run this again:
  Debian/Ubuntu:  sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached
  macOS:          brew install rabbitmq && brew services start rabbitmq
  Docker:         docker run -d --name rabbitmq -p 5672:5672 -p 15692:15692 rabbitmq:3.13-management
Or point MMSEND_AMQP_URL at a broker you already have.
HELP

echo "rabbitmq: starting (rabbitmq-server -detached)"
if [ "$(id -u)" = "0" ] || [ -w /var/lib/rabbitmq ]; then
  rabbitmq-server -detached >/dev/null 2>&1 || true
else
  sudo rabbitmq-server -detached >/dev/null 2>&1 || true
fi
wait_up 60 "its log (rabbitmq-diagnostics status)"

#!/usr/bin/env bash
# The first command: RabbitMQ up, build, run `mmsend demo` (extra arguments are passed on,
# e.g. deploy/local/demo.sh --jobs 500 --keep).
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/local/ensure-rabbitmq.sh
deploy/local/ensure-redis.sh
echo "== building mmsend (first build takes a few minutes)"
cargo build --quiet
exec target/debug/mmsend demo "$@"

#!/usr/bin/env bash
# The first command: RabbitMQ up, build, run `mmsend demo` (extra arguments are passed on,
# e.g. deploy/local/demo.sh --jobs 500 --keep). `cargo run` finds the binary wherever
# the build puts it (CARGO_TARGET_DIR included).
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/local/ensure-rabbitmq.sh
deploy/local/ensure-redis.sh
echo "== building and running mmsend (the first build takes a few minutes)"
exec cargo run --quiet -- demo "$@"

#!/usr/bin/env bash
# The test command: RabbitMQ up, then formatting, lints, every test, and the
# static checks of deploy/. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/local/ensure-rabbitmq.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo test --all-targets

if [ -x deploy/check.sh ]; then
  echo "== deploy/check.sh"
  deploy/check.sh
fi

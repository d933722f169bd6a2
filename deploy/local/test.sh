#!/usr/bin/env bash
# The test command: RabbitMQ up, promtool present, then formatting, lints,
# every test, and the static checks of deploy/. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/local/ensure-rabbitmq.sh

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing promtool (Debian package prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool not found and cannot be installed here (needs root and apt-get);"
    echo "the metrics and alert-rule checks that need it are skipped."
  fi
fi
if command -v promtool >/dev/null 2>&1; then
  export MMSEND_REQUIRE_PROMTOOL=1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo test --all-targets

echo "== deploy/check.sh"
deploy/check.sh

# Fuzz each cargo-fuzz target briefly (MMSEND_FUZZ_SECONDS each, default 10;
# 0 skips). cargo-fuzz is installed on first use; its nightly-only compiler
# flags are allowed on stable with RUSTC_BOOTSTRAP=1. Longer runs by hand:
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run job_parse -- -max_total_time=300
fuzz_seconds="${MMSEND_FUZZ_SECONDS:-10}"
if [ "$fuzz_seconds" != 0 ]; then
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
  fi
  for target in job_parse graph_error; do
    echo "== fuzz $target (${fuzz_seconds} s)"
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" -- \
      -max_total_time="$fuzz_seconds" -print_final_stats=1 2>&1 | tail -n 4)
  done
fi

#!/usr/bin/env bash
# The test command: RabbitMQ up, promtool and Chromium present, then formatting, lints,
# the supply-chain policy (cargo deny), every test, and the static checks of
# deploy/. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/local/ensure-rabbitmq.sh
deploy/local/ensure-redis.sh

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
# tests/console.rs drives a real headless Chromium through chromedriver
# (Debian's chromium and chromium-driver). Installed here when missing and
# possible; then the browser tests must run (MMSEND_REQUIRE_CHROMIUM=1).
# Without them those tests print SKIPPED and the rest still runs.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing chromium and chromium-driver (Debian packages) for the console's browser tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
  else
    echo "chromium/chromedriver not found and cannot be installed here (needs root and apt-get);"
    echo "the console's browser tests are skipped (they say SKIPPED)."
  fi
fi
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  export MMSEND_REQUIRE_CHROMIUM=1
fi
# deploy/check.sh reads the YAML files with PyYAML
if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "== installing PyYAML for deploy/check.sh"
  python3 -m pip install --quiet pyyaml
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

# Supply chain (deny.toml): advisories, licences, bans, sources. cargo-deny
# is installed on first use. The advisory check needs the RustSec database,
# a git repository fetched from its upstream; where it cannot be fetched and no copy is
# cached, this says so loudly and checks the other three (the known
# unmaintained crates are also banned by name in deny.toml, which needs no
# network). MMSEND_REQUIRE_ADVISORIES=1 turns that into a failure.
if ! cargo deny --version >/dev/null 2>&1; then
  echo "== installing cargo-deny"
  cargo install cargo-deny --locked --quiet
fi
advisory_dbs="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if fetch_log=$(cargo deny fetch db 2>&1); then
  echo "== cargo deny check (advisories, licenses, bans, sources)"
  cargo deny check
elif compgen -G "$advisory_dbs/*/crates" >/dev/null; then
  echo "== cargo deny check, advisories against the cached database (refresh failed)"
  echo "   cached copy: $(git -C "$(compgen -G "$advisory_dbs/*/crates" | head -1)/.." log -1 --format=%cs 2>/dev/null || echo unknown date)"
  cargo deny --offline check
else
  cat >&2 <<WARN
==========================================================================
  ADVISORIES NOT CHECKED: the RustSec advisory database could not be
  fetched and no copy is cached ($advisory_dbs).
  reason: $( (echo "$fetch_log" | grep -m1 -i 'fatal:' || echo "$fetch_log" | grep -m1 -i 'error' || echo unknown) | sed 's/.*fatal: //' | cut -c1-110)
  Licences, bans and sources are still checked below. Run
  'cargo deny check advisories' where its git source is reachable, or set
  MMSEND_REQUIRE_ADVISORIES=1 to make this a failure.
==========================================================================
WARN
  if [ "${MMSEND_REQUIRE_ADVISORIES:-0}" = 1 ]; then
    echo "MMSEND_REQUIRE_ADVISORIES=1: failing" >&2
    exit 1
  fi
  echo "== cargo deny check licenses bans sources (advisories: NOT CHECKED, see above)"
  cargo deny check licenses bans sources
fi

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

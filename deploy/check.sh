#!/usr/bin/env bash
# Static checks of deploy/ (no Docker engine needed): alert rules compile and
# pass their promtool tests, the Prometheus config is valid, every YAML and
# JSON file parses, every script parses, and the Dockerfile runs as non-root.
set -euo pipefail
cd "$(dirname "$0")"

passed=0
failed=0
ok() { echo "  ok    $1"; passed=$((passed + 1)); }
bad() { echo "  FAIL  $1"; failed=$((failed + 1)); }
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
check() { local what="$1"; shift; if "$@" >"$log" 2>&1; then ok "$what"; else bad "$what"; sed 's/^/        /' "$log"; fi; }

if command -v promtool >/dev/null 2>&1; then
  check "promtool check rules prometheus/alerts.yml" promtool check rules prometheus/alerts.yml
  check "promtool test rules prometheus/alerts.test.yml" promtool test rules prometheus/alerts.test.yml
  # the config names the rules at their in-container path; check a copy pointing here
  tmp=$(mktemp -d)
  sed "s#/etc/prometheus/alerts.yml#$PWD/prometheus/alerts.yml#" prometheus/prometheus.yml > "$tmp/prometheus.yml"
  check "promtool check config prometheus/prometheus.yml" promtool check config "$tmp/prometheus.yml"
  rm -rf "$tmp"
else
  echo "  skip  promtool checks (promtool not installed; deploy/local/test.sh installs it as root)"
fi

yaml_check='
import sys, yaml
for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs, path + ": empty"
    for d in docs:
        if "/k8s/" in path and "kustomization" not in path:
            assert "apiVersion" in d and "kind" in d and "metadata" in d, path + ": not a Kubernetes object"
'
if python3 -c 'import yaml' 2>/dev/null; then
  for f in $(find . -name '*.yml' -o -name '*.yaml' | sort); do
    check "yaml $f" python3 -c "$yaml_check" "$f"
  done
else
  echo "  skip  YAML parsing (python3 yaml module missing: pip install pyyaml)"
fi
for f in $(find . -name '*.json' | sort); do
  check "json $f" python3 -m json.tool "$f"
done
for f in $(find . -name '*.sh' | sort); do
  check "bash -n $f" bash -n "$f"
done
check "Dockerfile runs as a non-root user" grep -Eq '^USER [0-9]+' Dockerfile
check "Dockerfile is multi-stage" test "$(grep -c '^FROM ' Dockerfile)" -ge 2
check "k8s grace period exceeds the worker's shutdown grace" \
  bash -c 'grep -q "terminationGracePeriodSeconds: 45" k8s/deployment.yaml && grep -q "MMSEND_SHUTDOWN_GRACE: 30s" k8s/configmap.yaml'
check "no real-looking token in deploy/" bash -c '! grep -rEq "EAA[A-Za-z0-9]{20,}" .'

echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

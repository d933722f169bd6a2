#!/usr/bin/env bash
# Static checks of deploy/ (no Docker engine or cluster needed): the alert
# rules and dashboard are generated from deploy/monitoring/ and up to date,
# compile and pass their promtool tests (also with other selectors), the
# Prometheus config is valid, every YAML and JSON file parses, every script
# parses, and check_deploy.py proves how the pieces fit (scrape job and
# selectors, runbook links, KEDA, PDB, pinned images, Dockerfile entrypoint
# and healthcheck, compose healthchecks and Redis, the webhook receiver's and
# tracker's scrape, ports, secrets and Ingress). tests/deploy.rs checks
# every mmsend command line in deploy/ against the real CLI.
set -euo pipefail
cd "$(dirname "$0")"

passed=0
failed=0
ok() { echo "  ok    $1"; passed=$((passed + 1)); }
bad() { echo "  FAIL  $1"; failed=$((failed + 1)); }
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
check() { local what="$1"; shift; if "$@" >"$log" 2>&1; then ok "$what"; else bad "$what"; sed 's/^/        /' "$log"; fi; }

check "alerts.yml and mmsend.json are generate.py's output (edit deploy/monitoring/*.in)" \
  python3 monitoring/generate.py --check

if command -v promtool >/dev/null 2>&1; then
  check "promtool check rules prometheus/alerts.yml" promtool check rules prometheus/alerts.yml
  check "promtool test rules prometheus/alerts.test.yml" promtool test rules prometheus/alerts.test.yml
  # the config names the rules at their in-container path; check a copy pointing here
  tmp=$(mktemp -d)
  sed "s#/etc/prometheus/alerts.yml#$PWD/prometheus/alerts.yml#" prometheus/prometheus.yml > "$tmp/prometheus.yml"
  check "promtool check config prometheus/prometheus.yml" promtool check config "$tmp/prometheus.yml"
  # other selectors, as an operator would set them, still give valid rules
  check "alerts generated with other selectors pass promtool check rules" bash -c "
    python3 monitoring/generate.py --out '$tmp/custom' \
      --set 'mmsend_selector=job=\"mmsend-worker\",namespace=\"messaging\"' \
      --set 'rabbitmq_selector=namespace=\"messaging\",job=~\"rabbitmq.*\"' \
      --set 'work_queue_regex=shop[.]send' --set 'webhook_queue_regex=shop[.]webhooks' --set runbook_base_url=https://docs.example/mmsend/docs/src/operating/runbook.md >/dev/null &&
    promtool check rules '$tmp/custom/alerts.yml' && python3 -m json.tool '$tmp/custom/mmsend.json' >/dev/null"
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
  # each line of its output is one check
  if python3 check_deploy.py >"$log" 2>&1; then status=0; else status=$?; fi
  grep -E '^  (ok|FAIL|      )' "$log" || true
  passed=$((passed + $(grep -c '^  ok' "$log" || true)))
  failed=$((failed + $(grep -c '^  FAIL' "$log" || true)))
  if [ "$status" -ne 0 ] && ! grep -q '^  FAIL' "$log"; then bad "check_deploy.py crashed"; sed 's/^/        /' "$log"; fi
else
  bad "python3 has no yaml module (pip install pyyaml): the YAML and deploy-fit checks cannot run"
fi
for f in $(find . -name '*.json' | sort); do
  check "json $f" python3 -m json.tool "$f"
done
for f in $(find . -name '*.sh' | sort); do
  check "bash -n $f" bash -n "$f"
done
check "Dockerfile runs as a non-root user" grep -Eq '^USER [0-9]+' Dockerfile
check "Dockerfile is multi-stage" test "$(grep -c '^FROM ' Dockerfile)" -ge 2
check "k8s grace period covers the shutdown grace + a call in flight + settling" \
  bash -c 'grep -q "terminationGracePeriodSeconds: 75" k8s/deployment.yaml && grep -q "MMSEND_SHUTDOWN_GRACE: 30s" k8s/configmap.yaml'
check "no real-looking token in deploy/" bash -c '! grep -rEq "EAA[A-Za-z0-9]{20,}" .'

echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

#!/usr/bin/env python3
"""Builds mmsend's Prometheus alert rules and Grafana dashboard from the
templates beside this script and a config of selectors, the way monitoring
mixins do (one config, every expression follows it).

    deploy/monitoring/generate.py                  # refresh the committed files
    deploy/monitoring/generate.py --check          # are they up to date? (deploy/check.sh)
    deploy/monitoring/generate.py --config mine.json --out build/
    deploy/monitoring/generate.py --set 'mmsend_selector=job="mmsend",namespace="messaging"' --out build/

Settings (config.json holds the defaults; --config overrides some or all,
--set overrides one):

    mmsend_selector    label matchers for mmsend's own series and `up`
                       (the Prometheus job of the workers, the webhook
                       receiver and a standalone tracker: the compose
                       scrape job, the ServiceMonitor's jobLabel)
    rabbitmq_selector  label matchers for RabbitMQ's rabbitmq_prometheus series
    console_selector   label matchers for `mmsend console`'s /metrics (campaign
                       progress, the Campaigns row)
    work_queue_regex   the work queues the queue alerts watch
    webhook_queue_regex  the queues `mmsend webhooks` stores into (<prefix>.webhooks),
                       which the trackers consume
    runbook_base_url   where the runbook is read; alerts link to
                       <runbook_base_url>#<alert name in lower case>

Templates mark a setting as @name@. Selectors must be one or more matchers
(name="value", name=~"regex", …) so they fit inside {…} next to others.
Python 3 standard library only.
"""

import argparse
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
DEPLOY = HERE.parent
# template -> committed output
OUTPUTS = {
    "alerts.yml.in": DEPLOY / "prometheus" / "alerts.yml",
    "mmsend.json.in": DEPLOY / "grafana" / "mmsend.json",
}
MATCHER = r'[a-zA-Z_][a-zA-Z0-9_]*\s*(?:=|!=|=~|!~)\s*"[^"\\]*"'
MATCHERS = re.compile(rf"^\s*{MATCHER}(?:\s*,\s*{MATCHER})*\s*$")
TOKEN = re.compile(r"@([a-z_]+)@")


def load_config(config_path, sets):
    with open(HERE / "config.json") as f:
        cfg = json.load(f)
    known = set(cfg)
    if config_path:
        with open(config_path) as f:
            cfg.update(json.load(f))
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep:
            sys.exit(f"--set {s!r}: write name=value")
        cfg[key] = value
    unknown = set(cfg) - known
    if unknown:
        sys.exit(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
    for key in ("mmsend_selector", "rabbitmq_selector", "console_selector"):
        if not MATCHERS.match(cfg[key]):
            sys.exit(
                f'{key} = {cfg[key]!r}: give one or more label matchers, e.g. job="mmsend",namespace="messaging"'
            )
    for key in ("work_queue_regex", "webhook_queue_regex"):
        if not cfg[key] or re.search(r'["\\\s]', cfg[key]):
            sys.exit(f'{key}: a non-empty regex without quotes, backslashes or spaces (use [.] for a dot)')
    if re.search(r"[\s#]", cfg["runbook_base_url"]):
        sys.exit("runbook_base_url: a URL without spaces or #")
    return cfg


def fill(text, cfg, where):
    def value(m):
        if m.group(1) not in cfg:
            sys.exit(f"{where}: unknown setting @{m.group(1)}@")
        return cfg[m.group(1)]

    return TOKEN.sub(value, text)


def render(template, cfg):
    text = (HERE / template).read_text()
    if template.endswith(".json.in"):
        # fill inside the parsed strings, so quotes in selectors get escaped
        def walk(v):
            if isinstance(v, str):
                return fill(v, cfg, template)
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            return v

        return json.dumps(walk(json.loads(text)), indent=2, ensure_ascii=False) + "\n"
    return fill(text, cfg, template)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="JSON file overriding config.json")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--out", help="write alerts.yml and mmsend.json to this directory")
    ap.add_argument("--check", action="store_true", help="fail if the committed outputs are stale")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    stale = []
    for template, committed in OUTPUTS.items():
        text = render(template, cfg)
        if args.check:
            if not committed.exists() or committed.read_text() != text:
                stale.append(str(committed.relative_to(DEPLOY.parent)))
            continue
        target = pathlib.Path(args.out) / committed.name if args.out else committed
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}")
    if stale:
        sys.exit(
            f"stale: {', '.join(stale)}; run deploy/monitoring/generate.py (edit the templates in deploy/monitoring/, not the outputs)"
        )


if __name__ == "__main__":
    main()

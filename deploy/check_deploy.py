#!/usr/bin/env python3
"""Static checks of how deploy/ fits together, for what no engine runs here
(no Docker daemon, no Kubernetes): each check proves one property from the
files alone and prints `ok` or `FAIL` with the reason, like deploy/check.sh.

Run by deploy/check.sh; needs python3 with PyYAML.
"""

import json
import pathlib
import re
import subprocess
import sys

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
ROOT = DEPLOY.parent
results = {"ok": 0, "bad": 0}


def check(what):
    """Decorator: runs the check now; any exception is a failure."""

    def run(fn):
        try:
            fn()
            print(f"  ok    {what}")
            results["ok"] += 1
        except Exception as e:  # an assertion, or a file not shaped as expected
            print(f"  FAIL  {what}")
            detail = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
            for line in detail.splitlines() or ["(no detail)"]:
                print(f"        {line}")
            results["bad"] += 1
        return fn

    return run


def load_all(path):
    with open(DEPLOY / path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kind(path, k):
    docs = [d for d in load_all(path) if d.get("kind") == k]
    assert docs, f"{path}: no {k}"
    return docs[0]


def cargo_package():
    text = (ROOT / "Cargo.toml").read_text()
    try:
        import tomllib

        return tomllib.loads(text)["package"]
    except ImportError:  # python < 3.11
        pkg = {}
        for key in ("version", "rust-version"):
            m = re.search(rf'^{key}\s*=\s*"([^"]+)"', text, re.M)
            pkg[key] = m.group(1) if m else None
        return pkg


PACKAGE = cargo_package()
COMPOSE = yaml.safe_load((DEPLOY / "compose.yml").read_text())
SERVICES = COMPOSE["services"]
MONITORING = json.loads((DEPLOY / "monitoring" / "config.json").read_text())
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
# instructions with their continuation lines joined
INSTRUCTIONS = re.sub(r"\\\n\s*", " ", DOCKERFILE).splitlines()
INSTRUCTIONS = [l.strip() for l in INSTRUCTIONS if l.strip() and not l.strip().startswith("#")]
STAGES = []
for line in INSTRUCTIONS:
    if line.upper().startswith("FROM "):
        STAGES.append([])
    if STAGES:
        STAGES[-1].append(line)
FINAL = STAGES[-1]


def exec_form(line, keyword):
    """The JSON array of an exec-form instruction (ENTRYPOINT ["a"], CMD [...])."""
    at = line.upper().find(keyword)
    assert at >= 0, f"no {keyword} in: {line}"
    rest = line[at + len(keyword):].strip()
    assert rest.startswith("["), f"{keyword} is not in exec form (JSON array): {line}"
    return json.loads(rest)


# --- Prometheus job, ServiceMonitor, selectors ---------------------------

@check("the alerts' and dashboard's mmsend selector is the job the scrapers produce")
def _():
    sel = MONITORING["mmsend_selector"]
    m = re.fullmatch(r'job="([^"]+)"', sel)
    assert m, f"default mmsend_selector {sel!r} is not job=\"…\""
    job = m.group(1)
    svc = kind("k8s/service.yaml", "Service")
    mon = kind("k8s/service.yaml", "ServiceMonitor")
    label = mon["spec"].get("jobLabel")
    assert label, "the ServiceMonitor sets no jobLabel: the Operator would name the job after the Service"
    got = svc["metadata"]["labels"].get(label)
    assert got == job, f"Service label {label}={got!r}, the alerts select job={job!r}"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = [c["job_name"] for c in prom["scrape_configs"]]
    assert job in jobs, f"compose Prometheus scrapes jobs {jobs}, none is {job!r}"
    rabbit = re.fullmatch(r'job="([^"]+)"', MONITORING["rabbitmq_selector"])
    assert rabbit and rabbit.group(1) in jobs, f"rabbitmq_selector {MONITORING['rabbitmq_selector']!r} is no compose scrape job {jobs}"


# the series `mmsend console` serves (campaign progress), read from the code
CONSOLE_SERIES = set(re.findall(
    r'"(mmsend_[a-z_]+)"',
    re.search(r"pub const CONSOLE_SERIES: &\[&str\] = &\[(.*?)\];",
              (ROOT / "src" / "metrics.rs").read_text(), re.S).group(1),
))


@check("every mmsend and RabbitMQ series in the alerts and the dashboard carries the configured selector (the console's series the console's)")
def _():
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, str(DEPLOY / "monitoring" / "generate.py"), "--out", out,
             "--set", 'mmsend_selector=job="probe-a",namespace="ns-b"',
             "--set", 'rabbitmq_selector=job="probe-c"',
             "--set", 'console_selector=job="probe-d"'],
            check=True, capture_output=True, text=True,
        )
        rules = yaml.safe_load((pathlib.Path(out) / "alerts.yml").read_text())
        exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
        dash = json.loads((pathlib.Path(out) / "mmsend.json").read_text())
        exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    missing = []
    for e in exprs:
        for m in re.finditer(r"\b(mmsend_[a-z_]+|rabbitmq_[a-z_]+|up)\b(\{[^}]*\})?", e):
            name, sel = m.group(1), m.group(2) or ""
            if name.startswith("rabbitmq_"):
                want = 'job="probe-c"'
            elif name in CONSOLE_SERIES:
                want = 'job="probe-d"'
            else:
                want = 'job="probe-a",namespace="ns-b"'
            if want not in sel:
                missing.append(f"{name}{sel} in {e}")
    assert exprs and not missing, "\n".join(missing)


@check("every alert has a summary, a description and a runbook_url into a runbook heading")
def _():
    # the default runbook_base_url is the runbook's path in the repository
    runbook = (ROOT / MONITORING["runbook_base_url"]).read_text()
    # GitHub's anchors: lower case, punctuation dropped, spaces to dashes
    anchors = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    problems = []
    base = MONITORING["runbook_base_url"]
    for r in (r for g in rules["groups"] for r in g["rules"]):
        a = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not a.get(key):
                problems.append(f"{r['alert']}: no {key}")
        url = a.get("runbook_url", "")
        anchor = url.partition("#")[2]
        if not url.startswith(base + "#") or anchor != r["alert"].lower():
            problems.append(f"{r['alert']}: runbook_url {url!r} is not {base}#{r['alert'].lower()}")
        elif anchor not in anchors:
            problems.append(f"{r['alert']}: {base} has no heading for #{anchor}")
    assert not problems, "\n".join(problems)


# --- Kubernetes ----------------------------------------------------------

@check("PodDisruptionBudget uses maxUnavailable: 1 (minAvailable would block drains at one replica)")
def _():
    spec = kind("k8s/pdb.yaml", "PodDisruptionBudget")["spec"]
    assert spec.get("maxUnavailable") == 1 and "minAvailable" not in spec, spec


@check("KEDA reads its own single-URL host, and watches <MMSEND_PREFIX>.send")
def _():
    auth = kind("k8s/keda.yaml", "TriggerAuthentication")
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    key = refs["host"]["key"]
    assert key != "MMSEND_AMQP_URL", "KEDA's host is MMSEND_AMQP_URL, which may list several nodes"
    secret = kind("k8s/secret.example.yaml", "Secret")["stringData"]
    assert key in secret, f"secret.example.yaml has no {key}"
    assert "," not in secret[key], f"{key} must be one URL: {secret[key]}"
    prefix = kind("k8s/configmap.yaml", "ConfigMap")["data"]["MMSEND_PREFIX"]
    queue = kind("k8s/keda.yaml", "ScaledObject")["spec"]["triggers"][0]["metadata"]["queueName"]
    assert queue == f"{prefix}.send", f"KEDA watches {queue}, the workers consume {prefix}.send"


@check("pods mount no service account token and run as the image's non-root user")
def _():
    uid = re.search(r"^USER (\d+)", "\n".join(FINAL), re.M)
    assert uid, "the runtime stage sets no numeric USER"
    for path in ("k8s/deployment.yaml", "k8s/redis.example.yaml"):
        for d in load_all(path):
            if d["kind"] in ("Deployment", "StatefulSet"):
                pod = d["spec"]["template"]["spec"]
                assert pod.get("automountServiceAccountToken") is False, f"{path}: automountServiceAccountToken is not false"
                assert pod["securityContext"].get("runAsNonRoot") is True, f"{path}: runAsNonRoot"
    pod = kind("k8s/deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == uid.group(1), "deployment runAsUser differs from the image's USER"


@check("every image tag is pinned (no latest, no bare name); mmsend's is the crate version")
def _():
    images = [(f"compose {n}", s["image"]) for n, s in SERVICES.items() if "image" in s]
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for d in load_all(path.relative_to(DEPLOY)):
            pod = d.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                images.append((f"{path.name} {c['name']}", c["image"]))
    images += [("Dockerfile", l.split()[1]) for l in INSTRUCTIONS if l.upper().startswith("FROM ")]
    bad = []
    for where, image in images:
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if not tag or tag == "latest" or tag.startswith("latest-"):
            bad.append(f"{where}: {image}")
        if name.split("/")[-1] == "mmsend" and tag != PACKAGE["version"]:
            bad.append(f"{where}: {image} is not mmsend:{PACKAGE['version']} (Cargo.toml)")
    assert len(images) >= 8 and not bad, "\n".join(bad) or f"only {len(images)} images found"


@check("Redis is a documented dependency: worker env, example manifest kept out of kustomization")
def _():
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert "redis.example.yaml" not in kust["resources"], "redis.example.yaml is an example, not applied"
    assert "redis.example.yaml" in (DEPLOY / "k8s" / "kustomization.yaml").read_text(), "kustomization.yaml does not mention redis.example.yaml"
    env = kind("k8s/deployment.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "MMSEND_REDIS_URL" for e in env), "the worker gets no MMSEND_REDIS_URL"
    assert "MMSEND_REDIS_URL" in kind("k8s/secret.example.yaml", "Secret")["stringData"]
    names = {d["kind"] for d in load_all("k8s/redis.example.yaml")}
    assert {"Service", "StatefulSet"} <= names, names


# --- Dockerfile ----------------------------------------------------------

@check("Dockerfile: the entrypoint binary is built and copied onto PATH in the runtime stage")
def _():
    entry = [l for l in FINAL if l.upper().startswith("ENTRYPOINT")]
    assert entry, "the runtime stage has no ENTRYPOINT"
    binary = exec_form(entry[-1], "ENTRYPOINT")[0]
    path = binary if binary.startswith("/") else f"/usr/local/bin/{binary}"
    copies = [l for l in FINAL if l.upper().startswith("COPY") and l.split()[-1] in (path, path.rsplit("/", 1)[0] + "/")]
    assert copies, f"nothing in the runtime stage is copied to {path}"
    src = copies[-1].split()[-2]
    build = "\n".join(sum(STAGES[:-1], []))
    assert f"--bin {pathlib.Path(path).name}" in build and src in build, f"the build stage does not build --bin {pathlib.Path(path).name} into {src}"
    assert (ROOT / "src" / "main.rs").exists(), "src/main.rs (the mmsend binary) is missing"


@check("Dockerfile: HEALTHCHECK runs `mmsend healthcheck` in exec form (no shell needed)")
def _():
    hc = [l for l in FINAL if l.upper().startswith("HEALTHCHECK")]
    assert hc, "the runtime stage has no HEALTHCHECK"
    argv = exec_form(hc[-1], "CMD")
    assert argv[:2] == ["mmsend", "healthcheck"], argv


@check("Dockerfile: dependencies cached by BuildKit cache mounts, no dummy src/")
def _():
    assert re.search(r"--mount=type=cache,target=/usr/local/cargo/registry", DOCKERFILE), "no cache mount for the cargo registry"
    assert re.search(r"--mount=type=cache,target=\S*target", DOCKERFILE), "no cache mount for target/"
    assert "fn main() {}" not in DOCKERFILE and "mkdir src" not in DOCKERFILE, "a dummy src/ is still built"


@check("Dockerfile: small runtime (distroless cc, or slim with ca-certificates) and the MSRV compiler")
def _():
    base = FINAL[0].split()[1]
    if "distroless" not in base:
        assert base.endswith("-slim"), f"runtime base {base} is neither distroless nor slim"
        assert any("ca-certificates" in l for l in FINAL), "slim runtime without ca-certificates: TLS to the Graph API would fail"
        assert any("--no-install-recommends" in l for l in FINAL), "apt-get install without --no-install-recommends"
    m = re.search(r"^ARG RUST_VERSION=(\S+)", DOCKERFILE, re.M)
    assert m and m.group(1) == PACKAGE["rust-version"], f"ARG RUST_VERSION={m and m.group(1)}, Cargo.toml rust-version={PACKAGE['rust-version']}"


# --- compose -------------------------------------------------------------

@check("compose: RabbitMQ is a community-supported series (4.2 or newer)")
def _():
    image = SERVICES["rabbitmq"]["image"]
    m = re.match(r"rabbitmq:(\d+)\.(\d+)", image)
    assert m and (int(m.group(1)), int(m.group(2))) >= (4, 2), image


@check("compose: workers use Redis (MMSEND_REDIS_URL, healthy before they start)")
def _():
    redis = SERVICES.get("redis")
    assert redis and "healthcheck" in redis, "no redis service with a healthcheck"
    w = SERVICES["worker"]
    assert w["environment"].get("MMSEND_REDIS_URL") == "redis://redis:6379/", w["environment"]
    assert w["depends_on"]["redis"]["condition"] == "service_healthy", w["depends_on"]


@check("compose: healthchecks run without a shell; the worker's is `mmsend healthcheck`")
def _():
    bad = []
    for name, s in SERVICES.items():
        hc = s.get("healthcheck", {})
        test = hc.get("test")
        if isinstance(test, str) or (test and test[0] == "CMD-SHELL"):
            bad.append(f"{name}: {test} needs a shell")
    assert SERVICES["worker"]["healthcheck"]["test"] == ["CMD", "mmsend", "healthcheck"], SERVICES["worker"]["healthcheck"]
    assert SERVICES["simulator"].get("healthcheck", {}).get("disable") is True, "the simulator serves no /readyz: disable the image's healthcheck"
    assert not bad, "\n".join(bad)


@check("RabbitMQ: a boot-time definitions import carries users and vhosts")
def _():
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    active = re.search(r"^\s*(management\.)?load_definitions\s*=\s*(\S+)", conf, re.M)
    if not active:
        return
    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    assert defs.get("users") and defs.get("vhosts"), (
        "rabbitmq.conf imports definitions.json at boot, which then skips the default user and vhost, "
        "but the file has none: nothing could log in"
    )


# --- delivery tracking: the webhook receiver and the tracker ---------------

def listen_port(argv, flag):
    """The port of `flag <host:port>` in an mmsend command line."""
    assert flag in argv, f"{argv} has no {flag}"
    return int(argv[argv.index(flag) + 1].rsplit(":", 1)[1])


def deployments():
    return {d["metadata"]["name"]: d for d in load_all("k8s/deployment.yaml") if d["kind"] == "Deployment"}


@check("every mmsend process is scraped as the alerts' job: the receiver's and the tracker's ports too (compose, ServiceMonitor)")
def _():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = re.fullmatch(r'job="([^"]+)"', MONITORING["mmsend_selector"]).group(1)
    sd = [c for c in prom["scrape_configs"] if c["job_name"] == job][0]["dns_sd_configs"]
    ports = {n: c["port"] for c in sd for n in c["names"]}
    receiver = listen_port(SERVICES["webhooks"]["command"], "--listen")
    assert ports.get("webhooks") == receiver, f"compose Prometheus scrapes webhooks on {ports.get('webhooks')}, the receiver listens on {receiver}"
    svcs = [d for d in load_all("k8s/service.yaml") if d["kind"] == "Service"]
    mon = kind("k8s/service.yaml", "ServiceMonitor")
    sel = mon["spec"]["selector"]["matchLabels"]
    endpoint_ports = {e["port"] for e in mon["spec"]["endpoints"]}
    for component in ("worker", "webhooks", "tracker"):
        mine = [s for s in svcs if s["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        assert mine, f"no Service for the {component}"
        s = mine[0]
        labels = s["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in sel.items()), f"the ServiceMonitor ({sel}) does not select {s['metadata']['name']}"
        assert labels.get(mon["spec"]["jobLabel"]) == job, f"{s['metadata']['name']}: its job would not be {job!r}"
        names = {p["name"] for p in s["spec"]["ports"]}
        assert names & endpoint_ports, f"{s['metadata']['name']} has none of the ServiceMonitor's ports {endpoint_ports}"


@check("k8s webhook receiver: listens on its container port (the Service's target), its secrets in mmsend-secrets, the workers' config file")
def _():
    d = deployments()["mmsend-webhooks"]
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    port = listen_port(c["args"], "--listen")
    cports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port in cports.values(), f"--listen port {port} is no containerPort {cports}"
    svc = [s for s in load_all("k8s/service.yaml") if s["kind"] == "Service" and s["metadata"]["name"] == "mmsend-webhooks"][0]
    target = svc["spec"]["ports"][0]["targetPort"]
    assert cports.get(target) == port, f"Service mmsend-webhooks targets {target!r}, the receiver listens on {port}"
    secret = kind("k8s/secret.example.yaml", "Secret")["stringData"]
    env = {e["name"]: e for e in c["env"]}
    for var in ("MMSEND_AMQP_URL", "MMSEND_WEBHOOK_VERIFY_TOKEN", "MMSEND_APP_SECRET"):
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref and ref["name"] == "mmsend-secrets" and ref["key"] in secret, f"{var} does not come from a key of mmsend-secrets"
        assert not ref.get("optional"), f"{var} is optional: the receiver refuses to start without it"
    # the receiver declares the topology: the same [topology] as the workers
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    worker = kind("k8s/deployment.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    config = [m["mountPath"] for m in worker["volumeMounts"] if m["mountPath"].endswith(".toml")][0]
    assert config in mounts, f"the receiver does not mount the workers' {config}"
    tracker = deployments()["mmsend-tracker"]["spec"]["template"]["spec"]["containers"][0]
    assert config in {m["mountPath"] for m in tracker.get("volumeMounts", [])}, f"the tracker does not mount the workers' {config} ([redis] retentions)"
    assert "MMSEND_REDIS_URL" in {e["name"] for e in tracker["env"]}, "the tracker gets no MMSEND_REDIS_URL"


@check("k8s webhook ingress example: TLS, only /webhooks (Exact) to the receiver's Service, kept out of kustomization")
def _():
    ing = kind("k8s/webhooks-ingress.example.yaml", "Ingress")["spec"]
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert "webhooks-ingress.example.yaml" not in kust["resources"], "the Ingress example names your host: not applied"
    hosts = {h for r in ing["rules"] for h in [r.get("host")]}
    assert ing.get("tls") and hosts <= {h for t in ing["tls"] for h in t["hosts"]}, "a host without TLS: Meta calls HTTPS only"
    paths = [p for r in ing["rules"] for p in r["http"]["paths"]]
    assert [(p["path"], p["pathType"]) for p in paths] == [("/webhooks", "Exact")], f"route only /webhooks (not /metrics): {paths}"
    assert all(p["backend"]["service"]["name"] == "mmsend-webhooks" for p in paths)


@check("compose: the simulator posts to the receiver, signed with its app secret; the receiver's and tracker's healthchecks ask their own port")
def _():
    sim = SERVICES["simulator"]
    hook = listen_port(SERVICES["webhooks"]["command"], "--listen")
    url = sim["command"][sim["command"].index("--webhook-url") + 1]
    assert url == f"http://webhooks:{hook}/webhooks", f"the simulator posts to {url}"
    assert sim["environment"]["MMSEND_SIM_WEBHOOK_SECRET"] == SERVICES["webhooks"]["environment"]["MMSEND_APP_SECRET"], "the simulator signs with another secret than the receiver checks"
    for name, flag in (("webhooks", "--listen"), ("tracker", "--metrics-addr")):
        s = SERVICES[name]
        test = s["healthcheck"]["test"]
        assert test[1:3] == ["mmsend", "healthcheck"], f"{name}: {test}"
        assert listen_port(test, "--metrics-addr") == listen_port(s["command"], flag), f"{name}: the healthcheck asks another port than it serves"
    assert SERVICES["tracker"].get("profiles"), "the standalone tracker is optional (workers run one): give it a profile"


print(f"deploy (python): {results['ok']} passed, {results['bad']} failed")
sys.exit(1 if results["bad"] else 0)

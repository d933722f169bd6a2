//! The `mmsend` binary as scripts and probes use it: `healthcheck` against a
//! real metrics endpoint, `--json` output that parses into named fields, the
//! documented exit codes, a closed pipe that ends quietly, and colour only on
//! a terminal without `NO_COLOR`.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, Harness, Opts};
use mmsend::metrics::Metrics;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn mmsend() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mmsend"));
    // the tests decide; nothing from the calling shell leaks in
    for var in [
        "MMSEND_METRICS_ADDR",
        "MMSEND_PREFIX",
        "MMSEND_CONFIG",
        "NO_COLOR",
    ] {
        c.env_remove(var);
    }
    c.env("MMSEND_AMQP_URL", common::amqp_url());
    c
}

/// Runs a blocking command without stalling the runtime that serves the
/// endpoint it talks to.
async fn run(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().expect("mmsend runs"))
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A metrics endpoint like a worker's, on a free port.
async fn endpoint() -> (Arc<Metrics>, std::net::SocketAddr, CancellationToken) {
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let addr = mmsend::metrics::serve("127.0.0.1:0", metrics.clone(), stop.clone())
        .await
        .unwrap();
    (metrics, addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_follows_readiness_and_exits_0_or_1() {
    let (metrics, addr, stop) = endpoint().await;
    let probe = |extra: &[&str], env_addr: String| {
        let mut c = mmsend();
        c.arg("healthcheck").args(extra);
        c.env("MMSEND_METRICS_ADDR", env_addr);
        c
    };

    // not ready yet: /readyz says 503, the probe exits 1 and says why
    let out = run(probe(&[], addr.to_string())).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("503"), "{}", text(&out.stderr));
    // ... while the process is alive: /healthz with --live passes
    let out = run(probe(&["--live"], addr.to_string())).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("/healthz"));

    metrics.set_ready(true);
    let out = run(probe(&[], addr.to_string())).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("/readyz answered 200"));

    // the worker's own setting, a wildcard bind, is asked on loopback
    let out = run(probe(&[], format!("0.0.0.0:{}", addr.port()))).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("http://127.0.0.1:{}/readyz", addr.port())));

    // the flag wins over the environment
    let mut c = probe(&["--metrics-addr", &addr.to_string()], "127.0.0.1:1".into());
    c.arg("--timeout").arg("2s");
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    stop.cancel();
    // nothing listening: exit 1, and the message names the address
    eventually!(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the endpoint did not stop"
    );
    let out = run(probe(&[], addr.to_string())).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&addr.to_string()),
        "{}",
        text(&out.stderr)
    );

    // a malformed address is a usage error: 2
    let out = run(probe(&[], "9464".into())).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("MMSEND_METRICS_ADDR"));
}

#[test]
fn help_documents_the_exit_codes() {
    let out = mmsend().arg("--help").output().unwrap();
    let help = text(&out.stdout);
    for line in [
        "Exit status:",
        "0  ok",
        "1  partly failed",
        "2  usage error or fatal",
    ] {
        assert!(help.contains(line), "--help lacks {line:?}:\n{help}");
    }
    // and clap's own usage errors are 2, as documented
    let out = mmsend().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn jsonl_file(name: &str, lines: &[String]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "mmsend-cli-{name}-{:08x}.jsonl",
        rand::random::<u32>()
    ));
    let mut f = std::fs::File::create(&path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    path
}

#[test]
fn enqueue_json_reports_every_line_and_exits_1_when_some_fail() {
    let good = common::job("cli-json-1", "r1").to_string();
    let path = jsonl_file("dry", &[good, r#"{"v":1,"job_id":"x"}"#.into()]);
    let out = mmsend()
        .args(["enqueue", "--dry-run", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is one JSON document ({e}): {}", text(&out.stdout)));
    assert_eq!(report["lines"], 2);
    assert_eq!(report["published"], 1);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["invalid"][0]["line"], 2);
    assert!(report["invalid"][0]["error"]
        .as_str()
        .unwrap()
        .contains("ad_account_id"));
    assert_eq!(report["failed"], Value::Array(vec![]));
    // no progress bar or table leaks into either stream
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

/// A config file that makes the CLI see the harness's topology.
fn config_for(h: &Harness) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(&h.topology.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    h.write_config(&dir, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_and_topology_show_speak_json() {
    let h = Harness::start(Opts::idle("clijson")).await;
    let config = config_for(&h);
    let lines: Vec<String> = (0..5)
        .map(|i| common::job(&format!("clijson-{i}"), "r").to_string())
        .collect();
    let path = jsonl_file("pub", &lines);

    let mut c = mmsend();
    c.args(["enqueue", "--json", "--prefix", &h.topology.prefix])
        .arg("--config")
        .arg(&config)
        .arg(&path);
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["lines"].as_u64(), report["published"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(report["dry_run"], false);

    let mut c = mmsend();
    c.args(["topology", "show", "--json", "--prefix", &h.topology.prefix])
        .arg("--config")
        .arg(&config);
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["prefix"], h.topology.prefix.as_str());
    let queues = shown["queues"].as_array().unwrap();
    let send = queues
        .iter()
        .find(|q| q["name"] == h.topology.send_queue().as_str())
        .unwrap_or_else(|| panic!("no work queue in {shown}"));
    assert_eq!(send["role"], "work");
    assert_eq!(send["messages"], 5);
    assert_eq!(send["consumers"], 0);
    // work, the tiers, dead letters, held (paused campaigns), webhooks and
    // their wait queue
    assert_eq!(queues.len(), h.topology.tiers.len() + 5, "{shown}");

    // a broker that is not there is fatal: 2, with the remedy
    let mut c = mmsend();
    c.args(["topology", "show", "--json"])
        .env("MMSEND_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("MMSEND_AMQP_URL"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());

    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&config);
    h.finish().await;
}

/// Runs `mmsend args…` with its standard output closed before it writes,
/// like `mmsend … | head -0`.
async fn with_closed_stdout(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut child = mmsend()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_quietly() {
    let h = Harness::start(Opts::idle("clipipe")).await;
    let config = config_for(&h);
    let config = config.to_string_lossy().into_owned();
    let prefix = h.topology.prefix.clone();
    for args in [
        vec!["topology", "show"],
        vec!["topology", "show", "--json"],
        vec!["topology", "definitions"],
        // printed with println! in the dlq module: the binary's edge catches it
        vec!["dlq", "list"],
        vec!["dlq", "stats"],
    ] {
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        args.extend([
            "--prefix".into(),
            prefix.clone(),
            "--config".into(),
            config.clone(),
        ]);
        let out = with_closed_stdout(args.clone()).await;
        let stderr = text(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "mmsend {}: {stderr}",
            args.join(" ")
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "mmsend {}: {stderr}",
            args.join(" ")
        );
    }
    let _ = std::fs::remove_file(&config);
    h.finish().await;
}

/// Runs `command` under a pseudo-terminal (util-linux `script`) and returns
/// everything it wrote there.
fn on_a_terminal(command: &str, no_color: Option<&str>) -> String {
    let mut c = Command::new("script");
    c.args(["-qec", command, "/dev/null"])
        .env_remove("NO_COLOR");
    if let Some(v) = no_color {
        c.env("NO_COLOR", v);
    }
    let out = c
        .stdin(Stdio::null())
        .output()
        .expect("util-linux `script` runs (apt-get install bsdutils)");
    text(&out.stdout)
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    // the simulator logs one line at info when it is up; end it after that
    let bin = env!("CARGO_BIN_EXE_mmsend");
    let cmd = format!("timeout 2 {bin} simulate --listen 127.0.0.1:0");
    let tty = on_a_terminal(&cmd, None);
    assert!(tty.contains("simulator up"), "{tty}");
    assert!(tty.contains('\u{1b}'), "a terminal gets colour: {tty:?}");

    let no_color = on_a_terminal(&cmd, Some("1"));
    assert!(no_color.contains("simulator up"), "{no_color}");
    assert!(!no_color.contains('\u{1b}'), "NO_COLOR=1: {no_color:?}");

    // a pipe gets none
    let out = Command::new("timeout")
        .args(["2", bin, "simulate", "--listen", "127.0.0.1:0"])
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let piped = text(&out.stderr);
    assert!(piped.contains("simulator up"), "{piped}");
    assert!(!piped.contains('\u{1b}'), "a pipe: {piped:?}");
}

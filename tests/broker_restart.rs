//! The broker restarts under a running worker (`rabbitmqctl stop_app`, a
//! few seconds, `start_app`): nothing is lost, duplicates stay within the
//! calls that were in flight, and `/readyz` drops and comes back.
//!
//! Stopping a broker is never done to the shared one: this test starts a
//! private RabbitMQ node of its own (own node name, AMQP and distribution
//! ports, directory and Erlang cookie, no plugins), as
//! `deploy/cluster/run.sh` does, and stops it at the end. It is in a file
//! of its own because starting an Erlang VM takes a few seconds; the whole
//! test takes about 20-30 s.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, job, Harness, Opts};

/// The RabbitMQ scripts: Debian's real ones (the wrapper in /usr/sbin
/// switches user), else whatever is on the PATH.
fn rabbitmq_bin() -> PathBuf {
    let debian = Path::new("/usr/lib/rabbitmq/bin");
    if debian.join("rabbitmq-server").exists() {
        return debian.to_path_buf();
    }
    let out = Command::new("sh")
        .args(["-c", "command -v rabbitmq-server"])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "RabbitMQ is not installed (deploy/local/ensure-rabbitmq.sh)"
    );
    Path::new(&path).parent().unwrap().to_path_buf()
}

/// A RabbitMQ node of this test's own, stopped and removed on drop.
struct PrivateNode {
    name: String,
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    server: Child,
}

impl PrivateNode {
    fn start() -> PrivateNode {
        let bin = rabbitmq_bin();
        let tag = format!("{:08x}", rand::random::<u32>());
        let name = format!("mmsend-restart-{tag}@localhost");
        let dir = std::env::temp_dir().join(format!("mmsend-node-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, format!("{:032x}", rand::random::<u128>())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let port = common::free_port();
        let dist = common::free_port();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = {port}\nloopback_users = none\n"),
        )
        .unwrap();
        let server = Command::new(bin.join("rabbitmq-server"))
            .env("HOME", &dir)
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("ERL_CRASH_DUMP", dir.join("erl_crash.dump"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server starts");
        let node = PrivateNode {
            name,
            port,
            dir,
            bin,
            server,
        };
        common::eventually_blocking(
            Duration::from_secs(90),
            "the private RabbitMQ node starts",
            || node.ctl(&["await_startup", "--timeout", "5"]),
        );
        node
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl -n <this node> args…`; true on success.
    fn ctl(&self, args: &[&str]) -> bool {
        Command::new(self.bin.join("rabbitmqctl"))
            .env("HOME", &self.dir)
            .args(["-q", "-n", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        if !self.ctl(&["stop"]) {
            // the node's own process, by the pid it wrote
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `/readyz` of the worker: `Some(true)` for 200, `Some(false)` for 503.
async fn ready(client: &reqwest::Client, port: u16) -> Option<bool> {
    let r = client
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some(r.status().is_success())
}

#[tokio::test]
async fn a_broker_restart_mid_run_loses_nothing() {
    let node = PrivateNode::start();
    // this test binary is its own process: the harness (and its clean-up
    // guard) follow MMSEND_AMQP_URL to the private node
    std::env::set_var("MMSEND_AMQP_URL", node.url());
    let mut opts = Opts::idle("restart");
    opts.sim.latency = mmsend::simulator::Latency::Fixed(Duration::from_millis(50));
    let mut h = Harness::start(opts).await;
    let n = 3000;
    for i in 0..n {
        h.publish_job(&job(&format!("r{i}"), &format!("r-{i}")))
            .await;
    }

    let concurrency = 32u64;
    let metrics_port = common::free_port();
    let dir = common::tmpdir("restart");
    // the harness follows MMSEND_AMQP_URL, set to the private node above
    let mut worker = h
        .worker_command(&dir, "")
        .env("MMSEND_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("MMSEND_CONCURRENCY", concurrency.to_string())
        .env("MMSEND_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let http = reqwest::Client::new();
    eventually!(
        Duration::from_secs(30),
        h.sim.distinct_sent() >= 300 && ready(&http, metrics_port).await == Some(true),
        "the worker is sending: {}",
        h.sim.distinct_sent()
    );
    assert!(node.ctl(&["stop_app"]), "rabbitmqctl stop_app");
    let at_stop = h.sim.distinct_sent();
    eventually!(
        Duration::from_secs(10),
        ready(&http, metrics_port).await == Some(false),
        "/readyz drops while the broker is down"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(node.ctl(&["start_app"]), "rabbitmqctl start_app");
    eventually!(
        Duration::from_secs(60),
        ready(&http, metrics_port).await == Some(true),
        "/readyz comes back after the broker does"
    );
    // the test's own connection went down with the broker too
    h.conn = mmsend::broker::connect(&node.url(), "test").await.unwrap();
    eventually!(
        Duration::from_secs(60),
        h.sim.distinct_sent() >= n,
        "every job sent: {} of {n}",
        h.sim.distinct_sent()
    );
    eventually!(
        Duration::from_secs(20),
        h.depth(&h.topology.send_queue()).await == 0,
        "the work queue is empty"
    );
    let stats = h.sim.stats();
    eprintln!(
        "broker restart: {n} jobs, stopped at {at_stop} sent; every job sent, {} duplicates (concurrency {concurrency})",
        stats.duplicates
    );
    assert!(at_stop < n, "the broker stopped mid-run");
    assert_eq!(stats.sends_by_recipient.len(), n, "zero lost");
    assert!(
        stats.duplicates <= concurrency,
        "{} duplicates, more than the {concurrency} calls in flight",
        stats.duplicates
    );
    assert!(h.drain_dlq().await.is_empty(), "nothing dead");

    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "worker exit {status:?}");
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
    drop(node);
}

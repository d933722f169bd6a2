//! The producers in other languages (`examples/producers/`) publish a job
//! the worker accepts, the way the producing chapter says: to the exchange
//! `<prefix>` with routing key `<prefix>.send`, persistent, `message_id` =
//! `job_id`, JSON, with the enqueue time; and with `mandatory` and publisher
//! confirms, so a job nobody can route fails the script instead of vanishing.
//!
//! Each runs against the real broker on a topology of its own (a random
//! prefix, declared by the library first, deleted after). A script whose
//! runtime or AMQP library is missing (`python3` with `pika`, `node` with
//! `amqplib`, found through `NODE_PATH` too) is skipped with the reason
//! printed (`SKIPPED: …`); `MMSEND_REQUIRE_PRODUCERS=1` makes that a failure.

mod common;

use std::process::Command;

use lapin::options::{BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use mmsend::broker::{self, Topology};
use mmsend::job::Job;

struct Script {
    /// Under examples/producers/.
    file: &'static str,
    program: &'static str,
    /// Exits 0 where the runtime and its AMQP library are present.
    probe: &'static [&'static str],
    job_id: &'static str,
    /// What installs the library.
    install: &'static str,
}

const SCRIPTS: [Script; 2] = [
    Script {
        file: "producer.py",
        program: "python3",
        probe: &["-c", "import pika"],
        job_id: "py-000001",
        install: "pip install pika",
    },
    Script {
        file: "producer.js",
        program: "node",
        probe: &["-e", "require('amqplib')"],
        job_id: "js-000001",
        install: "npm install amqplib",
    },
];

/// Whether the script can run here; prints why not.
fn present(s: &Script) -> bool {
    let why = match Command::new(s.program).args(s.probe).output() {
        Ok(out) if out.status.success() => return true,
        Ok(_) => format!("`{} {}` failed", s.program, s.probe.join(" ")),
        Err(e) => format!("{} cannot be run ({e})", s.program),
    };
    if std::env::var("MMSEND_REQUIRE_PRODUCERS").as_deref() == Ok("1") {
        panic!("MMSEND_REQUIRE_PRODUCERS=1 but {why}");
    }
    eprintln!(
        "SKIPPED: examples/producers/{} did not run: {why} ({} to run it)",
        s.file, s.install
    );
    false
}

fn run(s: &Script, prefix: &str) -> std::process::Output {
    let path = format!(
        "{}/examples/producers/{}",
        env!("CARGO_MANIFEST_DIR"),
        s.file
    );
    Command::new(s.program)
        .arg(path)
        .env("MMSEND_AMQP_URL", common::amqp_url())
        .env("MMSEND_PREFIX", prefix)
        .output()
        .unwrap()
}

#[tokio::test]
async fn each_producer_publishes_a_job_the_worker_accepts() {
    let conn = broker::connect(&common::amqp_url(), "test producers")
        .await
        .unwrap();
    for s in SCRIPTS.iter().filter(|s| present(s)) {
        let prefix = common::random_prefix("producers");
        let topology = Topology::with_prefix(&prefix).unwrap();
        let mut guard = common::TopologyGuard::new(&topology);
        topology.declare(&conn).await.unwrap();

        let out = run(s, &prefix);
        assert!(
            out.status.success(),
            "{} failed: {}{}",
            s.file,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let channel = conn.create_channel().await.unwrap();
        let message = channel
            .basic_get(
                topology.send_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{}: no job on {}", s.file, topology.send_queue()));
        let job = Job::parse(&message.delivery.data)
            .unwrap_or_else(|e| panic!("{}: the worker would refuse the job: {e}", s.file));
        assert_eq!(job.job_id, s.job_id);
        let props = &message.delivery.properties;
        assert_eq!(
            props.message_id().as_ref().map(|m| m.as_str()),
            Some(s.job_id),
            "{}: message_id",
            s.file
        );
        assert_eq!(*props.delivery_mode(), Some(2), "{}: persistent", s.file);
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        let headers = props.headers().clone().unwrap_or_else(FieldTable::default);
        let enqueued = match headers.inner().get("x-mmsend-enqueued-at") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("{}: x-mmsend-enqueued-at is {other:?}", s.file),
        };
        assert!(
            chrono::DateTime::parse_from_rfc3339(&enqueued).is_ok(),
            "{}: x-mmsend-enqueued-at {enqueued:?} is not RFC 3339",
            s.file
        );
        assert!(props.timestamp().is_some(), "{}: timestamp", s.file);
        channel.close(200, "done".into()).await.unwrap();

        topology.delete(&conn).await.unwrap();
        guard.disarm();
    }
}

#[tokio::test]
async fn an_unroutable_job_fails_the_producer() {
    let conn = broker::connect(&common::amqp_url(), "test producers")
        .await
        .unwrap();
    for s in SCRIPTS.iter().filter(|s| present(s)) {
        // the exchange exists, no queue is bound: only `mandatory` notices
        let prefix = common::random_prefix("producers-unroutable");
        let channel = conn.create_channel().await.unwrap();
        channel
            .exchange_declare(
                prefix.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    auto_delete: false,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let out = run(s, &prefix);
        channel
            .exchange_delete(prefix.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
        assert!(
            !out.status.success(),
            "{} reported success for a job no queue took: {}",
            s.file,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// The producing chapter shows the scripts as they are.
#[test]
fn the_book_shows_the_scripts_as_they_are() {
    let root = env!("CARGO_MANIFEST_DIR");
    let chapter = std::fs::read_to_string(format!("{root}/docs/src/job.md")).unwrap();
    for (s, fence) in SCRIPTS.iter().zip(["```python\n", "```js\n"]) {
        let code =
            std::fs::read_to_string(format!("{root}/examples/producers/{}", s.file)).unwrap();
        let shown = chapter
            .split(fence)
            .nth(1)
            .and_then(|rest| rest.split("```\n").next())
            .unwrap_or_else(|| panic!("docs/src/job.md has no {fence:?} block"));
        assert_eq!(
            shown, code,
            "docs/src/job.md shows another {} than examples/producers/ has; copy the file into the chapter",
            s.file
        );
    }
}

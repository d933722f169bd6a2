//! `mmsend demo`: the whole pipeline on this machine, no Meta account.
//!
//! It starts the Graph API simulator in-process, declares a demo topology
//! (its own prefix, short delay tiers), enqueues sample jobs across five
//! campaigns and three pages with a realistic mix (mostly fine; campaigns
//! that are still populating for a few seconds; a campaign out of budget,
//! whose jobs wait behind the budget gate and expire; a few page mismatches
//! and unsupported regions; flaky, throttled and transient answers), runs a worker, shows live progress, and when every job
//! is settled prints what happened by outcome and class, the DLQ stats, and
//! the commands to inspect and replay. It checks its own books: the sends
//! the simulator received must equal the jobs the worker acked as sent, and
//! sent + dead must equal the jobs enqueued.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Topology};
use crate::classify::{Class, RetryPolicy};
use crate::graph::{ClientConfig, Secret, TokenStore};
use crate::metrics::Metrics;
use crate::producer::Producer;
use crate::simulator::{Latency, SimConfig, SimStats, Simulator};
use crate::worker::{self, gates::GateTimes, pacing::PacingConfig, WorkerConfig};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// RabbitMQ URL (or a comma-separated list of cluster nodes).
    pub amqp_url: String,
    /// Sample jobs to enqueue.
    pub jobs: usize,
    /// The worker's concurrency (jobs processed at once).
    pub concurrency: u16,
    /// Keep the demo queues (and the dead letters) afterwards.
    pub keep: bool,
    /// Redis for the send ledger and fleet-wide pacing and gates.
    pub redis_url: Option<String>,
    /// Draw the live progress line.
    pub progress: bool,
    /// Give up after this long.
    pub timeout: Duration,
}

/// What the demo saw.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The demo topology's prefix (`mmsend-demo-<hex>`), for the dlq commands.
    pub prefix: String,
    /// Jobs enqueued.
    pub jobs: usize,
    /// (outcome, class) → count, from the worker's metrics.
    pub outcomes: BTreeMap<(String, String), u64>,
    /// Jobs the worker acked as sent.
    pub sent: u64,
    /// Jobs the worker dead-lettered.
    pub dead: u64,
    /// What the simulator received and answered.
    pub sim: SimStats,
    /// Wall time of the whole demo, start to summary.
    pub seconds: f64,
    /// Redis answered at the end (`None`: no Redis configured).
    pub redis_up: Option<bool>,
    /// Deliveries the send ledger acked as already sent.
    pub suppressed: u64,
    /// Jobs settled as sent on 2300035 after a maybe-sent call.
    pub suspected: u64,
}

impl DemoReport {
    /// The books balance: every job sent or dead, and every send the
    /// simulator received was acked as sent exactly once.
    pub fn balanced(&self) -> bool {
        self.sent + self.dead == self.jobs as u64
            && self.sim.sent == self.sent
            && self.sim.duplicates == 0
    }
}

const CAMPAIGNS: [(&str, &str); 4] = [
    ("spring-sale", "120210000000000001"),
    ("black-friday", "120210000000000002"),
    ("new-arrivals", "120210000000000003"),
    ("winter-preview", "120210000000000004"),
];
/// Out of budget: every send of this campaign answers 2300015.
const BUDGET_CAMPAIGN: (&str, &str) = ("vip-budget", "120210000000000009");
const PAGES: [&str; 3] = ["9876543210", "9876543211", "9876543212"];

/// The sample job `i`: campaign, page and a recipient token that makes the
/// simulator answer what the demo wants to show (public for `tests/schemas.rs`,
/// which checks the demo's jobs against the published schema).
pub fn sample_job(i: usize) -> serde_json::Value {
    let (mut campaign, mut message_id) = CAMPAIGNS[i % CAMPAIGNS.len()];
    let page = PAGES[i % PAGES.len()];
    let token = match i % 100 {
        0 | 50 => {
            (campaign, message_id) = BUDGET_CAMPAIGN;
            format!("sim:err:2300015:{i}")
        }
        5 => format!("sim:err:2300005:{i}"),  // page mismatch
        9 => format!("sim:err:2300030:{i}"),  // business region not supported
        13 => format!("sim:err:2300031:{i}"), // recipient region excluded
        17 => format!("sim:flaky:2:{i}"),     // transient twice, then fine
        _ => format!("demo-recipient-{i}"),
    };
    json!({"v": 1, "job_id": format!("demo-{i:06}"), "ad_account_id": "1234567890",
           "page_id": page, "message_id": message_id, "subscription_token": token,
           "message": {"text": "Hi {{first_name}}, new deals are in!"}, "campaign": campaign})
}

/// Runs the demo. Fails with advice when RabbitMQ is unreachable.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let prefix = format!("mmsend-demo-{:06x}", rand::random::<u32>() & 0xffffff);
    let topology = Topology::new(&prefix, &["1s", "3s", "10s"], 10).map_err(anyhow::Error::msg)?;
    let conn = broker::connect(&opts.amqp_url, "demo").await?;
    topology.declare(&conn).await?;

    let sim = Simulator::start(
        "127.0.0.1:0",
        SimConfig {
            latency: Latency::Range(Duration::from_millis(5), Duration::from_millis(40)),
            error_mix: vec![(4, 0.005), (2, 0.01)],
            populating: Duration::from_secs(4),
            regain_minutes: 0,
            ..SimConfig::default()
        },
    )
    .await?;
    println!(
        "demo: simulator on {}, topology {prefix:?} (tiers 1s/3s/10s), {} jobs",
        sim.base_url(),
        opts.jobs
    );

    let ms = Duration::from_millis;
    let policy = RetryPolicy {
        max_attempts: 6,
        transient_delays: vec![ms(1000), ms(3000)],
        not_ready_delay: ms(3000),
        not_ready_max_age: Duration::from_secs(60),
        budget_delay: ms(3000),
        budget_max_age: Duration::from_secs(10),
        recipient_capped_delay: ms(3000),
        recipient_capped_max_age: Duration::from_secs(30),
        gated_max_age: Duration::from_secs(30),
        ..RetryPolicy::default()
    };
    let graph = ClientConfig {
        base_url: sim.base_url(),
        request_timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    };
    let tokens = TokenStore::new(Some(Secret::new("demo-access-token")));
    let mut config =
        WorkerConfig::new(&opts.amqp_url, topology.clone(), graph, tokens).with_policy(policy);
    config.gate_times = GateTimes {
        throttle: ms(1000),
        auth: ms(3000),
        probe_wait: ms(1000),
        ..config.gate_times
    };
    config.concurrency = opts.concurrency;
    config.pacing = PacingConfig {
        per_page: 400,
        ..PacingConfig::default()
    };
    config.worker_id = "demo-worker".into();
    config.fleet = opts
        .redis_url
        .as_deref()
        .map(crate::fleet::FleetConfig::new);
    match &opts.redis_url {
        Some(url) => println!(
            "demo: send ledger and fleet coordination on Redis at {} (unreachable: the worker says so and runs per process)",
            crate::broker::redact_url(url)
        ),
        None => println!("demo: no Redis; pacing and gates per process, no send ledger"),
    }
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(worker::run(config, metrics.clone(), shutdown.clone()));

    let producer = Producer::on(&conn, &topology).await?;
    let bodies: Vec<Vec<u8>> = (0..opts.jobs)
        .map(|i| serde_json::to_vec(&sample_job(i)).expect("json"))
        .collect();
    let results = producer
        .send_batch(bodies.iter().map(|b| b.as_slice()))
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        anyhow::bail!("{failed} sample jobs were not confirmed by RabbitMQ");
    }
    println!(
        "demo: enqueued {} jobs in {:.1}s; the worker is sending…",
        opts.jobs,
        started.elapsed().as_secs_f64()
    );

    let bar = indicatif::ProgressBar::new(opts.jobs as u64);
    if opts.progress {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} settled  {msg}",
            )
            .expect("valid template"),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let deadline = Instant::now() + opts.timeout;
    let mut last = (Instant::now(), 0u64);
    let mut rate = 0.0;
    loop {
        let crate::metrics::SettledCounts {
            sent,
            retried,
            dead,
        } = metrics.settled_counts();
        let waiting: u32 = match topology.show(&conn).await {
            Ok(qs) => qs
                .iter()
                .filter(|q| q.name.contains(".retry."))
                .map(|q| q.messages)
                .sum(),
            Err(_) => 0,
        };
        let dt = last.0.elapsed().as_secs_f64();
        if dt >= 1.0 {
            rate = (sent - last.1) as f64 / dt;
            last = (Instant::now(), sent);
        }
        bar.set_position(sent + dead);
        bar.set_message(format!(
            "sent {sent}  waiting in delay {waiting}  dead {dead}  (retries so far {retried})  {rate:.0} sends/s"
        ));
        if sent + dead >= opts.jobs as u64 && metrics.inflight() == 0 {
            break;
        }
        if Instant::now() > deadline {
            bar.abandon();
            shutdown.cancel();
            anyhow::bail!(
                "demo did not settle in {:?}: sent {sent}, dead {dead}, waiting {waiting}",
                opts.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    shutdown.cancel();
    worker.await??;

    let outcomes = metrics
        .settled_by_class()
        .into_iter()
        .map(|(outcome, class, n)| {
            let class = class.map_or("none", Class::as_str);
            ((outcome.label().to_string(), class.to_string()), n)
        })
        .collect();
    let crate::metrics::SettledCounts { sent, dead, .. } = metrics.settled_counts();
    let report = DemoReport {
        prefix: prefix.clone(),
        jobs: opts.jobs,
        outcomes,
        sent,
        dead,
        sim: sim.stats(),
        seconds: started.elapsed().as_secs_f64(),
        redis_up: opts.redis_url.as_ref().map(|_| metrics.redis_up()),
        suppressed: metrics.duplicates_suppressed(),
        suspected: metrics.suspected_duplicates(),
    };
    print_summary(&report);
    println!("\nDead-letter queue:");
    let (stats, scan) = crate::dlq::stats(&conn, &topology, crate::dlq::Filter::default()).await?;
    println!("{}", crate::report::dlq_stats_summary(&stats, &scan));
    if opts.keep {
        println!(
            "\nThe demo queues are kept. Inspect and replay the dead letters:\n\
             \x20 mmsend dlq stats  --prefix {prefix}\n\
             \x20 mmsend dlq list   --prefix {prefix} --class mismatch\n\
             \x20 mmsend dlq export --prefix {prefix} --reason terminal -o dead.jsonl\n\
             \x20 mmsend dlq replay --prefix {prefix} --code 2300005 --dry-run\n\
             \x20 mmsend dlq replay --prefix {prefix} --code 2300005\n\
             \x20 mmsend dlq purge  --prefix {prefix} --yes\n\
             \x20 mmsend topology show --prefix {prefix}"
        );
    } else {
        topology.delete(&conn).await?;
        if let Some(url) = &opts.redis_url {
            // the demo's ledger and gate keys go with its queues
            let fleet = crate::fleet::Fleet::new(
                crate::fleet::FleetConfig::new(url),
                &prefix,
                "demo",
                Metrics::new(),
            )?;
            let _ = fleet.delete_all().await;
        }
        println!(
            "\nThe demo queues were deleted. Run `mmsend demo --keep` to keep them, then:\n\
             \x20 mmsend dlq stats  --prefix <prefix>\n\
             \x20 mmsend dlq list   --prefix <prefix> --class mismatch\n\
             \x20 mmsend dlq replay --prefix <prefix> --code 2300005 --dry-run"
        );
    }
    let _ = conn.close(200, "demo done".into()).await;
    sim.shutdown().await;
    Ok(report)
}

fn print_summary(r: &DemoReport) {
    println!(
        "\nSettled {} jobs in {:.1}s: {} sent, {} dead.",
        r.jobs, r.seconds, r.sent, r.dead
    );
    let rows = r
        .outcomes
        .iter()
        .map(|((outcome, class), n)| vec![outcome.clone(), class.clone(), n.to_string()])
        .collect();
    println!(
        "{}",
        crate::report::table(&["outcome", "class (last failure)", "jobs"], &[2], rows)
    );
    let mut errors: Vec<_> = r.sim.errors.iter().collect();
    errors.sort_by(|a, b| b.1.cmp(a.1));
    let errors: Vec<String> = errors.iter().map(|(k, v)| format!("{k}×{v}")).collect();
    println!(
        "Simulator: {} requests, {} sends, {} duplicate sends; errors answered: {}",
        r.sim.requests,
        r.sim.sent,
        r.sim.duplicates,
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(", ")
        }
    );
    println!(
        "Books: {} (sent + dead = {} of {} jobs; simulator sends = {} acked sends)",
        if r.balanced() {
            "balanced ✓"
        } else {
            "NOT balanced ✗"
        },
        r.sent + r.dead,
        r.jobs,
        r.sim.sent
    );
    match r.redis_up {
        Some(true) => println!(
            "Send ledger: on (Redis); {} duplicate deliveries suppressed, {} jobs settled as sent on evidence",
            r.suppressed, r.suspected
        ),
        Some(false) => println!(
            "Send ledger: Redis was unreachable; the worker ran per process (start Redis: deploy/local/ensure-redis.sh)"
        ),
        None => println!("Send ledger: off (no Redis)"),
    }
}

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
//!
//! With Redis it also runs the delivery loop: the simulator posts Meta's
//! signed webhooks for each send (echo, delivery or failure, read, click;
//! delayed at random, a few twice) to a webhook receiver on a local port,
//! the worker's tracker joins them to the jobs, and the demo prints each
//! campaign's funnel next to what the simulator posted (they must be
//! equal).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Topology};
use crate::classify::{Class, RetryPolicy};
use crate::graph::{ClientConfig, Secret, TokenStore};
use crate::metrics::Metrics;
use crate::producer::Producer;
use crate::simulator::{Latency, SimConfig, SimStats, SimWebhooks, Simulator};
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
    /// Each campaign's delivery funnel (with Redis: the webhook loop runs).
    pub funnels: Vec<DemoFunnel>,
}

impl DemoReport {
    /// The books balance: every job sent or dead, every send the simulator
    /// received was acked as sent exactly once, and every webhook event it
    /// posted was counted once in its campaign's funnel.
    pub fn balanced(&self) -> bool {
        self.sent + self.dead == self.jobs as u64
            && self.sim.sent == self.sent
            && self.sim.duplicates == 0
            && self.funnels.iter().all(DemoFunnel::exact)
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
/// The app secret the demo's simulator signs its webhooks with.
const DEMO_APP_SECRET: &str = "demo-app-secret";

fn page_token(page: &str) -> String {
    format!("demo-page-token-{page}")
}

/// The webhook receiver on a free local port, storing into the demo's
/// topology; its address.
async fn start_receiver(
    amqp_url: &str,
    topology: &Topology,
    stop: &CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let config = crate::webhooks::WebhookConfig {
        amqp_url: amqp_url.to_string(),
        topology: topology.clone(),
        listen: "127.0.0.1:0".into(),
        verify_token: Secret::new("demo-verify-token"),
        app_secret: Secret::new(DEMO_APP_SECRET),
        max_body: crate::webhooks::MAX_BODY,
    };
    // the task ends with `stop`
    let (addr, _task) = crate::webhooks::spawn(config, Metrics::new(), stop.clone())
        .await
        .map_err(|e| anyhow::anyhow!("the demo's webhook receiver did not start: {e}"))?;
    println!(
        "demo: webhook receiver on http://{addr}/webhooks; the worker's tracker joins the events"
    );
    Ok(addr)
}

/// One campaign's delivery: what the tracker counted, and what the
/// simulator posted (each event once).
#[derive(Debug, Clone)]
pub struct DemoFunnel {
    /// The campaign.
    pub campaign: String,
    /// Its sends (the campaign's counter).
    pub sent: u64,
    /// Counted by the tracker.
    pub counted: crate::fleet::campaign::Funnel,
    /// Posted by the simulator: status → events.
    pub posted: BTreeMap<String, u64>,
}

impl DemoFunnel {
    /// Every posted event counted once, nothing else.
    pub fn exact(&self) -> bool {
        self.counted
            .stages()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (s.to_string(), n))
            .collect::<BTreeMap<_, _>>()
            == self.posted
    }
}

/// Waits (up to `wait`) until each campaign's funnel equals what the
/// simulator posted for it, and returns the funnels as they are then.
async fn settle_funnels(
    url: &str,
    prefix: &str,
    sim: &crate::simulator::SimHandle,
    wait: Duration,
) -> Vec<DemoFunnel> {
    let deadline = Instant::now() + wait;
    let campaigns = match crate::fleet::campaign::Campaigns::connect(
        &crate::fleet::FleetConfig::new(url),
        prefix,
    )
    .await
    {
        Ok(c) => c,
        Err(_) => return Vec::new(),
    };
    loop {
        let posted = sim.stats().webhooks;
        let mut out = Vec::new();
        for (name, message_id) in CAMPAIGNS.iter().chain([&BUDGET_CAMPAIGN]) {
            // a campaign with no send has no delivery to show
            let Ok(Some(v)) = campaigns.show(name).await else {
                continue;
            };
            if v.sent == 0 {
                continue;
            }
            out.push(DemoFunnel {
                campaign: name.to_string(),
                sent: v.sent,
                counted: v.funnel,
                posted: posted.get(*message_id).cloned().unwrap_or_default(),
            });
        }
        if out.iter().all(DemoFunnel::exact) || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print_funnels(funnels: &[DemoFunnel]) {
    println!("\nDelivery (Meta's webhooks, joined by the tracker):");
    let rows = funnels
        .iter()
        .map(|f| {
            let mut row = vec![f.campaign.clone(), f.sent.to_string()];
            row.extend(f.counted.stages().iter().map(|(_, n)| n.to_string()));
            row.push(if f.exact() {
                "✓".into()
            } else {
                "✗".into()
            });
            row
        })
        .collect();
    println!(
        "{}",
        crate::report::table(
            &[
                "campaign",
                "sent",
                "echoed",
                "delivered",
                "read",
                "clicked",
                "failed",
                "unmatched",
                "= posted"
            ],
            &[1, 2, 3, 4, 5, 6, 7],
            rows
        )
    );
    let exact = funnels.iter().all(DemoFunnel::exact);
    println!(
        "Funnel: {} (every event the simulator posted counted once, duplicates and reordering included)",
        if exact { "exact ✓" } else { "NOT exact ✗ (see mmsend campaign show)" }
    );
}

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

    // with Redis, the whole delivery loop: the simulator posts Meta's
    // webhooks to a receiver, and the worker's tracker joins them
    let stop_receiver = CancellationToken::new();
    let receiver = match &opts.redis_url {
        Some(_) => Some(start_receiver(&opts.amqp_url, &topology, &stop_receiver).await?),
        None => None,
    };
    let sim = Simulator::start(
        "127.0.0.1:0",
        SimConfig {
            latency: Latency::Range(Duration::from_millis(5), Duration::from_millis(40)),
            error_mix: vec![(4, 0.005), (2, 0.01)],
            populating: Duration::from_secs(4),
            regain_minutes: 0,
            webhooks: receiver.as_ref().map(|addr| SimWebhooks {
                url: format!("http://{addr}/webhooks"),
                app_secret: DEMO_APP_SECRET.into(),
                page_id: PAGES[0].into(),
                page_by_token: PAGES
                    .iter()
                    .map(|p| (page_token(p), p.to_string()))
                    .collect(),
                delivered: 0.9,
                read: 0.5,
                click: 0.2,
                failed: 0.03,
                duplicate: 0.05,
                max_delay: Duration::from_secs(1),
            }),
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
    // a token per page, as Meta's page tokens (the simulator knows each
    // token's page, for the webhooks it posts)
    let tokens = PAGES.iter().fold(TokenStore::new(None), |t, p| {
        t.with_page(*p, Secret::new(page_token(p)))
    });
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
    config.fleet = opts.redis_url.as_deref().map(|url| {
        let mut fleet = crate::fleet::FleetConfig::new(url);
        // the demo's first sends come before any echo: index them all
        fleet.delivery_tracking = crate::config::DeliveryTracking::On;
        fleet
    });
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
    // the last webhooks arrive up to a second after their send; the tracker
    // joins them as they come
    let funnels = match &opts.redis_url {
        Some(url) if receiver.is_some() => {
            Some(settle_funnels(url, &prefix, &sim, Duration::from_secs(20)).await)
        }
        _ => None,
    };
    shutdown.cancel();
    worker.await??;
    stop_receiver.cancel();

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
        funnels: funnels.unwrap_or_default(),
    };
    print_summary(&report);
    if !report.funnels.is_empty() {
        print_funnels(&report.funnels);
    }
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

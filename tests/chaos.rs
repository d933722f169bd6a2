//! The chaos run (DESIGN §15), in the style of Jepsen: a generator of
//! faults drawn from a seed ([`faults`]), a history of what was done and
//! when ([`history`]), and a checker of invariants ([`checker`]) that reads
//! only what the run left behind — the simulator's own record, the queues,
//! the DLQ, the results stream and the logs. [`run`] ties them together:
//! `mmsend worker` processes with a private Redis against the in-process
//! simulator with Meta's 12 h recipient cap on, campaigns that share their
//! recipients, a mix of answers, and SIGKILL/SIGTERM of workers, the broker
//! closing their connections, Redis frozen, paused and restarted empty,
//! duplicate publishes and mid-run replays of the DLQ.
//!
//! Every run prints its seed; the same seed replays the same schedule.
//!
//! ```text
//! # the short run (fixed seeds, part of `cargo test`)
//! cargo test --test chaos -- --nocapture
//! # a long run: 20 new seeds of 3,000 jobs each
//! MMSEND_CHAOS_SEEDS=20 MMSEND_CHAOS_JOBS=3000 cargo test --test chaos -- --nocapture
//! # replay seeds (long size unless MMSEND_CHAOS_JOBS says otherwise;
//! # MMSEND_CHAOS_REDIS=off for a seed that ran without Redis faults)
//! MMSEND_CHAOS_SEED=1234,5678 cargo test --test chaos -- --nocapture
//! ```
//!
//! The simulator also posts Meta's webhooks for every send (some twice,
//! out of order) to a receiver, and the workers' trackers join them: the
//! checker holds every `delivery` event and each campaign's funnel to what
//! was posted (exactly, in a run without Redis faults: the short run's third
//! seed, and one new seed in three).
//!
//! `MMSEND_CHAOS_SEEDS=<n>` runs n new seeds, `MMSEND_CHAOS_SEED=<a>,<b>…`
//! these seeds, `MMSEND_CHAOS_JOBS=<n>` sets the jobs per seed of either
//! (default 3,000); the short run's seeds are 300 jobs each. Each seed
//! prints a summary row (jobs, sent, dead by reason, faults, duplicates
//! suppressed, suspected sends, verdict, time); a failed seed prints the
//! fault history, every violation and the story of each offending job,
//! and keeps the workers' logs.

mod common;

#[path = "chaos/checker.rs"]
mod checker;
#[path = "chaos/faults.rs"]
mod faults;
#[path = "chaos/history.rs"]
mod history;
#[path = "chaos/run.rs"]
mod run;

use std::time::Duration;

use faults::{Plan, Size};

/// The short run's seeds: between them, every fault kind and fail mode;
/// the last without Redis faults, so that the delivery funnel must be
/// exact (checker invariant 9).
const SHORT_SEEDS: [(u64, bool); 3] = [(1, true), (2, true), (3, false)];

/// Which seeds, each at its size, from the environment, and the drain
/// limit. `MMSEND_CHAOS_REDIS=off` runs every seed without Redis faults;
/// new seeds (`MMSEND_CHAOS_SEEDS`) go without them one in three.
fn seeds() -> (Vec<(u64, Size)>, Duration) {
    let jobs = std::env::var("MMSEND_CHAOS_JOBS")
        .ok()
        .and_then(|n| n.trim().parse().ok());
    let redis_off = std::env::var("MMSEND_CHAOS_REDIS").is_ok_and(|v| v.trim() == "off");
    let sized = |size: Size, redis: bool| match redis && !redis_off {
        true => size,
        false => size.without_redis_faults(),
    };
    let long = |default: usize| Size::long(jobs.unwrap_or(default));
    if let Ok(list) = std::env::var("MMSEND_CHAOS_SEED") {
        let seeds = list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                let seed = s
                    .trim()
                    .parse()
                    .expect("MMSEND_CHAOS_SEED: seeds are numbers");
                (seed, sized(long(3000), true))
            })
            .collect();
        return (seeds, Duration::from_secs(300));
    }
    if let Ok(n) = std::env::var("MMSEND_CHAOS_SEEDS") {
        let n: usize = n
            .trim()
            .parse()
            .expect("MMSEND_CHAOS_SEEDS: a number of seeds");
        let seeds = (0..n)
            .map(|i| (rand::random::<u32>() as u64, sized(long(3000), i % 3 != 2)))
            .collect();
        return (seeds, Duration::from_secs(300));
    }
    let size = match jobs {
        Some(j) => Size {
            jobs: j,
            ..Size::short()
        },
        None => Size::short(),
    };
    let seeds = SHORT_SEEDS
        .iter()
        .map(|(seed, redis)| (*seed, sized(size, *redis)))
        .collect();
    (seeds, Duration::from_secs(60))
}

fn summary_header() -> String {
    format!(
        "{:>10} {:>6} {:>6} {:<44} {:>6} {:>5} {:>5} {:>6} {:>17} {:>8} {:>7}",
        "seed",
        "jobs",
        "sent",
        "dead by reason",
        "faults",
        "dups",
        "susp",
        "repeat",
        "webhook events",
        "verdict",
        "took"
    )
}

fn summary_row(o: &run::Outcome) -> String {
    let s = &o.verdict.summary;
    let dead: Vec<String> = s.dead.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let faults: usize = o.history.applied_faults().values().sum();
    format!(
        "{:>10} {:>6} {:>6} {:<44} {:>6} {:>5} {:>5} {:>6} {:>17} {:>8} {:>6.0}s",
        o.plan.seed,
        s.jobs,
        s.sent,
        dead.join(", "),
        faults,
        s.duplicates,
        s.suspected,
        s.repeat_calls,
        // counted by the trackers / posted by the simulator; `=` when they
        // must be equal (Redis never unusable), `≤` otherwise
        {
            let total = |m: &std::collections::BTreeMap<
                String,
                std::collections::BTreeMap<String, u64>,
            >|
             -> u64 { m.values().flat_map(|f| f.values()).sum() };
            let exact = o.observed.outages.is_empty() && o.observed.ledger_losses.is_empty();
            format!(
                "{} {} {}",
                total(&o.observed.funnels),
                if exact { "=" } else { "≤" },
                total(&o.observed.posted)
            )
        },
        if o.verdict.passed() {
            "ok".to_string()
        } else {
            format!("{} bad", o.verdict.violations.len())
        },
        o.took.as_secs_f64()
    )
}

/// The failure report of one seed: safe to print (secrets masked).
fn report(o: &run::Outcome) -> String {
    let mut out = format!(
        "\nchaos seed {} FAILED ({} violations). Replay: MMSEND_CHAOS_SEED={} MMSEND_CHAOS_JOBS={} cargo test --test chaos -- --nocapture\n",
        o.plan.seed,
        o.verdict.violations.len(),
        o.plan.seed,
        o.plan.size.jobs
    );
    out.push_str(&format!(
        "fail mode {}, populating {:?}, budget window {:?}, workers' logs in {}\nfaults:\n{}",
        o.plan.fail_mode,
        o.plan.populating,
        o.plan.budget_window,
        o.dir.display(),
        o.history.faults_text()
    ));
    let s = &o.verdict.summary;
    out.push_str(&format!(
        "allowed: {} ambiguous letters of sent jobs, {} letters after a lost ledger, {} suspected sends maybe sent by design, {} twin letters dead before the send, {} jobs with twin letters; {} requests, {} events\nviolations:\n",
        s.ambiguous_dead, s.ledger_lost_dead, s.suspected_allowed, s.twin_dead_before_send, s.twin_letters, s.requests, s.events
    ));
    let mut shown = std::collections::BTreeMap::new();
    for v in &o.verdict.violations {
        let n = shown.entry(v.kind).or_insert(0);
        *n += 1;
        if *n <= 25 {
            let detail = checker::mask(&o.observed.secrets, &v.detail);
            out.push_str(&format!("  {:?}: {detail}\n", v.kind));
        }
    }
    for (kind, n) in shown.iter().filter(|(_, n)| **n > 25) {
        out.push_str(&format!("  … {} more {kind:?}\n", n - 25));
    }
    // the stories of the first few jobs of each kind
    let mut jobs = std::collections::BTreeSet::new();
    let mut per_kind = std::collections::BTreeMap::new();
    for v in &o.verdict.violations {
        for &job in &v.jobs {
            let n = per_kind.entry(v.kind).or_insert(0);
            if *n < 4 && jobs.insert(job) {
                *n += 1;
            }
        }
    }
    out.push_str(&format!(
        "offending jobs ({} in all; the first of each kind):\n",
        o.verdict.offending().len()
    ));
    for job in jobs {
        out.push_str(&checker::story(
            &o.plan,
            &o.observed,
            job,
            &o.history.publishes_of(job),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_run_keeps_every_invariant() {
    let (seeds, drain_limit) = seeds();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (seed, size) in seeds {
        let plan: Plan = faults::plan(seed, size);
        eprintln!(
            "chaos seed {seed}: {} jobs, {} campaigns, {} workers, {} faults over {:?}, fail mode {}{}",
            plan.jobs.len(),
            plan.campaigns.len(),
            plan.size.workers,
            plan.faults.len(),
            plan.size.fault_phase,
            plan.fail_mode,
            if plan.size.redis_faults { "" } else { ", no Redis faults" }
        );
        let outcome = run::run(plan, drain_limit).await;
        let row = summary_row(&outcome);
        eprintln!("{}\n{row}", summary_header());
        if !outcome.verdict.passed() {
            eprintln!("{}", report(&outcome));
            failed.push(outcome.plan.seed);
        }
        rows.push(row);
    }
    eprintln!("\n{}\n{}", summary_header(), rows.join("\n"));
    assert!(
        failed.is_empty(),
        "chaos seeds failed: {failed:?} (reports above)"
    );
}

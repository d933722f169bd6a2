//! The generator: one seed makes the whole run — the secrets, the campaigns,
//! the recipients and their simulator answers, the jobs and when each is
//! published, and the fault schedule ([`Plan`]). Nothing else is random in
//! what the run does to the fleet: the same seed replays the same schedule
//! (what the fleet does in answer, and when, is up to the fleet).
//!
//! Decisions:
//! - Recipients are shared across campaigns (a pool of about half as many
//!   recipients as jobs), so Meta's one-message-per-recipient cap decides
//!   what many jobs become: the first campaign to reach a recipient sends,
//!   the others are answered 2300035 and end dead as `expired`
//!   (recipient_capped). That is where a job wrongly settled "sent" hides.
//! - One recipient of each simulator trigger ([`TRIGGERS`]: flaky, late
//!   answers, throttling, answers without a tracking id, long bodies,
//!   terminal errors, a 190 that echoes the token, resets), and about one in
//!   seven of the others a trigger drawn by weight. Their jobs carry the
//!   same trigger in every campaign.
//! - Every plan has at least one fault of each kind (so two fixed seeds
//!   cover them all), placed at random in the fault phase, then more of
//!   random kinds.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use serde_json::json;

/// Pages of ordinary jobs.
pub const PAGES: [&str; 3] = ["1000000001", "1000000002", "1000000003"];
/// The page of the recipients whose answer is a 190: an auth answer
/// closes its page for a long time, which must not hold the other jobs.
pub const AUTH_PAGE: &str = "1000000099";
/// Every job's ad account.
pub const AD_ACCOUNT: &str = "2000000001";
/// The workers' Graph request timeout; `sim:latesend` answers after it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Simulator triggers given to recipients (`{late}`: past the request
/// timeout; `{slow}`: a slow answer within it), with their weights.
pub const TRIGGERS: &[(&str, u32)] = &[
    ("sim:flaky:1", 3),
    ("sim:flaky:2", 2),
    ("sim:flaky:9", 1),
    ("sim:latesend:{late}", 3),
    ("sim:slow:{slow}", 2),
    ("sim:throttle:1", 1),
    ("sim:errn:2300078:1", 1),
    ("sim:fault:no_tracking_id", 2),
    ("sim:fault:long2xx", 2),
    ("sim:err:2300004", 1),
    ("sim:fault:html502", 1),
    ("sim:fault:reset", 1),
    ("sim:fault:token190", 1),
];

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Jobs (each published once; duplicates come on top).
    pub jobs: usize,
    /// Campaigns (distinct message ids).
    pub campaigns: usize,
    /// `mmsend worker` processes.
    pub workers: usize,
    /// Faults happen and jobs are published within this long from the start.
    pub fault_phase: Duration,
    /// Faults of random kinds on top of one of each kind.
    pub extra_faults: usize,
    /// Redis faults (freeze, pause, restart) among them; without, every
    /// send is recorded and each campaign's delivery funnel must equal what
    /// the simulator posted (the checker's invariant 9).
    pub redis_faults: bool,
}

impl Size {
    /// The run of the test command: a few hundred jobs, about 15 s of faults.
    pub fn short() -> Size {
        Size {
            jobs: 300,
            campaigns: 4,
            workers: 3,
            fault_phase: Duration::from_secs(15),
            extra_faults: 4,
            redis_faults: true,
        }
    }

    /// A long run of `jobs` jobs: about 30 jobs a second of fault phase,
    /// a fault every 3 s on average.
    pub fn long(jobs: usize) -> Size {
        let secs = (jobs as u64 / 30).max(20);
        Size {
            jobs,
            campaigns: 6,
            workers: 4,
            fault_phase: Duration::from_secs(secs),
            extra_faults: (secs / 3) as usize,
            redis_faults: true,
        }
    }

    /// The same without Redis faults.
    pub fn without_redis_faults(self) -> Size {
        Size {
            redis_faults: false,
            ..self
        }
    }
}

/// One campaign: a marketing message sent to part of the recipients.
#[derive(Debug, Clone)]
pub struct Campaign {
    /// Its `message_id`.
    pub message_id: String,
    /// Its `campaign` label.
    pub label: String,
}

/// One job of the plan; `(token, message_id)` is unique per job.
#[derive(Debug, Clone)]
pub struct Job {
    /// `job_id`.
    pub id: String,
    /// Index into [`Plan::campaigns`].
    pub campaign: usize,
    /// The recipient (`subscription_token`).
    pub token: String,
    /// `page_id`.
    pub page: &'static str,
    /// When it is published, from the start of the run.
    pub at: Duration,
    /// The job JSON as published (every copy the same bytes).
    pub body: Vec<u8>,
}

/// A fault, as drawn.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// SIGKILL a worker; start it again `down` later.
    Kill { worker: usize, down: Duration },
    /// SIGTERM a worker (it drains); start it again `down` later.
    Term { worker: usize, down: Duration },
    /// The broker closes the worker's connection (`rabbitmqctl close_connection`).
    CloseConnection { worker: usize },
    /// Redis frozen (SIGSTOP) for `hold`, then SIGCONT: nothing lost.
    RedisFreeze { hold: Duration },
    /// `CLIENT PAUSE <hold> ALL`: nothing lost.
    RedisClientPause { hold: Duration },
    /// Redis killed and started again `down` later, empty: the ledger is lost.
    RedisRestart { down: Duration },
    /// These jobs published again (same job_id, same body).
    Duplicate { jobs: Vec<usize> },
    /// `mmsend dlq replay` of every dead letter.
    Replay,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Kill { worker, down } => {
                write!(f, "SIGKILL worker {worker}, back after {down:?}")
            }
            Fault::Term { worker, down } => {
                write!(f, "SIGTERM worker {worker}, back after {down:?}")
            }
            Fault::CloseConnection { worker } => {
                write!(f, "broker closes worker {worker}'s connection")
            }
            Fault::RedisFreeze { hold } => write!(f, "Redis frozen (SIGSTOP) for {hold:?}"),
            Fault::RedisClientPause { hold } => write!(f, "Redis CLIENT PAUSE ALL for {hold:?}"),
            Fault::RedisRestart { down } => {
                write!(f, "Redis killed, restarted empty after {down:?}")
            }
            Fault::Duplicate { jobs } => write!(f, "{} jobs published again", jobs.len()),
            Fault::Replay => write!(f, "mmsend dlq replay"),
        }
    }
}

/// A fault and when it starts, from the start of the run.
#[derive(Debug, Clone)]
pub struct Scheduled {
    pub at: Duration,
    pub fault: Fault,
}

/// Everything a seed decides.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub size: Size,
    /// The workers' access token: `EAA` and 40 letters and digits.
    pub access_token: String,
    /// The app secret: 32 hex digits.
    pub app_secret: String,
    /// `MMSEND_REDIS_FAIL_MODE` of every worker.
    pub fail_mode: &'static str,
    /// The simulator's populating window per new campaign.
    pub populating: Duration,
    /// The simulator's budget window per campaign, after populating.
    pub budget_window: Duration,
    pub campaigns: Vec<Campaign>,
    /// In publishing order.
    pub jobs: Vec<Job>,
    /// In time order.
    pub faults: Vec<Scheduled>,
}

fn alphanumeric(rng: &mut StdRng, n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| char::from(*ALPHABET.choose(rng).expect("not empty")))
        .collect()
}

fn millis(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..hi))
}

/// The plan of `seed` at `size`.
pub fn plan(seed: u64, size: Size) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let access_token = format!("EAA{}", alphanumeric(&mut rng, 40));
    let app_secret: String = (0..32)
        .map(|_| char::from(*b"0123456789abcdef".choose(&mut rng).expect("not empty")))
        .collect();
    let fail_mode = *["local", "hold"].choose(&mut rng).expect("not empty");
    let populating = millis(&mut rng, 1000, 3000);
    let budget_window = millis(&mut rng, 500, 2000);

    let campaigns: Vec<Campaign> = (0..size.campaigns)
        .map(|c| Campaign {
            message_id: format!("12021{:013}", rng.random_range(0..10u64.pow(13))),
            label: format!("chaos-c{c}"),
        })
        .collect();

    // the shared recipients, one in seven a trigger
    let per_campaign = size.jobs.div_ceil(size.campaigns);
    let pool = per_campaign.max(size.jobs / 2);
    let late = (REQUEST_TIMEOUT + Duration::from_millis(500)).as_millis();
    // one recipient of each trigger, then one in seven a trigger by weight
    let mut triggers: Vec<Option<usize>> = (0..pool)
        .map(|_| {
            if rng.random_range(0..7) != 0 {
                return None;
            }
            let total: u32 = TRIGGERS.iter().map(|(_, w)| w).sum();
            let mut pick = rng.random_range(0..total);
            TRIGGERS.iter().position(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
        })
        .collect();
    for (t, r) in rand::seq::index::sample(&mut rng, pool, TRIGGERS.len().min(pool))
        .iter()
        .enumerate()
    {
        triggers[r] = Some(t);
    }
    let recipients: Vec<String> = triggers
        .into_iter()
        .enumerate()
        .map(|(r, trigger)| match trigger {
            None => format!("psid-{r:05}"),
            Some(t) => {
                let slow = rng.random_range(200..700u32);
                let trigger = TRIGGERS[t]
                    .0
                    .replace("{late}", &late.to_string())
                    .replace("{slow}", &slow.to_string());
                format!("{trigger}:psid-{r:05}")
            }
        })
        .collect();

    // campaigns start at different times in the first half of the fault
    // phase and publish over a third of it
    let phase = size.fault_phase.as_millis() as u64;
    let mut jobs = Vec::with_capacity(size.jobs);
    for (c, campaign) in campaigns.iter().enumerate() {
        let n = per_campaign.min(size.jobs - jobs.len());
        let start = rng.random_range(0..phase / 2);
        let picked = rand::seq::index::sample(&mut rng, pool, n);
        for (k, r) in picked.iter().enumerate() {
            let token = recipients[r].clone();
            let page = match token.starts_with("sim:fault:token190") {
                true => AUTH_PAGE,
                false => *PAGES.choose(&mut rng).expect("not empty"),
            };
            let id = format!("{}-{k:05}", campaign.label);
            let mut body = json!({"v": 1, "job_id": id, "ad_account_id": AD_ACCOUNT, "page_id": page,
                "message_id": campaign.message_id, "subscription_token": token,
                "message": {"text": format!("Hello {{{{first_name}}}}, offer {k}")},
                "campaign": campaign.label});
            if rng.random_bool(0.2) {
                body["min_conversation_gap_seconds"] = json!(3600);
            }
            jobs.push(Job {
                id,
                campaign: c,
                token,
                page,
                at: Duration::from_millis(start + rng.random_range(0..phase / 3)),
                body: serde_json::to_vec(&body).expect("JSON"),
            });
        }
    }
    jobs.sort_by_key(|j| j.at);

    // one fault of each kind, then random kinds
    // (without Redis faults, those kinds are kills instead)
    let redis_kind = |k: u8| (3..=5).contains(&k) && !size.redis_faults;
    let mut kinds: Vec<u8> = (0..8).map(|k| if redis_kind(k) { 0 } else { k }).collect();
    for _ in 0..size.extra_faults {
        // weights: kills, terms and duplicates more often than the slow ones
        let k = *[0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 6, 6, 7]
            .choose(&mut rng)
            .expect("not empty");
        kinds.push(if redis_kind(k) { 0 } else { k });
    }
    kinds.shuffle(&mut rng);
    let mut faults: Vec<Scheduled> = kinds
        .into_iter()
        .map(|kind| {
            let worker = rng.random_range(0..size.workers);
            let (lo, hi) = match kind {
                // a replay finds letters only after some jobs died
                7 => (phase * 3 / 10, phase * 9 / 10),
                _ => (phase / 20, phase * 9 / 10),
            };
            let at = Duration::from_millis(rng.random_range(lo..hi));
            let fault = match kind {
                0 => Fault::Kill {
                    worker,
                    down: millis(&mut rng, 300, 3000),
                },
                1 => Fault::Term {
                    worker,
                    down: millis(&mut rng, 300, 2000),
                },
                2 => Fault::CloseConnection { worker },
                3 => Fault::RedisFreeze {
                    hold: millis(&mut rng, 500, 3000),
                },
                4 => Fault::RedisClientPause {
                    hold: millis(&mut rng, 500, 2500),
                },
                5 => Fault::RedisRestart {
                    down: millis(&mut rng, 300, 2000),
                },
                6 => {
                    let published = jobs.partition_point(|j| j.at <= at).max(1);
                    let n = rng.random_range(1..=20usize.min(published));
                    Fault::Duplicate {
                        jobs: rand::seq::index::sample(&mut rng, published, n).into_vec(),
                    }
                }
                _ => Fault::Replay,
            };
            Scheduled { at, fault }
        })
        .collect();
    faults.sort_by_key(|f| f.at);
    Plan {
        seed,
        size,
        access_token,
        app_secret,
        fail_mode,
        populating,
        budget_window,
        campaigns,
        jobs,
        faults,
    }
}

#[test]
fn a_seed_makes_the_same_plan_and_another_seed_another() {
    let (a, b, c) = (
        plan(7, Size::short()),
        plan(7, Size::short()),
        plan(8, Size::short()),
    );
    let shape = |p: &Plan| {
        (
            p.access_token.clone(),
            p.jobs
                .iter()
                .map(|j| (j.id.clone(), j.body.clone(), j.at))
                .collect::<Vec<_>>(),
            p.faults
                .iter()
                .map(|f| (f.at, f.fault.clone()))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(shape(&a), shape(&b));
    assert_ne!(shape(&a), shape(&c));
    assert_eq!(a.jobs.len(), Size::short().jobs);
    assert!(a.access_token.starts_with("EAA") && a.access_token.len() == 43);
    assert!(a.app_secret.len() == 32 && a.app_secret.bytes().all(|b| b.is_ascii_hexdigit()));
    // (token, message_id) is unique per job, and recipients are shared
    let mut keys = std::collections::HashSet::new();
    let mut recipients = std::collections::HashSet::new();
    for j in &a.jobs {
        assert!(keys.insert((j.token.clone(), j.campaign)), "{}", j.id);
        recipients.insert(j.token.clone());
    }
    assert!(
        recipients.len() < a.jobs.len() * 3 / 4,
        "{} recipients",
        recipients.len()
    );
    // every kind of fault is in the schedule
    let kinds: std::collections::HashSet<_> = a
        .faults
        .iter()
        .map(|f| std::mem::discriminant(&f.fault))
        .collect();
    assert_eq!(kinds.len(), 8);
}

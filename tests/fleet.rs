//! The fleet layer against the real Redis: the send ledger's transitions,
//! shared gates with one probe at a time, fleet-wide pacing, and the page
//! rate that a page rate limit lowers. Each test uses its own key prefix and
//! deletes its keys at the end.

mod common;

use std::time::Duration;

use mmsend::classify::{Class, CodeLabel, ScopeKind};
use mmsend::fleet::{Ask, Before, Fleet, FleetConfig, Record, Tell};
use mmsend::job::Job;
use mmsend::metrics::Metrics;

use common::redis_url;

/// Written by the tests that flush or load Redis's scripts, read by every
/// other test here: any fleet that meets a flushed script loads both
/// again, which would undo such a test's setup.
static SCRIPTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Two workers of one fleet on a private prefix; the keys go at the end.
struct Two {
    prefix: String,
    a: Fleet,
    b: Fleet,
    /// a's metrics (its Redis round trips)
    a_metrics: std::sync::Arc<Metrics>,
}

impl Two {
    /// Worker a calls for `job` and is answered "budget reached": the job's
    /// campaign closes for `wait`, fleet-wide.
    async fn budget_closes_campaign(&self, job: &Job, wait: Duration) {
        assert!(go(&self.a.before(job, &ask()).await.unwrap()).is_some());
        let mut closing = tell(Record::Release);
        closing.close = Some((
            ScopeKind::Campaign,
            Class::Budget,
            CodeLabel::Code(2300015),
            wait,
        ));
        self.a.after(job, &closing).await.unwrap();
    }

    fn new(name: &str, config: FleetConfig) -> Two {
        let prefix = common::random_prefix(name);
        let fleet = |worker: &str, metrics| {
            Fleet::new(config.clone(), &prefix, worker, metrics).expect("a valid URL")
        };
        let a_metrics = Metrics::new();
        Two {
            a: fleet("worker-a", a_metrics.clone()),
            b: fleet("worker-b", Metrics::new()),
            a_metrics,
            prefix,
        }
    }

    async fn cleanup(self) {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{}}}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
}

/// Makes Redis forget every script, as a restart does (callers hold
/// [`SCRIPTS`] for writing).
async fn flush_scripts(conn: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(conn)
        .await
        .unwrap();
}

fn job(id: &str, page: &str, campaign: &str) -> Job {
    Job::parse(
        format!(
            r#"{{"v":1,"job_id":"{id}","ad_account_id":"1","page_id":"{page}","message_id":"{campaign}","subscription_token":"s"}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

fn ask() -> Ask {
    Ask {
        request_timeout: Duration::from_secs(5),
        page_rate: 0.0,
        global_rate: 0.0,
        probe_wait: Duration::from_millis(50),
        probe_lock: Duration::from_secs(5),
        gates: true,
        call: String::new(),
        last_call: String::new(),
    }
}

fn tell(record: Record<'_>) -> Tell<'_> {
    Tell {
        record,
        success: matches!(record, Record::Sent(_) | Record::Suspected),
        close: None,
        lower_page_rate: false,
        page_rate: 0.0,
        gates: true,
        gate_grace: Duration::from_secs(1),
    }
}

fn go(b: &Before) -> Option<(bool, Duration)> {
    match b {
        Before::Go {
            maybe_sent,
            pace_wait,
        } => Some((*maybe_sent, *pace_wait)),
        _ => None,
    }
}

#[tokio::test]
async fn the_ledger_claims_records_and_suppresses() {
    let _scripts = SCRIPTS.read().await;
    let mut config = FleetConfig::new(&redis_url());
    config.lease_margin = Duration::ZERO;
    let t = Two::new("ledger", config);
    let j = job("j1", "7", "c");
    // first claim: go, nothing sent before
    assert_eq!(
        go(&t.a.before(&j, &ask()).await.unwrap()),
        Some((false, Duration::ZERO))
    );
    // a live lease of a: b must not call
    match t.b.before(&j, &ask()).await.unwrap() {
        Before::Busy { worker, remaining } => {
            assert_eq!(worker, "worker-a");
            assert!(remaining > Duration::from_secs(4) && remaining <= Duration::from_secs(5));
        }
        other => panic!("{other:?}"),
    }
    // sent: every later delivery is acked without a call
    t.a.after(&j, &tell(Record::Sent("mm.42"))).await.unwrap();
    for f in [&t.a, &t.b] {
        assert_eq!(
            f.before(&j, &ask()).await.unwrap(),
            Before::AlreadySent {
                tracking_id: "mm.42".into()
            }
        );
    }

    // a retry releases the claim: the next delivery calls again, and it is
    // not a maybe-sent call
    let r = job("j2", "7", "c");
    assert!(go(&t.a.before(&r, &ask()).await.unwrap()).is_some());
    t.a.after(&r, &tell(Record::Release)).await.unwrap();
    assert_eq!(
        go(&t.b.before(&r, &ask()).await.unwrap()),
        Some((false, Duration::ZERO))
    );

    // a claim whose lease ran out: its worker died mid-call, so the next
    // call may repeat a send
    let d = job("j3", "7", "c");
    let short = Ask {
        request_timeout: Duration::from_millis(100),
        ..ask()
    };
    assert!(go(&t.a.before(&d, &short).await.unwrap()).is_some());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        go(&t.b.before(&d, &ask()).await.unwrap()),
        Some((true, Duration::ZERO))
    );
    // settled as sent on evidence: suppressed from then on
    t.b.after(&d, &tell(Record::Suspected)).await.unwrap();
    assert!(matches!(
        t.a.before(&d, &ask()).await.unwrap(),
        Before::AlreadySent { .. }
    ));
    t.cleanup().await;
}

/// Jobs that ask or tell at the same time share one script call; each
/// still gets its own answer, as if it had asked alone.
#[tokio::test]
async fn jobs_asking_together_share_round_trips_and_get_their_own_answers() {
    let _scripts = SCRIPTS.read().await;
    use futures_util::future::join_all;
    use mmsend::metrics::RedisOp;
    let t = Two::new("batch", FleetConfig::new(&redis_url()));
    let jobs: Vec<Job> = (0..150).map(|i| job(&format!("b{i}"), "7", "c")).collect();
    let ask = ask();
    // a claims them all at once: every job is a go, none maybe sent
    let answers = join_all(jobs.iter().map(|j| t.a.before(j, &ask))).await;
    for answer in answers {
        assert_eq!(go(&answer.unwrap()), Some((false, Duration::ZERO)));
    }
    let asked = t.a_metrics.redis_calls(RedisOp::Before);
    assert!(
        (2..150).contains(&asked),
        "150 jobs asking at once took {asked} round trips (at most 128 jobs a call)"
    );
    // b sees each claim
    let answers = join_all(jobs.iter().map(|j| t.b.before(j, &ask))).await;
    for answer in answers {
        assert!(matches!(answer.unwrap(), Before::Busy { worker, .. } if worker == "worker-a"));
    }
    // a records every send with its own tracking id, at once; even jobs
    // are sent, odd ones released
    let ids: Vec<String> = (0..150).map(|i| format!("mm.{i}")).collect();
    let tells: Vec<Tell<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            tell(if i % 2 == 0 {
                Record::Sent(id)
            } else {
                Record::Release
            })
        })
        .collect();
    let told = join_all(jobs.iter().zip(&tells).map(|(j, tl)| t.a.after(j, tl))).await;
    assert!(told.iter().all(Result::is_ok), "{told:?}");
    assert!(t.a_metrics.redis_calls(RedisOp::After) < 150);
    // each job's record is its own
    let answers = join_all(jobs.iter().map(|j| t.b.before(j, &ask))).await;
    for (i, answer) in answers.into_iter().enumerate() {
        let answer = answer.unwrap();
        if i % 2 == 0 {
            assert_eq!(
                answer,
                Before::AlreadySent {
                    tracking_id: format!("mm.{i}")
                }
            );
        } else {
            assert_eq!(go(&answer), Some((false, Duration::ZERO)), "job {i}");
        }
    }
    t.cleanup().await;
}

/// Jobs that tell and jobs that ask at the same time share one round trip
/// (both scripts pipelined, the tells first): a claim in the same round as
/// the job's recorded send sees the send.
#[tokio::test]
async fn tells_and_asks_at_the_same_time_share_a_round_trip_tells_first() {
    use futures_util::future::{join3, join_all};
    use mmsend::metrics::RedisOp;
    let _scripts = SCRIPTS.write().await;
    let t = Two::new("round", FleetConfig::new(&redis_url()));
    let ask = ask();
    let sent: Vec<Job> = (0..40).map(|i| job(&format!("s{i}"), "7", "c")).collect();
    let fresh: Vec<Job> = (0..40).map(|i| job(&format!("f{i}"), "7", "c")).collect();
    for answer in join_all(sent.iter().map(|j| t.a.before(j, &ask))).await {
        assert_eq!(go(&answer.unwrap()), Some((false, Duration::ZERO)));
    }
    let ids: Vec<String> = (0..40).map(|i| format!("mm.{i}")).collect();
    let tells: Vec<Tell<'_>> = ids.iter().map(|id| tell(Record::Sent(id))).collect();
    let calls = |op| t.a_metrics.redis_calls(op);
    let (before, after, both) = (
        calls(RedisOp::Before),
        calls(RedisOp::After),
        calls(RedisOp::BeforeAfter),
    );
    let (told, claimed, again) = join3(
        join_all(sent.iter().zip(&tells).map(|(j, tl)| t.a.after(j, tl))),
        join_all(fresh.iter().map(|j| t.a.before(j, &ask))),
        // the sent jobs asked again in the same round as their sends
        join_all(sent.iter().take(10).map(|j| t.a.before(j, &ask))),
    )
    .await;
    assert!(told.iter().all(Result::is_ok), "{told:?}");
    for answer in claimed {
        assert_eq!(go(&answer.unwrap()), Some((false, Duration::ZERO)));
    }
    for (i, answer) in again.into_iter().enumerate() {
        assert_eq!(
            answer.unwrap(),
            Before::AlreadySent {
                tracking_id: format!("mm.{i}")
            }
        );
    }
    assert_eq!(
        (
            calls(RedisOp::Before) - before,
            calls(RedisOp::After) - after,
            calls(RedisOp::BeforeAfter) - both
        ),
        (0, 0, 1),
        "90 jobs telling and asking at once: one round trip with both scripts"
    );

    // Redis forgot the scripts (a restart, SCRIPT FLUSH): both are loaded
    // again and each call made once more, in a round of both again
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    flush_scripts(&mut conn).await;
    let later: Vec<Job> = (0..5).map(|i| job(&format!("l{i}"), "7", "c")).collect();
    let (told, claimed) = futures_util::future::join(
        join_all(fresh.iter().zip(&tells).map(|(j, tl)| t.a.after(j, tl))),
        join_all(later.iter().map(|j| t.a.before(j, &ask))),
    )
    .await;
    assert!(told.iter().all(Result::is_ok), "{told:?}");
    for answer in claimed {
        assert_eq!(go(&answer.unwrap()), Some((false, Duration::ZERO)));
    }
    assert_eq!(
        t.b.before(&fresh[3], &ask).await.unwrap(),
        Before::AlreadySent {
            tracking_id: "mm.3".into()
        }
    );
    // and in a round of one script alone
    flush_scripts(&mut conn).await;
    let alone: Vec<Job> = (0..5).map(|i| job(&format!("o{i}"), "7", "c")).collect();
    for answer in join_all(alone.iter().map(|j| t.a.before(j, &ask))).await {
        assert_eq!(go(&answer.unwrap()), Some((false, Duration::ZERO)));
    }
    t.cleanup().await;
}

/// In a round of both scripts where Redis knows one script and cannot be
/// given the other (here: a Redis user that may not `SCRIPT LOAD`), the
/// call that ran keeps its answers; only the other call's jobs fail.
#[tokio::test]
async fn a_call_that_ran_keeps_its_answers_when_the_other_cannot_be_loaded() {
    use futures_util::future::{join, join_all};
    let _scripts = SCRIPTS.write().await;
    let admin = redis::Client::open(redis_url()).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let user = format!("mmsend-test-{}", rand::random::<u32>());
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", &user, "on", ">pw", "~*", "+@all", "-script|load"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut url = reqwest::Url::parse(&redis_url()).unwrap();
    url.set_username(&user).unwrap();
    url.set_password(Some("pw")).unwrap();
    let prefix = common::random_prefix("noload");
    let fleet = Fleet::new(
        FleetConfig::new(url.as_str()),
        &prefix,
        "worker-a",
        Metrics::new(),
    )
    .unwrap();

    // Redis knows before.lua (loaded by the admin) and not after.lua
    flush_scripts(&mut conn).await;
    let before = concat!(
        include_str!("../src/fleet/prelude.lua"),
        include_str!("../src/fleet/before.lua")
    );
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(before)
        .query_async(&mut conn)
        .await
        .unwrap();
    let ask = ask();
    let claimed: Vec<Job> = (0..5).map(|i| job(&format!("c{i}"), "7", "c")).collect();
    for answer in join_all(claimed.iter().map(|j| fleet.before(j, &ask))).await {
        assert_eq!(go(&answer.unwrap()), Some((false, Duration::ZERO)));
    }
    let fresh: Vec<Job> = (0..5).map(|i| job(&format!("n{i}"), "7", "c")).collect();
    let ids: Vec<String> = (0..5).map(|i| format!("mm.{i}")).collect();
    let tells: Vec<Tell<'_>> = ids.iter().map(|id| tell(Record::Sent(id))).collect();
    let (told, asked) = join(
        join_all(claimed.iter().zip(&tells).map(|(j, tl)| fleet.after(j, tl))),
        join_all(fresh.iter().map(|j| fleet.before(j, &ask))),
    )
    .await;
    // the user and the keys go before the checks, so a failing check
    // leaves nothing behind on a shared Redis
    let _: () = redis::cmd("ACL")
        .arg(&["DELUSER", &user])
        .query_async(&mut conn)
        .await
        .unwrap();
    common::delete_redis_keys(&redis_url(), &prefix).await;
    for answer in told {
        let err = answer.unwrap_err().to_string();
        assert!(err.contains("after"), "{err}");
    }
    for answer in asked {
        assert_eq!(go(&answer.unwrap()), Some((false, Duration::ZERO)));
    }
}

/// Jobs of different pages and campaigns in one call: each group's scope
/// keys and settings go once, and every job is still answered by its own.
#[tokio::test]
async fn jobs_of_many_scopes_in_one_call_keep_their_own_gates_and_records() {
    let _scripts = SCRIPTS.read().await;
    use futures_util::future::join_all;
    use mmsend::metrics::RedisOp;
    let t = Two::new("groups", FleetConfig::new(&redis_url()));
    // campaign cx is held for a minute
    t.budget_closes_campaign(&job("x", "7", "cx"), Duration::from_secs(60))
        .await;

    let campaigns = ["cx", "cy", "cz"];
    let jobs: Vec<Job> = (0..90)
        .map(|i| {
            let page = if i % 2 == 0 { "7" } else { "8" };
            job(&format!("m{i}"), page, campaigns[i % 3])
        })
        .collect();
    let ask = ask();
    let before_calls = t.a_metrics.redis_calls(RedisOp::Before);
    let answers = join_all(jobs.iter().map(|j| t.a.before(j, &ask))).await;
    assert!(t.a_metrics.redis_calls(RedisOp::Before) - before_calls < 90);
    for (i, (j, answer)) in jobs.iter().zip(answers).enumerate() {
        match answer.unwrap() {
            Before::Gated(held) => {
                assert_eq!(j.message_id, "cx", "job {i} held");
                assert_eq!(held.scope.kind, ScopeKind::Campaign);
                assert_eq!(held.scope.id, "cx");
                assert_eq!(held.class, Class::Budget);
            }
            other => {
                assert_ne!(
                    j.message_id, "cx",
                    "job {i} of the held campaign: {other:?}"
                );
                assert_eq!(go(&other), Some((false, Duration::ZERO)), "job {i}");
            }
        }
    }
    // the jobs that went are recorded together, each with its own id; a
    // success opens only its own scopes' gates, so cx stays held
    let sent: Vec<&Job> = jobs.iter().filter(|j| j.message_id != "cx").collect();
    let ids: Vec<String> = sent.iter().map(|j| format!("mm.{}", j.job_id)).collect();
    let tells: Vec<Tell<'_>> = ids.iter().map(|id| tell(Record::Sent(id))).collect();
    let told = join_all(sent.iter().zip(&tells).map(|(j, tl)| t.a.after(j, tl))).await;
    assert!(told.iter().all(Result::is_ok), "{told:?}");
    for j in &sent {
        assert_eq!(
            t.b.before(j, &ask).await.unwrap(),
            Before::AlreadySent {
                tracking_id: format!("mm.{}", j.job_id)
            }
        );
    }
    assert!(matches!(
        t.b.before(&job("late", "8", "cx"), &ask).await.unwrap(),
        Before::Gated(_)
    ));
    t.cleanup().await;
}

/// A sent record expires after the retention, whether it was recorded over
/// this worker's claim, over a claim whose key was lost, or over a claim
/// written as an earlier build did (a hash, with no expiry yet).
#[tokio::test]
async fn every_sent_record_keeps_an_expiry() {
    let _scripts = SCRIPTS.read().await;
    let mut config = FleetConfig::new(&redis_url());
    config.ledger_retention = Duration::from_secs(3600);
    let t = Two::new("expiry", config);
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = |j: &Job| format!("{{{}}}:job:{}", t.prefix, j.job_id);
    let (claimed, lost, older) = (
        job("e1", "7", "c"),
        job("e2", "7", "c"),
        job("e3", "7", "c"),
    );
    for j in [&claimed, &lost, &older] {
        assert!(go(&t.a.before(j, &ask()).await.unwrap()).is_some());
    }
    // the key of one claim is lost; another is rewritten as an older
    // mmsend claimed it (three fields, no expiry yet)
    let _: () = redis::cmd("DEL")
        .arg(key(&lost))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(key(&older))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(key(&older))
        .arg(&[
            "state",
            "sending",
            "worker",
            "worker-a",
            "until",
            "9999999999999",
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    for j in [&claimed, &lost, &older] {
        let id = format!("mm.{}", j.job_id);
        t.a.after(j, &tell(Record::Sent(&id))).await.unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key(j))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 3_500_000 && ttl <= 3_600_000,
            "{}: {ttl} ms",
            j.job_id
        );
        assert_eq!(
            t.b.before(j, &ask()).await.unwrap(),
            Before::AlreadySent { tracking_id: id }
        );
    }
    t.cleanup().await;
}

/// Records are one string each; the hash records of builds before 0.2
/// are still read (sent: suppressed; a live claim of another worker: busy;
/// a claim whose lease ran out: taken over as maybe sent) and replaced by
/// a string when written; a job held by a gate leaves no record; a worker
/// id that could break a record's layout is refused.
#[tokio::test]
async fn records_are_strings_and_an_earlier_builds_hashes_are_still_read() {
    let _scripts = SCRIPTS.read().await;
    let t = Two::new("format", FleetConfig::new(&redis_url()));
    let client = redis::Client::open(redis_url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = |j: &Job| format!("{{{}}}:job:{}", t.prefix, j.job_id);
    let get = |k: String| {
        let mut conn = conn.clone();
        async move {
            let kind: String = redis::cmd("TYPE")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
            let value: Option<String> = if kind == "string" {
                redis::cmd("GET")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .unwrap()
            } else {
                None
            };
            (kind, value)
        }
    };

    // this build: a claim, then the send, each one string
    let j = job("f1", "7", "c");
    assert!(go(&t.a.before(&j, &ask()).await.unwrap()).is_some());
    let (kind, claim) = get(key(&j)).await;
    assert_eq!(kind, "string");
    let claim = claim.unwrap();
    let digest = mmsend::fleet::send_digest(&j);
    assert!(
        claim.starts_with("sending\n")
            && claim.ends_with(&format!("\nworker-a\n{}\n", digest.as_str())),
        "{claim:?}"
    );
    t.a.after(&j, &tell(Record::Sent("mm.f1"))).await.unwrap();
    let sent = get(key(&j)).await.1.unwrap();
    let fields: Vec<&str> = sent.split('\n').collect();
    assert_eq!(fields.len(), 6, "{sent:?}");
    assert_eq!(
        (fields[0], fields[2], fields[3], fields[4], fields[5]),
        ("sent", "0", "worker-a", "mm.f1", digest.as_str())
    );
    // the same job_id for another recipient is another send, not a duplicate
    let mut other = j.clone();
    other.subscription_token = "someone-else".into();
    assert_eq!(
        t.b.before(&other, &ask()).await.unwrap(),
        Before::Reused { sent: true }
    );
    assert_eq!(
        t.b.before(&j, &ask()).await.unwrap(),
        Before::AlreadySent {
            tracking_id: "mm.f1".into()
        }
    );

    // 0.2's string records (no digest) are read: a send, a live claim
    let set = |j: &Job, value: String| {
        let mut conn = conn.clone();
        let k = key(j);
        async move {
            let _: () = redis::cmd("SET")
                .arg(&k)
                .arg(value)
                .arg("PX")
                .arg(3_600_000)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    let (v02_sent, v02_live) = (job("f8", "7", "c"), job("f9", "7", "c"));
    set(&v02_sent, "sent\n1\n0\nw0\nmm.v02".into()).await;
    set(&v02_live, "sending\n99999999999999\nw0".into()).await;
    assert_eq!(
        t.b.before(&v02_sent, &ask()).await.unwrap(),
        Before::AlreadySent {
            tracking_id: "mm.v02".into()
        }
    );
    match t.b.before(&v02_live, &ask()).await.unwrap() {
        Before::Busy { worker, .. } => assert_eq!(worker, "w0"),
        other => panic!("{other:?}"),
    }

    // an earlier build's records, as it wrote them
    let hash = |j: &Job, fields: &[&str]| {
        let mut conn = conn.clone();
        let (k, fields) = (
            key(j),
            fields.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
        );
        async move {
            let _: () = redis::cmd("HSET")
                .arg(&k)
                .arg(&fields)
                .query_async(&mut conn)
                .await
                .unwrap();
            let _: () = redis::cmd("PEXPIRE")
                .arg(&k)
                .arg(3_600_000)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    let (old_sent, old_live, old_dead) = (
        job("f2", "7", "c"),
        job("f3", "7", "c"),
        job("f4", "7", "c"),
    );
    hash(
        &old_sent,
        &[
            "state",
            "sent",
            "tracking",
            "mm.old",
            "at",
            "1",
            "worker",
            "w0",
            "suspected",
            "0",
            "until",
            "0",
            "expiry",
            "1",
        ],
    )
    .await;
    hash(
        &old_live,
        &[
            "state",
            "sending",
            "worker",
            "w0",
            "until",
            "99999999999999",
            "expiry",
            "1",
        ],
    )
    .await;
    hash(
        &old_dead,
        &[
            "state", "sending", "worker", "w0", "until", "1", "expiry", "1",
        ],
    )
    .await;
    assert_eq!(
        t.b.before(&old_sent, &ask()).await.unwrap(),
        Before::AlreadySent {
            tracking_id: "mm.old".into()
        }
    );
    match t.b.before(&old_live, &ask()).await.unwrap() {
        Before::Busy { worker, .. } => assert_eq!(worker, "w0"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        go(&t.b.before(&old_dead, &ask()).await.unwrap()).map(|g| g.0),
        Some(true)
    );
    let (kind, claim) = get(key(&old_dead)).await;
    assert_eq!(
        kind, "string",
        "the claim over an earlier build's hash is a string"
    );
    assert!(claim.unwrap().ends_with(&format!(
        "\nworker-b\n{}\n",
        mmsend::fleet::send_digest(&old_dead).as_str()
    )));
    // a send recorded over an earlier build's live claim
    t.a.after(&old_live, &tell(Record::Sent("mm.f3")))
        .await
        .unwrap();
    assert_eq!(get(key(&old_live)).await.0, "string");
    assert_eq!(
        t.b.before(&old_live, &ask()).await.unwrap(),
        Before::AlreadySent {
            tracking_id: "mm.f3".into()
        }
    );
    // a release of an earlier build's claim of this worker
    let old_mine = job("f5", "7", "c");
    hash(
        &old_mine,
        &[
            "state",
            "sending",
            "worker",
            "worker-a",
            "until",
            "99999999999999",
        ],
    )
    .await;
    t.a.after(&old_mine, &tell(Record::Release)).await.unwrap();
    assert_eq!(get(key(&old_mine)).await.0, "none");

    // held by a gate: no record
    let first = job("f6", "7", "gated");
    t.budget_closes_campaign(&first, Duration::from_secs(30))
        .await;
    let held = job("f7", "7", "gated");
    assert!(matches!(
        t.b.before(&held, &ask()).await.unwrap(),
        Before::Gated(_)
    ));
    assert_eq!(get(key(&held)).await.0, "none");

    // a worker id with a line break, or none, is refused at the start
    for id in ["odd\nworker", ""] {
        let refused = Fleet::new(
            FleetConfig::new(&redis_url()),
            &t.prefix,
            id,
            Metrics::new(),
        );
        let message = refused.expect_err("refused").to_string();
        assert!(message.contains("MMSEND_WORKER_ID"), "{message}");
    }
    // a record that starts as a sent one but has no known shape: never
    // called again
    let odd = job("f8", "7", "c");
    let _: () = redis::cmd("SET")
        .arg(key(&odd))
        .arg("sent\nsomething else")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert!(matches!(
        t.b.before(&odd, &ask()).await.unwrap(),
        Before::AlreadySent { .. }
    ));
    t.cleanup().await;
}

#[tokio::test]
async fn a_gate_closed_by_one_worker_holds_the_fleet_and_one_probes() {
    let _scripts = SCRIPTS.read().await;
    let t = Two::new("gates", FleetConfig::new(&redis_url()));
    let first = job("g0", "7", "camp");
    t.budget_closes_campaign(&first, Duration::from_millis(400))
        .await;

    // worker b holds the campaign's other jobs without a claim
    let other = job("g1", "7", "camp");
    match t.b.before(&other, &ask()).await.unwrap() {
        Before::Gated(held) => {
            assert_eq!(held.scope.kind, ScopeKind::Campaign);
            assert_eq!(held.class, Class::Budget);
            assert_eq!(held.label, CodeLabel::Code(2300015));
            assert!(held.wait <= Duration::from_millis(400));
        }
        other => panic!("{other:?}"),
    }
    // another campaign is free
    assert!(go(&t.b.before(&job("g2", "7", "other"), &ask()).await.unwrap()).is_some());

    // time up: exactly one probe for the whole fleet
    tokio::time::sleep(Duration::from_millis(450)).await;
    let probe = job("g3", "7", "camp");
    assert!(go(&t.a.before(&probe, &ask()).await.unwrap()).is_some());
    match t.b.before(&job("g4", "7", "camp"), &ask()).await.unwrap() {
        Before::Gated(held) => assert_eq!(held.wait, Duration::from_millis(50), "the probe wait"),
        other => panic!("{other:?}"),
    }
    // the probe succeeds: the campaign is open for everyone
    t.a.after(&probe, &tell(Record::Sent("mm.1")))
        .await
        .unwrap();
    assert!(go(&t.b.before(&job("g5", "7", "camp"), &ask()).await.unwrap()).is_some());
    assert!(t.a.gate_census().await.unwrap().is_empty());
    t.cleanup().await;
}

#[tokio::test]
async fn pacing_is_fleet_wide_and_a_page_rate_limit_halves_it() {
    let _scripts = SCRIPTS.read().await;
    let t = Two::new("pacing", FleetConfig::new(&redis_url()));
    let paced = Ask {
        page_rate: 10.0,
        ..ask()
    };
    // 30 sends for one page from two workers: a second's worth at once,
    // then one every 100 ms, whoever asks
    let mut waits = Vec::new();
    for i in 0..30 {
        let f = if i % 2 == 0 { &t.a } else { &t.b };
        let (_, wait) = go(&f
            .before(&job(&format!("p{i}"), "101", "c"), &paced)
            .await
            .unwrap())
        .unwrap();
        waits.push(wait);
    }
    assert!(
        waits[..10].iter().all(|w| *w < Duration::from_millis(20)),
        "{waits:?}"
    );
    // the 30th slot is 20 intervals after the burst
    let last = waits[29];
    assert!(
        last > Duration::from_millis(1900) && last < Duration::from_millis(2100),
        "{waits:?}"
    );
    // another page has its own bucket
    let (_, other) = go(&t.a.before(&job("q", "102", "c"), &paced).await.unwrap()).unwrap();
    assert!(other < Duration::from_millis(20));

    // a page rate limit (2300078) halves page2's rate for the whole fleet
    let j = job("r0", "102", "c");
    let mut limited = tell(Record::Release);
    limited.lower_page_rate = true;
    limited.page_rate = 10.0;
    t.a.after(&j, &limited).await.unwrap();
    let mut waits = Vec::new();
    for i in 0..12 {
        let (_, w) = go(&t
            .b
            .before(&job(&format!("r{i}"), "102", "c"), &paced)
            .await
            .unwrap())
        .unwrap();
        waits.push(w);
    }
    // burst of 5 (one second at 5/s, one slot already taken), then 200 ms apart
    let step = waits[11].saturating_sub(waits[10]);
    assert!(
        step > Duration::from_millis(180) && step < Duration::from_millis(220),
        "{waits:?}"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn a_bad_url_is_refused_without_its_password() {
    for url in [
        "redis//:hunter2@host:6379",
        "http://:hunter2@host/",
        "redis://:hunter2@[::1",
    ] {
        let e = Fleet::new(FleetConfig::new(url), "7", "w", Metrics::new())
            .err()
            .map(|e| e.to_string());
        let e = e.unwrap_or_else(|| panic!("{url} accepted"));
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("MMSEND_REDIS_URL"), "{e}");
    }
}

/// A claim Redis runs after the worker gave up on it (Redis frozen, then
/// thawed) writes nothing: an orphan claim would run out and make the
/// job's next claim "maybe sent", and a 2300035 answer to it (another
/// campaign's send to the recipient) would settle as sent a job that was
/// never called. Found by the chaos run (Redis frozen and paused).
#[tokio::test]
async fn a_claim_redis_runs_after_the_worker_gave_up_writes_nothing() {
    let redis = common::PrivateRedis::start();
    let prefix = common::random_prefix("late");
    let fleet = Fleet::new(
        FleetConfig::new(&redis.url()),
        &prefix,
        "worker-a",
        Metrics::new(),
    )
    .expect("a valid URL");
    let j = job("late-1", "1001", "2001");
    // the scripts are loaded and the clock measured while Redis answers
    assert!(go(&fleet
        .before(&job("warm-1", "1001", "2001"), &ask())
        .await
        .unwrap())
    .is_some());
    fleet.measure_clock().await.unwrap();

    redis.freeze();
    let e = fleet.before(&j, &ask()).await;
    assert!(e.is_err(), "a frozen Redis does not answer: {e:?}");
    redis.thaw();

    // the script queued while Redis was frozen has run by now
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let record: Option<String> = redis::cmd("GET")
        .arg(format!("{{{prefix}}}:job:late-1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(record, None, "no orphan claim");
    // and the job's next claim is a fresh one, not "maybe sent"
    assert_eq!(
        go(&fleet.before(&j, &ask()).await.unwrap()),
        Some((false, Duration::ZERO))
    );
}

/// The chaos run found it (seed 675350838): a job dropped while its ask was
/// still queued for the next round gave its claim back in that same round,
/// where `after.lua` runs before `before.lua`: the release found nothing,
/// then the claim was written, an orphan. The job's redelivery was "maybe
/// sent", and a 2300035 (another campaign's send) settled a job that was
/// never called. A claim given back runs after the asks queued before it.
#[tokio::test]
async fn a_claim_given_back_while_its_ask_waits_for_the_round_is_not_left_behind() {
    let _scripts = SCRIPTS.read().await;
    let prefix = common::random_prefix("giveback");
    let fleet = Fleet::new(
        FleetConfig::new(&redis_url()),
        &prefix,
        "worker-a",
        Metrics::new(),
    )
    .expect("a valid URL");
    // warm: the scripts are loaded, the rounds task runs
    assert!(go(&fleet
        .before(&job("warm-1", "1001", "2001"), &ask())
        .await
        .unwrap())
    .is_some());
    let j = job("giveback-1", "1001", "2001");
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{{{prefix}}}:job:giveback-1");
    for round in 0..20 {
        // the ask is queued (first poll), then its claim is given back
        // before the rounds task took it: both wait for the same round
        let a = ask();
        let asking = fleet.before(&j, &a);
        tokio::pin!(asking);
        assert!(futures_util::FutureExt::now_or_never(&mut asking).is_none());
        fleet.after_detached(&j, &tell(Record::Release));
        let answer = asking.await.unwrap();
        assert!(go(&answer).is_some(), "round {round}: {answer:?}");
        // the release's answer is dropped: wait for the round after
        fleet
            .after(&job("flush", "1001", "2001"), &tell(Record::Release))
            .await
            .unwrap();
        let record: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(record, None, "round {round}: an orphan claim is left");
    }
    fleet.delete_all().await.unwrap();
}

/// The chaos run found it (seed 352670813): a call answered 2300035 (not
/// sent: another campaign's send to the recipient) whose end the worker
/// could not tell Redis (Redis paused) left its claim; the job's retry took
/// the expired claim for "maybe sent", and its next 2300035 settled a job
/// that was never sent as sent. A claim now carries its call's id, and the
/// job's story names its last call: the claim of that very call is not
/// "maybe sent" (the story has its answer); any other expired claim still is.
#[tokio::test]
async fn a_claim_left_by_the_jobs_own_last_call_is_not_maybe_sent() {
    let _scripts = SCRIPTS.read().await;
    let mut config = FleetConfig::new(&redis_url());
    config.lease_margin = Duration::ZERO;
    let t = Two::new("lastcall", config);
    let short = |call: &str, last_call: &str| Ask {
        request_timeout: Duration::from_millis(100),
        call: call.into(),
        last_call: last_call.into(),
        ..ask()
    };
    // the call whose end was never told, then its lease runs out
    let j = job("lc-1", "7", "c");
    assert_eq!(
        go(&t.a.before(&j, &short("c1", "")).await.unwrap()),
        Some((false, Duration::ZERO))
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    // the retry of that very call: its story has the answer
    assert_eq!(
        go(&t.b.before(&j, &short("c2", "c1")).await.unwrap()),
        Some((false, Duration::ZERO)),
        "the job's own last call, answered, is not maybe sent"
    );
    // a copy whose story names another call (a twin, a redelivery from
    // before that call) cannot know how that call ended
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        go(&t.a.before(&j, &short("c3", "c0")).await.unwrap()),
        Some((true, Duration::ZERO)),
        "a claim of a call the story does not know is maybe sent"
    );
    // and a copy that knows no call at all
    let k = job("lc-2", "7", "c");
    assert!(go(&t.a.before(&k, &short("d1", "")).await.unwrap()).is_some());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        go(&t.b.before(&k, &short("d2", "")).await.unwrap()),
        Some((true, Duration::ZERO))
    );
    t.cleanup().await;
}

/// A page whose token Meta rejected is listed (for `mmsend campaign list`
/// and the console) with the time of the rejection, while its auth gate
/// holds it; other gates are not.
#[tokio::test]
async fn a_page_whose_token_was_rejected_is_listed_with_the_time() {
    let _scripts = SCRIPTS.read().await;
    let t = Two::new("rejected", FleetConfig::new(&redis_url()));
    let before = chrono::Utc::now();
    for (page, class, code) in [("4401", Class::Auth, 190), ("4402", Class::Budget, 2300015)] {
        let j = job(&format!("r-{page}"), page, "c");
        assert!(go(&t.a.before(&j, &ask()).await.unwrap()).is_some());
        let mut closing = tell(Record::Release);
        closing.close = Some((
            ScopeKind::Page,
            class,
            CodeLabel::Code(code),
            Duration::from_secs(60),
        ));
        t.a.after(&j, &closing).await.unwrap();
    }
    let pages = t.a.campaigns().rejected_pages().await.unwrap();
    assert_eq!(pages.len(), 1, "{pages:?}");
    assert_eq!(pages[0].page_id, "4401");
    assert_eq!(pages[0].code, "190");
    let at = pages[0].rejected_at.expect("the time of the rejection");
    assert!(at >= before - chrono::Duration::seconds(1) && at <= chrono::Utc::now());
    assert!(pages[0].held_until.unwrap() > at);
    t.cleanup().await;
}

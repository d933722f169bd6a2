//! The checker: reads what the run left behind — the simulator's own record
//! (every request and every accepted send), the DLQ's letters, the results
//! stream's events, what is still in the work and delay queues, and every
//! log line the workers and the `mmsend` commands wrote — and holds it
//! against the plan. It never asks the workers what they think they did.
//!
//! A job is `(subscription_token, message_id)`, one per `job_id`. The
//! invariants:
//!
//! 1. **No job sent twice**: the simulator booked at most one send per job.
//! 2. **No recipient twice inside the cap window** (the simulator's cap
//!    enforces it; the record is checked anyway).
//! 3. **Every job ends exactly once**: sent (the simulator has its send) or
//!    dead with a reason this build knows (a DLQ letter). None lost (neither;
//!    whatever was still queued after every worker stopped is listed), none
//!    both — unless the letter itself says the job may have been sent
//!    (`x-mmsend-ambiguous`), or the send's ledger record was lost (Redis
//!    restarted empty between the send and the letter: any letter; or
//!    unusable then: the 2300035 of a second copy that Meta's cap
//!    stopped; or, in `fail_mode = local`, unusable when the send was
//!    made: it was never recorded): the ledger cannot remember a send it
//!    does not have. Two letters of one job
//!    are allowed when it was published more than once or workers were
//!    killed or cut off (a crash between a letter's confirm and the ack
//!    repeats it: at-least-once), and then one of the twins may die (after
//!    its calls, or waiting without a call: each copy's age is its own)
//!    before another copy is sent.
//! 4. **Nothing settled "sent" that the simulator did not send**: every
//!    `sent` results event (`suspected` or not) and every `duplicate` event
//!    names a job the simulator sent, with that send's tracking id when it
//!    gives one. A suspected send must be this job's own send, not another
//!    campaign's send to the same recipient.
//!    Exceptions, by design and counted in the summary (docs/src/guarantees.md,
//!    "What can still repeat a send", 5): a suspected send of a job an earlier call
//!    of which was caught by a worker fault (killed, stopped or cut off
//!    within the lease), or whose claim a SIGKILLed worker may have held
//!    (killed after the job was published, within 30 s of the settling
//!    call), or that was answered ambiguously (the simulator reset it,
//!    or held its answer past the request timeout);
//!    in `fail_mode = local`, a suspected send settled while Redis was
//!    unusable (without the ledger a redelivered job is maybe sent). A
//!    suspected send with no such earlier call is a violation.
//! 5. **Every end has its event**: a sent job a `sent` event, a dead one a
//!    `dead` event (not for `delivery_limit`: the broker moved it). A
//!    `duplicate` event (a copy the ledger suppressed) is no new end; it
//!    stands for the `sent` event only when the copy that sent lost its
//!    event with its connection (its ack was lost too, so it came back).
//! 6. **An attempt is a call**: a letter's `x-mmsend-attempt` is at most
//!    the requests the simulator got for that job, and a job dead
//!    `retries_exhausted` died on the answer to a call (the simulator got a
//!    request for it within the request timeout, and a second, before it
//!    died): waits that make no call (a busy lease, `fail_mode = hold`, a
//!    second copy, a closed gate) must not spend attempts.
//! 7. **No secret anywhere**: no 19-character stretch of the access token,
//!    the app secret or the `appsecret_proof` in any log line, DLQ header or
//!    body, results event or command output.
//! 8. No worker panicked or exited by itself.
//! 9. **Delivery tracking** (the simulator posts Meta's webhooks for each
//!    send, some twice, shuffled by random delays; the workers' trackers
//!    join them and die with their workers): every `delivery` event names a
//!    job the simulator sent, with that send's tracking id; each campaign's
//!    funnel equals what the simulator posted for it (each event once) when
//!    Redis was never unusable in the run, and never exceeds it otherwise (a
//!    send made or recorded while Redis was down, or a ledger lost, leaves
//!    its events unmatched: counted apart, never to another send).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use mmsend::dlq::DeadLetter;
use mmsend::simulator::{SimRecord, SimRequest, SimSend};
use serde_json::Value;

use super::faults::Plan;
use super::history::{Entry, Record};

/// A secret the run configured, by name.
pub struct Secret {
    pub name: &'static str,
    pub value: String,
}

/// What the run left behind.
pub struct Observed {
    /// Copies published per job (1 + duplicates).
    pub copies: Vec<u32>,
    /// When each job was first published.
    pub published: Vec<Option<DateTime<Utc>>>,
    pub sim: SimRecord,
    pub letters: Vec<DeadLetter>,
    /// Raw results events.
    pub events: Vec<Vec<u8>>,
    /// (queue, body) of every message still in the work or delay queues
    /// after every worker stopped.
    pub left: Vec<(String, Vec<u8>)>,
    /// (name, text) of every log and command output.
    pub texts: Vec<(String, String)>,
    /// Windows in which Redis was unusable.
    pub outages: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    /// When Redis was killed (it came back empty: the ledger lost).
    pub ledger_losses: Vec<DateTime<Utc>>,
    /// When a worker was killed, stopped or cut off, and which.
    pub worker_fault_times: Vec<(DateTime<Utc>, String)>,
    /// Kills, terms and connection closes applied.
    pub worker_faults: usize,
    /// Workers that exited without being told to.
    pub exits: Vec<String>,
    pub max_attempts: u32,
    pub cap_window: Duration,
    pub request_timeout: Duration,
    pub secrets: Vec<Secret>,
    /// What the simulator posted per message id: status → events (each
    /// once).
    pub posted: BTreeMap<String, BTreeMap<String, u64>>,
    /// What the trackers counted per message id (the campaign's funnel,
    /// `unmatched` left out): status → sends.
    pub funnels: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Which invariant broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    SentTwice,
    CapBreached,
    Lost,
    SentAndDead,
    DeadTwice,
    SentWithoutSend,
    NoResultEvent,
    UnknownReason,
    AttemptsWithoutCalls,
    DiedWithoutCall,
    LeftInQueue,
    UnknownJob,
    SecretLeak,
    WorkerPanic,
    WorkerExit,
    DeliveryWithoutSend,
    FunnelWrong,
}

/// One broken invariant: the jobs (plan indexes) it concerns and what was seen.
#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: Kind,
    pub jobs: Vec<usize>,
    pub detail: String,
}

/// Counts for the summary table.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub jobs: usize,
    /// Jobs whose end is a send.
    pub sent: usize,
    /// Final letters by reason.
    pub dead: BTreeMap<String, usize>,
    /// `sent` events with `suspected: true`.
    pub suspected: usize,
    /// `duplicate` events (a copy the ledger suppressed).
    pub duplicates: usize,
    /// Calls for a job already sent, stopped by Meta's cap (2300035).
    pub repeat_calls: usize,
    /// Sent jobs whose letter says "may have been sent" (allowed).
    pub ambiguous_dead: usize,
    /// Sent jobs dead by a second copy after the ledger was lost (allowed).
    pub ledger_lost_dead: usize,
    /// Suspected sends of jobs not sent that the rules allow: an earlier
    /// call of the job was caught by a worker fault or answered
    /// ambiguously (maybe sent, as far as anyone can know), or it was
    /// settled while Redis was unusable in `fail_mode = local` (without the
    /// ledger, redelivered is maybe sent).
    pub suspected_allowed: usize,
    /// Letters of a copy that died (after its calls) before a twin copy
    /// of the job was sent (allowed: at-least-once letters, replayed).
    pub twin_dead_before_send: usize,
    /// Jobs with two or more letters (allowed when copies or crashes explain them).
    pub twin_letters: usize,
    pub requests: usize,
    pub events: usize,
}

pub struct Verdict {
    pub violations: Vec<Violation>,
    pub summary: Summary,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// Every job a violation names.
    pub fn offending(&self) -> BTreeSet<usize> {
        self.violations
            .iter()
            .flat_map(|v| v.jobs.iter().copied())
            .collect()
    }
}

/// A results event, as far as the checker reads it.
struct Event {
    job_id: String,
    outcome: String,
    tracking_id: Option<String>,
    suspected: bool,
    at: Option<DateTime<Utc>>,
}

fn event(raw: &[u8]) -> Option<Event> {
    let v: Value = serde_json::from_slice(raw).ok()?;
    Some(Event {
        job_id: v.get("job_id")?.as_str()?.to_string(),
        outcome: v.get("outcome")?.as_str()?.to_string(),
        tracking_id: v
            .get("tracking_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        suspected: v.get("suspected").and_then(Value::as_bool) == Some(true),
        at: v
            .get("at")
            .and_then(Value::as_str)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)),
    })
}

/// Everything the sources say about one job.
#[derive(Default)]
struct Seen<'a> {
    sends: Vec<&'a SimSend>,
    requests: Vec<&'a SimRequest>,
    letters: Vec<&'a DeadLetter>,
    events: Vec<Event>,
}

/// The checker's indexes over the observations.
struct Books<'a> {
    by_job: Vec<Seen<'a>>,
    by_id: HashMap<&'a str, usize>,
}

fn books<'a>(plan: &'a Plan, o: &'a Observed, violations: &mut Vec<Violation>) -> Books<'a> {
    let mut by_key: HashMap<(&str, &str), usize> = HashMap::new();
    let mut by_id = HashMap::new();
    for (i, j) in plan.jobs.iter().enumerate() {
        by_key.insert((&j.token, &plan.campaigns[j.campaign].message_id), i);
        by_id.insert(j.id.as_str(), i);
    }
    let mut by_job: Vec<Seen<'a>> = plan.jobs.iter().map(|_| Seen::default()).collect();
    for s in &o.sim.sends {
        match by_key.get(&(s.token.as_str(), s.message_id.as_str())) {
            Some(&i) => by_job[i].sends.push(s),
            None => violations.push(Violation {
                kind: Kind::UnknownJob,
                jobs: vec![],
                detail: format!(
                    "the simulator sent {} / {}, which no job asked for",
                    s.token, s.message_id
                ),
            }),
        }
    }
    for r in &o.sim.requests {
        let key = (
            r.token.as_deref().unwrap_or(""),
            r.message_id.as_deref().unwrap_or(""),
        );
        if let Some(&i) = by_key.get(&key) {
            by_job[i].requests.push(r);
        }
    }
    for d in &o.letters {
        match d.job_id().and_then(|id| by_id.get(id.as_str()).copied()) {
            Some(i) => by_job[i].letters.push(d),
            None => violations.push(Violation {
                kind: Kind::UnknownJob,
                jobs: vec![],
                detail: format!("a dead letter of no job: {:?}", d.job_id()),
            }),
        }
    }
    for raw in &o.events {
        let Some(e) = event(raw) else {
            violations.push(Violation {
                kind: Kind::UnknownJob,
                jobs: vec![],
                detail: format!(
                    "a results event that does not read: {}",
                    String::from_utf8_lossy(raw)
                ),
            });
            continue;
        };
        match by_id.get(e.job_id.as_str()) {
            Some(&i) => by_job[i].events.push(e),
            None => violations.push(Violation {
                kind: Kind::UnknownJob,
                jobs: vec![],
                detail: format!("a results event of no job: {}", e.job_id),
            }),
        }
    }
    Books { by_job, by_id }
}

/// What the ledger may have taken for a send: the job's calls before its
/// settling call (`until`) that a worker fault caught (the worker killed,
/// stopped or cut off within the lease after the call), or none.
/// The second value: whether such a call (or one the simulator reset) is
/// there, so that "maybe sent" was the truth as far as anyone could know.
fn evidence(o: &Observed, requests: &[&SimRequest], until: DateTime<Utc>) -> (String, bool) {
    let lease = chrono::Duration::from_std(o.request_timeout + Duration::from_millis(1500))
        .unwrap_or_default();
    let mut before: Vec<&&SimRequest> = requests.iter().filter(|r| r.at <= until).collect();
    // the settling call itself
    before.pop();
    if before.is_empty() {
        let text = "; it was never called before the call that settled it";
        return (text.into(), false);
    }
    // reset unanswered, or answered after the caller's request timeout:
    // ambiguous to the worker, whatever the simulator answered
    let reset = before.iter().any(|r| {
        r.status == 0
            || r.late_ms
                .is_some_and(|ms| Duration::from_millis(ms) >= o.request_timeout)
    });
    let caught: Vec<String> = before
        .iter()
        .filter_map(|r| {
            let fault = o.worker_fault_times.iter().find(|(t, _)| {
                *t >= r.at - chrono::Duration::milliseconds(200) && *t <= r.at + lease
            })?;
            Some(format!(
                "its call at {} (answered {} {:?}) was followed {} ms later by `{}`",
                r.at.format("%H:%M:%S%.3f"),
                r.status,
                r.code,
                (fault.0 - r.at).num_milliseconds(),
                fault.1
            ))
        })
        .collect();
    match caught.is_empty() {
        true => (
            format!(
                "; {} earlier call(s), none near a worker fault",
                before.len()
            ),
            reset,
        ),
        false => (format!("; {}", caught.join("; ")), true),
    }
}

/// Whether a worker was SIGKILLed between the job's first publish and `at`
/// (within the longest a claim and the waits behind it last): it may have
/// held the job's claim, and to the ledger a claim that ran out under a
/// dead worker is a call that may have been the send (docs/src/guarantees.md, "What
/// can still repeat a send", 1 and 5). Nothing can tell a claim killed before
/// its call from one killed mid-call.
fn killed_holding(o: &Observed, published: Option<DateTime<Utc>>, at: DateTime<Utc>) -> bool {
    let Some(published) = published else {
        return false;
    };
    let window = chrono::Duration::seconds(30);
    o.worker_fault_times.iter().any(|(t, what)| {
        what.starts_with("SIGKILL") && *t >= published && *t <= at && at - *t <= window
    })
}

/// Whether Redis was unusable at some point in `[from, to]`.
fn outage_within(o: &Observed, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
    o.outages.iter().any(|(a, b)| *a <= to && *b >= from)
}

/// Checks every invariant.
pub fn check(plan: &Plan, o: &Observed) -> Verdict {
    let mut v = Vec::new();
    let b = books(plan, o, &mut v);
    let mut s = Summary {
        jobs: plan.jobs.len(),
        requests: o.sim.requests.len(),
        events: o.events.len(),
        ..Summary::default()
    };
    let now = Utc::now();
    let slack = chrono::Duration::from_std(o.request_timeout * 2).unwrap_or_default();
    let mut push =
        |kind, jobs: Vec<usize>, detail: String| v.push(Violation { kind, jobs, detail });

    for (i, seen) in b.by_job.iter().enumerate() {
        let job = &plan.jobs[i];
        // 1. one send per job
        if seen.sends.len() > 1 {
            let times: Vec<String> = seen.sends.iter().map(|s| s.at.to_rfc3339()).collect();
            push(
                Kind::SentTwice,
                vec![i],
                format!("{} sent {} times, at {times:?}", job.id, seen.sends.len()),
            );
        }
        let sent = seen.sends.first();
        s.repeat_calls += seen
            .requests
            .iter()
            .filter(|r| r.code == Some(2300035) && sent.is_some_and(|s| r.at >= s.at))
            .count();

        // 3. one end
        let mut unexplained = Vec::new();
        for d in &seen.letters {
            let Some(send) = sent else { continue };
            let dead_at = d.story.dead_at.unwrap_or(now);
            // a twin's letter: a job published twice has two copies that
            // route on their own, and a crash between a letter's confirm and
            // its ack repeats the letter (at-least-once); one copy may die
            // (after its calls, or waiting without one: each copy's age is
            // its own) before another copy is sent
            let twin = o.copies[i] > 1 || (seen.letters.len() > 1 && o.worker_faults > 0);
            if d.story.last_error.ambiguous {
                s.ambiguous_dead += 1;
            } else if twin && dead_at < send.at {
                s.twin_dead_before_send += 1;
            } else if (d.has_code(2300035) && outage_within(o, send.at - slack, dead_at))
                || o.ledger_losses
                    .iter()
                    .any(|t| *t >= send.at && *t <= dead_at)
                // in `fail_mode = local` a send made while Redis was
                // unusable was never recorded: no later copy can know it
                || (plan.fail_mode == "local" && outage_within(o, send.at - slack, send.at + slack))
            {
                // the send's record was lost (or unreadable) before this
                // copy died: the worker could not know the job was sent
                s.ledger_lost_dead += 1;
            } else {
                unexplained.push(format!(
                    "letter {} ({:?} {:?}, dead at {dead_at}) after the send at {}",
                    d.reason_label(),
                    d.class_label(),
                    d.code(),
                    send.at
                ));
            }
        }
        if !unexplained.is_empty() {
            push(
                Kind::SentAndDead,
                vec![i],
                format!(
                    "{} was sent and is dead: {}",
                    job.id,
                    unexplained.join("; ")
                ),
            );
        }
        // a job settled "sent" without a send is reported below, once
        let claimed = seen
            .events
            .iter()
            .any(|e| e.outcome == "sent" || e.outcome == "duplicate");
        if sent.is_none() && seen.letters.is_empty() && !claimed {
            push(
                Kind::Lost,
                vec![i],
                format!(
                    "{} was neither sent nor dead-lettered ({} requests, {} events)",
                    job.id,
                    seen.requests.len(),
                    seen.events.len()
                ),
            );
        }
        if seen.letters.len() > 1 {
            s.twin_letters += 1;
            if o.copies[i] <= 1 && o.worker_faults == 0 {
                push(
                    Kind::DeadTwice,
                    vec![i],
                    format!(
                        "{} has {} letters, published once, no worker crashed",
                        job.id,
                        seen.letters.len()
                    ),
                );
            }
        }
        match (sent, seen.letters.is_empty()) {
            (Some(_), true) => s.sent += 1,
            _ => {
                for d in &seen.letters {
                    *s.dead.entry(d.reason_label()).or_insert(0) += 1;
                }
            }
        }
        for d in &seen.letters {
            if d.reason().is_none() {
                push(
                    Kind::UnknownReason,
                    vec![i],
                    format!("{}: dead reason {:?}", job.id, d.reason_label()),
                );
            }
            // 6. attempts are calls (not for a job whose calls the
            // simulator resets: a request on a connection it has just
            // dropped can fail before the simulator reads it)
            let resets = seen.requests.iter().any(|r| r.status == 0);
            if !resets && d.story.attempt as usize > seen.requests.len() {
                push(
                    Kind::AttemptsWithoutCalls,
                    vec![i],
                    format!(
                        "{} is dead {} ({:?}) at attempt {} after {} calls (max_attempts {}); last error: {:?}",
                        job.id,
                        d.reason_label(),
                        d.class_label(),
                        d.story.attempt,
                        seen.requests.len(),
                        o.max_attempts,
                        d.story.last_error.message
                    ),
                );
            }
        }

        for d in &seen.letters {
            // a transport error after the request may have been written is a
            // call the simulator may never have read
            let e = &d.story.last_error;
            if d.story.dead_reason.as_deref() != Some("retries_exhausted")
                || (e.http_status.is_none() && e.ambiguous)
            {
                continue;
            }
            let dead_at = d.story.dead_at.unwrap_or(now);
            // (the letter's time is cut to the millisecond, and the
            // simulator books a request as its answer leaves: the call that
            // killed the job may read a little later than its death)
            let last = seen
                .requests
                .iter()
                .filter(|r| r.at <= dead_at + chrono::Duration::seconds(1))
                .map(|r| r.at)
                .max();
            let call_slack = chrono::Duration::from_std(o.request_timeout + Duration::from_secs(1))
                .unwrap_or_default();
            if last.is_none_or(|at| dead_at - at > call_slack) {
                push(
                    Kind::DiedWithoutCall,
                    vec![i],
                    format!(
                        "{} died retries_exhausted ({:?}, attempt {}) at {dead_at} without a call: its last request was {}; last error: {:?}",
                        job.id,
                        d.class_label(),
                        d.story.attempt,
                        last.map_or("never".to_string(), |t| t.to_rfc3339()),
                        d.story.last_error.message
                    ),
                );
            }
        }

        // 4. nothing "sent" without a send
        let first_published = o.published.get(i).copied().flatten();
        let maybe_sent = |e: &Event| {
            let at = e.at.unwrap_or(now);
            (plan.fail_mode == "local" && outage_within(o, at - slack, at))
                || evidence(o, &seen.requests, at).1
                || killed_holding(o, first_published, at)
        };
        let suspected_allowed = seen
            .events
            .iter()
            .any(|e| e.outcome == "sent" && e.suspected && maybe_sent(e));
        for e in &seen.events {
            match e.outcome.as_str() {
                "sent" if e.suspected => s.suspected += 1,
                "duplicate" => s.duplicates += 1,
                _ => {}
            }
            if e.outcome == "delivery" {
                match sent {
                    Some(send) if send.tracking_id.is_some() && send.tracking_id != e.tracking_id => push(
                        Kind::DeliveryWithoutSend,
                        vec![i],
                        format!(
                            "{}'s `delivery` event names tracking id {:?}, the simulator's send has {:?}",
                            job.id, e.tracking_id, send.tracking_id
                        ),
                    ),
                    Some(_) => {}
                    None => push(
                        Kind::DeliveryWithoutSend,
                        vec![i],
                        format!(
                            "{} has a `delivery` event (tracking id {:?}) but the simulator never sent it",
                            job.id, e.tracking_id
                        ),
                    ),
                }
                continue;
            }
            if e.outcome != "sent" && e.outcome != "duplicate" {
                continue;
            }
            match (sent, &e.tracking_id) {
                // by design: without the ledger (Redis unusable, `fail_mode
                // = local`) a redelivered job is taken for maybe sent, and a
                // 2300035 answer settles it as a suspected send (docs/src/guarantees.md,
                // "What can still repeat a send"); counted, not a violation
                // (and the duplicates of such a send: no tracking id)
                (None, _)
                    if (e.suspected && maybe_sent(e))
                        || (e.outcome == "duplicate"
                            && e.tracking_id.is_none()
                            && suspected_allowed) =>
                {
                    s.suspected_allowed += 1;
                }
                (None, _) => push(
                    Kind::SentWithoutSend,
                    vec![i],
                    format!(
                        "{} has a `{}` event (suspected: {}, tracking id {:?}) but the simulator never sent it{}{}{}",
                        job.id,
                        e.outcome,
                        e.suspected,
                        e.tracking_id,
                        match o.sim.sends.iter().filter(|s| s.token == job.token).count() {
                            0 => String::new(),
                            n => format!(" (its recipient got {n} send(s) of other campaigns)"),
                        },
                        match seen.letters.is_empty() {
                            true => "; no letter either: never delivered, and the books say sent",
                            false => "",
                        },
                        evidence(o, &seen.requests, e.at.unwrap_or(now)).0
                    ),
                ),
                (Some(send), Some(t)) if send.tracking_id.as_deref() != Some(t.as_str()) => push(
                    Kind::SentWithoutSend,
                    vec![i],
                    format!(
                        "{}'s `{}` event names tracking id {t}, the simulator's send has {:?}",
                        job.id, e.outcome, send.tracking_id
                    ),
                ),
                _ => {}
            }
        }
        // 5. every end has its event
        let has = |outcome: &str| seen.events.iter().any(|e| e.outcome == outcome);
        // (a copy settled as sent whose event was lost with its connection
        // is acked, when redelivered, as a duplicate: that event tells the end)
        if sent.is_some() && seen.letters.is_empty() && !has("sent") && !has("duplicate") {
            push(
                Kind::NoResultEvent,
                vec![i],
                format!(
                    "{} was sent, and has no `sent` (or `duplicate`) event",
                    job.id
                ),
            );
        }
        let by_worker = seen.letters.iter().any(|d| d.story.dead_reason.is_some());
        if by_worker && !has("dead") {
            push(
                Kind::NoResultEvent,
                vec![i],
                format!("{} is dead, and has no `dead` event", job.id),
            );
        }
    }

    // 2. the cap
    let mut by_recipient: HashMap<&str, Vec<&SimSend>> = HashMap::new();
    for send in &o.sim.sends {
        by_recipient.entry(&send.token).or_default().push(send);
    }
    let window = chrono::Duration::from_std(o.cap_window).unwrap_or_default();
    for (token, mut sends) in by_recipient {
        sends.sort_by_key(|s| s.at);
        for pair in sends.windows(2) {
            if pair[1].at - pair[0].at < window {
                let jobs = pair
                    .iter()
                    .filter_map(|s| {
                        plan.jobs.iter().position(|j| {
                            j.token == s.token
                                && plan.campaigns[j.campaign].message_id == s.message_id
                        })
                    })
                    .collect();
                v.push(Violation {
                    kind: Kind::CapBreached,
                    jobs,
                    detail: format!(
                        "{token} got {} and {} at {} and {}",
                        pair[0].message_id, pair[1].message_id, pair[0].at, pair[1].at
                    ),
                });
            }
        }
    }

    // left in the queues
    if !o.left.is_empty() {
        let mut jobs = Vec::new();
        let mut names = Vec::new();
        for (queue, body) in &o.left {
            let id = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("job_id")?.as_str().map(str::to_owned))
                .unwrap_or_default();
            if let Some(&i) = b.by_id.get(id.as_str()) {
                jobs.push(i);
            }
            names.push(format!("{id} in {queue}"));
        }
        v.push(Violation {
            kind: Kind::LeftInQueue,
            jobs,
            detail: format!(
                "{} messages still queued after every worker stopped: {}",
                names.len(),
                names.join(", ")
            ),
        });
    }

    // 7. secrets
    for (name, text) in &o.texts {
        for (n, line) in text.lines().enumerate() {
            if let Some(secret) = leaked(&o.secrets, line) {
                v.push(Violation {
                    kind: Kind::SecretLeak,
                    jobs: vec![],
                    detail: format!(
                        "the {secret} in {name} line {}: {}",
                        n + 1,
                        mask(&o.secrets, line)
                    ),
                });
            }
            if line.contains("panicked at") {
                v.push(Violation {
                    kind: Kind::WorkerPanic,
                    jobs: vec![],
                    detail: format!("{name} line {}: {}", n + 1, mask(&o.secrets, line)),
                });
            }
        }
    }
    for d in &o.letters {
        let text = letter_text(d);
        if let Some(secret) = leaked(&o.secrets, &text) {
            let jobs = d
                .job_id()
                .and_then(|id| b.by_id.get(id.as_str()).copied())
                .into_iter()
                .collect();
            v.push(Violation {
                kind: Kind::SecretLeak,
                jobs,
                detail: format!(
                    "the {secret} in the dead letter of {:?}: {}",
                    d.job_id(),
                    mask(&o.secrets, &text)
                ),
            });
        }
    }
    for raw in &o.events {
        let text = String::from_utf8_lossy(raw);
        if let Some(secret) = leaked(&o.secrets, &text) {
            v.push(Violation {
                kind: Kind::SecretLeak,
                jobs: vec![],
                detail: format!(
                    "the {secret} in a results event: {}",
                    mask(&o.secrets, &text)
                ),
            });
        }
    }
    // 9. each campaign's funnel
    let exact = o.outages.is_empty() && o.ledger_losses.is_empty();
    for c in &plan.campaigns {
        let empty = BTreeMap::new();
        let posted = o.posted.get(&c.message_id).unwrap_or(&empty);
        let counted = o.funnels.get(&c.message_id).unwrap_or(&empty);
        let wrong = match exact {
            true => posted != counted,
            false => counted
                .iter()
                .any(|(status, n)| *n > posted.get(status).copied().unwrap_or(0)),
        };
        if wrong {
            v.push(Violation {
                kind: Kind::FunnelWrong,
                jobs: vec![],
                detail: format!(
                    "campaign {}: the trackers counted {counted:?}, the simulator posted {posted:?} ({})",
                    c.label,
                    match exact {
                        true => "Redis was never unusable: they must be equal",
                        false => "Redis was unusable or lost: no count may exceed what was posted",
                    }
                ),
            });
        }
    }
    for exit in &o.exits {
        v.push(Violation {
            kind: Kind::WorkerExit,
            jobs: vec![],
            detail: exit.clone(),
        });
    }
    v.sort_by_key(|v| v.kind);
    Verdict {
        violations: v,
        summary: s,
    }
}

/// A dead letter as text: every header (strings as text, not bytes), the
/// message id and the body.
fn letter_text(d: &DeadLetter) -> String {
    use lapin::types::AMQPValue;
    fn render(v: &AMQPValue, out: &mut String) {
        match v {
            AMQPValue::LongString(s) => out.push_str(&String::from_utf8_lossy(s.as_bytes())),
            AMQPValue::ShortString(s) => out.push_str(s.as_str()),
            AMQPValue::ByteArray(b) => out.push_str(&String::from_utf8_lossy(b.as_slice())),
            AMQPValue::FieldTable(t) => {
                for (k, v) in t.inner() {
                    out.push_str(&format!(" {k}="));
                    render(v, out);
                }
            }
            AMQPValue::FieldArray(a) => {
                for v in a.as_slice() {
                    out.push(' ');
                    render(v, out);
                }
            }
            other => out.push_str(&format!("{other:?}")),
        }
    }
    let mut out = String::new();
    if let Some(headers) = d.properties.headers() {
        render(&AMQPValue::FieldTable(headers.clone()), &mut out);
    }
    if let Some(id) = d.properties.message_id() {
        out.push_str(&format!(" message_id={id}"));
    }
    out.push_str(" body=");
    out.push_str(&String::from_utf8_lossy(&d.body));
    out
}

/// Stretches of a secret looked for: any 16 characters starting at a
/// multiple of 4, so any leak of 19 characters or more is found.
fn pieces(secret: &str) -> impl Iterator<Item = &str> {
    (0..secret.len().saturating_sub(15))
        .step_by(4)
        .map(move |i| &secret[i..i + 16])
}

/// The name of the first secret a text holds a stretch of.
pub fn leaked(secrets: &[Secret], text: &str) -> Option<&'static str> {
    secrets
        .iter()
        .find(|s| pieces(&s.value).any(|p| text.contains(p)))
        .map(|s| s.name)
}

/// `text` with every stretch of a secret (each found piece, grown while
/// the text goes on matching the secret either way) replaced by the
/// secret's name, cut to 600 characters: safe to print.
pub fn mask(secrets: &[Secret], text: &str) -> String {
    let bytes = text.as_bytes();
    // (start, end, name) of every masked stretch
    let mut cover: Vec<(usize, usize, &str)> = Vec::new();
    for s in secrets {
        let secret = s.value.as_bytes();
        for k in (0..secret.len().saturating_sub(15)).step_by(4) {
            for (p, _) in text.match_indices(&s.value[k..k + 16]) {
                let (mut a, mut ka) = (p, k);
                while a > 0 && ka > 0 && bytes[a - 1] == secret[ka - 1] {
                    a -= 1;
                    ka -= 1;
                }
                let (mut b, mut kb) = (p + 16, k + 16);
                while b < bytes.len() && kb < secret.len() && bytes[b] == secret[kb] {
                    b += 1;
                    kb += 1;
                }
                cover.push((a, b, s.name));
            }
        }
    }
    cover.sort();
    let mut out = String::new();
    let mut at = 0;
    for (a, b, name) in cover {
        if b <= at {
            continue;
        }
        if a >= at {
            out.push_str(&text[at..a]);
            out.push_str(&format!("«{name}»"));
        }
        at = b;
    }
    out.push_str(&text[at..]);
    out.chars().take(1200).collect()
}

/// Everything known about one job, for a failure report (secrets masked).
pub fn story(plan: &Plan, o: &Observed, job: usize, publishes: &[Record]) -> String {
    let j = &plan.jobs[job];
    let message_id = &plan.campaigns[j.campaign].message_id;
    let mut out = format!(
        "job {} — recipient {}, message {message_id}, page {}\n",
        j.id, j.token, j.page
    );
    for r in publishes {
        if let Entry::Publish { copy, .. } = r.entry {
            out.push_str(&format!(
                "    published (copy {copy}) at {:.3}s {}\n",
                r.since.as_secs_f64(),
                r.at.format("%H:%M:%S%.3f")
            ));
        }
    }
    for r in o.sim.requests.iter().filter(|r| {
        r.token.as_deref() == Some(j.token.as_str()) && r.message_id.as_deref() == Some(message_id)
    }) {
        out.push_str(&format!(
            "    request at {}: {} {:?}{}\n",
            r.at.format("%H:%M:%S%.3f"),
            r.status,
            r.code,
            if r.sent { " SENT" } else { "" }
        ));
    }
    let others: Vec<String> = o
        .sim
        .sends
        .iter()
        .filter(|s| s.token == j.token && &s.message_id != message_id)
        .map(|s| format!("{} at {}", s.message_id, s.at.format("%H:%M:%S%.3f")))
        .collect();
    if !others.is_empty() {
        out.push_str(&format!(
            "    its recipient got other campaigns: {}\n",
            others.join(", ")
        ));
    }
    for d in o
        .letters
        .iter()
        .filter(|d| d.job_id().as_deref() == Some(j.id.as_str()))
    {
        let e = &d.story.last_error;
        out.push_str(&format!(
            "    letter: {} class {:?} code {:?} ambiguous {} attempt {} dead at {:?} by {:?}, replays {}: {}\n",
            d.reason_label(),
            e.class,
            d.code(),
            e.ambiguous,
            d.story.attempt,
            d.story.dead_at.map(|t| t.format("%H:%M:%S%.3f").to_string()),
            d.story.worker,
            d.story.replays,
            mask(&o.secrets, e.message.as_deref().unwrap_or(""))
        ));
    }
    for raw in &o.events {
        if event(raw).is_some_and(|e| e.job_id == j.id) {
            out.push_str(&format!(
                "    event: {}\n",
                mask(&o.secrets, &String::from_utf8_lossy(raw))
            ));
        }
    }
    out
}

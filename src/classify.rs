//! Outcome → [`Class`] → [`Route`]: the one place that decides what a Graph
//! API answer means for a job.
//!
//! Like tower's retry `Policy` or Vector's `RetryLogic`, this is a pure
//! function over typed values, separate from the I/O and tested by tables:
//!
//! 1. [`CodeTable::classify`] maps a failure to a [`Class`]: the first of
//!    `error_subcode`, `code` that the table knows (Meta puts the 2300xxx
//!    marketing codes in either), then `is_transient`, then the HTTP status,
//!    then the transport error. The built-in table is [`BUILTIN_CODES`]; the
//!    TOML config can add or override codes.
//! 2. [`RetryPolicy::route`] turns the class plus the job's history into a
//!    [`Route`]: `Retry { delay }` within the class's limits, `Dead` with a
//!    [`DeadReason`] past them or for terminal classes.
//!
//! Limits, as an operator would expect them: `transient` and `throttled`
//! are bounded by `max_attempts`; `not_ready`, `budget` and
//! `recipient_capped` wait for something outside mmsend (a campaign to
//! populate, a budget to refill, a recipient's cap to lapse) and are bounded
//! by age since the first attempt instead. Every retry is also bounded by the
//! job's `not_after`: a retry that would come back after it dies `expired`
//! now rather than later.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::graph::{Failure, FailureKind, Outcome};

/// What kind of failure a job met. The class fixes the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Transient,
    Throttled,
    NotReady,
    Budget,
    RecipientCapped,
    Mismatch,
    Region,
    CampaignConfig,
    InvalidRequest,
    Recipient,
    Auth,
    Unknown,
}

impl Class {
    pub const ALL: [Class; 12] = [
        Class::Transient,
        Class::Throttled,
        Class::NotReady,
        Class::Budget,
        Class::RecipientCapped,
        Class::Mismatch,
        Class::Region,
        Class::CampaignConfig,
        Class::InvalidRequest,
        Class::Recipient,
        Class::Auth,
        Class::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Transient => "transient",
            Class::Throttled => "throttled",
            Class::NotReady => "not_ready",
            Class::Budget => "budget",
            Class::RecipientCapped => "recipient_capped",
            Class::Mismatch => "mismatch",
            Class::Region => "region",
            Class::CampaignConfig => "campaign_config",
            Class::InvalidRequest => "invalid_request",
            Class::Recipient => "recipient",
            Class::Auth => "auth",
            Class::Unknown => "unknown",
        }
    }

    /// Whether jobs of this class are retried (otherwise they are dead).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Class::Transient
                | Class::Throttled
                | Class::NotReady
                | Class::Budget
                | Class::RecipientCapped
        )
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Class::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Class::ALL.iter().map(|c| c.as_str()).collect();
                format!("unknown class {s:?}; expected one of {}", names.join(", "))
            })
    }
}

/// Why a job ended in the dead-letter queue (`x-mmsend-dead-reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadReason {
    /// A terminal class (mismatch, region, auth, …).
    Terminal,
    /// `max_attempts` reached for a retryable class.
    RetriesExhausted,
    /// `not_after` or the class's maximum age passed.
    Expired,
    /// The body is not a valid v1 job.
    InvalidJob,
    /// Dead-lettered by RabbitMQ itself (`x-delivery-limit`), e.g. a job
    /// that crashed workers repeatedly. Never written by mmsend.
    DeliveryLimit,
    /// No access token for the job's page.
    NoToken,
}

impl DeadReason {
    pub const ALL: [DeadReason; 6] = [
        DeadReason::Terminal,
        DeadReason::RetriesExhausted,
        DeadReason::Expired,
        DeadReason::InvalidJob,
        DeadReason::DeliveryLimit,
        DeadReason::NoToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Terminal => "terminal",
            DeadReason::RetriesExhausted => "retries_exhausted",
            DeadReason::Expired => "expired",
            DeadReason::InvalidJob => "invalid_job",
            DeadReason::DeliveryLimit => "delivery_limit",
            DeadReason::NoToken => "no_token",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeadReason::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = DeadReason::ALL.iter().map(|c| c.as_str()).collect();
                format!(
                    "unknown dead reason {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The built-in code table: inclusive ranges of Graph `code` /
/// `error_subcode` values and their class (DESIGN §4). The README's
/// classification table is checked against this by a test.
pub const BUILTIN_CODES: &[(i64, i64, Class)] = &[
    // transient
    (1, 2, Class::Transient),
    (2300008, 2300009, Class::Transient),
    (2300055, 2300055, Class::Transient),
    (2300057, 2300057, Class::Transient),
    (2300060, 2300063, Class::Transient),
    (2300068, 2300068, Class::Transient),
    // throttled
    (4, 4, Class::Throttled),
    (17, 17, Class::Throttled),
    (32, 32, Class::Throttled),
    (341, 341, Class::Throttled),
    (613, 613, Class::Throttled),
    (80000, 80014, Class::Throttled),
    (2300078, 2300080, Class::Throttled),
    // not_ready: CAMPAIGN_POPULATING_IN_PROGRESS and friends
    (2300012, 2300012, Class::NotReady),
    (2300033, 2300033, Class::NotReady),
    (2300041, 2300041, Class::NotReady),
    // budget: BUDGET_REACHED, AD_ACCOUNT_SPEND_LIMITATION_REACHED, …
    (2300015, 2300015, Class::Budget),
    (2300017, 2300017, Class::Budget),
    (2300053, 2300054, Class::Budget),
    // recipient_capped
    (2300035, 2300035, Class::RecipientCapped),
    (2300042, 2300044, Class::RecipientCapped),
    (2300052, 2300052, Class::RecipientCapped),
    // mismatch: PAGE_ID_MISMATCH, AD_ACCOUNT_NOT_MATCH
    (2300005, 2300005, Class::Mismatch),
    (2300014, 2300014, Class::Mismatch),
    // region
    (2300018, 2300018, Class::Region),
    (2300030, 2300032, Class::Region),
    // campaign_config
    (2300000, 2300000, Class::CampaignConfig),
    (2300002, 2300003, Class::CampaignConfig),
    (2300006, 2300007, Class::CampaignConfig),
    (2300011, 2300011, Class::CampaignConfig),
    (2300013, 2300013, Class::CampaignConfig),
    (2300016, 2300016, Class::CampaignConfig),
    (2300019, 2300020, Class::CampaignConfig),
    // invalid_request
    (2300001, 2300001, Class::InvalidRequest),
    (2300010, 2300010, Class::InvalidRequest),
    (2300021, 2300026, Class::InvalidRequest),
    (100, 100, Class::InvalidRequest),
    // recipient
    (2300004, 2300004, Class::Recipient),
    (2300034, 2300034, Class::Recipient),
    (2300037, 2300037, Class::Recipient),
    (551, 551, Class::Recipient),
    // auth
    (10, 10, Class::Auth),
    (102, 102, Class::Auth),
    (190, 190, Class::Auth),
    (200, 299, Class::Auth),
];

/// The classification table as Markdown (class, route, codes), generated
/// from [`BUILTIN_CODES`]; the README embeds it and a test keeps the two
/// equal.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| class | route | codes (Graph `code` or `error_subcode`) |\n|---|---|---|\n",
    );
    for class in Class::ALL {
        let route = match class {
            Class::Transient => "retry: `transient_delays`, up to `max_attempts`",
            Class::Throttled => "retry after the BUC / `Retry-After` hint, else `transient_delays`; up to `max_attempts`",
            Class::NotReady => "retry every `not_ready_delay`, up to `not_ready_max_age`",
            Class::Budget => "retry every `budget_delay`, up to `budget_max_age`",
            Class::RecipientCapped => "retry every `recipient_capped_delay`, up to `recipient_capped_max_age`",
            Class::Auth => "dead (`terminal`); pauses the page",
            _ => "dead (`terminal`)",
        };
        let mut codes: Vec<String> = BUILTIN_CODES
            .iter()
            .filter(|(_, _, c)| *c == class)
            .map(|&(lo, hi, _)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}–{hi}")
                }
            })
            .collect();
        match class {
            Class::Transient => codes.extend([
                "`is_transient: true`".to_string(),
                "HTTP 5xx".to_string(),
                "timeouts, connection errors (`ambiguous` once the request may have been sent)"
                    .to_string(),
            ]),
            Class::Throttled => codes.push("HTTP 429".to_string()),
            Class::InvalidRequest => codes.push("HTTP 400 without a known code".to_string()),
            Class::Unknown => codes.push("any other 4xx".to_string()),
            _ => {}
        }
        out.push_str(&format!("| `{class}` | {route} | {} |\n", codes.join(", ")));
    }
    out
}

/// A classified failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub class: Class,
    /// The code the decision was made on, for the bounded metric label:
    /// a table code, `other`, `http_429`, `http_5xx`, `http_4xx`, `timeout`
    /// or `transport`.
    pub code_label: String,
    /// The request may have been processed (a transport error after the
    /// connection was up).
    pub ambiguous: bool,
}

/// The code → class table: built in, overridable.
#[derive(Debug, Clone)]
pub struct CodeTable {
    codes: HashMap<i64, Class>,
}

impl Default for CodeTable {
    fn default() -> Self {
        let mut codes = HashMap::new();
        for &(lo, hi, class) in BUILTIN_CODES {
            for code in lo..=hi {
                codes.insert(code, class);
            }
        }
        CodeTable { codes }
    }
}

impl CodeTable {
    /// The built-in table with `overrides` (code → class name) applied.
    pub fn with_overrides(overrides: &BTreeMap<String, String>) -> Result<CodeTable, String> {
        let mut table = CodeTable::default();
        for (code, class) in overrides {
            let code: i64 = code.trim().parse().map_err(|_| {
                format!("classification override: {code:?} is not an integer Graph code")
            })?;
            let class: Class = class
                .parse()
                .map_err(|e| format!("classification override for code {code}: {e}"))?;
            table.codes.insert(code, class);
        }
        Ok(table)
    }

    pub fn get(&self, code: i64) -> Option<Class> {
        self.codes.get(&code).copied()
    }

    /// Every (code, class), sorted by code.
    pub fn entries(&self) -> Vec<(i64, Class)> {
        let mut all: Vec<_> = self.codes.iter().map(|(k, v)| (*k, *v)).collect();
        all.sort();
        all
    }

    /// Classifies a failed call.
    pub fn classify(&self, failure: &Failure) -> Verdict {
        let (class, code_label) = match &failure.kind {
            FailureKind::Graph { status, error } => {
                let known = [error.error_subcode, error.code]
                    .into_iter()
                    .flatten()
                    .find_map(|c| self.get(c).map(|class| (class, c.to_string())));
                match known {
                    Some(hit) => hit,
                    None if error.is_transient == Some(true) => {
                        (Class::Transient, "other".to_string())
                    }
                    None => {
                        let (class, _) = by_status(*status);
                        (class, "other".to_string())
                    }
                }
            }
            FailureKind::Http { status, .. } => {
                let (class, label) = by_status(*status);
                (class, label.to_string())
            }
            FailureKind::Transport { timeout, .. } => (
                Class::Transient,
                if *timeout { "timeout" } else { "transport" }.to_string(),
            ),
        };
        Verdict {
            class,
            code_label,
            ambiguous: failure.ambiguous(),
        }
    }
}

/// The class of an answer without a known Graph code.
fn by_status(status: u16) -> (Class, &'static str) {
    match status {
        429 => (Class::Throttled, "http_429"),
        500..=599 => (Class::Transient, "http_5xx"),
        400 => (Class::InvalidRequest, "http_4xx"),
        _ => (Class::Unknown, "http_4xx"),
    }
}

/// Where a job goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Sent,
    Retry { class: Class, delay: Duration },
    Dead { class: Class, reason: DeadReason },
}

/// What the router knows about the job's history.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// Sends tried so far, this one included (1 after the first try).
    pub number: u32,
    pub first_attempt_at: DateTime<Utc>,
    pub now: DateTime<Utc>,
    pub not_after: Option<DateTime<Utc>>,
}

/// Retry schedule and limits; the schedule is data (as in Svix), set from the
/// `[retry]` section of the TOML config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts before a transient/throttled job dies `retries_exhausted`.
    pub max_attempts: u32,
    /// Delay before attempt n+1 of a transient failure (last one repeats).
    #[serde(deserialize_with = "durations")]
    pub transient_delays: Vec<Duration>,
    #[serde(with = "humantime_serde")]
    pub not_ready_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub not_ready_max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub budget_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub budget_max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub recipient_capped_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub recipient_capped_max_age: Duration,
    /// How long a job held back by an auth gate (a page whose token fails)
    /// keeps waiting for the token to be fixed.
    #[serde(with = "humantime_serde")]
    pub gated_max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        RetryPolicy {
            max_attempts: 10,
            transient_delays: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                m(2),
                m(10),
                m(60),
            ],
            not_ready_delay: m(2),
            not_ready_max_age: m(120),
            budget_delay: m(60),
            budget_max_age: m(24 * 60),
            recipient_capped_delay: m(6 * 60),
            recipient_capped_max_age: m(48 * 60),
            gated_max_age: m(24 * 60),
        }
    }
}

/// `["5s", "30s", …]` → durations.
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let items: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
    Ok(items.into_iter().map(|s| s.into_inner()).collect())
}

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("retry.max_attempts must be at least 1".into());
        }
        if self.transient_delays.is_empty() {
            return Err("retry.transient_delays must list at least one delay".into());
        }
        Ok(())
    }

    /// The route of a call's outcome, given the job's history.
    pub fn route(&self, outcome: &Outcome, table: &CodeTable, attempt: &Attempt) -> Route {
        match outcome {
            Outcome::Sent { .. } => Route::Sent,
            Outcome::Failed(failure) => {
                let verdict = table.classify(failure);
                self.route_class(verdict.class, failure.hint.wait(), attempt)
            }
        }
    }

    /// The route of a job held back by a closed gate (no call was made):
    /// it waits `wait` in a delay tier, within the class's limits. A
    /// terminal class that gates a scope (auth pauses a page) delays too
    /// instead of killing jobs that were never tried, bounded by `not_after`
    /// and `gated_max_age`; the probe after the gate reopens decides.
    pub fn route_gated(&self, class: Class, wait: Duration, attempt: &Attempt) -> Route {
        if class.is_retryable() {
            // the gate knows how long its scope stays closed (its remaining
            // time, or the probe wait once it reopens): wait exactly that,
            // not the class's full delay, within the class's limits
            return self.route_with(class, None, Some(wait), attempt);
        }
        let back_at =
            attempt.now + chrono::Duration::from_std(wait).unwrap_or(chrono::TimeDelta::MAX);
        let age = (back_at - attempt.first_attempt_at)
            .to_std()
            .unwrap_or_default();
        if attempt.not_after.is_some_and(|deadline| back_at > deadline) || age > self.gated_max_age
        {
            return Route::Dead {
                class,
                reason: DeadReason::Expired,
            };
        }
        Route::Retry { class, delay: wait }
    }

    /// The route of a failure already classified. `hint` is the wait the
    /// response headers asked for, if any.
    pub fn route_class(&self, class: Class, hint: Option<Duration>, attempt: &Attempt) -> Route {
        self.route_with(class, hint, None, attempt)
    }

    /// [`RetryPolicy::route_class`], with `exact` (if given) replacing the
    /// class's delay while its limits (`not_after`, max age, attempts) hold.
    fn route_with(
        &self,
        class: Class,
        hint: Option<Duration>,
        exact: Option<Duration>,
        attempt: &Attempt,
    ) -> Route {
        let transient = || {
            let i = (attempt.number.max(1) as usize - 1).min(self.transient_delays.len() - 1);
            self.transient_delays[i]
        };
        let (delay, max_age) = match class {
            Class::Transient => (transient(), None),
            Class::Throttled => (hint.unwrap_or_else(transient), None),
            Class::NotReady => (self.not_ready_delay, Some(self.not_ready_max_age)),
            Class::Budget => (
                hint.unwrap_or(self.budget_delay).max(self.budget_delay),
                Some(self.budget_max_age),
            ),
            Class::RecipientCapped => (
                self.recipient_capped_delay,
                Some(self.recipient_capped_max_age),
            ),
            Class::Mismatch
            | Class::Region
            | Class::CampaignConfig
            | Class::InvalidRequest
            | Class::Recipient
            | Class::Auth
            | Class::Unknown => {
                return Route::Dead {
                    class,
                    reason: DeadReason::Terminal,
                }
            }
        };
        let delay = exact.unwrap_or(delay);
        let back_at =
            attempt.now + chrono::Duration::from_std(delay).unwrap_or(chrono::TimeDelta::MAX);
        if attempt.not_after.is_some_and(|deadline| back_at > deadline) {
            return Route::Dead {
                class,
                reason: DeadReason::Expired,
            };
        }
        match max_age {
            Some(max_age) => {
                let age = (back_at - attempt.first_attempt_at)
                    .to_std()
                    .unwrap_or_default();
                if age > max_age {
                    return Route::Dead {
                        class,
                        reason: DeadReason::Expired,
                    };
                }
            }
            None if attempt.number >= self.max_attempts => {
                return Route::Dead {
                    class,
                    reason: DeadReason::RetriesExhausted,
                }
            }
            None => {}
        }
        Route::Retry { class, delay }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{GraphError, UsageHint};

    fn graph(status: u16, code: Option<i64>, subcode: Option<i64>) -> Failure {
        Failure {
            kind: FailureKind::Graph {
                status,
                error: GraphError {
                    code,
                    error_subcode: subcode,
                    message: Some("m".into()),
                    ..Default::default()
                },
            },
            hint: UsageHint::default(),
        }
    }

    fn class_of(f: &Failure) -> Class {
        CodeTable::default().classify(f).class
    }

    /// DESIGN §4, one row per code; each is checked in `code` and in
    /// `error_subcode` (behind the generic code 100).
    const EXPECTED: &[(i64, Class)] = &[
        (2300000, Class::CampaignConfig),
        (2300001, Class::InvalidRequest),
        (2300002, Class::CampaignConfig),
        (2300003, Class::CampaignConfig),
        (2300004, Class::Recipient),
        (2300005, Class::Mismatch),
        (2300006, Class::CampaignConfig),
        (2300007, Class::CampaignConfig),
        (2300008, Class::Transient),
        (2300009, Class::Transient),
        (2300010, Class::InvalidRequest),
        (2300011, Class::CampaignConfig),
        (2300012, Class::NotReady),
        (2300013, Class::CampaignConfig),
        (2300014, Class::Mismatch),
        (2300015, Class::Budget),
        (2300016, Class::CampaignConfig),
        (2300017, Class::Budget),
        (2300018, Class::Region),
        (2300019, Class::CampaignConfig),
        (2300020, Class::CampaignConfig),
        (2300030, Class::Region),
        (2300031, Class::Region),
        (2300032, Class::Region),
        // beyond the seed list
        (2300021, Class::InvalidRequest),
        (2300026, Class::InvalidRequest),
        (2300033, Class::NotReady),
        (2300034, Class::Recipient),
        (2300035, Class::RecipientCapped),
        (2300037, Class::Recipient),
        (2300041, Class::NotReady),
        (2300042, Class::RecipientCapped),
        (2300044, Class::RecipientCapped),
        (2300052, Class::RecipientCapped),
        (2300053, Class::Budget),
        (2300054, Class::Budget),
        (2300055, Class::Transient),
        (2300057, Class::Transient),
        (2300060, Class::Transient),
        (2300063, Class::Transient),
        (2300068, Class::Transient),
        (2300078, Class::Throttled),
        (2300080, Class::Throttled),
    ];

    #[test]
    fn every_marketing_code_in_code_and_in_subcode() {
        for &(code, want) in EXPECTED {
            assert_eq!(class_of(&graph(400, Some(code), None)), want, "code {code}");
            assert_eq!(
                class_of(&graph(400, Some(100), Some(code))),
                want,
                "subcode {code} behind code 100"
            );
        }
        // the 24 seed codes are all in the table
        let seed: Vec<i64> = (2300000..=2300020).chain(2300030..=2300032).collect();
        assert_eq!(seed.len(), 24);
        for code in seed {
            assert!(CodeTable::default().get(code).is_some(), "{code}");
        }
    }

    #[test]
    fn generic_graph_codes() {
        let rows: &[(i64, Option<i64>, Class)] = &[
            (1, None, Class::Transient),
            (2, None, Class::Transient),
            (4, None, Class::Throttled),
            (17, None, Class::Throttled),
            (32, None, Class::Throttled),
            (341, None, Class::Throttled),
            (613, None, Class::Throttled),
            (80000, None, Class::Throttled),
            (80014, None, Class::Throttled),
            (100, None, Class::InvalidRequest),
            (551, None, Class::Recipient),
            (190, Some(463), Class::Auth),
            (190, None, Class::Auth),
            (102, None, Class::Auth),
            (10, None, Class::Auth),
            (200, None, Class::Auth),
            (299, None, Class::Auth),
            (12345, None, Class::InvalidRequest), // unknown code, HTTP 400
        ];
        for &(code, sub, want) in rows {
            assert_eq!(
                class_of(&graph(400, Some(code), sub)),
                want,
                "{code}/{sub:?}"
            );
        }
        assert_eq!(class_of(&graph(403, Some(12345), None)), Class::Unknown);
        let mut t = graph(400, Some(99999), None);
        if let FailureKind::Graph { error, .. } = &mut t.kind {
            error.is_transient = Some(true);
        }
        assert_eq!(class_of(&t), Class::Transient);
    }

    fn http(status: u16, body: &str) -> Failure {
        Failure {
            kind: FailureKind::Http {
                status,
                body_snippet: body.into(),
            },
            hint: UsageHint::default(),
        }
    }

    #[test]
    fn statuses_and_transport() {
        let t = CodeTable::default();
        let v = t.classify(&http(502, "<html>"));
        assert_eq!(
            (v.class, v.code_label.as_str()),
            (Class::Transient, "http_5xx")
        );
        assert_eq!(t.classify(&http(500, "")).class, Class::Transient);
        assert_eq!(t.classify(&http(429, "")).class, Class::Throttled);
        assert_eq!(t.classify(&http(400, "")).class, Class::InvalidRequest);
        assert_eq!(t.classify(&http(404, "")).class, Class::Unknown);
        let timeout = Failure {
            kind: FailureKind::Transport {
                timeout: true,
                ambiguous: true,
                message: "timed out".into(),
            },
            hint: UsageHint::default(),
        };
        let v = t.classify(&timeout);
        assert_eq!(v.class, Class::Transient);
        assert!(v.ambiguous);
        assert_eq!(v.code_label, "timeout");
    }

    #[test]
    fn overrides_replace_and_reject_nonsense() {
        let mut o = BTreeMap::new();
        o.insert("2300005".to_string(), "transient".to_string());
        o.insert("2300999".to_string(), "budget".to_string());
        let t = CodeTable::with_overrides(&o).unwrap();
        assert_eq!(t.get(2300005), Some(Class::Transient));
        assert_eq!(t.get(2300999), Some(Class::Budget));
        o.insert("x".to_string(), "budget".to_string());
        assert!(CodeTable::with_overrides(&o).unwrap_err().contains("\"x\""));
        let mut o = BTreeMap::new();
        o.insert("1".to_string(), "retry".to_string());
        assert!(CodeTable::with_overrides(&o)
            .unwrap_err()
            .contains("unknown class \"retry\""));
    }

    fn at(number: u32, age_secs: i64) -> Attempt {
        let now: DateTime<Utc> = "2026-11-24T12:00:00Z".parse().unwrap();
        Attempt {
            number,
            first_attempt_at: now - chrono::Duration::seconds(age_secs),
            now,
            not_after: None,
        }
    }

    #[test]
    fn routes_by_class_and_limits() {
        let p = RetryPolicy::default();
        let s = Duration::from_secs;
        let retry = |class, delay| Route::Retry { class, delay };
        let dead = |class, reason| Route::Dead { class, reason };
        let rows: Vec<(Class, Option<Duration>, Attempt, Route)> = vec![
            (
                Class::Transient,
                None,
                at(1, 0),
                retry(Class::Transient, s(5)),
            ),
            (
                Class::Transient,
                None,
                at(3, 60),
                retry(Class::Transient, s(120)),
            ),
            (
                Class::Transient,
                None,
                at(9, 60),
                retry(Class::Transient, s(3600)),
            ),
            (
                Class::Transient,
                None,
                at(10, 60),
                dead(Class::Transient, DeadReason::RetriesExhausted),
            ),
            (
                Class::Throttled,
                Some(s(180)),
                at(1, 0),
                retry(Class::Throttled, s(180)),
            ),
            (
                Class::Throttled,
                None,
                at(2, 0),
                retry(Class::Throttled, s(30)),
            ),
            (
                Class::NotReady,
                None,
                at(30, 3000),
                retry(Class::NotReady, s(120)),
            ),
            (
                Class::NotReady,
                None,
                at(2, 7200),
                dead(Class::NotReady, DeadReason::Expired),
            ),
            (
                Class::Budget,
                None,
                at(20, 3600),
                retry(Class::Budget, s(3600)),
            ),
            (
                Class::Budget,
                None,
                at(2, 86400),
                dead(Class::Budget, DeadReason::Expired),
            ),
            (
                Class::RecipientCapped,
                None,
                at(1, 0),
                retry(Class::RecipientCapped, s(6 * 3600)),
            ),
            (
                Class::Mismatch,
                None,
                at(1, 0),
                dead(Class::Mismatch, DeadReason::Terminal),
            ),
            (
                Class::Region,
                None,
                at(1, 0),
                dead(Class::Region, DeadReason::Terminal),
            ),
            (
                Class::Auth,
                None,
                at(1, 0),
                dead(Class::Auth, DeadReason::Terminal),
            ),
        ];
        for (class, hint, attempt, want) in rows {
            assert_eq!(
                p.route_class(class, hint, &attempt),
                want,
                "{class} {attempt:?}"
            );
        }
    }

    #[test]
    fn gated_jobs_wait_even_for_terminal_scopes() {
        let p = RetryPolicy::default();
        let mut a = at(0, 0);
        let wait = Duration::from_secs(600);
        assert_eq!(
            p.route_gated(Class::Auth, wait, &a),
            Route::Retry {
                class: Class::Auth,
                delay: wait
            }
        );
        let old = Attempt {
            first_attempt_at: a.now - chrono::Duration::hours(24),
            ..a
        };
        assert_eq!(
            p.route_gated(Class::Auth, wait, &old),
            Route::Dead {
                class: Class::Auth,
                reason: DeadReason::Expired
            }
        );
        a.not_after = Some(a.now + chrono::Duration::minutes(5));
        assert_eq!(
            p.route_gated(Class::Auth, wait, &a),
            Route::Dead {
                class: Class::Auth,
                reason: DeadReason::Expired
            }
        );
    }

    #[test]
    fn gated_retryable_jobs_wait_the_gate_not_the_class_delay() {
        let p = RetryPolicy::default();
        // a probe is in flight: the others wait the probe wait, not the
        // 2-minute not_ready delay (nor the 1-hour budget delay)
        let wait = Duration::from_secs(5);
        for class in [Class::NotReady, Class::Budget, Class::Throttled] {
            assert_eq!(
                p.route_gated(class, wait, &at(1, 0)),
                Route::Retry { class, delay: wait },
                "{class}"
            );
        }
        // the class's limits still hold
        assert_eq!(
            p.route_gated(Class::NotReady, wait, &at(1, 3 * 3600)),
            Route::Dead {
                class: Class::NotReady,
                reason: DeadReason::Expired
            }
        );
    }

    #[test]
    fn not_after_bounds_every_retry() {
        let p = RetryPolicy::default();
        let mut a = at(1, 0);
        a.not_after = Some(a.now + chrono::Duration::minutes(30));
        assert_eq!(
            p.route_class(Class::RecipientCapped, None, &a),
            Route::Dead {
                class: Class::RecipientCapped,
                reason: DeadReason::Expired
            }
        );
        assert_eq!(
            p.route_class(Class::Transient, None, &a),
            Route::Retry {
                class: Class::Transient,
                delay: Duration::from_secs(5)
            }
        );
    }
}

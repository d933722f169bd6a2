//! What a Graph API answer means for a job: one pure decision per answer.
//!
//! Like tower's retry `Policy` and Vector's `RetryLogic`, the decision is a
//! small pure function over typed values, apart from the I/O and tested by
//! tables. It has two steps, one file each:
//!
//! 1. **What the failure is** ([`verdict`]): [`CodeTable::classify`] turns a
//!    failed call into a [`Verdict`] — its [`Class`], the code it was decided
//!    on, the [`ScopeKind`] it blocks, the wait of its own (a table row's
//!    delay, or the answer's `Retry-After`/BUC hint), and whether the call
//!    may have been a send. The table is data ([`table`]): code → class,
//!    scope, delay; no code number lives anywhere else in mmsend.
//! 2. **Where the job goes** ([`route`]): [`RetryPolicy::route`] turns the
//!    verdict and the job's history ([`Attempt`]) into a [`Route`]: sent,
//!    retry after a delay, or dead with a [`DeadReason`].
//!
//! [`decide`] does both for one failed call, exactly once; the worker
//! settles the route it returns as it is, and the gates read the verdict's
//! scope.

pub mod route;
pub mod table;
pub mod verdict;

use std::fmt;
use std::str::FromStr;

pub use route::{Attempt, RetryPolicy, Route};
pub use table::{markdown_table, CodeTable, Row, RowDelay, ScopeKind, TableError};
pub use verdict::{CodeLabel, Verdict};

use crate::graph::Failure;

/// What kind of failure a job met. The class fixes the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Try again soon: transport errors, 5xx, Graph 1/2, "try again later".
    Transient,
    /// Meta asks us to slow down (rate limits).
    Throttled,
    /// The campaign is not ready yet (2300012 populating, …).
    NotReady,
    /// A budget, spend limit or balance ran out; it may be refilled.
    Budget,
    /// The recipient cannot take another message now (frequency caps).
    RecipientCapped,
    /// Page or ad account does not match the message.
    Mismatch,
    /// A region is excluded or not supported.
    Region,
    /// The campaign or message is not set up to send.
    CampaignConfig,
    /// The request itself is wrong (creative, parameters).
    InvalidRequest,
    /// The recipient cannot be messaged (token invalid, stopped, expired).
    Recipient,
    /// The access token is invalid, expired or lacks permissions.
    Auth,
    /// The page or ad account is not onboarded: terms not signed, no
    /// permission for the page. Needs an operator.
    Onboarding,
    /// Anything else with a 4xx.
    Unknown,
}

impl Class {
    /// Every class, in table order.
    pub const ALL: [Class; 13] = [
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
        Class::Onboarding,
        Class::Unknown,
    ];

    /// The name used in headers, metrics, the config and the CLI.
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
            Class::Onboarding => "onboarding",
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

    /// The scope a code of this class holds unless its table row says
    /// otherwise (the short `"code" = "class"` form of an override).
    pub fn default_scope(self) -> ScopeKind {
        match self {
            Class::Throttled => ScopeKind::App,
            Class::NotReady | Class::Budget => ScopeKind::Campaign,
            Class::Auth | Class::Onboarding => ScopeKind::Page,
            _ => ScopeKind::None,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of a fixed list (a class, a dead reason, a scope).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {got:?}; expected one of {}", expected.join(", "))]
pub struct UnknownName {
    /// What was being named (`class`, `dead reason`, `scope`).
    pub what: &'static str,
    /// The name given.
    pub got: String,
    /// The names allowed.
    pub expected: Vec<&'static str>,
}

/// Parses `s` as one of `all` by name.
pub(crate) fn by_name<T: Copy>(
    what: &'static str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
    s: &str,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|c| name(*c) == s)
        .ok_or_else(|| UnknownName {
            what,
            got: s.to_string(),
            expected: all.iter().map(|c| name(*c)).collect(),
        })
}

impl FromStr for Class {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name("class", &Class::ALL, Class::as_str, s)
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
    /// Its campaign was cancelled (`mmsend campaign cancel`): never called
    /// after the cancel.
    Cancelled,
}

impl DeadReason {
    /// Every reason.
    pub const ALL: [DeadReason; 7] = [
        DeadReason::Terminal,
        DeadReason::RetriesExhausted,
        DeadReason::Expired,
        DeadReason::InvalidJob,
        DeadReason::DeliveryLimit,
        DeadReason::NoToken,
        DeadReason::Cancelled,
    ];

    /// The name used in headers, metrics and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Terminal => "terminal",
            DeadReason::RetriesExhausted => "retries_exhausted",
            DeadReason::Expired => "expired",
            DeadReason::InvalidJob => "invalid_job",
            DeadReason::DeliveryLimit => "delivery_limit",
            DeadReason::NoToken => "no_token",
            DeadReason::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadReason {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name("dead reason", &DeadReason::ALL, DeadReason::as_str, s)
    }
}

/// The decision on one failed call: what it was and where the job goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What the failure was.
    pub verdict: Verdict,
    /// Where the job goes.
    pub route: Route,
}

/// Classifies a failed call once and routes the job from that verdict: the
/// one decision the worker makes per failed answer (a success is simply
/// [`Route::Sent`]).
pub fn decide(
    failure: &Failure,
    table: &CodeTable,
    policy: &RetryPolicy,
    attempt: &Attempt,
) -> Decision {
    let verdict = table.classify(failure);
    let route = policy.route(&verdict, attempt);
    Decision { verdict, route }
}

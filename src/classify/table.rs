//! The classification table as data: Graph code → [`Row`] (class, the scope
//! the answer holds, an optional wait of its own, and whether the answer
//! proves an earlier call was the send).
//!
//! The built-in rows ([`BUILTIN`]) follow Meta's API Errors reference for
//! the Marketing Message API for Messenger (updated April 2026) and the
//! Graph API's generic codes; [`REFERENCE`] keeps each marketing code's
//! description, which the simulator answers with and the book shows. The
//! TOML `[classification]` section can add or override any row, every
//! column of it:
//!
//! ```toml
//! [classification]
//! "2300099" = "budget"                                        # class only; its usual scope
//! "2300098" = { class = "budget", scope = "ad_account", delay = "30m" }
//! "2300097" = { class = "budget", delay = "next_day" }
//! "2300096" = { class = "recipient_capped", already_sent = true }
//! ```
//!
//! Decisions written down here (docs/src/classification.md repeats them):
//!
//! - **2300018**: the seed list named it `REGION_NOT_SUPPORTED`; Meta's
//!   current reference says the attachment could not be saved. The current
//!   reference wins: it is an `invalid_request` (terminal either way, so the
//!   route is the same); the dead letter keeps Meta's own message.
//! - **Onboarding** (2300013, 2300019, 2300039, 2300066, 2300067, 2300069:
//!   terms not signed, no permission for the page): the job that got the
//!   answer dies at once with Meta's message, so the operator sees the
//!   cause in the DLQ right away; the other jobs of that page or ad account
//!   are held without calls (like `auth`), one probe per hold interval, for
//!   up to `gated_max_age`, and flow again by themselves once the operator
//!   has fixed the onboarding. Dying without a call would force a replay of
//!   every held job for a fix that takes minutes.
//! - **Spend and balance** (2300017, 2300056, 2300058, 2300059) hold the ad
//!   account; campaign budgets (2300015, 2300053, 2300054) the campaign.
//!   2300054 (daily budget) waits until the next day starts.
//! - **"Try again in about 30 minutes"** (2300055, 2300061, 2300062) waits
//!   30 minutes; "try again later" (2300057, 2300060, 2300063, 2300068)
//!   follows the transient schedule.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::{by_name, Class, UnknownName};

/// What an answer holds back besides its own job: the jobs that share this
/// scope wait without calls until the scope reopens (see `worker::gates`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKind {
    /// Only the job itself.
    None,
    /// The marketing message / campaign (`message_id`).
    Campaign,
    /// The ad account.
    AdAccount,
    /// The page (and so its token).
    Page,
    /// Everything this worker fleet sends (the app's rate limits).
    App,
}

impl ScopeKind {
    /// Every scope kind.
    pub const ALL: [ScopeKind; 5] = [
        ScopeKind::None,
        ScopeKind::Campaign,
        ScopeKind::AdAccount,
        ScopeKind::Page,
        ScopeKind::App,
    ];

    /// The name used in the config, metrics (`scope` label) and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::None => "none",
            ScopeKind::Campaign => "campaign",
            ScopeKind::AdAccount => "ad_account",
            ScopeKind::Page => "page",
            ScopeKind::App => "app",
        }
    }
}

impl fmt::Display for ScopeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ScopeKind {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name("scope", &ScopeKind::ALL, ScopeKind::as_str, s)
    }
}

/// A row's own wait, replacing its class's delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowDelay {
    /// A fixed wait ("try again in about 30 minutes").
    After(Duration),
    /// Until the next day starts ("will resume tomorrow"), at the UTC offset
    /// of `[retry] daily_reset_utc_offset`.
    NextDay,
}

impl fmt::Display for RowDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowDelay::After(d) => write!(f, "{}", humantime::format_duration(*d)),
            RowDelay::NextDay => f.write_str("next_day"),
        }
    }
}

impl FromStr for RowDelay {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "next_day" {
            return Ok(RowDelay::NextDay);
        }
        match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() => Ok(RowDelay::After(d)),
            _ => Err(TableError::Delay(s.to_string())),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// The class, which fixes the route.
    pub class: Class,
    /// The scope this answer holds (gates it for the other jobs).
    pub scope: ScopeKind,
    /// A wait of its own, replacing the class's delay.
    pub delay: Option<RowDelay>,
    /// After a call that may have been a send (an ambiguous failure, a
    /// redelivery, an expired ledger lease), this answer means that call
    /// was the send: the job is settled as sent, never retried into a
    /// second send. 2300035 (one marketing message per recipient per 12 h).
    pub already_sent: bool,
}

const fn row(class: Class, scope: ScopeKind) -> Row {
    Row {
        class,
        scope,
        delay: None,
        already_sent: false,
    }
}

const fn wait(class: Class, scope: ScopeKind, delay: RowDelay) -> Row {
    Row {
        class,
        scope,
        delay: Some(delay),
        already_sent: false,
    }
}

const MIN30: RowDelay = RowDelay::After(Duration::from_secs(30 * 60));

use Class as C;
use ScopeKind as S;

/// The built-in table: inclusive ranges of Graph `code` / `error_subcode`
/// values and their row. Marketing codes first (Meta's reference), then the
/// Graph API's generic codes.
pub const BUILTIN: &[(i64, i64, Row)] = &[
    (2300000, 2300000, row(C::CampaignConfig, S::None)),
    (2300001, 2300001, row(C::InvalidRequest, S::None)),
    (2300002, 2300003, row(C::CampaignConfig, S::None)),
    (2300004, 2300004, row(C::Recipient, S::None)),
    (2300005, 2300005, row(C::Mismatch, S::None)),
    (2300006, 2300007, row(C::CampaignConfig, S::None)),
    (2300008, 2300009, row(C::Transient, S::None)),
    (2300010, 2300010, row(C::InvalidRequest, S::None)),
    (2300011, 2300011, row(C::CampaignConfig, S::None)),
    (2300012, 2300012, row(C::NotReady, S::Campaign)),
    (2300013, 2300013, row(C::Onboarding, S::Page)),
    (2300014, 2300014, row(C::Mismatch, S::None)),
    (2300015, 2300015, row(C::Budget, S::Campaign)),
    (2300016, 2300016, row(C::CampaignConfig, S::None)),
    (2300017, 2300017, row(C::Budget, S::AdAccount)),
    (2300018, 2300018, row(C::InvalidRequest, S::None)),
    (2300019, 2300019, row(C::Onboarding, S::AdAccount)),
    (2300020, 2300020, row(C::CampaignConfig, S::None)),
    (2300021, 2300027, row(C::InvalidRequest, S::None)),
    (2300030, 2300032, row(C::Region, S::None)),
    (2300033, 2300033, row(C::NotReady, S::Campaign)),
    (2300034, 2300034, row(C::Recipient, S::None)),
    (
        2300035,
        2300035,
        Row {
            already_sent: true,
            ..row(C::RecipientCapped, S::None)
        },
    ),
    (2300036, 2300036, row(C::RecipientCapped, S::None)),
    (2300037, 2300037, row(C::Recipient, S::None)),
    (2300038, 2300038, row(C::InvalidRequest, S::None)),
    (2300039, 2300039, row(C::Onboarding, S::Page)),
    (2300040, 2300040, row(C::InvalidRequest, S::None)),
    (2300041, 2300041, row(C::NotReady, S::Campaign)),
    (2300042, 2300044, row(C::RecipientCapped, S::None)),
    (2300046, 2300048, row(C::InvalidRequest, S::None)),
    (2300052, 2300052, row(C::RecipientCapped, S::None)),
    (2300053, 2300053, row(C::Budget, S::Campaign)),
    (
        2300054,
        2300054,
        wait(C::Budget, S::Campaign, RowDelay::NextDay),
    ),
    (2300055, 2300055, wait(C::Transient, S::None, MIN30)),
    (2300056, 2300056, row(C::Budget, S::AdAccount)),
    (2300057, 2300057, row(C::Transient, S::None)),
    (2300058, 2300059, row(C::Budget, S::AdAccount)),
    (2300060, 2300060, row(C::Transient, S::None)),
    (2300061, 2300062, wait(C::Transient, S::None, MIN30)),
    (2300063, 2300063, row(C::Transient, S::None)),
    (2300064, 2300065, row(C::InvalidRequest, S::None)),
    (2300066, 2300066, row(C::Onboarding, S::Page)),
    (2300067, 2300067, row(C::Onboarding, S::AdAccount)),
    (2300068, 2300068, row(C::Transient, S::None)),
    (2300069, 2300069, row(C::Onboarding, S::Page)),
    (2300070, 2300077, row(C::InvalidRequest, S::None)),
    (2300078, 2300078, row(C::Throttled, S::Page)),
    (2300079, 2300080, row(C::Throttled, S::App)),
    // the Graph API's generic codes
    (1, 2, row(C::Transient, S::None)),
    (4, 4, row(C::Throttled, S::App)),
    (10, 10, row(C::Auth, S::Page)),
    (17, 17, row(C::Throttled, S::Page)),
    (32, 32, row(C::Throttled, S::Page)),
    (100, 100, row(C::InvalidRequest, S::None)),
    (102, 102, row(C::Auth, S::Page)),
    (190, 190, row(C::Auth, S::Page)),
    (200, 299, row(C::Auth, S::Page)),
    (341, 341, row(C::Throttled, S::App)),
    (551, 551, row(C::Recipient, S::None)),
    (613, 613, row(C::Throttled, S::App)),
    (80000, 80014, row(C::Throttled, S::App)),
];

/// Meta's API Errors reference for the Marketing Message API for Messenger
/// (April 2026; 2300052's text from its changelog): each marketing code and
/// its description. The simulator answers with these messages and has no
/// copy of its own; a test checks that every code here has a row in
/// [`BUILTIN`].
pub const REFERENCE: &[(i64, &str)] = &[
    (2300000, "You cannot send a message unless the message campaign under which the message exists is active."),
    (2300001, "The message ID you supplied is invalid. The message with this ID either does not exist, or you do not have the permission to load it."),
    (2300002, "Messages cannot be sent if the message set under which the message exists is inactive. Please make sure your message set is activated."),
    (2300003, "The message must be in active status before it can be sent."),
    (2300004, "The subscription token you passed in could not be loaded. This could be because the token id you passed was invalid - or you may not have permissions to load it."),
    (2300005, "The page id behind your message does not match the page id on the messenger subscription token. Pages can only message their own subscribers."),
    (2300006, "The message campaign is not set up for marketing messages on Messenger."),
    (2300007, "The message is not set up for marketing messages on Messenger."),
    (2300008, "An internal error occurred while sending the message. Please try again later."),
    (2300009, "The message could not be processed right now. Please try again later."),
    (2300010, "A required parameter is missing or invalid."),
    (2300011, "The message campaign's configuration is not valid for sending."),
    (2300012, "The campaign is still being populated; messages cannot be sent until it is ready. Try again in a few minutes."),
    (2300013, "The page has not been onboarded to marketing messages on Messenger."),
    (2300014, "The ad account does not match the ad account of the message campaign."),
    (2300015, "The campaign has reached its budget."),
    (2300016, "The message campaign has ended or is not scheduled to send now."),
    (2300017, "The ad account has reached its spend limitation."),
    (2300018, "The attachment could not be saved."),
    (2300019, "The ad account has not been onboarded to marketing messages on Messenger."),
    (2300020, "The message campaign's objective does not support marketing messages."),
    (2300021, "The message creative is invalid."),
    (2300022, "The message text is invalid or too long."),
    (2300023, "The message attachment is invalid."),
    (2300024, "The message template is invalid."),
    (2300025, "The message buttons are invalid."),
    (2300026, "The message quick replies are invalid."),
    (2300027, "The message contains an unsupported element."),
    (2300030, "The ad account is not in a supported region."),
    (2300031, "The recipient's region is excluded from marketing messages."),
    (2300032, "The recipient's region is not supported."),
    (2300033, "The message campaign is not ready to send yet."),
    (2300034, "The recipient has stopped marketing messages from this page."),
    (2300035, "The recipient has already received a marketing message in the last 12 hours."),
    (2300036, "The recipient cannot receive marketing messages at this time. Try again later."),
    (2300037, "The subscription token has expired."),
    (2300038, "The message's link or URL is invalid."),
    (2300039, "The app does not have permission to send marketing messages for this page."),
    (2300040, "The message's media could not be processed."),
    (2300041, "The message is still being reviewed."),
    (2300042, "The recipient has reached the frequency cap for marketing messages from this page."),
    (2300043, "The recipient has reached the frequency cap for marketing messages from this business."),
    (2300044, "The recipient has reached the overall frequency cap for marketing messages."),
    (2300046, "The message payload is too large."),
    (2300047, "The message contains an invalid personalisation field."),
    (2300048, "The message language is not supported."),
    (2300052, "This person is not available right now."),
    (2300053, "The campaign has reached its lifetime budget."),
    (2300054, "The campaign has reached its daily budget; sending will resume tomorrow."),
    (2300055, "Sending is temporarily unavailable. Try again in about 30 minutes."),
    (2300056, "The ad account has reached its total spending limit."),
    (2300057, "The message could not be sent. Try again later."),
    (2300058, "The ad account's prepaid balance has run out."),
    (2300059, "The business's stored balance is too low."),
    (2300060, "The service is busy. Try again later."),
    (2300061, "Marketing messages are paused for this page. Try again in about 30 minutes."),
    (2300062, "Marketing messages are paused for this ad account. Try again in about 30 minutes."),
    (2300063, "A temporary error occurred. Try again later."),
    (2300064, "The message's call to action is invalid."),
    (2300065, "The message's product or catalog reference is invalid."),
    (2300066, "The page has not signed the marketing messages terms."),
    (2300067, "The ad account has not signed the marketing messages terms."),
    (2300068, "The request timed out. Try again later."),
    (2300069, "The required terms for marketing messages have not been signed."),
    (2300070, "The message format is not supported."),
    (2300071, "The message contains an invalid image."),
    (2300072, "The message contains an invalid video."),
    (2300073, "The message contains an invalid file."),
    (2300074, "The message's carousel is invalid."),
    (2300075, "The message's coupon is invalid."),
    (2300076, "The message's product list is invalid."),
    (2300077, "The message's tracking parameters are invalid."),
    (2300078, "The page has reached its marketing message sending rate limit."),
    (2300079, "The ad account has reached its marketing message rate limit."),
    (2300080, "The business has reached its marketing message rate limit."),
];

/// Meta's description of a marketing code, if the reference has one.
pub fn reference_message(code: i64) -> Option<&'static str> {
    REFERENCE
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, message)| *message)
}

/// One `[classification]` entry: a class name, or every column.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RowOverride {
    /// `"2300099" = "budget"`: the class, with its usual scope and no delay.
    Class(String),
    /// `"2300099" = { class = "budget", scope = "ad_account", delay = "30m" }`.
    Full {
        /// Class name.
        class: String,
        /// Scope name; the class's usual scope if absent.
        #[serde(default)]
        scope: Option<String>,
        /// A duration (`30m`) or `next_day`.
        #[serde(default)]
        delay: Option<String>,
        /// Settles a maybe-sent call as sent.
        #[serde(default)]
        already_sent: bool,
    },
}

/// A `[classification]` entry that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The key is not an integer.
    #[error("classification: {0:?} is not an integer Graph code")]
    Code(String),
    /// A name that is not a class or scope.
    #[error("classification for code {code}: {source}")]
    Name {
        /// The code of the entry.
        code: i64,
        /// What was wrong with the name.
        source: UnknownName,
    },
    /// A delay that is neither a duration nor `next_day`.
    #[error("classification delay {0:?} is neither a duration like 30m nor next_day")]
    Delay(String),
}

impl RowOverride {
    fn to_row(&self, code: i64) -> Result<Row, TableError> {
        let name = |source| TableError::Name { code, source };
        let (class, scope, delay, already_sent) = match self {
            RowOverride::Class(class) => (class, None, None, false),
            RowOverride::Full {
                class,
                scope,
                delay,
                already_sent,
            } => (class, scope.as_ref(), delay.as_ref(), *already_sent),
        };
        let class: Class = class.trim().parse().map_err(name)?;
        let scope = match scope {
            Some(s) => s.trim().parse().map_err(name)?,
            None => class.default_scope(),
        };
        let delay = delay.map(|d| d.parse()).transpose()?;
        Ok(Row {
            class,
            scope,
            delay,
            already_sent,
        })
    }
}

/// The code → row table: built in, overridable.
#[derive(Debug, Clone)]
pub struct CodeTable {
    rows: HashMap<i64, Row>,
}

impl Default for CodeTable {
    fn default() -> Self {
        let mut rows = HashMap::new();
        for &(lo, hi, row) in BUILTIN {
            for code in lo..=hi {
                rows.insert(code, row);
            }
        }
        CodeTable { rows }
    }
}

impl CodeTable {
    /// The built-in table with the `[classification]` entries applied.
    pub fn with_overrides(
        overrides: &BTreeMap<String, RowOverride>,
    ) -> Result<CodeTable, TableError> {
        let mut table = CodeTable::default();
        for (code, spec) in overrides {
            let code: i64 = code
                .trim()
                .parse()
                .map_err(|_| TableError::Code(code.clone()))?;
            table.rows.insert(code, spec.to_row(code)?);
        }
        Ok(table)
    }

    /// The row of a code, if the table knows it.
    pub fn get(&self, code: i64) -> Option<&Row> {
        self.rows.get(&code)
    }
}

/// The classification table as Markdown (class, route, codes with the scope
/// they hold), generated from [`BUILTIN`]; docs/src/classification.md embeds it and a test
/// keeps the two equal.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| class | route | codes (Graph `code` or `error_subcode`) → scope held |\n|---|---|---|\n",
    );
    for class in Class::ALL {
        let route = match class {
            Class::Transient => "retry: `transient_delays`, up to `max_attempts`",
            Class::Throttled => "retry after the BUC / `Retry-After` hint, else `transient_delays`; up to `max_attempts`",
            Class::NotReady => "retry every `not_ready_delay`, up to `not_ready_max_age`",
            Class::Budget => "retry every `budget_delay`, up to `budget_max_age`",
            Class::RecipientCapped => "retry every `recipient_capped_delay`, up to `recipient_capped_max_age`",
            Class::Auth | Class::Onboarding => "dead (`terminal`); holds its scope",
            _ => "dead (`terminal`)",
        };
        // group ranges by what the rest of the row says
        let mut groups: Vec<(ScopeKind, Option<RowDelay>, bool, Vec<String>)> = Vec::new();
        for &(lo, hi, row) in BUILTIN.iter().filter(|(_, _, r)| r.class == class) {
            let codes = if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}–{hi}")
            };
            match groups
                .iter_mut()
                .find(|g| (g.0, g.1, g.2) == (row.scope, row.delay, row.already_sent))
            {
                Some(g) => g.3.push(codes),
                None => groups.push((row.scope, row.delay, row.already_sent, vec![codes])),
            }
        }
        let mut parts: Vec<String> = groups
            .into_iter()
            .map(|(scope, delay, already_sent, codes)| {
                let mut out = codes.join(", ");
                if scope != ScopeKind::None {
                    out.push_str(&format!(" → `{scope}`"));
                }
                let mut notes = Vec::new();
                match delay {
                    Some(RowDelay::After(d)) => {
                        notes.push(format!("waits {}", humantime::format_duration(d)))
                    }
                    Some(RowDelay::NextDay) => notes.push("waits until the next day".into()),
                    None => {}
                }
                if already_sent {
                    notes.push("after a maybe-sent call: settled as sent".into());
                }
                if !notes.is_empty() {
                    out.push_str(&format!(" ({})", notes.join("; ")));
                }
                out
            })
            .collect();
        match class {
            Class::Transient => parts.extend([
                "`is_transient: true`".to_string(),
                "HTTP 5xx".to_string(),
                "timeouts, connection errors (`ambiguous` once the request may have been sent)"
                    .to_string(),
                "a 2xx that is not JSON (never reached Meta)".to_string(),
                "a 2xx with `success: true` but no tracking id (`ambiguous`)".to_string(),
            ]),
            Class::Throttled => parts.push("HTTP 429 → `app`".to_string()),
            Class::InvalidRequest => parts.push("HTTP 400 without a known code".to_string()),
            Class::Unknown => parts.extend([
                "any other 4xx".to_string(),
                "a 2xx JSON without `success: true` (Meta refused it)".to_string(),
            ]),
            _ => {}
        }
        out.push_str(&format!("| `{class}` | {route} | {} |\n", parts.join("; ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_code_has_a_row_and_every_marketing_row_a_reference() {
        let t = CodeTable::default();
        for (code, message) in REFERENCE {
            assert!(t.get(*code).is_some(), "{code} has no row");
            assert!(!message.is_empty());
        }
        for &(lo, hi, _) in BUILTIN.iter().filter(|(lo, _, _)| *lo >= 2_300_000) {
            for code in lo..=hi {
                assert!(
                    reference_message(code).is_some(),
                    "{code} is not in REFERENCE"
                );
            }
        }
        // the 24 seed codes of DESIGN §4
        for code in (2300000..=2300020).chain(2300030..=2300032) {
            assert!(t.get(code).is_some(), "{code}");
        }
    }

    #[test]
    fn ranges_do_not_overlap() {
        let mut seen = std::collections::HashSet::new();
        for &(lo, hi, _) in BUILTIN {
            assert!(lo <= hi);
            for code in lo..=hi {
                assert!(seen.insert(code), "{code} twice in BUILTIN");
            }
        }
    }

    #[test]
    fn overrides_set_every_column_and_reject_nonsense() {
        let mut o = BTreeMap::new();
        o.insert(
            "2300005".to_string(),
            RowOverride::Class("transient".into()),
        );
        o.insert(
            "2300999".to_string(),
            RowOverride::Full {
                class: "budget".into(),
                scope: Some("ad_account".into()),
                delay: Some("45m".into()),
                already_sent: false,
            },
        );
        o.insert(
            "2300998".to_string(),
            RowOverride::Full {
                class: "budget".into(),
                scope: None,
                delay: Some("next_day".into()),
                already_sent: true,
            },
        );
        let t = CodeTable::with_overrides(&o).unwrap();
        assert_eq!(
            *t.get(2300005).unwrap(),
            row(Class::Transient, ScopeKind::None)
        );
        assert_eq!(
            *t.get(2300999).unwrap(),
            wait(
                Class::Budget,
                ScopeKind::AdAccount,
                RowDelay::After(Duration::from_secs(45 * 60))
            )
        );
        let r = t.get(2300998).unwrap();
        assert_eq!(
            (r.scope, r.delay, r.already_sent),
            (ScopeKind::Campaign, Some(RowDelay::NextDay), true)
        );

        let bad = |key: &str, spec: RowOverride| {
            let mut o = BTreeMap::new();
            o.insert(key.to_string(), spec);
            CodeTable::with_overrides(&o).unwrap_err().to_string()
        };
        assert!(bad("x", RowOverride::Class("budget".into())).contains("\"x\""));
        assert!(bad("1", RowOverride::Class("retry".into())).contains("unknown class \"retry\""));
        let e = bad(
            "1",
            RowOverride::Full {
                class: "budget".into(),
                scope: Some("galaxy".into()),
                delay: None,
                already_sent: false,
            },
        );
        assert!(e.contains("unknown scope \"galaxy\""), "{e}");
        let e = bad(
            "1",
            RowOverride::Full {
                class: "budget".into(),
                scope: None,
                delay: Some("soon".into()),
                already_sent: false,
            },
        );
        assert!(e.contains("\"soon\""), "{e}");
    }
}

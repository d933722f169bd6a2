//! Which dead letters a command acts on: a [`Filter`] over typed fields
//! (reason, class, code, campaign, page, job, time) with an optional limit,
//! or an exact [`LetterSet`] that a caller saw and a person confirmed.
//!
//! Both are a [`Selection`]; the scan asks it, letter by letter, whether to
//! take the letter and whether anything more can be taken (so a run stops as
//! soon as the limit is reached or every confirmed letter was found).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::letter::{DeadLetter, LetterKey};
use crate::classify::{Class, DeadReason};

/// Letters matching every field that is set. Empty filter = all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Why the job died; `DeliveryLimit` matches the letters RabbitMQ
    /// dead-lettered itself (no `x-mmsend-dead-reason`).
    pub reason: Option<DeadReason>,
    /// The class of the last failure.
    pub class: Option<Class>,
    /// Matches the error code or the subcode.
    pub code: Option<i64>,
    /// The job's campaign, exactly: its `campaign` label, else its
    /// `message_id` (as campaign control names it).
    pub campaign: Option<String>,
    /// The job's `page_id`, exactly.
    pub page: Option<String>,
    /// One job, by `job_id`.
    pub job_id: Option<String>,
    /// Dead at or after this instant ([`DeadLetter::died_at`]: a worker's
    /// `x-mmsend-dead-at`, else RabbitMQ's `x-death` time).
    pub since: Option<DateTime<Utc>>,
    /// Dead before this instant (same time as `since`).
    pub until: Option<DateTime<Utc>>,
    /// At most this many selected; the scan stops once it has them.
    pub limit: Option<usize>,
}

impl Filter {
    /// The filter in the CLI's words (`--reason cancelled --campaign bf`),
    /// `every letter` when empty: for the audit trail.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = self.reason {
            parts.push(format!("--reason {r}"));
        }
        if let Some(c) = self.class {
            parts.push(format!("--class {c}"));
        }
        if let Some(c) = self.code {
            parts.push(format!("--code {c}"));
        }
        for (flag, v) in [
            ("--campaign", &self.campaign),
            ("--page", &self.page),
            ("--job-id", &self.job_id),
        ] {
            if let Some(v) = v {
                parts.push(format!("{flag} {v}"));
            }
        }
        if let Some(s) = self.since {
            parts.push(format!("--since {}", s.to_rfc3339()));
        }
        if let Some(u) = self.until {
            parts.push(format!("--until {}", u.to_rfc3339()));
        }
        if let Some(l) = self.limit {
            parts.push(format!("--limit {l}"));
        }
        match parts.is_empty() {
            true => "every letter".into(),
            false => parts.join(" "),
        }
    }

    /// Whether the letter matches (the limit is the scan's business): a
    /// letter as read ([`DeadLetter`]) or as the console's snapshot keeps it,
    /// through the same [`Facets`], so both count alike.
    pub fn matches<L: Facets + ?Sized>(&self, d: &L) -> bool {
        self.reason
            .is_none_or(|r| d.reason_facet().parse::<DeadReason>().ok() == Some(r))
            && self
                .class
                .is_none_or(|c| d.class_facet() == Some(c.as_str()))
            && self.code.is_none_or(|c| d.has_code_facet(c))
            && self
                .campaign
                .as_ref()
                .is_none_or(|c| d.campaign_facet() == Some(c.as_str()))
            && self
                .page
                .as_ref()
                .is_none_or(|p| d.page_facet() == Some(p.as_str()))
            && self
                .job_id
                .as_ref()
                .is_none_or(|j| d.job_id_facet().as_deref() == Some(j.as_str()))
            && self
                .since
                .is_none_or(|s| d.died_at_facet().is_some_and(|t| t >= s))
            && self
                .until
                .is_none_or(|u| d.died_at_facet().is_some_and(|t| t < u))
    }

    /// No field is set: every letter matches.
    pub fn is_empty(&self) -> bool {
        Filter {
            limit: None,
            ..self.clone()
        } == Filter::default()
    }
}

/// What a [`Filter`] looks at in a letter.
pub trait Facets {
    /// The dead reason as written (`delivery_limit` when RabbitMQ moved it).
    fn reason_facet(&self) -> std::borrow::Cow<'_, str>;
    /// The last failure's class label.
    fn class_facet(&self) -> Option<&str>;
    /// Whether `code` is the last failure's error code or subcode.
    fn has_code_facet(&self, code: i64) -> bool;
    /// The campaign as campaign control names it: the `campaign` label,
    /// else the `message_id`.
    fn campaign_facet(&self) -> Option<&str>;
    /// The job's `page_id`.
    fn page_facet(&self) -> Option<&str>;
    /// The job id.
    fn job_id_facet(&self) -> Option<std::borrow::Cow<'_, str>>;
    /// When it died ([`DeadLetter::died_at`]).
    fn died_at_facet(&self) -> Option<DateTime<Utc>>;
}

impl Facets for DeadLetter {
    fn reason_facet(&self) -> std::borrow::Cow<'_, str> {
        self.reason_str().into()
    }
    fn class_facet(&self) -> Option<&str> {
        self.class_label()
    }
    fn has_code_facet(&self, code: i64) -> bool {
        self.has_code(code)
    }
    fn campaign_facet(&self) -> Option<&str> {
        self.campaign_name()
    }
    fn page_facet(&self) -> Option<&str> {
        self.page_str()
    }
    fn job_id_facet(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.job_id().map(Into::into)
    }
    fn died_at_facet(&self) -> Option<DateTime<Utc>> {
        self.died_at()
    }
}

/// An exact set of letters (a multiset: a key seen twice is taken twice).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LetterSet {
    wanted: BTreeMap<LetterKey, usize>,
}

impl LetterSet {
    /// An empty set; a scan of it selects nothing.
    pub fn new() -> LetterSet {
        LetterSet::default()
    }

    /// Wants the letter `key` (once more, if it is already in the set).
    pub fn insert(&mut self, key: LetterKey) {
        *self.wanted.entry(key).or_insert(0) += 1;
    }

    /// Letters still wanted.
    pub fn len(&self) -> usize {
        self.wanted.values().sum()
    }

    /// No letter is wanted (any more).
    pub fn is_empty(&self) -> bool {
        self.wanted.is_empty()
    }

    /// Takes `key` out of the set if it is wanted.
    fn take(&mut self, key: &LetterKey) -> bool {
        match self.wanted.get_mut(key) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.wanted.remove(key);
                }
                true
            }
            None => false,
        }
    }
}

impl FromIterator<LetterKey> for LetterSet {
    fn from_iter<I: IntoIterator<Item = LetterKey>>(iter: I) -> LetterSet {
        let mut set = LetterSet::new();
        for k in iter {
            set.insert(k);
        }
        set
    }
}

/// What a scan selects.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// Every letter the filter matches, up to its limit.
    Matching(Filter),
    /// Exactly these letters; the ones not found are counted as missing.
    Exact(LetterSet),
}

impl From<Filter> for Selection {
    fn from(f: Filter) -> Selection {
        Selection::Matching(f)
    }
}

impl From<LetterSet> for Selection {
    fn from(s: LetterSet) -> Selection {
        Selection::Exact(s)
    }
}

/// A [`Selection`] being applied during one scan.
#[derive(Debug)]
pub(crate) struct Selector {
    selection: Selection,
    selected: usize,
}

impl Selector {
    pub(crate) fn new(selection: Selection) -> Selector {
        Selector {
            selection,
            selected: 0,
        }
    }

    /// Whether to take this letter (counted as selected when true).
    pub(crate) fn take(&mut self, d: &DeadLetter) -> bool {
        let take = match &mut self.selection {
            Selection::Matching(f) => f.limit.is_none_or(|l| self.selected < l) && f.matches(d),
            Selection::Exact(set) => !set.is_empty() && set.take(&d.key()),
        };
        if take {
            self.selected += 1;
        }
        take
    }

    /// Nothing more can be selected: the limit is reached or every wanted
    /// letter was found.
    pub(crate) fn done(&self) -> bool {
        match &self.selection {
            Selection::Matching(f) => f.limit.is_some_and(|l| self.selected >= l),
            Selection::Exact(set) => set.is_empty(),
        }
    }

    /// Wanted letters not found (exact sets only).
    pub(crate) fn missing(&self) -> usize {
        match &self.selection {
            Selection::Matching(_) => 0,
            Selection::Exact(set) => set.len(),
        }
    }
}

/// Why a `--since` value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinceError {
    /// A duration that reaches back before any representable time (the
    /// value given).
    #[error("{0:?} reaches back before any time mmsend can represent; give a shorter duration or an RFC 3339 time")]
    TooFarBack(String),
    /// Neither a duration nor an RFC 3339 time (the value given).
    #[error("{0:?}: give a duration (30m, 2h, 1d) or an RFC 3339 time (2026-11-24T10:00:00Z)")]
    Unreadable(String),
}

/// `--since`: a duration back from `now` (`30m`, `2d`) or an RFC 3339 time.
/// Too long a duration is an error, never a panic.
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, SinceError> {
    if let Ok(d) = humantime::parse_duration(s) {
        return chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .ok_or_else(|| SinceError::TooFarBack(s.to_string()));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| SinceError::Unreadable(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::letter::tests::letter;

    #[test]
    fn filters_combine() {
        let d = letter(Some("terminal"), "region", 2300030, "bf");
        assert!(Filter::default().matches(&d));
        let f = Filter {
            reason: Some(DeadReason::Terminal),
            class: Some(Class::Region),
            code: Some(2300030),
            campaign: Some("bf".into()),
            page: Some("42".into()),
            job_id: Some("j".into()),
            since: Some("2026-11-24T09:00:00Z".parse().unwrap()),
            until: Some("2026-11-24T11:00:00Z".parse().unwrap()),
            limit: None,
        };
        assert!(f.matches(&d));
        for other in [
            Filter {
                code: Some(2300005),
                ..f.clone()
            },
            Filter {
                since: Some("2026-11-24T11:00:00Z".parse().unwrap()),
                ..f.clone()
            },
            Filter {
                until: Some("2026-11-24T09:30:00Z".parse().unwrap()),
                ..f.clone()
            },
            Filter {
                reason: Some(DeadReason::Expired),
                ..f.clone()
            },
            Filter {
                class: Some(Class::Mismatch),
                ..f.clone()
            },
        ] {
            assert!(!other.matches(&d), "{other:?}");
        }
        assert!(Filter {
            code: Some(100),
            ..Default::default()
        }
        .matches(&d));
        let broker = letter(None, "transient", 1, "a");
        assert!(Filter {
            reason: Some(DeadReason::DeliveryLimit),
            ..Default::default()
        }
        .matches(&broker));
    }

    #[test]
    fn limits_and_exact_sets_say_when_they_are_done() {
        let d = letter(Some("terminal"), "region", 2300030, "bf");
        let mut s = Selector::new(
            Filter {
                limit: Some(2),
                ..Default::default()
            }
            .into(),
        );
        assert!(s.take(&d) && !s.done());
        assert!(s.take(&d) && s.done());
        assert!(!s.take(&d));

        let other = letter(Some("terminal"), "region", 2300031, "bf");
        let mut s = Selector::new([d.key(), d.key()].into_iter().collect::<LetterSet>().into());
        assert!(!s.take(&other));
        assert!(s.take(&d) && !s.done());
        assert_eq!(s.missing(), 1);
        assert!(s.take(&d) && s.done());
        assert!(!s.take(&d), "a third twin was not confirmed");
        assert_eq!(s.missing(), 0);
    }

    #[test]
    fn since_takes_durations_and_times_and_refuses_absurd_ones() {
        let now: DateTime<Utc> = "2026-11-24T10:00:00Z".parse().unwrap();
        assert_eq!(
            parse_since("2h", now).unwrap(),
            "2026-11-24T08:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            parse_since("2026-11-01T00:00:00+01:00", now).unwrap(),
            "2026-10-31T23:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let e = parse_since("300000years", now).unwrap_err();
        assert_eq!(e, SinceError::TooFarBack("300000years".into()));
        assert!(e.to_string().contains("shorter duration"), "{e}");
        let e = parse_since("yesterday", now).unwrap_err();
        assert_eq!(e, SinceError::Unreadable("yesterday".into()));
        assert!(e.to_string().contains("RFC 3339"), "{e}");
    }
}

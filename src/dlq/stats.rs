//! `dlq stats`: dead letters grouped by reason, class, code, campaign and
//! page, each group with its count, oldest and newest death and its latest
//! error. The same grouping is the dead-letter console's overview.
//!
//! [`StatsBuilder`] takes letters one at a time and keeps one small entry per
//! distinct key, never the letters; [`StatsBuilder::build`] sorts each
//! dimension, largest group first.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::letter::DeadLetter;

/// Longest error message kept per group.
const ERROR_CHARS: usize = 300;

/// One group of one dimension (e.g. reason `terminal`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    /// The value, `-` when the letter has none (no campaign, no code, …).
    pub key: String,
    /// Letters in the group.
    pub count: usize,
    /// Earliest death ([`DeadLetter::died_at`]: `x-mmsend-dead-at`, or
    /// RabbitMQ's `x-death` time) among the group's letters; `None` when no
    /// letter says when it died.
    pub oldest: Option<DateTime<Utc>>,
    /// Latest death among the group's letters.
    pub newest: Option<DateTime<Utc>>,
    /// The error of the group's most recently dead letter.
    pub latest_error: Option<String>,
}

/// Counts of the selected dead letters by every dimension.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Letters counted.
    pub total: usize,
    /// Earliest death among them (`None`: no letter has a dead-at).
    pub oldest: Option<DateTime<Utc>>,
    /// Latest death among them.
    pub newest: Option<DateTime<Utc>>,
    /// By dead reason (`delivery_limit` for the broker's own).
    pub by_reason: Vec<Group>,
    /// By class of the last failure.
    pub by_class: Vec<Group>,
    /// By code: the marketing (2300xxx) subcode when Meta gave one, else
    /// the error code ([`DeadLetter::code`]).
    pub by_code: Vec<Group>,
    /// By the job's `campaign` label.
    pub by_campaign: Vec<Group>,
    /// By the job's `page_id`.
    pub by_page: Vec<Group>,
}

/// One way of grouping dead letters: each letter belongs to exactly one
/// group of each dimension, named by [`Dimension::key_of`] (the same key
/// [`Stats`] counts it under).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// `x-mmsend-dead-reason` (or `delivery_limit`).
    Reason,
    /// The last failure's class.
    Class,
    /// Meta's code of the last failure.
    Code,
    /// The job's campaign label.
    Campaign,
    /// The job's page.
    Page,
}

impl Dimension {
    /// In display order (the order of [`Stats::dimensions`]).
    pub const ALL: [Dimension; 5] = [
        Dimension::Reason,
        Dimension::Class,
        Dimension::Code,
        Dimension::Campaign,
        Dimension::Page,
    ];

    /// The name in URLs, JSON and table headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Reason => "reason",
            Dimension::Class => "class",
            Dimension::Code => "code",
            Dimension::Campaign => "campaign",
            Dimension::Page => "page",
        }
    }

    /// The key of the group `d` belongs to in this dimension: the value, or
    /// `-` when the letter has none.
    pub fn key_of(self, d: &DeadLetter) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow;
        match self {
            Dimension::Reason => Cow::Borrowed(d.reason_str()),
            Dimension::Class => Cow::Borrowed(d.class_label().unwrap_or(NONE)),
            Dimension::Code => d
                .code()
                .map_or(Cow::Borrowed(NONE), |c| Cow::Owned(c.to_string())),
            Dimension::Campaign => Cow::Borrowed(d.campaign_str().unwrap_or(NONE)),
            Dimension::Page => Cow::Borrowed(d.page_str().unwrap_or(NONE)),
        }
    }
}

impl std::fmt::Display for Dimension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Dimension {
    type Err = String;

    fn from_str(s: &str) -> Result<Dimension, String> {
        Dimension::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is not a dimension (reason, class, code, campaign, page)")
            })
    }
}

/// The group key of a letter without that value.
pub(crate) const NONE: &str = "-";

impl Stats {
    /// The groups of one dimension, largest first.
    pub fn groups(&self, dimension: Dimension) -> &[Group] {
        match dimension {
            Dimension::Reason => &self.by_reason,
            Dimension::Class => &self.by_class,
            Dimension::Code => &self.by_code,
            Dimension::Campaign => &self.by_campaign,
            Dimension::Page => &self.by_page,
        }
    }

    /// The five dimensions with their names, in display order.
    pub fn dimensions(&self) -> [(&'static str, &[Group]); 5] {
        [
            ("reason", &self.by_reason),
            ("class", &self.by_class),
            ("code", &self.by_code),
            ("campaign", &self.by_campaign),
            ("page", &self.by_page),
        ]
    }
}

#[derive(Debug, Default)]
struct Acc {
    count: usize,
    oldest: Option<DateTime<Utc>>,
    newest: Option<DateTime<Utc>>,
    latest_error: Option<String>,
}

impl Acc {
    fn add(&mut self, dead_at: Option<DateTime<Utc>>, error: Option<&String>) {
        self.count += 1;
        if let Some(t) = dead_at {
            self.oldest = Some(self.oldest.map_or(t, |o| o.min(t)));
            if self.newest.is_none_or(|n| t >= n) {
                self.newest = Some(t);
                self.latest_error = error.map(|e| cut(e));
            }
        } else if self.latest_error.is_none() {
            self.latest_error = error.map(|e| cut(e));
        }
    }
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(ERROR_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Accumulates [`Stats`] over a scan.
#[derive(Debug, Default)]
pub struct StatsBuilder {
    all: Acc,
    /// reason, class, campaign, page (by text) …
    maps: [BTreeMap<String, Acc>; 4],
    /// … and code (by number; `None` = no code).
    codes: BTreeMap<Option<i64>, Acc>,
}

/// The group of `key`, allocating its name only the first time.
fn group<'a>(map: &'a mut BTreeMap<String, Acc>, key: &str) -> &'a mut Acc {
    if !map.contains_key(key) {
        map.insert(key.to_string(), Acc::default());
    }
    map.get_mut(key).expect("inserted above")
}

impl StatsBuilder {
    /// Counts one letter in every dimension.
    pub fn add(&mut self, d: &DeadLetter) {
        let dead_at = d.died_at();
        let error = d.story.last_error.message.as_ref();
        self.all.add(dead_at, error);
        let dimensions = [
            Dimension::Reason,
            Dimension::Class,
            Dimension::Campaign,
            Dimension::Page,
        ];
        for (map, dimension) in self.maps.iter_mut().zip(dimensions) {
            group(map, &dimension.key_of(d)).add(dead_at, error);
        }
        self.codes.entry(d.code()).or_default().add(dead_at, error);
    }

    /// The stats, each dimension sorted largest group first.
    pub fn build(self) -> Stats {
        let [r, c, cp, p] = self.maps;
        let codes: BTreeMap<String, Acc> = self
            .codes
            .into_iter()
            .map(|(k, a)| (k.map_or_else(|| NONE.to_string(), |c| c.to_string()), a))
            .collect();
        let [r, c, k, cp, p] = [r, c, codes, cp, p].map(|m| {
            let mut v: Vec<Group> = m
                .into_iter()
                .map(|(key, a)| Group {
                    key,
                    count: a.count,
                    oldest: a.oldest,
                    newest: a.newest,
                    latest_error: a.latest_error,
                })
                .collect();
            v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
            v
        });
        Stats {
            total: self.all.count,
            oldest: self.all.oldest,
            newest: self.all.newest,
            by_reason: r,
            by_class: c,
            by_code: k,
            by_campaign: cp,
            by_page: p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::letter::tests::letter;

    #[test]
    fn groups_count_and_remember_times_and_the_latest_error() {
        let mut s = StatsBuilder::default();
        s.add(&letter(None, "-", 1, "a"));
        let mut later = letter(Some("terminal"), "region", 2300030, "a");
        later.story.dead_at = Some("2026-11-25T10:00:00Z".parse().unwrap());
        later.story.last_error.message = Some("newest".into());
        s.add(&later);
        s.add(&letter(Some("terminal"), "region", 2300031, "b"));
        let st = s.build();
        assert_eq!(st.total, 3);
        let reasons: Vec<(&str, usize)> = st
            .by_reason
            .iter()
            .map(|g| (g.key.as_str(), g.count))
            .collect();
        assert_eq!(reasons, [("terminal", 2), ("delivery_limit", 1)]);
        let terminal = &st.by_reason[0];
        assert_eq!(
            terminal.oldest,
            Some("2026-11-24T10:00:00Z".parse().unwrap())
        );
        assert_eq!(
            terminal.newest,
            Some("2026-11-25T10:00:00Z".parse().unwrap())
        );
        assert_eq!(terminal.latest_error.as_deref(), Some("newest"));
        assert_eq!(
            (st.by_campaign[0].key.as_str(), st.by_campaign[0].count),
            ("a", 2)
        );
        assert_eq!(st.newest, terminal.newest);
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(st.groups(Dimension::Campaign), st.by_campaign.as_slice());
        assert_eq!(json["by_reason"][0]["key"], "terminal");
        assert_eq!(json["by_reason"][0]["count"], 2);
    }

    #[test]
    fn every_letter_is_in_the_group_its_key_names() {
        let mut letters = vec![
            letter(None, "-", 1, "a"),
            letter(Some("terminal"), "region", 2300030, "a"),
            letter(Some("expired"), "budget", 2300015, "b"),
        ];
        let mut no_code = letter(Some("invalid_job"), "x", 0, "c");
        no_code.story.last_error.code = None;
        no_code.story.last_error.subcode = None;
        letters.push(no_code);
        let mut s = StatsBuilder::default();
        for d in &letters {
            s.add(d);
        }
        let st = s.build();
        for dimension in Dimension::ALL {
            for d in &letters {
                let key = dimension.key_of(d);
                let group = st.groups(dimension).iter().find(|g| g.key == key);
                assert!(
                    group.is_some(),
                    "{dimension} {key} not among {:?}",
                    st.groups(dimension)
                );
            }
            let counted: usize = st.groups(dimension).iter().map(|g| g.count).sum();
            assert_eq!(counted, letters.len(), "{dimension}");
            assert_eq!(dimension.as_str().parse::<Dimension>(), Ok(dimension));
        }
        assert_eq!(Dimension::Code.key_of(&letters[3]), "-");
        assert!("nope".parse::<Dimension>().is_err());
    }
}

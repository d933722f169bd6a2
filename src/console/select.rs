//! Any combination of filters: the CLI's `dlq` flags as query parameters.
//!
//! `/letters?campaign=black-friday&code=2300005&since=1h` selects, in the
//! snapshot, the letters `mmsend dlq stats --campaign black-friday --code
//! 2300005 --since 1h` counts: the same [`Filter`], matched through the same
//! [`crate::dlq::filter::Facets`] on the values the snapshot keeps. The
//! parameters are `reason`, `class`, `code`, `campaign`, `page`, `since`,
//! `until` and `job_id`; an empty one is not set (a filter form sends every
//! field). `since` and `until` take what `--since` takes (a duration back
//! from now, `30m`, `2d`, or an RFC 3339 instant), and links keep the text
//! as given, so a link to "the last hour" stays the last hour.
//!
//! The same filter drives the list, the per-hour chart, the JSONL download
//! and the replay or purge confirmation: an action on a filter acts on the
//! exact letters the confirmation page listed (the snapshot's keys), never
//! on whatever matches later.

use chrono::{DateTime, Duration as Span, DurationRound, Utc};
use serde::Deserialize;

use super::mask;
use super::snapshot::{Letter, Snapshot, VALUE_BYTES};
use super::views::{count, query};
use crate::classify::{Class, DeadReason};
use crate::dlq::{parse_since, Dimension, Filter};

/// The filter's query parameters, in the order links write them.
pub(crate) const PARAMS: [&str; 8] = [
    "reason", "class", "code", "campaign", "page", "since", "until", "job_id",
];

/// The filter as a page's query gives it (every field optional, empty =
/// not set); `p` is the page number of a list.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct FilterQuery {
    #[serde(default)]
    pub(crate) reason: String,
    #[serde(default)]
    pub(crate) class: String,
    #[serde(default)]
    pub(crate) code: String,
    #[serde(default)]
    pub(crate) campaign: String,
    #[serde(default)]
    pub(crate) page: String,
    #[serde(default)]
    pub(crate) since: String,
    #[serde(default)]
    pub(crate) until: String,
    #[serde(default)]
    pub(crate) job_id: String,
}

impl FilterQuery {
    fn values(&self) -> [&str; 8] {
        [
            &self.reason,
            &self.class,
            &self.code,
            &self.campaign,
            &self.page,
            &self.since,
            &self.until,
            &self.job_id,
        ]
        .map(|v| v.trim())
    }

    /// Whether any filter parameter is set.
    pub(crate) fn any(&self) -> bool {
        self.values().iter().any(|v| !v.is_empty())
    }

    /// The filter, or what is wrong with a parameter (in words a person
    /// can act on).
    ///
    /// Every value is taken as pages show it, masked and bounded (a person
    /// may paste a token into a field): that is how the snapshot keeps
    /// campaigns, pages and job ids, so the filter matches them, and no
    /// title, link, record or audit entry of the filter carries a token.
    pub(crate) fn parse(&self, now: DateTime<Utc>) -> Result<Selected, String> {
        let shown = self.values().map(|v| mask::shown(v, VALUE_BYTES));
        let v = shown.each_ref().map(|v| v.as_ref());
        let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let time = |name: &str, s: &str| {
            text(s)
                .map(|s| parse_since(&s, now))
                .transpose()
                .map_err(|e| format!("{name}: {e}"))
        };
        let reason = text(v[0])
            .map(|r| r.parse::<DeadReason>())
            .transpose()
            .map_err(|e| format!("reason: {e}"))?;
        let class = text(v[1])
            .map(|c| c.parse::<Class>())
            .transpose()
            .map_err(|e| format!("class: {e}"))?;
        let code = text(v[2])
            .map(|c| c.parse::<i64>())
            .transpose()
            .map_err(|_| format!("code: {:?} is not a number (e.g. 2300005)", v[2]))?;
        let filter = Filter {
            reason,
            class,
            code,
            campaign: text(v[3]),
            page: text(v[4]),
            since: time("since", v[5])?,
            until: time("until", v[6])?,
            // as the snapshot shows job ids (a key's, a long one cut)
            job_id: text(v[7]).map(|j| {
                super::snapshot::job_label_of(&crate::dlq::letter::key_job_id(&j)).into_owned()
            }),
            limit: None,
        };
        let pairs = PARAMS
            .iter()
            .zip(v)
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
        Ok(Selected { filter, pairs })
    }
}

/// A parsed filter and its parameters as given (masked).
#[derive(Debug, Clone)]
pub(crate) struct Selected {
    pub(crate) filter: Filter,
    /// (parameter, value as given), set ones only, in [`PARAMS`] order.
    pub(crate) pairs: Vec<(&'static str, String)>,
}

impl Selected {
    /// Whether parameter `name` is set.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.pairs.iter().any(|(k, _)| *k == name)
    }

    /// No filter: every letter.
    pub(crate) fn all() -> Selected {
        Selected {
            filter: Filter::default(),
            pairs: Vec::new(),
        }
    }

    /// A filter of one group (`campaign = black-friday`); `-` (no value) is
    /// not a filter value, so a `-` group gives `None`.
    pub(crate) fn of_group(d: Dimension, key: &str) -> Option<Selected> {
        if key == crate::dlq::stats::NONE {
            return None;
        }
        let mut q = FilterQuery::default();
        match d {
            Dimension::Reason => q.reason = key.into(),
            Dimension::Class => q.class = key.into(),
            Dimension::Code => q.code = key.into(),
            Dimension::Campaign => q.campaign = key.into(),
            Dimension::Page => q.page = key.into(),
        }
        q.parse(Utc::now()).ok()
    }

    /// A link to this filter narrowed by one more parameter (replacing the
    /// same one).
    pub(crate) fn with(&self, name: &'static str, value: &str) -> Link {
        Link {
            pairs: self.pairs.clone(),
        }
        .with(name, value)
    }

    /// `?campaign=…&code=…` followed by `extra`.
    pub(crate) fn query(&self, extra: &[(&str, &str)]) -> String {
        query_of(&self.pairs, extra)
    }

    /// `/letters?…`: the list of this filter's letters.
    pub(crate) fn href(&self) -> String {
        format!("/letters{}", self.query(&[]))
    }

    /// `campaign = black-friday, code = 2300005`, or `every letter` (the
    /// values masked, as [`FilterQuery::parse`] took them).
    pub(crate) fn describe(&self) -> String {
        if self.pairs.is_empty() {
            return "every letter".into();
        }
        self.pairs
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The same selection on the command line (`--campaign black-friday
    /// --code 2300005`), values quoted when they need it.
    pub(crate) fn flags(&self) -> String {
        self.pairs
            .iter()
            .map(|(k, v)| {
                let safe = !v.is_empty()
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:+/@".contains(c));
                let v = if safe {
                    v.clone()
                } else {
                    format!("'{}'", v.replace('\'', "'\\''"))
                };
                format!("--{} {v}", k.replace('_', "-"))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The snapshot's letters this filter selects, in queue order.
    pub(crate) fn members(&self, s: &Snapshot) -> Vec<u32> {
        if self.pairs.is_empty() {
            return (0..s.letters.len() as u32).collect();
        }
        s.letters
            .iter()
            .enumerate()
            .filter(|(_, l)| self.filter.matches(*l))
            .map(|(i, _)| i as u32)
            .collect()
    }
}

/// A link to a list of letters: a filter's parameters, not parsed (the
/// page it opens parses them).
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pairs: Vec<(&'static str, String)>,
}

impl Link {
    /// The same with one more parameter (replacing the same one), in the
    /// CLI's order.
    pub(crate) fn with(mut self, name: &'static str, value: &str) -> Link {
        self.pairs.retain(|(k, _)| *k != name);
        self.pairs.push((name, value.to_string()));
        self.pairs
            .sort_by_key(|(k, _)| PARAMS.iter().position(|p| p == k));
        self
    }

    /// `/letters?…`.
    pub(crate) fn href(&self) -> String {
        format!("/letters{}", query_of(&self.pairs, &[]))
    }
}

/// `?k=v&…` of a filter's parameters followed by `extra`.
fn query_of(pairs: &[(&'static str, String)], extra: &[(&str, &str)]) -> String {
    let mut all: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    query(&all)
}

/// Hours the per-hour chart shows.
pub(crate) const CHART_HOURS: usize = 48;

/// One bar of the chart: an hour and its dead letters.
#[derive(Clone, Debug)]
pub(crate) struct Bar {
    pub(crate) x: usize,
    pub(crate) y: usize,
    pub(crate) height: usize,
    pub(crate) title: String,
    /// The list of that hour's letters.
    pub(crate) href: String,
}

/// Dead letters per hour over the last [`CHART_HOURS`] hours, as an SVG
/// the template draws (no script, no inline style).
#[derive(Clone, Debug)]
pub(crate) struct Chart {
    pub(crate) bars: Vec<Bar>,
    /// What a screen reader says of it.
    pub(crate) label: String,
    pub(crate) start: String,
    pub(crate) end: String,
    pub(crate) peak: String,
    /// Letters dead before the chart's first hour, or with no time.
    pub(crate) earlier: String,
}

/// Chart height in SVG units.
pub(crate) const CHART_HEIGHT: usize = 60;
/// One hour's width in SVG units.
pub(crate) const BAR_WIDTH: usize = 10;

impl Chart {
    /// The chart of `members`, ending with the hour of `now`; bars link to
    /// `sel` narrowed to their hour.
    pub(crate) fn new(
        letters: &[Letter],
        members: &[u32],
        now: DateTime<Utc>,
        sel: &Selected,
    ) -> Chart {
        let hour = Span::hours(1);
        let last = now.duration_trunc(hour).unwrap_or(now);
        let first = last - Span::hours(CHART_HOURS as i64 - 1);
        let mut counts = [0usize; CHART_HOURS];
        let mut earlier = 0usize;
        for &i in members {
            match letters[i as usize].dead_at {
                Some(t) if t >= first => {
                    let h = ((t - first).num_hours().max(0) as usize).min(CHART_HOURS - 1);
                    counts[h] += 1;
                }
                _ => earlier += 1,
            }
        }
        let peak = counts.iter().copied().max().unwrap_or(0);
        let peak_at = counts.iter().position(|&c| c == peak && c > 0);
        let bars = counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(h, &c)| {
                let start = first + Span::hours(h as i64);
                let height = (c * CHART_HEIGHT).div_ceil(peak.max(1)).max(1);
                Bar {
                    x: h * BAR_WIDTH,
                    y: CHART_HEIGHT - height,
                    height,
                    title: format!(
                        "{} {}:00–{}:00 UTC: {} dead letters",
                        start.format("%Y-%m-%d"),
                        start.format("%H"),
                        (start + hour).format("%H"),
                        count(c)
                    ),
                    href: sel
                        .with("since", &start.to_rfc3339())
                        .with("until", &(start + hour).to_rfc3339())
                        .href(),
                }
            })
            .collect();
        let label = match peak_at {
            None => format!("No dead letters in the last {CHART_HOURS} hours."),
            Some(h) => format!(
                "Dead letters per hour over the last {CHART_HOURS} hours: {} in all, at most {} in the hour from {}:00 UTC; {} in the last hour.",
                count(counts.iter().sum()),
                count(peak),
                (first + Span::hours(h as i64)).format("%Y-%m-%d %H"),
                count(counts[CHART_HOURS - 1]),
            ),
        };
        Chart {
            bars,
            label,
            start: format!("{} UTC", first.format("%m-%d %H:00")),
            end: format!("{} UTC", (last + hour).format("%m-%d %H:00")),
            peak: count(peak),
            earlier: count(earlier),
        }
    }
}

/// The dimension a group's breakdown is counted by: a campaign's codes, a
/// code's campaigns, else codes.
pub(crate) fn breakdown_of(d: Dimension) -> Dimension {
    match d {
        Dimension::Code | Dimension::Page => Dimension::Campaign,
        _ => Dimension::Code,
    }
}

/// The groups of `by` among `members`, with their letters, largest first
/// (then by key).
pub(crate) fn counts_by(s: &Snapshot, members: &[u32], by: Dimension) -> Vec<(String, usize)> {
    use std::borrow::Cow;
    use std::collections::HashMap;
    let none = crate::dlq::stats::NONE;
    let mut counts: HashMap<Cow<'_, str>, usize> = HashMap::new();
    for &i in members {
        let l = &s.letters[i as usize];
        let key: Cow<'_, str> = match by {
            Dimension::Code => l
                .code
                .map_or(Cow::Borrowed(none), |c| Cow::Owned(c.to_string())),
            Dimension::Campaign => Cow::Borrowed(l.campaign.as_deref().unwrap_or(none)),
            Dimension::Page => Cow::Borrowed(l.page.as_deref().unwrap_or(none)),
            Dimension::Class => Cow::Borrowed(l.class.as_deref().unwrap_or(none)),
            Dimension::Reason => Cow::Borrowed(&l.reason),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    let mut v: Vec<(String, usize)> = counts
        .into_iter()
        .map(|(k, n)| (k.into_owned(), n))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The largest few groups of `by` among `members`: (key, count), and
/// `(N more, "")` when there are more.
pub(crate) fn breakdown(s: &Snapshot, members: &[u32], by: Dimension) -> Vec<(String, String)> {
    const SHOWN: usize = 3;
    let v = counts_by(s, members, by);
    let mut out: Vec<(String, String)> = v
        .iter()
        .take(SHOWN)
        .map(|(k, n)| (k.clone(), count(*n)))
        .collect();
    if v.len() > SHOWN {
        out.push((format!("{} more", v.len() - SHOWN), String::new()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> FilterQuery {
        let mut q = FilterQuery::default();
        for (k, v) in pairs {
            let field = match *k {
                "reason" => &mut q.reason,
                "class" => &mut q.class,
                "code" => &mut q.code,
                "campaign" => &mut q.campaign,
                "page" => &mut q.page,
                "since" => &mut q.since,
                "until" => &mut q.until,
                "job_id" => &mut q.job_id,
                other => panic!("{other} is no filter"),
            };
            *field = v.to_string();
        }
        q
    }

    fn letter_at(dead_at: Option<DateTime<Utc>>) -> Letter {
        Letter {
            job_id: "j".into(),
            fingerprint: 1,
            reason: "terminal".into(),
            class: None,
            code: None,
            campaign: None,
            page: None,
            message_id: None,
            error_codes: [None, None],
            attempts: 1,
            replays: 0,
            dead_at,
            error: None,
            headers: Box::new([]),
            x_death: None,
            body: "".into(),
            body_bytes: 0,
            body_json: false,
            body_cut: false,
        }
    }

    #[test]
    fn a_query_is_the_cli_filter_and_says_what_is_wrong() {
        let now: DateTime<Utc> = "2026-12-04T12:00:00Z".parse().unwrap();
        let sel = q(&[
            ("code", "2300005"),
            ("campaign", "black friday"),
            ("since", "1h"),
            ("page", ""),
        ])
        .parse(now)
        .unwrap();
        assert_eq!(sel.filter.code, Some(2300005));
        assert_eq!(sel.filter.campaign.as_deref(), Some("black friday"));
        assert_eq!(
            sel.filter.since,
            Some("2026-12-04T11:00:00Z".parse().unwrap())
        );
        assert_eq!(sel.filter.page, None, "an empty field is not a filter");
        assert_eq!(
            sel.describe(),
            "code = 2300005, campaign = black friday, since = 1h"
        );
        assert_eq!(
            sel.flags(),
            "--code 2300005 --campaign 'black friday' --since 1h"
        );
        assert_eq!(
            sel.query(&[]),
            "?code=2300005&campaign=black%20friday&since=1h"
        );
        let narrowed = sel.with("reason", "terminal");
        assert_eq!(
            narrowed.pairs[0],
            ("reason", "terminal".to_string()),
            "links keep the CLI's order"
        );
        for (bad, says) in [
            (q(&[("code", "x")]), "code: \"x\" is not a number"),
            (q(&[("reason", "nope")]), "reason: "),
            (q(&[("class", "nope")]), "class: "),
            (q(&[("until", "yesterday")]), "until: "),
        ] {
            let e = bad.parse(now).unwrap_err();
            assert!(e.starts_with(says), "{e}");
        }
        assert!(!q(&[]).any());
        assert_eq!(
            Selected::of_group(Dimension::Campaign, "-").map(|s| s.pairs),
            None
        );
    }

    #[test]
    fn the_chart_counts_each_letter_in_its_hour() {
        let now: DateTime<Utc> = "2026-12-04T12:30:00Z".parse().unwrap();
        let at = |t: &str| letter_at(t.parse().ok());
        let letters = vec![
            at("2026-12-04T12:10:00Z"),
            at("2026-12-04T12:59:00Z"),
            at("2026-12-04T11:00:00Z"),
            at("2026-12-01T00:00:00Z"),
            at("not a time"),
        ];
        let members: Vec<u32> = (0..letters.len() as u32).collect();
        let chart = Chart::new(&letters, &members, now, &Selected::all());
        let last = chart.bars.last().unwrap();
        assert_eq!(last.x, (CHART_HOURS - 1) * BAR_WIDTH);
        assert_eq!(last.height, CHART_HEIGHT, "the peak fills the chart");
        assert!(
            last.title.ends_with("12:00–13:00 UTC: 2 dead letters"),
            "{}",
            last.title
        );
        assert_eq!(chart.bars.len(), 2);
        assert_eq!(chart.earlier, "2", "older than the chart, or no time");
        assert!(
            chart.label.contains("3 in all, at most 2"),
            "{}",
            chart.label
        );
        assert!(
            last.href
                .contains("since=2026-12-04T12%3A00%3A00%2B00%3A00"),
            "{}",
            last.href
        );
    }
}

//! What a failed call was: [`CodeTable::classify`] turns a [`Failure`] into
//! a [`Verdict`], once per answer.
//!
//! The first of `error_subcode`, `code` that the table knows decides (Meta
//! puts the 2300xxx marketing codes in either; 190 with subcode 463 is still
//! `auth`), then `is_transient`, then the HTTP status, then the transport
//! error. A 2xx that is not a send (see [`NotASend`]) has a class too: it is
//! never acked as sent.

use std::fmt;
use std::time::Duration;

use super::table::{CodeTable, Row, RowDelay, ScopeKind};
use super::Class;
use crate::graph::client::NotASend;
use crate::graph::{Failure, FailureKind};

/// The bounded `code` label of `mmsend_graph_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodeLabel {
    /// A code of the classification table.
    Code(i64),
    /// A Graph error whose codes the table does not know.
    Other,
    /// HTTP 429 without a Graph error body.
    Http429,
    /// HTTP 5xx without a Graph error body.
    Http5xx,
    /// Another 4xx without a Graph error body.
    Http4xx,
    /// The request timed out.
    Timeout,
    /// Any other transport error.
    Transport,
    /// A 2xx that was not a send.
    NotASend,
}

impl fmt::Display for CodeLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodeLabel::Code(c) => write!(f, "{c}"),
            CodeLabel::Other => f.write_str("other"),
            CodeLabel::Http429 => f.write_str("http_429"),
            CodeLabel::Http5xx => f.write_str("http_5xx"),
            CodeLabel::Http4xx => f.write_str("http_4xx"),
            CodeLabel::Timeout => f.write_str("timeout"),
            CodeLabel::Transport => f.write_str("transport"),
            CodeLabel::NotASend => f.write_str("not_a_send"),
        }
    }
}

impl std::str::FromStr for CodeLabel {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "other" => CodeLabel::Other,
            "http_429" => CodeLabel::Http429,
            "http_5xx" => CodeLabel::Http5xx,
            "http_4xx" => CodeLabel::Http4xx,
            "timeout" => CodeLabel::Timeout,
            "transport" => CodeLabel::Transport,
            "not_a_send" => CodeLabel::NotASend,
            code => CodeLabel::Code(code.parse()?),
        })
    }
}

/// A classified failure: everything the route and the gates need.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The class, which fixes the route.
    pub class: Class,
    /// What the decision was made on (a table code, or what the answer was).
    pub label: CodeLabel,
    /// The scope the answer holds back besides this job.
    pub scope: ScopeKind,
    /// The table row's own wait, if it has one.
    pub delay: Option<RowDelay>,
    /// The wait the answer's headers asked for (`Retry-After`, BUC
    /// `estimated_time_to_regain_access`), already bounded by the client.
    pub hint: Option<Duration>,
    /// The call may have been a send (a transport failure after the request
    /// was written, a 2xx without a tracking id).
    pub ambiguous: bool,
    /// After a maybe-sent call, this answer proves that call was the send.
    pub already_sent: bool,
}

impl Verdict {
    fn new(class: Class, label: CodeLabel, failure: &Failure) -> Verdict {
        Verdict {
            class,
            label,
            scope: ScopeKind::None,
            delay: None,
            hint: failure.hint.wait(),
            ambiguous: failure.ambiguous(),
            already_sent: false,
        }
    }

    fn from_row(row: &Row, code: i64, failure: &Failure) -> Verdict {
        Verdict {
            scope: row.scope,
            delay: row.delay,
            already_sent: row.already_sent,
            ..Verdict::new(row.class, CodeLabel::Code(code), failure)
        }
    }
}

impl CodeTable {
    /// Classifies a failed call.
    pub fn classify(&self, failure: &Failure) -> Verdict {
        match &failure.kind {
            FailureKind::Graph { status, error } => {
                let known = [error.error_subcode, error.code]
                    .into_iter()
                    .flatten()
                    .find_map(|c| self.get(c).map(|row| (row, c)));
                match known {
                    Some((row, code)) => Verdict::from_row(row, code, failure),
                    None if error.is_transient == Some(true) => {
                        Verdict::new(Class::Transient, CodeLabel::Other, failure)
                    }
                    None => Verdict {
                        label: CodeLabel::Other,
                        ..by_status(*status, failure)
                    },
                }
            }
            FailureKind::Http { status, .. } => by_status(*status, failure),
            FailureKind::Transport { timeout, .. } => Verdict::new(
                Class::Transient,
                if *timeout {
                    CodeLabel::Timeout
                } else {
                    CodeLabel::Transport
                },
                failure,
            ),
            FailureKind::NotASend { why, .. } => {
                let class = match why {
                    // Meta answers JSON; anything else came from something
                    // in between (a proxy, a wrong base URL): never reached
                    // Meta, try again.
                    NotASend::NotJson => Class::Transient,
                    // Meta said it did not send: `unknown`, dead, with the
                    // body in the last error for the operator.
                    NotASend::NotSuccess => Class::Unknown,
                    // Meta said success but gave no tracking id: maybe sent
                    // (the failure is ambiguous), try again; a 2300035 on
                    // the retry settles it as sent.
                    NotASend::NoTrackingId => Class::Transient,
                    // The answer was a 2xx but its body was lost on the way:
                    // maybe sent, like a timeout after the request was written.
                    NotASend::CutOff => Class::Transient,
                };
                Verdict::new(class, CodeLabel::NotASend, failure)
            }
        }
    }
}

/// The verdict on an answer without a known Graph code.
fn by_status(status: u16, failure: &Failure) -> Verdict {
    match status {
        429 => Verdict {
            scope: ScopeKind::App,
            ..Verdict::new(Class::Throttled, CodeLabel::Http429, failure)
        },
        500..=599 => Verdict::new(Class::Transient, CodeLabel::Http5xx, failure),
        400 => Verdict::new(Class::InvalidRequest, CodeLabel::Http4xx, failure),
        _ => Verdict::new(Class::Unknown, CodeLabel::Http4xx, failure),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::table::{BUILTIN, REFERENCE};
    use crate::graph::{GraphError, UsageHint};

    pub(crate) fn graph(status: u16, code: Option<i64>, subcode: Option<i64>) -> Failure {
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

    fn verdict(f: &Failure) -> Verdict {
        CodeTable::default().classify(f)
    }

    const MIN30: Option<RowDelay> = Some(RowDelay::After(Duration::from_secs(1800)));

    /// Every code of Meta's reference, with the class and scope its words
    /// call for (the reading of the April 2026 reference), checked
    /// in `code` and in `error_subcode` behind the generic code 100.
    const EXPECTED: &[(i64, Class, ScopeKind, Option<RowDelay>)] = {
        use Class as C;
        use ScopeKind as S;
        &[
            (2300000, C::CampaignConfig, S::None, None),
            (2300001, C::InvalidRequest, S::None, None),
            (2300002, C::CampaignConfig, S::None, None),
            (2300003, C::CampaignConfig, S::None, None),
            (2300004, C::Recipient, S::None, None),
            (2300005, C::Mismatch, S::None, None),
            (2300006, C::CampaignConfig, S::None, None),
            (2300007, C::CampaignConfig, S::None, None),
            (2300008, C::Transient, S::None, None),
            (2300009, C::Transient, S::None, None),
            (2300010, C::InvalidRequest, S::None, None),
            (2300011, C::CampaignConfig, S::None, None),
            (2300012, C::NotReady, S::Campaign, None),
            (2300013, C::Onboarding, S::Page, None),
            (2300014, C::Mismatch, S::None, None),
            (2300015, C::Budget, S::Campaign, None),
            (2300016, C::CampaignConfig, S::None, None),
            (2300017, C::Budget, S::AdAccount, None),
            (2300018, C::InvalidRequest, S::None, None),
            (2300019, C::Onboarding, S::AdAccount, None),
            (2300020, C::CampaignConfig, S::None, None),
            (2300021, C::InvalidRequest, S::None, None),
            (2300022, C::InvalidRequest, S::None, None),
            (2300023, C::InvalidRequest, S::None, None),
            (2300024, C::InvalidRequest, S::None, None),
            (2300025, C::InvalidRequest, S::None, None),
            (2300026, C::InvalidRequest, S::None, None),
            (2300027, C::InvalidRequest, S::None, None),
            (2300030, C::Region, S::None, None),
            (2300031, C::Region, S::None, None),
            (2300032, C::Region, S::None, None),
            (2300033, C::NotReady, S::Campaign, None),
            (2300034, C::Recipient, S::None, None),
            (2300035, C::RecipientCapped, S::None, None),
            (2300036, C::RecipientCapped, S::None, None),
            (2300037, C::Recipient, S::None, None),
            (2300038, C::InvalidRequest, S::None, None),
            (2300039, C::Onboarding, S::Page, None),
            (2300040, C::InvalidRequest, S::None, None),
            (2300041, C::NotReady, S::Campaign, None),
            (2300042, C::RecipientCapped, S::None, None),
            (2300043, C::RecipientCapped, S::None, None),
            (2300044, C::RecipientCapped, S::None, None),
            (2300046, C::InvalidRequest, S::None, None),
            (2300047, C::InvalidRequest, S::None, None),
            (2300048, C::InvalidRequest, S::None, None),
            (2300052, C::RecipientCapped, S::None, None),
            (2300053, C::Budget, S::Campaign, None),
            (2300054, C::Budget, S::Campaign, Some(RowDelay::NextDay)),
            (2300055, C::Transient, S::None, MIN30),
            (2300056, C::Budget, S::AdAccount, None),
            (2300057, C::Transient, S::None, None),
            (2300058, C::Budget, S::AdAccount, None),
            (2300059, C::Budget, S::AdAccount, None),
            (2300060, C::Transient, S::None, None),
            (2300061, C::Transient, S::None, MIN30),
            (2300062, C::Transient, S::None, MIN30),
            (2300063, C::Transient, S::None, None),
            (2300064, C::InvalidRequest, S::None, None),
            (2300065, C::InvalidRequest, S::None, None),
            (2300066, C::Onboarding, S::Page, None),
            (2300067, C::Onboarding, S::AdAccount, None),
            (2300068, C::Transient, S::None, None),
            (2300069, C::Onboarding, S::Page, None),
            (2300070, C::InvalidRequest, S::None, None),
            (2300071, C::InvalidRequest, S::None, None),
            (2300072, C::InvalidRequest, S::None, None),
            (2300073, C::InvalidRequest, S::None, None),
            (2300074, C::InvalidRequest, S::None, None),
            (2300075, C::InvalidRequest, S::None, None),
            (2300076, C::InvalidRequest, S::None, None),
            (2300077, C::InvalidRequest, S::None, None),
            (2300078, C::Throttled, S::Page, None),
            (2300079, C::Throttled, S::App, None),
            (2300080, C::Throttled, S::App, None),
        ]
    };

    #[test]
    fn every_reference_code_in_code_and_in_subcode() {
        assert_eq!(EXPECTED.len(), REFERENCE.len(), "one expectation per code");
        for &(code, class, scope, delay) in EXPECTED {
            for f in [
                graph(400, Some(code), None),
                graph(400, Some(100), Some(code)),
            ] {
                let v = verdict(&f);
                assert_eq!(
                    (v.class, v.scope, v.delay, v.label),
                    (class, scope, delay, CodeLabel::Code(code)),
                    "{code}"
                );
                assert_eq!(v.already_sent, code == 2300035, "{code}");
            }
        }
        // no marketing row outside the expectations
        let listed: Vec<i64> = EXPECTED.iter().map(|e| e.0).collect();
        for &(lo, hi, _) in BUILTIN.iter().filter(|(lo, _, _)| *lo >= 2_300_000) {
            for code in lo..=hi {
                assert!(listed.contains(&code), "{code} has no expectation");
            }
        }
    }

    #[test]
    fn generic_graph_codes() {
        use Class as C;
        use ScopeKind as S;
        let rows: &[(i64, Option<i64>, Class, ScopeKind)] = &[
            (1, None, C::Transient, S::None),
            (2, None, C::Transient, S::None),
            (4, None, C::Throttled, S::App),
            (17, None, C::Throttled, S::Page),
            (32, None, C::Throttled, S::Page),
            (341, None, C::Throttled, S::App),
            (613, None, C::Throttled, S::App),
            (80000, None, C::Throttled, S::App),
            (80014, None, C::Throttled, S::App),
            (100, None, C::InvalidRequest, S::None),
            (551, None, C::Recipient, S::None),
            (190, Some(463), C::Auth, S::Page),
            (190, None, C::Auth, S::Page),
            (102, None, C::Auth, S::Page),
            (10, None, C::Auth, S::Page),
            (200, None, C::Auth, S::Page),
            (299, None, C::Auth, S::Page),
        ];
        for &(code, sub, class, scope) in rows {
            let v = verdict(&graph(400, Some(code), sub));
            assert_eq!((v.class, v.scope), (class, scope), "{code}/{sub:?}");
        }
        // unknown codes fall back to the status, labelled `other`
        let v = verdict(&graph(400, Some(12345), None));
        assert_eq!((v.class, v.label), (C::InvalidRequest, CodeLabel::Other));
        assert_eq!(verdict(&graph(403, Some(12345), None)).class, C::Unknown);
        let mut t = graph(400, Some(99999), None);
        if let FailureKind::Graph { error, .. } = &mut t.kind {
            error.is_transient = Some(true);
        }
        assert_eq!(verdict(&t).class, C::Transient);
    }

    fn failure(kind: FailureKind) -> Failure {
        Failure {
            kind,
            hint: UsageHint::default(),
        }
    }

    #[test]
    fn statuses_transport_and_answers_that_are_not_sends() {
        let http = |status, body: &str| {
            failure(FailureKind::Http {
                status,
                body_snippet: body.into(),
            })
        };
        let v = verdict(&http(502, "<html>"));
        assert_eq!((v.class, v.label), (Class::Transient, CodeLabel::Http5xx));
        assert_eq!(verdict(&http(500, "")).class, Class::Transient);
        let v = verdict(&http(429, ""));
        assert_eq!((v.class, v.scope), (Class::Throttled, ScopeKind::App));
        assert_eq!(verdict(&http(400, "")).class, Class::InvalidRequest);
        assert_eq!(verdict(&http(404, "")).class, Class::Unknown);

        let v = verdict(&failure(FailureKind::Transport {
            timeout: true,
            ambiguous: true,
            message: "timed out".into(),
        }));
        assert_eq!(
            (v.class, v.label, v.ambiguous),
            (Class::Transient, CodeLabel::Timeout, true)
        );

        let not_a_send = |why| {
            verdict(&failure(FailureKind::NotASend {
                status: 200,
                body_snippet: "<html>".into(),
                why,
            }))
        };
        let v = not_a_send(NotASend::NotJson);
        assert_eq!(
            (v.class, v.label, v.ambiguous),
            (Class::Transient, CodeLabel::NotASend, false)
        );
        let v = not_a_send(NotASend::NotSuccess);
        assert_eq!((v.class, v.ambiguous), (Class::Unknown, false));
        let v = not_a_send(NotASend::NoTrackingId);
        assert_eq!((v.class, v.ambiguous), (Class::Transient, true));
    }
}

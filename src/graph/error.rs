//! Reading what the Graph API says when it fails: the error body and the
//! throttling hints in the response headers.
//!
//! Error bodies arrive as Graph JSON (`{"error": {…}}`), but proxies and
//! overloaded front ends also send HTML, empty or cut-off bodies. Parsing
//! never fails loudly: anything that is not a Graph error object yields
//! `None` and the caller falls back to the HTTP status.
//!
//! Graph's texts may quote the token it was sent ("Malformed access token
//! EAA…"): the client passes every text field through
//! [`GraphError::redact`] before the error leaves it (see
//! [`super::auth::Redactor`]). The usage headers yield numbers only, so no
//! text of theirs goes further.
//!
//! Every wait a response asks for (`Retry-After`, the BUC header's
//! `estimated_time_to_regain_access`, and any hint field added later) is
//! clamped to [`MAX_HINT`] here, where it enters the process: a hint is
//! data from the network, and an absurd one (`Retry-After:
//! 10000000000000`) must neither overflow time arithmetic downstream nor
//! park a scope for centuries.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::Redactor;

/// The `error` object of a Graph API error response. Every field is optional
/// because real responses omit any of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphError {
    /// The developer-facing message.
    #[serde(default)]
    pub message: Option<String>,
    /// The JSON `type`, e.g. `OAuthException`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The error code (190, 4, 2300005, …), the first thing classification
    /// looks at.
    #[serde(default)]
    pub code: Option<i64>,
    /// Narrows `code` (e.g. 463 under 190: token expired).
    #[serde(default)]
    pub error_subcode: Option<i64>,
    /// A title meant for the end user, when Meta gives one.
    #[serde(default)]
    pub error_user_title: Option<String>,
    /// A message meant for the end user, when Meta gives one.
    #[serde(default)]
    pub error_user_msg: Option<String>,
    /// Meta's trace id, to quote to Meta's support.
    #[serde(default)]
    pub fbtrace_id: Option<String>,
    /// Meta's own hint that trying again may work.
    #[serde(default)]
    pub is_transient: Option<bool>,
}

impl GraphError {
    /// Parses a response body. `None` unless it is JSON with an `error`
    /// object carrying at least a code or a message.
    pub fn parse(body: &[u8]) -> Option<GraphError> {
        let value: Value = serde_json::from_slice(body).ok()?;
        let error = value.get("error")?;
        if !error.is_object() {
            return None;
        }
        // Field-by-field, so one odd field (a code sent as a string, say)
        // does not throw the rest away.
        let text = |k: &str| error.get(k).and_then(Value::as_str).map(str::to_owned);
        let int = |k: &str| {
            error.get(k).and_then(|v| {
                v.as_i64()
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            })
        };
        let parsed = GraphError {
            message: text("message"),
            kind: text("type"),
            code: int("code"),
            error_subcode: int("error_subcode"),
            error_user_title: text("error_user_title"),
            error_user_msg: text("error_user_msg"),
            fbtrace_id: text("fbtrace_id"),
            is_transient: error.get("is_transient").and_then(Value::as_bool),
        };
        (parsed.code.is_some() || parsed.message.is_some()).then_some(parsed)
    }

    /// Takes secrets out of every text field (see [`Redactor`]).
    pub fn redact(&mut self, redactor: &Redactor<'_>) {
        for field in [
            &mut self.message,
            &mut self.kind,
            &mut self.error_user_title,
            &mut self.error_user_msg,
            &mut self.fbtrace_id,
        ]
        .into_iter()
        .flatten()
        {
            redactor.redact_string(field);
        }
    }

    /// The most useful human text: the user message if Meta gave one,
    /// else the developer message.
    pub fn best_message(&self) -> Option<&str> {
        self.error_user_msg
            .as_deref()
            .filter(|s| !s.is_empty())
            .or(self.message.as_deref())
    }
}

/// The longest wait a hint from the network may ask for: one day. No Graph
/// throttle we know of asks for more (Meta's BUC waits are minutes to
/// hours); a longer hint is taken as one day, after which one probe asks
/// the API again.
pub const MAX_HINT: Duration = Duration::from_secs(24 * 3600);

/// A wait asked for by the network, clamped to [`MAX_HINT`].
pub fn clamp_hint(wait: Duration) -> Duration {
    wait.min(MAX_HINT)
}

/// Usage counters as Meta reports them (percent of the allowed budget).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Calls made, percent of the allowed calls.
    pub call_count: f64,
    /// CPU time used, percent of the allowed CPU time.
    pub total_cputime: f64,
    /// Wall time used, percent of the allowed time.
    pub total_time: f64,
}

/// What the response headers said about throttling, typed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageHint {
    /// `Retry-After` in seconds, if present.
    pub retry_after: Option<Duration>,
    /// The largest `estimated_time_to_regain_access` (minutes) over all
    /// business ids of `X-Business-Use-Case-Usage`, if non-zero.
    pub regain_access: Option<Duration>,
    /// `X-App-Usage`.
    pub app: Option<Usage>,
    /// `X-Business-Use-Case-Usage`, the highest of each counter over all
    /// entries.
    pub business: Option<Usage>,
}

impl UsageHint {
    /// Reads the hint headers; malformed headers are ignored, never an error.
    ///
    /// Meta sends the usage headers on every answer and their values change
    /// slowly, so the last value of each header and what it parsed to are
    /// kept (per thread) and a repeated value is not parsed again.
    pub fn from_headers(headers: &http::HeaderMap) -> UsageHint {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let app = get("x-app-usage").and_then(|v| cached(&LAST_APP, v, parse_app_usage));
        let (regain_access, business) = get("x-business-use-case-usage")
            .map_or((None, None), |v| cached(&LAST_BUC, v, parse_buc));
        UsageHint {
            retry_after: get("retry-after").and_then(parse_retry_after),
            app,
            regain_access,
            business,
        }
    }

    /// The longest wait the hints ask for, if any, never more than
    /// [`MAX_HINT`] (also for a hint built by hand rather than read by
    /// [`UsageHint::from_headers`]).
    pub fn wait(&self) -> Option<Duration> {
        let longest = match (self.retry_after, self.regain_access) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        longest.map(clamp_hint)
    }
}

/// `Retry-After: <seconds>`, at most [`MAX_HINT`]. (The HTTP-date form is
/// not used by Graph.)
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| clamp_hint(Duration::from_secs(s)))
}

fn usage_of(v: &Value) -> Option<Usage> {
    let num = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    v.is_object().then(|| Usage {
        call_count: num("call_count"),
        total_cputime: num("total_cputime"),
        total_time: num("total_time"),
    })
}

fn parse_app_usage(v: &str) -> Option<Usage> {
    usage_of(&serde_json::from_str::<Value>(v).ok()?)
}

type Cache<T> = std::cell::RefCell<Option<(String, T)>>;

thread_local! {
    static LAST_APP: Cache<Option<Usage>> = const { std::cell::RefCell::new(None) };
    static LAST_BUC: Cache<(Option<Duration>, Option<Usage>)> = const { std::cell::RefCell::new(None) };
}

/// `parse(raw)`, or what it gave the last time this thread saw `raw`.
fn cached<T: Clone + 'static>(
    cache: &'static std::thread::LocalKey<Cache<T>>,
    raw: &str,
    parse: fn(&str) -> T,
) -> T {
    cache.with(|c| {
        let mut c = c.borrow_mut();
        match c.as_ref() {
            Some((last, value)) if last == raw => value.clone(),
            _ => {
                let value = parse(raw);
                *c = Some((raw.to_owned(), value.clone()));
                value
            }
        }
    })
}

/// `X-Business-Use-Case-Usage`, `{"<business id>": [{…}, …], …}`: the
/// longest `estimated_time_to_regain_access` and the highest of each
/// counter over every entry.
fn parse_buc(v: &str) -> (Option<Duration>, Option<Usage>) {
    let entries: Vec<Value> = match serde_json::from_str::<Value>(v) {
        Ok(Value::Object(map)) => map
            .into_iter()
            .flat_map(|(_, list)| match list {
                Value::Array(items) => items,
                other => vec![other],
            })
            .collect(),
        _ => Vec::new(),
    };
    let regain = entries
        .iter()
        .filter_map(|e| e.get("estimated_time_to_regain_access")?.as_f64())
        .filter(|m| *m > 0.0 && m.is_finite())
        .map(|m| {
            clamp_hint(Duration::from_secs_f64(
                (m * 60.0).min(MAX_HINT.as_secs_f64()),
            ))
        })
        .max();
    let usage = entries.iter().filter_map(usage_of).reduce(|a, b| Usage {
        call_count: a.call_count.max(b.call_count),
        total_cputime: a.total_cputime.max(b.total_cputime),
        total_time: a.total_time.max(b.total_time),
    });
    (regain, usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderMap, HeaderValue};

    #[test]
    fn parses_a_full_graph_error() {
        let body = br#"{"error":{"message":"Page mismatch","type":"OAuthException","code":100,
            "error_subcode":2300005,"error_user_title":"t","error_user_msg":"The page does not match",
            "fbtrace_id":"AbC123","is_transient":false}}"#;
        let e = GraphError::parse(body).unwrap();
        assert_eq!(e.code, Some(100));
        assert_eq!(e.error_subcode, Some(2300005));
        assert_eq!(e.fbtrace_id.as_deref(), Some("AbC123"));
        assert_eq!(e.is_transient, Some(false));
        assert_eq!(e.best_message(), Some("The page does not match"));
    }

    #[test]
    fn redaction_reaches_every_text_field() {
        let token = "EAAGm0PX4ZCpsBAKZB0123456789abcdef";
        let body = format!(
            r#"{{"error":{{"message":"Malformed access token {token}","type":"OAuth {token}",
            "code":190,"error_user_title":"t {token}","error_user_msg":"m {token}","fbtrace_id":"A {token}"}}}}"#
        );
        let mut e = GraphError::parse(body.as_bytes()).unwrap();
        e.redact(&Redactor::default());
        assert!(!format!("{e:?}").contains(token), "{e:?}");
        assert_eq!(
            e.message.as_deref(),
            Some("Malformed access token EAA…[redacted]")
        );
        assert_eq!(e.code, Some(190));
    }

    #[test]
    fn tolerates_odd_shapes() {
        assert_eq!(GraphError::parse(b""), None);
        assert_eq!(
            GraphError::parse(b"<html><body>502 Bad Gateway</body></html>"),
            None
        );
        assert_eq!(GraphError::parse(br#"{"error": {"message": "Unexp"#), None);
        assert_eq!(GraphError::parse(br#"{"error": "boom"}"#), None);
        assert_eq!(GraphError::parse(br#"{"data": []}"#), None);
        let e = GraphError::parse(br#"{"error": {"code": "2300012"}}"#).unwrap();
        assert_eq!(e.code, Some(2300012));
    }

    #[test]
    fn reads_usage_headers() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        h.insert(
            "x-app-usage",
            HeaderValue::from_static(r#"{"call_count":12,"total_cputime":3,"total_time":40}"#),
        );
        h.insert(
            "x-business-use-case-usage",
            HeaderValue::from_static(
                r#"{"111":[{"type":"ads_management","call_count":95,"total_cputime":20,"total_time":30,"estimated_time_to_regain_access":3}],"222":[{"call_count":10,"estimated_time_to_regain_access":0}]}"#,
            ),
        );
        let hint = UsageHint::from_headers(&h);
        assert_eq!(hint.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(hint.regain_access, Some(Duration::from_secs(180)));
        assert_eq!(hint.app.unwrap().total_time, 40.0);
        assert_eq!(hint.business.unwrap().call_count, 95.0);
        assert_eq!(hint.wait(), Some(Duration::from_secs(180)));
    }

    #[test]
    fn absurd_hints_are_clamped_to_one_day() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("10000000000000"));
        h.insert(
            "x-business-use-case-usage",
            HeaderValue::from_static(
                r#"{"1":[{"call_count":100,"estimated_time_to_regain_access":1e300}]}"#,
            ),
        );
        let hint = UsageHint::from_headers(&h);
        assert_eq!(hint.retry_after, Some(MAX_HINT));
        assert_eq!(hint.regain_access, Some(MAX_HINT));
        assert_eq!(hint.wait(), Some(MAX_HINT));
        // u64::MAX seconds, and a hint built by hand
        h.insert(
            "retry-after",
            HeaderValue::from_static("18446744073709551615"),
        );
        assert_eq!(UsageHint::from_headers(&h).retry_after, Some(MAX_HINT));
        let by_hand = UsageHint {
            retry_after: Some(Duration::MAX),
            ..Default::default()
        };
        assert_eq!(by_hand.wait(), Some(MAX_HINT));
        // ordinary hints pass unchanged
        h.insert("retry-after", HeaderValue::from_static("120"));
        h.remove("x-business-use-case-usage");
        assert_eq!(
            UsageHint::from_headers(&h).wait(),
            Some(Duration::from_secs(120))
        );
    }

    #[test]
    fn ignores_malformed_headers() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("soon"));
        h.insert("x-app-usage", HeaderValue::from_static("{not json"));
        h.insert("x-business-use-case-usage", HeaderValue::from_static("[]"));
        assert_eq!(UsageHint::from_headers(&h), UsageHint::default());
    }
}

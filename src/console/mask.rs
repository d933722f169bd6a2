//! What of a dead letter may reach a page: recipient tokens and anything
//! that looks like an access token are masked, and the body is cut to a
//! short preview. Pure functions, used when the snapshot is taken (so the
//! snapshot itself never holds a token in full; the one exception is a job
//! id, kept whole to name the letter to the DLQ library, and masked by
//! [`text`] wherever a page shows it).
//!
//! Every text of a letter (its headers, its last error, its campaign and
//! page, a group's key and latest error) goes through a [`Masker`]: the
//! values the letter's own body keeps under secret-named keys (its
//! recipient's `subscription_token`, …) are masked wherever they appear,
//! and so is any run that looks like a Meta access token (`EAA…`, as Graph
//! echoes one in "Malformed access token EAA…"). Group keys and job ids use
//! the access-token rule only ([`text`]), so that the same value always
//! names the same group.
//!
//! A JSON body is masked by structure: the string value of every key that
//! names a secret (`subscription_token`, `access_token`, `*secret*`,
//! `*password*`, `appsecret_proof`, `authorization`) and any string that
//! looks like a Meta access token (`EAA…`). A body that is not JSON (an
//! `invalid_job` letter is often cut off or mangled) is masked as text: the
//! quoted value after such a key, and every long run of token characters.

use serde_json::Value;

/// Longest body preview kept per letter, in bytes (cut at a character).
pub(crate) const BODY_PREVIEW_BYTES: usize = 512;

/// Bodies larger than this are not parsed as JSON for the preview: only
/// their start is shown, masked as text.
const PARSE_LIMIT: usize = 64 * 1024;

/// A run of token characters at least this long is masked in text.
const LONG_RUN: usize = 24;

/// Secret values shorter than this are not looked for in a letter's texts
/// (a short value would mask ordinary words); the body masks them by
/// structure still.
const SECRET_MIN_CHARS: usize = 8;
/// Nor are longer ones, or more of them.
const SECRET_MAX_BYTES: usize = 1024;
const MAX_SECRETS: usize = 8;

/// Of a text longer than this only the start is masked and kept: no page
/// shows more than a few hundred bytes of one.
const TEXT_SCAN_BYTES: usize = 4 * 1024;

/// What a masked value shows in place of the secret (`abcd•••(48 chars)`).
pub(crate) const MASK_MARK: &str = "•••(";

/// What ends a text that was cut.
pub(crate) const CUT_MARK: &str = "…";

/// Key names whose string values are secrets.
const SECRET_KEYS: [&str; 5] = ["token", "secret", "password", "proof", "authorization"];

/// A body as a page may show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BodyPreview {
    /// Masked, pretty-printed when the body is JSON, at most
    /// [`BODY_PREVIEW_BYTES`] bytes.
    pub(crate) text: String,
    /// The body's size in bytes.
    pub(crate) bytes: usize,
    pub(crate) json: bool,
    /// The preview is shorter than the masked body.
    pub(crate) cut: bool,
    /// The values of the body's secret-named keys, for [`Masker::new`]
    /// (not kept: the snapshot holds only their masks).
    pub(crate) secrets: Vec<String>,
}

/// Masks the texts of one letter: its own secret values, and anything that
/// looks like an access token.
#[derive(Debug, Default)]
pub(crate) struct Masker {
    /// Longest first, so a secret inside another is not masked first.
    secrets: Vec<String>,
}

impl Masker {
    /// A masker for the secret values of a letter's body.
    pub(crate) fn new(mut secrets: Vec<String>) -> Masker {
        secrets.retain(|s| s.chars().count() >= SECRET_MIN_CHARS && s.len() <= SECRET_MAX_BYTES);
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        secrets.truncate(MAX_SECRETS);
        Masker { secrets }
    }

    /// `value` as a page may show it: masked, then cut to at most
    /// `max_bytes` bytes and [`CUT_MARK`].
    pub(crate) fn text(&self, value: &str, max_bytes: usize) -> String {
        let mut s = value.to_string();
        let longer = cut(&mut s, TEXT_SCAN_BYTES);
        for secret in &self.secrets {
            if s.contains(secret.as_str()) {
                s = s.replace(secret.as_str(), &mask(secret));
            }
        }
        let mut s = mask_runs(&s, looks_like_access_token);
        if cut(&mut s, max_bytes) || longer {
            s.push_str(CUT_MARK);
        }
        s
    }
}

/// A text that is not a letter's own (a group key, a job id, a message
/// that may quote one) as a page may show it: access-token-shaped runs
/// masked, cut to `max_bytes` and [`CUT_MARK`].
pub(crate) fn text(value: &str, max_bytes: usize) -> String {
    Masker::default().text(value, max_bytes)
}

/// [`text`], without a copy when there is nothing to mask or cut (most
/// group keys and job ids).
pub(crate) fn shown(value: &str, max_bytes: usize) -> std::borrow::Cow<'_, str> {
    if value.len() <= max_bytes && !value.contains("EAA") {
        std::borrow::Cow::Borrowed(value)
    } else {
        std::borrow::Cow::Owned(text(value, max_bytes))
    }
}

/// `abcd•••(48 chars)`: the first 4 characters of a long value (none of a
/// short one) and its length.
pub(crate) fn mask(value: &str) -> String {
    let n = value.chars().count();
    let shown: String = if n >= 12 {
        value.chars().take(4).collect()
    } else {
        String::new()
    };
    format!("{shown}{MASK_MARK}{n} chars)")
}

/// Whether a JSON key names a secret.
fn secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEYS.iter().any(|k| key.contains(k))
}

/// Whether a string looks like a Meta access token (they start `EAA`).
fn looks_like_access_token(s: &str) -> bool {
    s.len() >= 20
        && s.starts_with("EAA")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Masks the secrets of a JSON value in place; `found` hears the values
/// of secret-named keys.
fn mask_json(v: &mut Value, secret: bool, found: &mut Vec<String>) {
    match v {
        Value::String(s) if secret => {
            found.push(std::mem::take(s));
            *s = mask(found.last().map_or("", String::as_str));
        }
        Value::String(s) if looks_like_access_token(s) => *s = mask(s),
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                mask_json(child, secret || secret_key(k), found);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| mask_json(c, secret, found)),
        _ => {}
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Masks text that is not JSON: the quoted value after a secret-naming key
/// (`"subscription_token": "…"`, even in a cut-off document; `found` hears
/// the values), then every long run of token characters (letters, digits,
/// `_`, `-`).
fn mask_text(text: &str, found: &mut Vec<String>) -> String {
    mask_runs(&mask_keyed_values(text, found), |run| {
        run.len() >= LONG_RUN || looks_like_access_token(run)
    })
}

/// Masks every maximal run of token characters for which `secret` holds.
fn mask_runs(text: &str, secret: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (is_token_char(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                push_run(&mut out, &text[s..i], &secret);
                out.push(c);
                start = None;
            }
            (false, None) => out.push(c),
            (true, Some(_)) => {}
        }
    }
    if let Some(s) = start {
        push_run(&mut out, &text[s..], &secret);
    }
    out
}

fn push_run(out: &mut String, run: &str, secret: &impl Fn(&str) -> bool) {
    if secret(run) {
        out.push_str(&mask(run));
    } else {
        out.push_str(run);
    }
}

/// `"…token…": "value"` → `"…token…": "va•••(n chars)"`, whatever the JSON
/// around it looks like; `found` hears the values.
fn mask_keyed_values(text: &str, found: &mut Vec<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(q) = rest.find('"') {
        // a quoted key?
        let after = &rest[q + 1..];
        let Some(end) = after.find('"') else {
            break;
        };
        let key = &after[..end];
        let tail = &after[end + 1..];
        let trimmed = tail.trim_start();
        let colon = trimmed.strip_prefix(':').map(str::trim_start);
        match colon.and_then(|v| v.strip_prefix('"')) {
            Some(value_and_more) if secret_key(key) => {
                let value_end = closing_quote(value_and_more);
                let value = &value_and_more[..value_end];
                let head_len = rest.len() - value_and_more.len();
                out.push_str(&rest[..head_len]);
                out.push_str(&mask(value));
                found.push(value.to_string());
                rest = &value_and_more[value_end..];
            }
            _ => {
                out.push_str(&rest[..q + 1 + end + 1]);
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Where an unescaped `"` ends a JSON string (or the end of the text).
fn closing_quote(s: &str) -> usize {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return i,
            _ => escaped = false,
        }
    }
    s.len()
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn cut(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.truncate(at);
    true
}

/// The masked preview of a body.
pub(crate) fn preview(body: &[u8]) -> BodyPreview {
    let parsed = (body.len() <= PARSE_LIMIT)
        .then(|| serde_json::from_slice::<Value>(body).ok())
        .flatten()
        .filter(|v| v.is_object() || v.is_array());
    let mut secrets = Vec::new();
    let (mut text, json) = match parsed {
        Some(mut v) => {
            mask_json(&mut v, false, &mut secrets);
            (serde_json::to_string_pretty(&v).unwrap_or_default(), true)
        }
        None => {
            // mask a little more than is shown, so a token across the cut
            // is still seen whole
            let end = body.len().min(BODY_PREVIEW_BYTES * 2);
            (
                mask_text(&String::from_utf8_lossy(&body[..end]), &mut secrets),
                false,
            )
        }
    };
    let cut = cut(&mut text, BODY_PREVIEW_BYTES) || (!json && body.len() > BODY_PREVIEW_BYTES * 2);
    BodyPreview {
        text,
        bytes: body.len(),
        json,
        cut,
        secrets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPIENT: &str = "recipient-token-0000042-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    const ACCESS: &str = "EAABwzLixnjYBAKZCZBdummydummydummy123";

    #[test]
    fn json_bodies_mask_recipients_and_access_tokens_by_structure() {
        let body = serde_json::json!({"v": 1, "job_id": "j-1", "subscription_token": RECIPIENT,
            "message": {"text": "Hi"}, "extra": {"Access_Token": "short", "note": ACCESS},
            "list": [{"app_secret": "s3cr3t-value-long"}]});
        let p = preview(&serde_json::to_vec(&body).unwrap());
        assert!(p.json);
        for secret in [RECIPIENT, ACCESS, "s3cr3t-value-long", "\"short\""] {
            assert!(!p.text.contains(secret), "{secret} in {}", p.text);
        }
        assert!(p.text.contains("reci•••(64 chars)"), "{}", p.text);
        assert!(p.text.contains("•••(5 chars)"), "{}", p.text);
        assert!(p.text.contains("\"job_id\": \"j-1\""), "{}", p.text);
        assert!(p.text.contains("\"text\": \"Hi\""));
    }

    #[test]
    fn broken_bodies_are_masked_as_text() {
        for body in [
            format!(r#"{{"job_id": "j", "subscription_token": "{RECIPIENT}", "message": "#),
            r#"{"subscription_token":"abc\"def", "x": 1"#.to_string(),
            format!("token={ACCESS} and more"),
            r#"{"SUBSCRIPTION_TOKEN" : "short1", "#.to_string(),
        ] {
            let p = preview(body.as_bytes());
            assert!(!p.json, "{body}");
            for secret in [RECIPIENT, ACCESS, "abc\\\"def", "short1"] {
                assert!(!p.text.contains(secret), "{secret} in {}", p.text);
            }
        }
        let p = preview(b"{\"job_id\": \"j\", \"subscription_token\": \"abc\"");
        assert!(p.text.contains("\"job_id\": \"j\""), "{}", p.text);
        assert!(p.text.contains("•••(3 chars)"), "{}", p.text);
    }

    #[test]
    fn previews_are_bounded_and_cut_at_a_character() {
        let body = serde_json::json!({"job_id": "é".repeat(5_000)});
        let p = preview(&serde_json::to_vec(&body).unwrap());
        assert!(p.text.len() <= BODY_PREVIEW_BYTES && p.cut);
        assert!(p.bytes > 10_000);
        let raw = vec![b'x'; 1_000_000];
        let p = preview(&raw);
        assert!(p.text.len() <= BODY_PREVIEW_BYTES && p.cut && !p.json);
        let p = preview(b"\xff\xfe not utf-8");
        assert!(!p.json && !p.cut);
    }

    #[test]
    fn texts_hide_tokens_and_are_cut() {
        assert_eq!(text(ACCESS, 100), mask(ACCESS));
        assert!(!text(&format!("bad token {ACCESS}"), 100).contains(ACCESS));
        assert_eq!(text("PAGE_ID_MISMATCH: x", 100), "PAGE_ID_MISMATCH: x");
        assert_eq!(text("abcdef", 3), "abc…");
        assert_eq!(text("éé", 3), "é…", "cut at a character");
        let t = "2026-11-24T10:00:00.000Z";
        assert_eq!(text(t, 100), t);
        assert_eq!(mask_text(t, &mut Vec::new()), t);
        assert_eq!(mask("short"), "•••(5 chars)");
        // a token across the cut is masked, not shown in part
        let long = format!("{} {ACCESS}", "x".repeat(90));
        let shown = text(&long, 100);
        assert!(
            !shown.contains(ACCESS)
                && shown.starts_with(&"x".repeat(90))
                && shown.ends_with(CUT_MARK),
            "{shown}"
        );
        // a huge value costs no more than its start
        let huge = format!("{ACCESS} {}", "y".repeat(1_000_000));
        assert!(text(&huge, 300).len() <= 300 + CUT_MARK.len());
    }

    #[test]
    fn a_letter_masks_its_own_recipient_token_everywhere() {
        let body = serde_json::json!({"job_id": "j", "subscription_token": RECIPIENT,
            "password": "short"});
        let p = preview(&serde_json::to_vec(&body).unwrap());
        assert!(
            p.secrets.contains(&RECIPIENT.to_string()),
            "{:?}",
            p.secrets
        );
        let m = Masker::new(p.secrets);
        let error = format!("(#100) Invalid subscription token {RECIPIENT} with {ACCESS}");
        let shown = m.text(&error, 300);
        assert!(
            !shown.contains(RECIPIENT) && !shown.contains(ACCESS),
            "{shown}"
        );
        assert!(
            shown.contains("reci•••(64 chars)") && shown.contains("EAAB•••("),
            "{shown}"
        );
        // a short secret is not looked for in text (it would mask words)
        assert_eq!(m.text("a short answer", 300), "a short answer");
        // a broken body names its secrets too
        let broken = format!(r#"{{"subscription_token": "{RECIPIENT}", "message": "#);
        let p = preview(broken.as_bytes());
        assert_eq!(p.secrets, vec![RECIPIENT.to_string()]);
    }
}

//! Credentials: the [`Secret`] newtype, the page → token map,
//! `appsecret_proof`, and the [`Redactor`] that takes secrets out of text
//! that came from the network.
//!
//! Tokens live only in workers (never in jobs). A [`Secret`] prints as `***`
//! through `Debug` and `Display`, so a token cannot reach a log line, an
//! error message or a panic by accident; the one way to read it is
//! [`Secret::expose`], used where the `Authorization` header is built.
//!
//! The network can hand a secret back, though: Graph quotes a malformed
//! token in its error ("Malformed access token EAA…"), a proxy's error page
//! may quote the request, and the HTTP client names the URL (with its
//! `appsecret_proof`) in its errors. Such text is scrubbed once, where it
//! enters the process (the Graph client, when it builds a failure), so
//! nothing downstream (logs, `x-mmsend-error-message`, the DLQ tools, the
//! console) can pass it on. A [`Redactor`] removes:
//!
//! - the secrets it is given: the token of the call, its proof, the app
//!   secret, the base URL's password. A call carries one token, so an answer
//!   can quote no other configured one; the shape rule below catches a
//!   token the answer got from anywhere else. Secrets shorter than
//!   [`MIN_SECRET_LEN`] are not searched for (no real credential is that
//!   short, and replacing every `abc` would garble the text);
//! - anything shaped like a Meta access token: `EAA` followed by at least
//!   [`TOKEN_SHAPE_MIN_TAIL`] characters of `[A-Za-z0-9_-]` (user, Page and
//!   system-user tokens all start `EAA` and run to 100-300 characters of
//!   `[A-Za-z0-9]`; `_` and `-` are taken too, as the console's mask does,
//!   so a base64url token or a hand-made one is caught). The minimum is low
//!   so that a token cut short by someone else's excerpt is still caught;
//!   it matches inside a longer word too (`%3DEAAB…` in an echoed URL). The
//!   price, a base64 blob in an error page that happens to contain such a
//!   run losing its tail, is nothing.
//!
//! A token becomes `EAA…[redacted]` (its public prefix, so the message still
//! says which kind of thing was there), anything else `[redacted]`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A secret string (access token, app secret). Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret; from here on it prints as `***`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    /// The secret itself. Call only where it is sent on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(s))
    }
}

/// Errors loading the page-token file. They name the file and the problem,
/// never a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read page token file {path}: {source}")]
    Read {
        /// The file as given.
        path: String,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not a JSON object of page id → token strings.
    #[error("page token file {path} is not a JSON object of page_id → token strings ({problem}); expected e.g. {{\"9876543210\": \"<token>\"}}")]
    Format {
        /// The file as given.
        path: String,
        /// What is wrong (the JSON error, or the page with a bad value).
        problem: String,
    },
}

/// A token or secret that cannot be right as given. The message names the
/// setting (or page), never the value.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Nothing left after trimming white space.
    #[error("{what} is empty")]
    Empty {
        /// The setting or page, e.g. `MMSEND_ACCESS_TOKEN`.
        what: String,
    },
    /// White space or a control character inside the value.
    #[error("{what} has a space or a control character inside it, which no access token or app secret has; check that it was copied whole and on one line")]
    Inner {
        /// The setting or page, e.g. `MMSEND_ACCESS_TOKEN`.
        what: String,
    },
}

/// A token (or app secret) as an operator gave it. Whitespace around it is
/// a common mistake, above all the trailing newline of a Kubernetes Secret
/// created from a file, and it would make every request fail as a builder
/// error that looks transient; it is trimmed, and the `bool` says so (the
/// caller logs it, naming `what`, not the value). Whitespace or control
/// characters inside cannot be repaired and are refused.
pub fn clean_token(raw: &str, what: &str) -> Result<(Secret, bool), TokenError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(TokenError::Empty {
            what: what.to_string(),
        });
    }
    if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenError::Inner {
            what: what.to_string(),
        });
    }
    Ok((Secret::new(trimmed), trimmed.len() != raw.len()))
}

/// Which token to use for a page: a per-page token if the file names the
/// page, else the default token.
#[derive(Clone, Default)]
pub struct TokenStore {
    default: Option<Secret>,
    pages: HashMap<String, Secret>,
    /// Pages of the token file whose token had whitespace around it.
    trimmed: Vec<String>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("default", &self.default.as_ref().map(|_| "***"))
            .field("pages", &self.pages.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TokenStore {
    /// A store with only a default token (`None`: none yet); add per-page
    /// tokens with [`TokenStore::load_pages`].
    pub fn new(default: Option<Secret>) -> Self {
        TokenStore {
            default,
            pages: HashMap::new(),
            trimmed: Vec::new(),
        }
    }

    /// Adds a page-specific token.
    pub fn with_page(mut self, page_id: impl Into<String>, token: Secret) -> Self {
        self.pages.insert(page_id.into(), token);
        self
    }

    /// Loads `{"<page_id>": "<token>", …}` from a JSON file.
    pub fn load_pages(mut self, path: &Path) -> Result<Self, TokenFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: shown.clone(),
            source,
        })?;
        // Parse into strings only: serde's error for a wrong type names the
        // position, not the value, so no token can leak through it.
        let map: HashMap<String, String> =
            serde_json::from_str(&text).map_err(|e| TokenFileError::Format {
                path: shown.clone(),
                problem: format!(
                    "line {} column {}: {:?}",
                    e.line(),
                    e.column(),
                    e.classify()
                ),
            })?;
        let mut pages: Vec<_> = map.into_iter().collect();
        pages.sort();
        for (page, token) in pages {
            if page.is_empty() || !page.bytes().all(|b| b.is_ascii_digit()) {
                return Err(TokenFileError::Format {
                    path: shown,
                    problem: format!(
                        "entry for page {page:?} needs a digit page id and a non-empty token"
                    ),
                });
            }
            let (token, trimmed) = clean_token(&token, &format!("the token of page {page}"))
                .map_err(|e| TokenFileError::Format {
                    path: shown.clone(),
                    problem: e.to_string(),
                })?;
            if trimmed {
                self.trimmed.push(page.clone());
            }
            self.pages.insert(page, token);
        }
        Ok(self)
    }

    /// The same default token with the pages of `path` read afresh (a
    /// changed page tokens file); `self` is left as it is whatever happens.
    pub fn reloaded(&self, path: &Path) -> Result<Self, TokenFileError> {
        TokenStore::new(self.default.clone()).load_pages(path)
    }

    /// How many pages have a token of their own.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Pages whose token in the file had whitespace around it (trimmed).
    pub fn trimmed_pages(&self) -> &[String] {
        &self.trimmed
    }

    /// The token for `page_id`, if any.
    pub fn token_for(&self, page_id: &str) -> Option<&Secret> {
        self.pages.get(page_id).or(self.default.as_ref())
    }

    /// The pages with a token of their own, sorted.
    pub fn pages(&self) -> Vec<&str> {
        let mut pages: Vec<&str> = self.pages.keys().map(String::as_str).collect();
        pages.sort_unstable();
        pages
    }

    /// No token at all; `mmsend worker` refuses to start with such a store.
    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.pages.is_empty()
    }
}

/// `appsecret_proof` = hex HMAC-SHA256(key = app secret, message = token).
pub fn appsecret_proof(app_secret: &Secret, token: &Secret) -> String {
    hmac_sha256_hex(app_secret.expose().as_bytes(), token.expose().as_bytes())
}

/// Hex HMAC-SHA256 of `message` keyed with `key`: `appsecret_proof`, and
/// the `X-Hub-Signature-256` of Meta's webhooks (keyed with the app secret
/// over the raw body).
pub fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

/// Equality of two byte strings in time that does not depend on where they
/// differ (their lengths are not secret): for comparing tokens.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a redacted secret reads as.
pub const REDACTED: &str = "[redacted]";

/// What a redacted access token reads as: its public `EAA` prefix kept.
pub const REDACTED_TOKEN: &str = "EAA…[redacted]";

/// The prefix every Meta access token starts with.
const TOKEN_PREFIX: &str = "EAA";

/// A run of `EAA` and at least this many ASCII letters, digits, `_` or `-`
/// is taken for an access token (see the module docs).
pub const TOKEN_SHAPE_MIN_TAIL: usize = 16;

/// Secrets shorter than this are not searched for in text.
pub const MIN_SECRET_LEN: usize = 8;

/// Takes secrets out of text that came from the network (see the module
/// docs). Built on the failure path only: a send that succeeded has no text
/// to scrub.
#[derive(Default)]
pub struct Redactor<'a> {
    /// Longest first, so a secret that contains another is replaced whole.
    secrets: Vec<&'a str>,
}

impl<'a> Redactor<'a> {
    /// A redactor for these secrets (and the token shape); empty and short
    /// ones are skipped.
    pub fn new(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut secrets: Vec<&str> = secrets
            .into_iter()
            .filter(|s| s.len() >= MIN_SECRET_LEN)
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    /// `text` without the secrets and token-shaped runs; borrowed when
    /// there was nothing to take out.
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut out = Cow::Borrowed(text);
        for secret in &self.secrets {
            if out.contains(secret) {
                let with = if secret.starts_with(TOKEN_PREFIX) {
                    REDACTED_TOKEN
                } else {
                    REDACTED
                };
                out = Cow::Owned(out.replace(secret, with));
            }
        }
        match redact_token_shapes(&out) {
            Some(clean) => Cow::Owned(clean),
            None => out,
        }
    }

    /// [`Redactor::redact`] in place.
    pub fn redact_string(&self, text: &mut String) {
        if let Cow::Owned(clean) = self.redact(text) {
            *text = clean;
        }
    }
}

/// `text` with every token-shaped run replaced, or `None` when it has none.
fn redact_token_shapes(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    // `copied`: the end of the text already in `out`
    let (mut copied, mut from) = (0, 0);
    while let Some(at) = text[from..].find(TOKEN_PREFIX).map(|i| from + i) {
        let tail = bytes[at + TOKEN_PREFIX.len()..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
            .count();
        let end = at + TOKEN_PREFIX.len() + tail;
        if tail >= TOKEN_SHAPE_MIN_TAIL {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..at]);
            o.push_str(REDACTED_TOKEN);
            copied = end;
            from = end;
        } else {
            // `EAA` and ASCII around it: byte offsets stay on char boundaries
            from = at + 1;
        }
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_takes_out_given_secrets_and_token_shapes() {
        let shaped = "EAAGm0PX4ZCpsBAKZB0123456789abcdef";
        let r = Redactor::new(["EAAB-configured-token", "app-secret-1234", "short", ""]);
        for (text, want) in [
            // Graph's echo of a malformed token
            (
                format!("Malformed access token {shaped}"),
                "Malformed access token EAA…[redacted]".to_string(),
            ),
            // a configured token, not token-shaped (a hyphen), replaced whole
            (
                "token EAAB-configured-token, again EAAB-configured-token".into(),
                "token EAA…[redacted], again EAA…[redacted]".into(),
            ),
            ("key=app-secret-1234&x".into(), "key=[redacted]&x".into()),
            // inside an encoded URL, and at the very start and end
            (
                format!("q=access_token%3D{shaped}&b"),
                "q=access_token%3DEAA…[redacted]&b".into(),
            ),
            (shaped.to_string(), "EAA…[redacted]".into()),
            (format!("é{shaped}é"), "éEAA…[redacted]é".into()),
            // two tokens, and a short run left alone
            (
                format!("{shaped} and {shaped}x EAAshort EAA"),
                "EAA…[redacted] and EAA…[redacted] EAAshort EAA".into(),
            ),
            // `_` and `-` belong to the run; other punctuation ends it
            (
                "t=EAAB_a-bcdefghijklmnop.q EAAB-short.".into(),
                "t=EAA…[redacted].q EAAB-short.".into(),
            ),
            // a secret below the minimum length is not searched for
            ("a short word".into(), "a short word".into()),
        ] {
            assert_eq!(r.redact(&text), want, "{text}");
            // redacting twice changes nothing
            assert_eq!(r.redact(&want), want);
        }
        // the minimum run: EAA + 16 letters and digits
        let min = format!("EAA{}", "a".repeat(TOKEN_SHAPE_MIN_TAIL));
        assert_eq!(Redactor::default().redact(&min), REDACTED_TOKEN);
        assert_eq!(Redactor::default().redact(&min[1..]), &min[1..]);
        assert_eq!(
            Redactor::default().redact(&min[..min.len() - 1]),
            &min[..min.len() - 1]
        );
        // nothing to take out: no copy
        assert!(matches!(r.redact("plain text"), Cow::Borrowed(_)));
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("EAAB-super-secret");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let store = TokenStore::new(Some(s.clone())).with_page("42", s);
        assert!(!format!("{store:?}").contains("super-secret"));
    }

    #[test]
    fn page_token_wins_over_default() {
        let store = TokenStore::new(Some(Secret::new("d"))).with_page("42", Secret::new("p"));
        assert_eq!(store.token_for("42").unwrap().expose(), "p");
        assert_eq!(store.token_for("7").unwrap().expose(), "d");
        assert!(TokenStore::new(None).token_for("7").is_none());
    }

    #[test]
    fn proof_matches_a_known_vector() {
        // echo -n token | openssl dgst -sha256 -hmac secret
        let proof = appsecret_proof(&Secret::new("secret"), &Secret::new("token"));
        assert_eq!(
            proof,
            "e941110e3d2bfe82621f0e3e1434730d7305d106c5f68c87165d0b27a4611a4a"
        );
    }

    #[test]
    fn whitespace_around_a_token_is_trimmed_and_inside_refused() {
        let (t, trimmed) = clean_token("EAAB-tok\n", "MMSEND_ACCESS_TOKEN").unwrap();
        assert_eq!((t.expose(), trimmed), ("EAAB-tok", true));
        let (t, trimmed) = clean_token("EAAB-tok", "x").unwrap();
        assert_eq!((t.expose(), trimmed), ("EAAB-tok", false));
        for bad in ["EAAB tok", "EAAB\ntok", "EAAB\u{0}tok"] {
            let e = clean_token(bad, "MMSEND_ACCESS_TOKEN")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("MMSEND_ACCESS_TOKEN") && !e.contains("EAAB"),
                "{e}"
            );
        }
        assert!(clean_token(" \n", "x").is_err());
    }

    #[test]
    fn token_file_errors_never_show_tokens() {
        let dir = std::env::temp_dir().join(format!("mmsend-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"42": ["EAAB-leaky-token"]}"#).unwrap();
        let err = TokenStore::new(None)
            .load_pages(&bad)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("leaky"), "{err}");
        assert!(err.contains("bad.json"), "{err}");
        let good = dir.join("good.json");
        std::fs::write(&good, r#"{"42": "EAAB-page-token"}"#).unwrap();
        let store = TokenStore::new(None).load_pages(&good).unwrap();
        assert_eq!(store.token_for("42").unwrap().expose(), "EAAB-page-token");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

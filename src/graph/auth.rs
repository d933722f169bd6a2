//! Credentials: the [`Secret`] newtype, the page → token map, and
//! `appsecret_proof`.
//!
//! Tokens live only in workers (never in jobs). A [`Secret`] prints as `***`
//! through `Debug` and `Display`, so a token cannot reach a log line, an
//! error message or a panic by accident; the one way to read it is
//! [`Secret::expose`], used where the `Authorization` header is built.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A secret string (access token, app secret). Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
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
    #[error("cannot read page token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("page token file {path} is not a JSON object of page_id → token strings ({problem}); expected e.g. {{\"9876543210\": \"<token>\"}}")]
    Format { path: String, problem: String },
}

/// Which token to use for a page: a per-page token if the file names the
/// page, else the default token.
#[derive(Clone, Default)]
pub struct TokenStore {
    default: Option<Secret>,
    pages: HashMap<String, Secret>,
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
    pub fn new(default: Option<Secret>) -> Self {
        TokenStore {
            default,
            pages: HashMap::new(),
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
        for (page, token) in map {
            if page.is_empty() || !page.bytes().all(|b| b.is_ascii_digit()) || token.is_empty() {
                return Err(TokenFileError::Format {
                    path: shown,
                    problem: format!(
                        "entry for page {page:?} needs a digit page id and a non-empty token"
                    ),
                });
            }
            self.pages.insert(page, Secret::new(token));
        }
        Ok(self)
    }

    /// The token for `page_id`, if any.
    pub fn token_for(&self, page_id: &str) -> Option<&Secret> {
        self.pages.get(page_id).or(self.default.as_ref())
    }

    /// Every secret held, for redaction checks.
    pub fn all(&self) -> impl Iterator<Item = &Secret> {
        self.default.iter().chain(self.pages.values())
    }

    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.pages.is_empty()
    }
}

/// `appsecret_proof` = hex HMAC-SHA256(key = app secret, message = token).
pub fn appsecret_proof(app_secret: &Secret, token: &Secret) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.expose().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(token.expose().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

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

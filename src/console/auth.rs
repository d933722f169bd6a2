//! Who may use the console, and proof that a POST came from its own pages.
//!
//! - **Token**: with `MMSEND_CONSOLE_TOKEN` set, every request needs it,
//!   as `Authorization: Bearer <token>` or through a session cookie given
//!   by the login form. Without a token the console listens on loopback
//!   only (checked at start, [`super::ConsoleConfig::check`]) and answers
//!   only requests whose `Host` is a loopback name, which keeps a web page
//!   that rebinds its own DNS name to 127.0.0.1 from reading it.
//! - **Sessions** are stateless cookies, `expiry.nonce.authenticated.mac`,
//!   signed with HMAC-SHA256 under a key drawn at start (a restart signs
//!   everyone out). `HttpOnly`, `SameSite=Strict`, `Secure` behind HTTPS.
//!   A login gets a new nonce (no session fixation).
//! - **CSRF**: every POST carries a token, HMAC of the session's nonce (or
//!   of `bearer` for bearer requests), compared in constant time; requests
//!   whose `Origin` is another site are refused as well.
//! - The token is compared through SHA-256 digests in constant time, never
//!   logged, never echoed; wrong tokens are limited per client
//!   ([`super::limit`]).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::graph::auth::constant_time_eq;
use crate::graph::Secret;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "mmsend_console";

/// How long a session lasts.
const SESSION_SECONDS: i64 = 12 * 3600;

/// The shortest console token accepted.
pub(crate) const MIN_TOKEN_CHARS: usize = 16;

/// A request's proven origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// What the CSRF token is derived from.
    nonce: String,
    /// Through the token (login or bearer), as opposed to a loopback-only
    /// console without a token.
    pub(crate) authenticated: bool,
    pub(crate) bearer: bool,
}

impl Identity {
    /// Who acts, for the audit trail: `bearer` (the token in a header),
    /// `session-<8 hex>` (a signed-in browser session, by a hash of its
    /// nonce), or `loopback` (a console without a token). The token itself
    /// is never written.
    pub(crate) fn who(&self) -> String {
        use sha2::Digest as _;
        if self.bearer {
            return "bearer".into();
        }
        let digest = sha2::Sha256::digest(self.nonce.as_bytes());
        let short: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        match self.authenticated {
            true => format!("session-{short}"),
            false => format!("loopback-{short}"),
        }
    }
}

/// A session read from (or made for) a cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    pub(crate) nonce: String,
    pub(crate) authenticated: bool,
    expires: i64,
}

impl Session {
    pub(crate) fn identity(&self) -> Identity {
        Identity {
            nonce: self.nonce.clone(),
            authenticated: self.authenticated,
            bearer: false,
        }
    }
}

/// The console's token and signing key.
pub(crate) struct Auth {
    token: Option<Secret>,
    key: [u8; 32],
}

type HmacSha256 = Hmac<Sha256>;

impl Auth {
    pub(crate) fn new(token: Option<Secret>) -> Auth {
        Auth {
            token,
            key: rand::random(),
        }
    }

    /// Whether requests must prove the token.
    pub(crate) fn required(&self) -> bool {
        self.token.is_some()
    }

    fn mac(&self, parts: &[&str]) -> String {
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes any key");
        for p in parts {
            m.update(p.as_bytes());
            m.update(b"\0");
        }
        hex::encode(&m.finalize().into_bytes()[..16])
    }

    /// A new session and the cookie value that carries it.
    pub(crate) fn issue(&self, authenticated: bool) -> (Session, String) {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let expires = chrono::Utc::now().timestamp() + SESSION_SECONDS;
        let a = if authenticated { "1" } else { "0" };
        let mac = self.mac(&["session", &expires.to_string(), &nonce, a]);
        (
            Session {
                nonce: nonce.clone(),
                authenticated,
                expires,
            },
            format!("{expires}.{nonce}.{a}.{mac}"),
        )
    }

    /// The session of a cookie value, if it is ours and not expired.
    pub(crate) fn session(&self, cookie: &str) -> Option<Session> {
        let mut parts = cookie.split('.');
        let (expires, nonce, a, mac) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || !constant_time_eq(
                self.mac(&["session", expires, nonce, a]).as_bytes(),
                mac.as_bytes(),
            )
        {
            return None;
        }
        let expires: i64 = expires.parse().ok()?;
        (expires > chrono::Utc::now().timestamp()).then(|| Session {
            nonce: nonce.to_string(),
            authenticated: a == "1",
            expires,
        })
    }

    /// Whether `given` is the console token.
    pub(crate) fn token_matches(&self, given: &str) -> bool {
        match &self.token {
            Some(t) => constant_time_eq(
                &Sha256::digest(t.expose().as_bytes()),
                &Sha256::digest(given.trim().as_bytes()),
            ),
            None => false,
        }
    }

    /// The identity of a request with a valid bearer token.
    pub(crate) fn bearer(&self, authorization: &str) -> Option<Identity> {
        let given = authorization.strip_prefix("Bearer ")?;
        self.token_matches(given).then(|| Identity {
            nonce: "bearer".into(),
            authenticated: true,
            bearer: true,
        })
    }

    /// The CSRF token a form of this identity carries.
    pub(crate) fn csrf(&self, id: &Identity) -> String {
        self.mac(&["csrf", &id.nonce])
    }

    /// Whether a POST's CSRF token belongs to this identity.
    pub(crate) fn csrf_ok(&self, id: &Identity, given: &str) -> bool {
        constant_time_eq(self.csrf(id).as_bytes(), given.as_bytes())
    }

    /// The `Set-Cookie` value for a session cookie.
    pub(crate) fn set_cookie(value: &str, secure: bool) -> String {
        let secure = if secure { "; Secure" } else { "" };
        format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECONDS}{secure}")
    }

    /// The `Set-Cookie` value that ends a session.
    pub(crate) fn clear_cookie() -> String {
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
    }
}

/// The value of our cookie in a `Cookie` header.
pub(crate) fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Whether a `Host` header names this machine's loopback.
pub(crate) fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether an `Origin` header names the site a request was sent to.
pub(crate) fn same_origin(origin: &str, host: &str) -> bool {
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.trim_end_matches('/').eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "console-token-0123456789";

    #[test]
    fn sessions_are_signed_and_expire() {
        let auth = Auth::new(Some(Secret::new(TOKEN)));
        let (s, cookie) = auth.issue(true);
        assert_eq!(auth.session(&cookie), Some(s.clone()));
        assert!(!cookie.contains(TOKEN));
        // flip the authenticated bit: the signature no longer holds
        let forged = cookie.replacen(".1.", ".0.", 1);
        assert_eq!(auth.session(&forged), None);
        let parts: Vec<&str> = cookie.split('.').collect();
        let later = format!(
            "{}.{}.{}.{}",
            parts[0].parse::<i64>().unwrap() + 1,
            parts[1],
            parts[2],
            parts[3]
        );
        assert_eq!(auth.session(&later), None);
        assert_eq!(auth.session("garbage"), None);
        assert_eq!(auth.session(&format!("{cookie}.x")), None);
        // another process's key signs other cookies
        assert_eq!(Auth::new(None).session(&cookie), None);
        let expired = format!(
            "1.{}.1.{}",
            s.nonce,
            auth.mac(&["session", "1", &s.nonce, "1"])
        );
        assert_eq!(auth.session(&expired), None);
    }

    #[test]
    fn csrf_tokens_belong_to_one_identity() {
        let auth = Auth::new(Some(Secret::new(TOKEN)));
        let (a, _) = auth.issue(true);
        let (b, _) = auth.issue(true);
        let ta = auth.csrf(&a.identity());
        assert!(auth.csrf_ok(&a.identity(), &ta));
        assert!(!auth.csrf_ok(&b.identity(), &ta));
        assert!(!auth.csrf_ok(&a.identity(), ""));
        let bearer = auth.bearer(&format!("Bearer {TOKEN}")).unwrap();
        assert!(auth.csrf_ok(&bearer, &auth.csrf(&bearer)));
        assert!(!auth.csrf_ok(&bearer, &ta));
    }

    #[test]
    fn the_token_is_checked_whole() {
        let auth = Auth::new(Some(Secret::new(TOKEN)));
        assert!(auth.token_matches(TOKEN));
        assert!(!auth.token_matches(&TOKEN[..TOKEN.len() - 1]));
        assert!(!auth.token_matches(""));
        assert!(auth.bearer(&format!("Bearer {TOKEN}x")).is_none());
        assert!(auth.bearer(TOKEN).is_none());
        assert!(!Auth::new(None).token_matches(""));
    }

    #[test]
    fn hosts_and_origins() {
        for h in [
            "127.0.0.1:9465",
            "localhost:9465",
            "LOCALHOST",
            "[::1]:80",
            "127.1.2.3",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in [
            "evil.example:9465",
            "10.0.0.1:9465",
            "[fe80::1]:1",
            "localhost.evil.example",
            "",
        ] {
            assert!(!loopback_host(h), "{h}");
        }
        assert!(same_origin("http://127.0.0.1:9465", "127.0.0.1:9465"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:9465"));
        assert!(!same_origin("null", "127.0.0.1:9465"));
        assert_eq!(cookie_value("a=b; mmsend_console=xyz; c=d"), Some("xyz"));
        assert_eq!(cookie_value("a=b"), None);
    }
}

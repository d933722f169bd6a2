//! How often a client may send a wrong token, and who a client is.
//!
//! - **A client** is the address the connection comes from. An IPv6
//!   address counts by its /64 (one host usually holds a whole /64), an
//!   IPv4-mapped IPv6 address as its IPv4 address. Behind a reverse proxy
//!   every connection comes from the proxy, so everyone behind it is one
//!   client: name the proxy with `--trusted-proxy` and the console takes
//!   the client from the `X-Forwarded-For` header the proxy appends (the
//!   rightmost address that is not itself a trusted proxy). From any other
//!   peer the header is ignored, so it cannot be forged.
//! - **Wrong tokens** (at the login form, or as `Authorization: Bearer`)
//!   are counted per client by a keyed GCRA limiter (`governor`): 30 at
//!   once, then one every 2 s. The wrong token that finds its client's
//!   budget spent locks that client out until its budget allows another
//!   try: meanwhile every token it sends, right or wrong, at the form or as
//!   a bearer, is answered 429 with `Retry-After` *before* it is compared,
//!   so no answer tells a good guess from a bad one. A right token costs
//!   nothing (scripts that send the bearer token are never slowed), and
//!   other clients are not affected.
//! - **Memory is bounded.** At [`MAX_CLIENTS`] counted clients the limiter
//!   drops those whose budget is full again (at most once a second); if it
//!   is still full, wrong tokens from clients are counted in one shared
//!   budget until it empties (a flood from many addresses can then lock
//!   out a client at its first wrong token; it never lets more guesses
//!   through). At most [`MAX_CLIENTS`] clients are locked out at once: an
//!   expired lock goes first, then the one that ends soonest.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Clients counted (and clients locked out) at most.
pub(crate) const MAX_CLIENTS: usize = 10_000;

/// Wrong tokens a client may send at once; then one every 2 s.
const WRONG_TOKENS_PER_MINUTE: u32 = 30;

/// Who sent a request, as far as limits go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Client(IpAddr);

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(a) => write!(f, "{a}/64"),
            IpAddr::V4(a) => write!(f, "{a}"),
        }
    }
}

/// The limiter's keys: a client, or the budget clients share while the
/// table is full.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Bucket {
    Client(Client),
    Shared,
}

/// The console's token limits.
pub(crate) struct Limits {
    trusted: Vec<IpAddr>,
    capacity: usize,
    wrong: DefaultKeyedRateLimiter<Bucket>,
    clock: DefaultClock,
    /// Client → end of its lockout.
    locked: Mutex<HashMap<Client, Instant>>,
    cleaned: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key an address counts under.
fn normalized(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// An address as `X-Forwarded-For` gives it (`1.2.3.4`, `2001:db8::1`,
/// `1.2.3.4:5678`, `[2001:db8::1]:5678`).
fn forwarded_address(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

impl Limits {
    /// `trusted`: reverse proxies whose `X-Forwarded-For` names the client.
    pub(crate) fn new(trusted: Vec<IpAddr>) -> Limits {
        Limits::with(trusted, MAX_CLIENTS, WRONG_TOKENS_PER_MINUTE)
    }

    fn with(trusted: Vec<IpAddr>, capacity: usize, per_minute: u32) -> Limits {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN));
        Limits {
            trusted: trusted.into_iter().map(|ip| ip.to_canonical()).collect(),
            capacity,
            wrong: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            locked: Mutex::new(HashMap::new()),
            cleaned: Mutex::new(None),
        }
    }

    /// The client of a connection from `peer` with these `X-Forwarded-For`
    /// header values (read only when `peer` is a trusted proxy).
    pub(crate) fn client<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> Client {
        let peer = peer.to_canonical();
        if !self.trusted.contains(&peer) {
            return Client(normalized(peer));
        }
        // the rightmost hop not itself a trusted proxy; an address that
        // does not parse ends the walk at the last trusted hop
        let mut client = peer;
        for hop in forwarded_for.rev().flat_map(|v| v.rsplit(',')) {
            match forwarded_address(hop) {
                Some(ip) => {
                    client = ip.to_canonical();
                    if !self.trusted.contains(&client) {
                        break;
                    }
                }
                None => break,
            }
        }
        Client(normalized(client))
    }

    /// How long `client` is still locked out, if it is.
    pub(crate) fn locked(&self, client: Client) -> Option<Duration> {
        let mut locked = lock(&self.locked);
        let until = *locked.get(&client)?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            locked.remove(&client);
            return None;
        }
        Some(left)
    }

    /// Counts a wrong token from `client`; returns how long it is locked
    /// out when that was one too many.
    pub(crate) fn wrong_token(&self, client: Client) -> Option<Duration> {
        let bucket = if self.wrong.len() >= self.capacity && !self.clean() {
            Bucket::Shared
        } else {
            Bucket::Client(client)
        };
        let not_until = self.wrong.check_key(&bucket).err()?;
        let wait = not_until
            .wait_time_from(self.clock.now())
            .max(Duration::from_secs(1));
        let mut locked = lock(&self.locked);
        if locked.len() >= self.capacity && !locked.contains_key(&client) {
            let now = Instant::now();
            locked.retain(|_, until| *until > now);
            if locked.len() >= self.capacity {
                let soonest = locked
                    .iter()
                    .min_by_key(|(_, until)| **until)
                    .map(|(c, _)| *c);
                if let Some(c) = soonest {
                    locked.remove(&c);
                }
            }
        }
        locked.insert(client, Instant::now() + wait);
        Some(wait)
    }

    /// Drops the clients whose budget is full again, at most once a second;
    /// returns whether the table has room now.
    fn clean(&self) -> bool {
        {
            let mut cleaned = lock(&self.cleaned);
            if cleaned.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return false;
            }
            *cleaned = Some(Instant::now());
        }
        self.wrong.retain_recent();
        self.wrong.shrink_to_fit();
        self.wrong.len() < self.capacity
    }

    /// Clients counted now (for tests).
    #[cfg(test)]
    fn counted(&self) -> usize {
        self.wrong.len()
    }
}

/// A `Retry-After` value: whole seconds, rounded up.
pub(crate) fn retry_after(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(s: &str) -> Client {
        Limits::new(Vec::new()).client(ip(s), std::iter::empty())
    }

    #[test]
    fn a_client_is_its_address_or_its_ipv6_network() {
        assert_eq!(client("192.0.2.7"), Client(ip("192.0.2.7")));
        assert_ne!(client("192.0.2.7"), client("192.0.2.8"));
        assert_eq!(client("::ffff:192.0.2.7"), client("192.0.2.7"));
        assert_eq!(
            client("2001:db8:1:2:aaaa::1"),
            client("2001:db8:1:2:bbbb::2")
        );
        assert_ne!(client("2001:db8:1:2::1"), client("2001:db8:1:3::1"));
        assert_eq!(
            client("2001:db8:1:2:aaaa::1").to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let untrusted = Limits::new(Vec::new());
        let proxied = Limits::new(vec![ip("10.0.0.1"), ip("10.0.0.2")]);
        let xff = |v: &'static [&'static str]| v.iter().copied();
        // anyone else's header is ignored
        assert_eq!(
            untrusted.client(ip("198.51.100.1"), xff(&["203.0.113.5"])),
            Client(ip("198.51.100.1"))
        );
        assert_eq!(
            proxied.client(ip("198.51.100.1"), xff(&["203.0.113.5"])),
            Client(ip("198.51.100.1"))
        );
        // from the proxy: the rightmost hop it did not add itself
        assert_eq!(
            proxied.client(ip("10.0.0.1"), xff(&["203.0.113.5"])),
            Client(ip("203.0.113.5"))
        );
        assert_eq!(
            proxied.client(ip("10.0.0.1"), xff(&["1.1.1.1, 203.0.113.5, 10.0.0.2"])),
            Client(ip("203.0.113.5")),
            "a forged left part is not read"
        );
        assert_eq!(
            proxied.client(ip("10.0.0.1"), xff(&["1.1.1.1", "203.0.113.5:4711"])),
            Client(ip("203.0.113.5"))
        );
        assert_eq!(
            proxied.client(ip("::ffff:10.0.0.1"), xff(&["[2001:db8::9]:443"])),
            Client(ip("2001:db8::"))
        );
        // nothing usable: the proxy itself
        for v in [&[][..], &["unknown"][..], &["203.0.113.5, nonsense"][..]] {
            assert_eq!(
                proxied.client(ip("10.0.0.1"), v.iter().copied()),
                Client(ip("10.0.0.1")),
                "{v:?}"
            );
        }
        // only proxies: the one farthest out
        assert_eq!(
            proxied.client(ip("10.0.0.1"), xff(&["10.0.0.2"])),
            Client(ip("10.0.0.2"))
        );
    }

    #[test]
    fn wrong_tokens_lock_out_their_client_only() {
        let limits = Limits::with(Vec::new(), 100, 30);
        let (a, b) = (client("192.0.2.1"), client("192.0.2.2"));
        for n in 0..30 {
            assert_eq!(limits.wrong_token(a), None, "wrong token {n}");
            assert_eq!(limits.locked(a), None);
        }
        let wait = limits.wrong_token(a).expect("the 31st locks it out");
        assert!(
            wait >= Duration::from_secs(1) && wait <= Duration::from_secs(3),
            "{wait:?}"
        );
        assert!(limits.locked(a).is_some());
        assert_eq!(retry_after(Duration::from_millis(1_001)), 2);
        // another client is not affected
        assert_eq!(limits.locked(b), None);
        assert_eq!(limits.wrong_token(b), None);
        assert_eq!(limits.locked(b), None);
    }

    #[test]
    fn memory_is_bounded_however_many_clients_fail() {
        let limits = Limits::with(Vec::new(), 100, 1);
        for i in 0..1_000u32 {
            let c = Client(IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
            let _ = limits.wrong_token(c);
            let _ = limits.wrong_token(c);
        }
        assert!(limits.counted() <= 101, "{} counted", limits.counted());
        assert!(lock(&limits.locked).len() <= 100);
        // past the bound, wrong tokens share a budget: still refused
        let late = client("192.0.2.200");
        assert!(limits.wrong_token(late).is_some());
        assert!(limits.locked(late).is_some());
    }
}

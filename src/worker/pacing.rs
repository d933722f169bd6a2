//! Pacing: a token bucket per page (Messenger's guidance is about 40
//! messages/s per page) and an optional global bucket, using `governor`
//! (GCRA). A paced job waits here, in memory; it is not requeued. Memory is
//! bounded by the prefetch: at most `concurrency` jobs wait here (holding
//! the worker's slots) and the spare prefetched ones wait for a slot.
//!
//! These limits are per worker process. With Redis (`MMSEND_REDIS_URL`)
//! the same `[pacing]` rates hold for the whole fleet instead (`fleet`),
//! and these serve while Redis is unreachable.

use std::collections::HashMap;
use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

/// `[pacing]` in the TOML config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PacingConfig {
    /// Messages per second per page; 0 turns per-page pacing off.
    pub per_page: u32,
    /// Messages per second over all pages; 0 (default) means no global limit.
    pub global: u32,
    /// Per-page overrides, page id → messages per second.
    pub pages: HashMap<String, u32>,
}

impl Default for PacingConfig {
    fn default() -> Self {
        PacingConfig {
            per_page: 40,
            global: 0,
            pages: HashMap::new(),
        }
    }
}

/// The buckets.
pub struct Pacer {
    per_page: Option<DefaultKeyedRateLimiter<String>>,
    pages: HashMap<String, DefaultDirectRateLimiter>,
    global: Option<DefaultDirectRateLimiter>,
}

fn quota(rate: u32) -> Option<Quota> {
    // burst = one second's worth, so an idle page may send a second's
    // allowance at once and is then held to the rate.
    NonZeroU32::new(rate).map(Quota::per_second)
}

impl PacingConfig {
    /// The rate of `page_id`, messages/s (0 = not paced).
    pub fn page_rate(&self, page_id: &str) -> u32 {
        self.pages.get(page_id).copied().unwrap_or(self.per_page)
    }
}

impl Pacer {
    /// The buckets of `config`: pages with a rate of their own get their
    /// own bucket, the others one each at `per_page`, plus the global one;
    /// a rate of 0 is no bucket (never waits).
    pub fn new(config: &PacingConfig) -> Pacer {
        Pacer {
            per_page: quota(config.per_page).map(RateLimiter::keyed),
            pages: config
                .pages
                .iter()
                .filter_map(|(page, rate)| Some((page.clone(), RateLimiter::direct(quota(*rate)?))))
                .collect(),
            global: quota(config.global).map(RateLimiter::direct),
        }
    }

    /// Waits until `page_id` (and the global bucket) may send one message.
    pub async fn until_ready(&self, page_id: &str) {
        if let Some(limiter) = self.pages.get(page_id) {
            limiter.until_ready().await;
        } else if let Some(limiter) = &self.per_page {
            limiter.until_key_ready(&page_id.to_string()).await;
        }
        if let Some(global) = &self.global {
            global.until_ready().await;
        }
    }

    /// Forgets idle pages (called periodically so the keyed map stays small).
    pub fn shrink(&self) {
        if let Some(l) = &self.per_page {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buckets_are_per_page_with_overrides_and_a_global_cap() {
        let p = Pacer::new(&PacingConfig {
            per_page: 20,
            global: 0,
            pages: HashMap::from([("vip".to_string(), 1000)]),
        });
        let per_page = p.per_page.as_ref().unwrap();
        // page a spends its burst of 20; the 21st must wait
        for _ in 0..20 {
            p.until_ready("a").await;
        }
        assert!(per_page.check_key(&"a".to_string()).is_err());
        // page b has its own bucket
        assert!(per_page.check_key(&"b".to_string()).is_ok());
        // the override has a bucket of its own, not the per-page one
        for _ in 0..100 {
            p.until_ready("vip").await;
        }
        assert!(p.pages["vip"].check().is_ok());
        assert!(per_page.check_key(&"vip".to_string()).is_ok());

        let g = Pacer::new(&PacingConfig {
            per_page: 0,
            global: 5,
            pages: HashMap::new(),
        });
        assert!(g.per_page.is_none());
        for page in ["a", "b", "c", "d", "e"] {
            g.until_ready(page).await;
        }
        assert!(g.global.as_ref().unwrap().check().is_err());
    }
}

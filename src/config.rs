//! Configuration: flags and `MMSEND_*` environment variables (see
//! [`crate::cli`]) for the things that differ per deployment, and an
//! optional TOML file (`MMSEND_CONFIG`) for the things that are policy:
//! the classification table, the retry schedule and limits, the delay
//! tiers, pacing. Everything is validated once, at start; a bad value stops
//! the process with a message that names the setting.
//!
//! ```toml
//! [classification]          # code → row; adds to / overrides the built-in table
//! "2300099" = "budget"      # the class, with its usual scope
//! "2300098" = { class = "budget", scope = "ad_account", delay = "30m" }
//!
//! [retry]
//! max_attempts = 10
//! transient_delays = ["5s", "30s", "2m", "10m", "1h"]
//! not_ready_delay = "2m"
//! not_ready_max_age = "2h"
//! budget_delay = "1h"
//! budget_max_age = "24h"
//! recipient_capped_delay = "6h"
//! recipient_capped_max_age = "48h"
//! gated_max_age = "24h"
//! daily_reset_utc_offset = "+00:00"   # where "the next day" starts (2300054)
//!
//! [topology]
//! tiers = ["5s", "30s", "2m", "10m", "1h", "6h"]
//! delivery_limit = 10
//! results = false           # one event per settled job on <prefix>.results
//! results_max_age = "7d"
//!
//! [pacing]
//! per_page = 40             # messages/s per page, 0 = off
//! global = 0                # messages/s for the whole worker, 0 = off
//! pages = { "9876543210" = 10 }
//!
//! [graph]
//! connect_timeout = "5s"
//! request_timeout = "30s"
//!
//! [gates]
//! enabled = true
//!
//! [redis]                   # with MMSEND_REDIS_URL
//! ledger_retention = "14d"
//! lease_margin = "5s"
//! op_timeout = "500ms"
//! lowered_rate_for = "10m"
//! allow_eviction = false    # start even if Redis may evict keys (warns)
//! campaign_retention = "30d" # campaign state and counters, after the last activity
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::broker::topology::{
    Tier, Topology, TopologyConfigError, DEFAULT_DELIVERY_LIMIT, DEFAULT_TIERS,
};
use crate::classify::route::PolicyError;
use crate::classify::table::RowOverride;
use crate::classify::{CodeTable, RetryPolicy, TableError};
use crate::worker::pacing::PacingConfig;

/// Every default that more than one place needs, written once: clap's
/// defaults, serde's defaults and the constructors read these.
pub mod defaults {
    use std::time::Duration;

    pub use crate::broker::topology::{DEFAULT_DELIVERY_LIMIT, DEFAULT_PREFIX, DEFAULT_TIERS};
    pub use crate::broker::DEFAULT_AMQP_URL;

    /// The Graph API's base URL.
    pub const GRAPH_BASE_URL: &str = "https://graph.facebook.com";
    /// The Graph API version mmsend was written against.
    pub const GRAPH_VERSION: &str = "v24.0";
    /// TCP + TLS connect timeout of a Graph call.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Whole-request timeout of a Graph call, body included.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Jobs a worker processes at once.
    pub const CONCURRENCY: u16 = 64;
    /// Threads a worker runs its jobs on (1: all on the main thread).
    pub const WORKER_THREADS: usize = 1;
    /// Where a worker serves /metrics, /healthz and /readyz.
    pub const METRICS_ADDR: &str = "0.0.0.0:9464";
}

/// The TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Code → row overrides of the classification table.
    pub classification: BTreeMap<String, RowOverride>,
    /// The retry schedule and limits.
    pub retry: RetryPolicy,
    /// Delay tiers and the work queue's delivery limit.
    pub topology: TopologySection,
    /// Per-page and global pacing.
    pub pacing: PacingConfig,
    /// Graph API timeouts.
    pub graph: GraphSection,
    /// Scope gates on or off.
    pub gates: GatesSection,
    /// The fleet layer on Redis (used when `MMSEND_REDIS_URL` is set).
    pub redis: RedisSection,
}

/// `[redis]`: the send ledger and fleet coordination (the URL and the fail
/// mode come from `MMSEND_REDIS_URL` / `MMSEND_REDIS_FAIL_MODE`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    /// How long a `sent` record is kept (at least as long as a job lives).
    #[serde(with = "humantime_serde")]
    pub ledger_retention: Duration,
    /// Added to the request timeout for a claim's lease.
    #[serde(with = "humantime_serde")]
    pub lease_margin: Duration,
    /// Longest a Redis command may take before Redis counts as down.
    #[serde(with = "humantime_serde")]
    pub op_timeout: Duration,
    /// How long a page's halved rate lasts after a page rate limit.
    #[serde(with = "humantime_serde")]
    pub lowered_rate_for: Duration,
    /// Start even if Redis may evict keys (a memory limit and a
    /// `maxmemory-policy` other than `noeviction`); the worker refuses to
    /// start then unless this is `true`, and warns while it runs.
    pub allow_eviction: bool,
    /// How long a campaign's state and counters are kept after its last
    /// activity.
    #[serde(with = "humantime_serde")]
    pub campaign_retention: Duration,
}

impl Default for RedisSection {
    fn default() -> Self {
        let d = crate::fleet::FleetConfig::new("");
        RedisSection {
            ledger_retention: d.ledger_retention,
            lease_margin: d.lease_margin,
            op_timeout: d.op_timeout,
            lowered_rate_for: d.lowered_rate_for,
            allow_eviction: d.allow_eviction,
            campaign_retention: d.campaign_retention,
        }
    }
}

impl RedisSection {
    /// The fleet config for `url` with these settings.
    pub fn fleet(&self, url: &str, fail_mode: crate::fleet::FailMode) -> crate::fleet::FleetConfig {
        crate::fleet::FleetConfig {
            url: url.to_string(),
            fail_mode,
            ledger_retention: self.ledger_retention,
            lease_margin: self.lease_margin,
            op_timeout: self.op_timeout,
            lowered_rate_for: self.lowered_rate_for,
            allow_eviction: self.allow_eviction,
            campaign_retention: self.campaign_retention,
        }
    }
}

/// `[topology]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologySection {
    /// Delay tiers, e.g. `["5s", "30s"]`.
    pub tiers: Vec<String>,
    /// `x-delivery-limit` of the work queue.
    pub delivery_limit: u32,
    /// Publish one event per settled job on the stream `<prefix>.results`.
    pub results: bool,
    /// How long the results stream keeps events.
    #[serde(with = "humantime_serde")]
    pub results_max_age: Duration,
}

impl Default for TopologySection {
    fn default() -> Self {
        TopologySection {
            tiers: DEFAULT_TIERS.iter().map(|s| s.to_string()).collect(),
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            results: false,
            results_max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// `[graph]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GraphSection {
    /// TCP + TLS connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Whole-request timeout.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for GraphSection {
    fn default() -> Self {
        GraphSection {
            connect_timeout: defaults::CONNECT_TIMEOUT,
            request_timeout: defaults::REQUEST_TIMEOUT,
        }
    }
}

/// `[gates]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatesSection {
    /// Scope gates on (default) or off.
    pub enabled: bool,
}

impl Default for GatesSection {
    fn default() -> Self {
        GatesSection { enabled: true }
    }
}

/// The config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML for this schema (unknown keys, wrong types).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value parses but cannot work.
    #[error("config file {path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        source: Invalid,
    },
}

/// A value that parses but cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A `[classification]` entry.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The `[retry]` section.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The `[topology]` section.
    #[error("topology: {0}")]
    Topology(#[from] TopologyConfigError),
    /// A zero timeout in `[graph]`.
    #[error("graph timeouts must be longer than zero")]
    Timeouts,
    /// A zero timeout or retention in `[redis]`.
    #[error("redis.op_timeout and redis.ledger_retention must be longer than zero")]
    Redis,
}

impl FileConfig {
    /// Reads and validates the file; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let config: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|source| ConfigError::Invalid {
            path: shown,
            source,
        })?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.code_table()?;
        self.retry.validate()?;
        self.topology(defaults::DEFAULT_PREFIX)?;
        if self.graph.request_timeout.is_zero() || self.graph.connect_timeout.is_zero() {
            return Err(Invalid::Timeouts);
        }
        if self.redis.op_timeout.is_zero() || self.redis.ledger_retention.is_zero() {
            return Err(Invalid::Redis);
        }
        Ok(())
    }

    /// The classification table with this file's overrides.
    pub fn code_table(&self) -> Result<CodeTable, TableError> {
        CodeTable::with_overrides(&self.classification)
    }

    /// The topology for `prefix` with this file's tiers and delivery limit.
    pub fn topology(&self, prefix: &str) -> Result<Topology, TopologyConfigError> {
        let tiers = self
            .topology
            .tiers
            .iter()
            .map(|t| Tier::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        let mut topology = Topology::from_tiers(prefix, tiers, self.topology.delivery_limit)?;
        topology.results = self
            .topology
            .results
            .then_some(self.topology.results_max_age);
        Ok(topology)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, String> {
        let c: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults_and_a_full_file() {
        let c = parse("").unwrap();
        assert_eq!(c.retry, RetryPolicy::default());
        let c = parse(
            r#"
            [classification]
            "2300099" = "budget"
            "2300098" = { class = "transient", delay = "30m" }
            [retry]
            max_attempts = 3
            transient_delays = ["1s", "2s"]
            [topology]
            tiers = ["1s", "2s"]
            delivery_limit = 4
            [pacing]
            per_page = 10
            pages = { "42" = 1 }
            [graph]
            request_timeout = "3s"
            "#,
        )
        .unwrap();
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.retry.transient_delays[1], Duration::from_secs(2));
        assert_eq!(c.topology("p").unwrap().tiers.len(), 2);
        assert_eq!(c.pacing.pages["42"], 1);
        let table = c.code_table().unwrap();
        assert_eq!(
            table.get(2300099).map(|r| (r.class, r.scope)),
            Some((
                crate::classify::Class::Budget,
                crate::classify::ScopeKind::Campaign
            ))
        );
        assert_eq!(
            table.get(2300098).and_then(|r| r.delay),
            Some(crate::classify::RowDelay::After(Duration::from_secs(1800)))
        );
    }

    #[test]
    fn bad_values_are_named() {
        assert!(parse("[retry]\nmax_atempts = 3")
            .unwrap_err()
            .contains("max_atempts"));
        assert!(parse("[retry]\nbudget_delay = \"soon\"")
            .unwrap_err()
            .contains("budget_delay"));
        assert!(parse("[topology]\ntiers = [\"5 parsecs\"]")
            .unwrap_err()
            .contains("5 parsecs"));
        assert!(parse("[classification]\n\"1\" = \"nope\"")
            .unwrap_err()
            .contains("unknown class"));
        assert!(parse("[retry]\nmax_attempts = 0")
            .unwrap_err()
            .contains("max_attempts"));
    }
}

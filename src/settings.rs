//! The TOML config file (`MMSEND_CONFIG`), for the things that are policy:
//! the classification table, the retry schedule and limits, the delay
//! tiers, pacing. Flags and `MMSEND_*` environment variables (the CLI) hold
//! what differs per deployment. The file is read and validated once, at
//! start; a bad value stops the process with a message that names the
//! setting.
//!
//! The file gathers every stage's own section (the classification table's
//! rows, the retry policy, the topology, pacing, the fleet), so it sits
//! above those stages; the defaults and the sections that are plain data
//! live in [`crate::config`], the bottom layer, where any stage may read them.
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
//! echo_window = "15s"        # a maybe-sent job waits this long for Meta's echo
//! silent_page_after = "15m"  # sends without an echo this long: the page is silent
//! delivery_tracking = "auto" # index sends for the tracker: auto (once an echo came), on, off
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::broker::topology::{Tier, Topology, TopologyConfigError};
use crate::classify::route::PolicyError;
use crate::classify::table::RowOverride;
use crate::classify::{CodeTable, RetryPolicy, TableError};
use crate::config::{defaults, GatesSection, GraphSection, RedisSection, TopologySection};
use crate::fleet::{FailMode, FleetConfig};
use crate::worker::pacing::PacingConfig;

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

    /// The fleet config for `url` with the `[redis]` settings.
    pub fn fleet(&self, url: &str, fail_mode: FailMode) -> FleetConfig {
        FleetConfig::from_section(url, fail_mode, &self.redis)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The file, or what is wrong with it, in words.
    fn parse(text: &str) -> Result<FileConfig, Box<dyn std::error::Error>> {
        let c: FileConfig = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// What is wrong with a file that must be refused.
    fn refused(text: &str) -> String {
        parse(text).expect_err("refused").to_string()
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
        assert!(refused("[retry]\nmax_atempts = 3").contains("max_atempts"));
        assert!(refused("[retry]\nbudget_delay = \"soon\"").contains("budget_delay"));
        assert!(refused("[topology]\ntiers = [\"5 parsecs\"]").contains("5 parsecs"));
        assert!(refused("[classification]\n\"1\" = \"nope\"").contains("unknown class"));
        assert!(refused("[retry]\nmax_attempts = 0").contains("max_attempts"));
    }
}

//! Configuration: flags and `MMSEND_*` environment variables (see
//! [`crate::cli`]) for the things that differ per deployment, and an
//! optional TOML file (`MMSEND_CONFIG`) for the things that are policy:
//! the classification table, the retry schedule and limits, the delay
//! tiers, pacing. Everything is validated once, at start; a bad value stops
//! the process with a message that names the setting.
//!
//! ```toml
//! [classification]          # code → class; adds to / overrides the built-in table
//! "2300099" = "budget"
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
//!
//! [topology]
//! tiers = ["5s", "30s", "2m", "10m", "1h", "6h"]
//! delivery_limit = 10
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
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::broker::topology::{Tier, Topology, DEFAULT_TIERS};
use crate::classify::{CodeTable, RetryPolicy};
use crate::worker::pacing::PacingConfig;

/// The TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub classification: BTreeMap<String, String>,
    pub retry: RetryPolicy,
    pub topology: TopologySection,
    pub pacing: PacingConfig,
    pub graph: GraphSection,
    pub gates: GatesSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologySection {
    pub tiers: Vec<String>,
    pub delivery_limit: u32,
}

impl Default for TopologySection {
    fn default() -> Self {
        TopologySection {
            tiers: DEFAULT_TIERS.iter().map(|s| s.to_string()).collect(),
            delivery_limit: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GraphSection {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for GraphSection {
    fn default() -> Self {
        GraphSection {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatesSection {
    pub enabled: bool,
}

impl Default for GatesSection {
    fn default() -> Self {
        GatesSection { enabled: true }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: String, message: String },
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
        let config: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: shown,
            message,
        })?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.code_table()?;
        self.retry.validate()?;
        self.topology("mmsend")?;
        if self.graph.request_timeout.is_zero() || self.graph.connect_timeout.is_zero() {
            return Err("graph timeouts must be longer than zero".into());
        }
        Ok(())
    }

    pub fn code_table(&self) -> Result<CodeTable, String> {
        CodeTable::with_overrides(&self.classification)
    }

    /// The topology for `prefix` with this file's tiers and delivery limit.
    pub fn topology(&self, prefix: &str) -> Result<Topology, String> {
        let tiers = self
            .topology
            .tiers
            .iter()
            .map(|t| Tier::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("topology.tiers: {e}"))?;
        Topology::from_tiers(prefix, tiers, self.topology.delivery_limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, String> {
        let c: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
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
        assert_eq!(
            c.code_table().unwrap().get(2300099),
            Some(crate::classify::Class::Budget)
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
            .contains("topology.tiers"));
        assert!(parse("[classification]\n\"1\" = \"nope\"")
            .unwrap_err()
            .contains("unknown class"));
        assert!(parse("[retry]\nmax_attempts = 0")
            .unwrap_err()
            .contains("max_attempts"));
    }
}

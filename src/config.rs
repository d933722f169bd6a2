//! The bottom layer of configuration: every default that more than one
//! place needs ([`defaults`]), and the sections of the TOML config file that
//! are plain data (`[topology]`, `[graph]`, `[gates]`, `[redis]`). It uses
//! nothing else of the crate, so any stage may read it; the file as a whole
//! (every stage's section, read and validated at start) is
//! [`crate::settings::FileConfig`].

use std::time::Duration;

use serde::Deserialize;

/// Every default that more than one place needs, written once: clap's
/// defaults, serde's defaults and the constructors read these.
pub mod defaults {
    use std::time::Duration;

    /// The default broker URL.
    pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    /// The default name prefix of the topology.
    pub const DEFAULT_PREFIX: &str = "mmsend";
    /// The default delay tiers (DESIGN §5).
    pub const DEFAULT_TIERS: [&str; 6] = ["5s", "30s", "2m", "10m", "1h", "6h"];
    /// The default `x-delivery-limit` of the work queue.
    pub const DEFAULT_DELIVERY_LIMIT: u32 = 10;
    /// How long the results stream keeps events.
    pub const RESULTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

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
    /// How long the send ledger keeps a `sent` record.
    pub const LEDGER_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);
    /// Added to the request timeout for a send-ledger claim's lease.
    pub const LEASE_MARGIN: Duration = Duration::from_secs(5);
    /// Longest a Redis command may take before Redis counts as down.
    pub const REDIS_OP_TIMEOUT: Duration = Duration::from_millis(500);
    /// How long a page's halved rate lasts after a page rate limit.
    pub const LOWERED_RATE_FOR: Duration = Duration::from_secs(600);
    /// How long a campaign's state and counters are kept after its last
    /// activity.
    pub const CAMPAIGN_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
    /// Meta echoes a send within seconds; a maybe-sent job waits this long
    /// for the echo of its earlier call before it calls again.
    pub const ECHO_WINDOW: Duration = Duration::from_secs(15);
    /// Sends without an echo for this long make a page silent.
    pub const SILENT_PAGE_AFTER: Duration = Duration::from_secs(15 * 60);
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
    /// How long a maybe-sent job waits for Meta's echo of its earlier call
    /// before it calls again (delivery tracking; 0s: does not wait).
    #[serde(with = "humantime_serde")]
    pub echo_window: Duration,
    /// A page with sends but no echo from Meta for this long is reported
    /// as silent (its webhook subscription was probably dropped).
    #[serde(with = "humantime_serde")]
    pub silent_page_after: Duration,
    /// Whether each send is indexed (tracking id → job) for the delivery
    /// tracker: `auto` (once the fleet saw an echo), `on`, `off`.
    pub delivery_tracking: DeliveryTracking,
}

/// `[redis] delivery_tracking`: whether `after.lua` indexes each send's
/// tracking id for the delivery tracker (one `HSET` per send, about 5 µs of
/// Redis time a job in the pipeline bench).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryTracking {
    /// Once the fleet saw an echo of any page (a webhook receiver and a
    /// tracker run): a fleet without webhooks pays nothing. The sends made
    /// before the first echo are not indexed, so their events count as
    /// unmatched: set `on` before the first campaign if that matters.
    #[default]
    Auto,
    /// Every send.
    On,
    /// None: no event can be joined (the tracker counts them unmatched).
    Off,
}

impl DeliveryTracking {
    /// `after.lua`'s argument: 1 on, 0 off, 2 auto.
    pub fn script_arg(self) -> u8 {
        match self {
            DeliveryTracking::On => 1,
            DeliveryTracking::Off => 0,
            DeliveryTracking::Auto => 2,
        }
    }
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            ledger_retention: defaults::LEDGER_RETENTION,
            lease_margin: defaults::LEASE_MARGIN,
            op_timeout: defaults::REDIS_OP_TIMEOUT,
            lowered_rate_for: defaults::LOWERED_RATE_FOR,
            allow_eviction: false,
            campaign_retention: defaults::CAMPAIGN_RETENTION,
            echo_window: defaults::ECHO_WINDOW,
            silent_page_after: defaults::SILENT_PAGE_AFTER,
            delivery_tracking: DeliveryTracking::Auto,
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
            tiers: defaults::DEFAULT_TIERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            delivery_limit: defaults::DEFAULT_DELIVERY_LIMIT,
            results: false,
            results_max_age: defaults::RESULTS_MAX_AGE,
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

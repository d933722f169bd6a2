//! The command line: clap definitions, each subcommand handing over to one
//! library function. Every flag can also be set as an `MMSEND_*`
//! environment variable; secrets are best passed that way (a flag is
//! visible in the process list).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::broker::{self, DEFAULT_AMQP_URL};
use crate::config::defaults;
use crate::graph::{ClientConfig, Secret, TokenStore};
use crate::metrics::{self, Metrics};
use crate::settings::FileConfig;
use crate::worker::{self, WorkerConfig};
use crate::{health, producer, report, simulator};

/// The exit codes, as `--help` shows them (docs/src/operating/worker.md: "Exit status, JSON and pipes").
pub(crate) const EXIT_STATUS: &str = "\
Exit status:
  0  ok
  1  partly failed: some jobs invalid or unconfirmed (enqueue), the worker
     not ready (healthcheck), a demo that did not balance
  2  usage error or fatal: bad flags or config, RabbitMQ unreachable

Output: --json prints one JSON document to stdout for scripts. Colour only
on a terminal, never with NO_COLOR set. A closed pipe (| head) ends quietly.";

pub(crate) mod campaign;
pub(crate) mod dlq;
pub(crate) mod pages;

/// The `mmsend` command line: the binary parses it, calls [`init_logging`],
/// then [`run`]. The subcommands and their flags are crate-private: the
/// command line, not this type, is the interface.
#[derive(Debug, Parser)]
#[command(
    name = "mmsend",
    version,
    about = "Send Meta Marketing Messages for Messenger from RabbitMQ, without losing a send",
    long_about = None,
    after_help = EXIT_STATUS
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "MMSEND_LOG_FORMAT",
        default_value = "pretty"
    )]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a worker: consume send jobs, call the Graph API, settle each job.
    Worker(WorkerArgs),
    /// Declare the queues, or show them with their depths.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Validate JSONL jobs (file or - for stdin) and publish them with confirms.
    Enqueue(EnqueueArgs),
    /// Inspect, export, replay or purge dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Serve the Graph API simulator (for tests, demos, load tests).
    Simulate(simulator::SimArgs),
    /// Run the whole pipeline locally against the simulator and print what happened.
    Demo(DemoArgs),
    /// Ask the local worker's /readyz (or /healthz with --live); exit 0 if it answers 2xx, else 1.
    Healthcheck(HealthcheckArgs),
    /// Serve the dead-letter console: the DLQ in a browser (groups, letters, replay, purge).
    Console(ConsoleArgs),
    /// See a campaign's progress; pause, resume or cancel it across the fleet (needs Redis).
    Campaign {
        #[command(subcommand)]
        command: campaign::CampaignCommand,
    },
    /// Receive Meta's page webhooks: check each post's signature, store it in RabbitMQ, answer 200.
    Webhooks(WebhooksArgs),
    /// Check the pages' webhook subscriptions: which marketing-message fields each page with a token is subscribed to.
    Pages {
        #[command(subcommand)]
        command: pages::PagesCommand,
    },
    /// Run the delivery tracker alone: join the stored webhook events to jobs, count each campaign's funnel (needs Redis; `mmsend worker` runs one unless --no-tracker).
    Tracker(TrackerArgs),
}

/// `mmsend tracker`.
#[derive(Debug, Clone, Args)]
pub(crate) struct TrackerArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// Redis: the send ledger the events are joined through (the workers' MMSEND_REDIS_URL).
    #[arg(long, env = "MMSEND_REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "MMSEND_TRACKER_METRICS_ADDR",
        default_value = "0.0.0.0:9467"
    )]
    pub(crate) metrics_addr: String,
}

/// `mmsend webhooks`.
#[derive(Debug, Clone, Args)]
pub(crate) struct WebhooksArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// Address to serve GET and POST /webhooks (and /metrics, /healthz, /readyz) on;
    /// put TLS in front (Meta accepts no self-signed certificate).
    #[arg(long, env = "MMSEND_WEBHOOK_LISTEN", default_value = crate::webhooks::DEFAULT_LISTEN)]
    pub(crate) listen: String,
    /// The verify token of the subscription handshake (the one given to Meta). Prefer the environment variable.
    #[arg(long, env = "MMSEND_WEBHOOK_VERIFY_TOKEN", hide_env_values = true)]
    pub(crate) verify_token: Option<Secret>,
    /// The app secret: every post's X-Hub-Signature-256 is checked with it.
    #[arg(long, env = "MMSEND_APP_SECRET", hide_env_values = true)]
    pub(crate) app_secret: Option<Secret>,
    /// The largest post taken, bytes (a larger one is answered 413).
    #[arg(long, env = "MMSEND_WEBHOOK_MAX_BODY", default_value_t = crate::webhooks::MAX_BODY)]
    pub(crate) max_body: usize,
}

impl WebhooksArgs {
    /// Validates the flags into the receiver's config.
    pub(crate) fn to_config(&self) -> anyhow::Result<crate::webhooks::WebhookConfig> {
        broker::parse_urls(&self.broker.amqp_url)?;
        let file = self.broker.file_config()?;
        let need = |s: &Option<Secret>, var: &str, what: &str| -> anyhow::Result<Secret> {
            let s = s.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "{what} is not set: set {var} (mmsend webhooks refuses to run without it)"
                )
            })?;
            Ok(crate::graph::auth::clean_token(s.expose(), var)?.0)
        };
        Ok(crate::webhooks::WebhookConfig {
            amqp_url: self.broker.amqp_url.clone(),
            topology: self.broker.topology(&file)?,
            listen: self.listen.clone(),
            verify_token: need(
                &self.verify_token,
                "MMSEND_WEBHOOK_VERIFY_TOKEN",
                "the webhook verify token",
            )?,
            app_secret: need(&self.app_secret, "MMSEND_APP_SECRET", "the app secret")?,
            max_body: self.max_body,
        })
    }
}

/// `mmsend console`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConsoleArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// Address to serve on; any address but loopback needs MMSEND_CONSOLE_TOKEN.
    #[arg(long, env = "MMSEND_CONSOLE_LISTEN", default_value = crate::console::DEFAULT_LISTEN)]
    pub(crate) listen: String,
    /// Token every request must prove (login form, or Authorization: Bearer). Prefer the environment variable.
    #[arg(long, env = "MMSEND_CONSOLE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<Secret>,
    /// Show the DLQ; hide and refuse every action.
    #[arg(long, env = "MMSEND_CONSOLE_READ_ONLY")]
    pub(crate) read_only: bool,
    /// Automatic snapshots at most this often (each is one scan of the DLQ,
    /// about 70 µs of broker CPU per letter); "Refresh now" takes one at once.
    #[arg(long, env = "MMSEND_CONSOLE_REFRESH", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) refresh: Duration,
    /// Letters a snapshot holds at most. Each costs the snapshot at most 6 KiB of memory,
    /// whatever headers it carries (about 2.5 KiB typically: only the x-mmsend-* headers
    /// and the x-death entries are kept, each value cut at 300 bytes), and the broker about
    /// 300 bytes while the snapshot is taken; a larger DLQ is shown in part, and says so.
    #[arg(long, env = "MMSEND_CONSOLE_MAX_LETTERS", default_value_t = crate::console::DEFAULT_MAX_LETTERS)]
    pub(crate) max_letters: usize,
    /// The replay rate a confirmation page offers (letters per second, 0 = no limit).
    #[arg(long, env = "MMSEND_CONSOLE_REPLAY_RATE", default_value_t = 0)]
    pub(crate) replay_rate: u32,
    /// A reverse proxy (IP address, repeat or comma-separate for more) whose
    /// X-Forwarded-For header names the client; wrong tokens are limited per
    /// client, and without this everyone behind a proxy is one client.
    #[arg(
        long = "trusted-proxy",
        value_name = "IP",
        env = "MMSEND_CONSOLE_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub(crate) trusted_proxies: Vec<std::net::IpAddr>,
    /// The workers' Redis: the Campaigns pages (state, progress, pause, resume, cancel) and the audit trail.
    #[arg(long, env = "MMSEND_REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
    /// Grafana's address (e.g. https://grafana.example): each campaign of the
    /// overview links to the mmsend dashboard over the hours its letters died.
    #[arg(long, env = "MMSEND_CONSOLE_GRAFANA_URL")]
    pub(crate) grafana_url: Option<String>,
}

impl ConsoleArgs {
    /// Validates the flags into the console's config.
    pub(crate) fn to_config(&self) -> anyhow::Result<crate::console::ConsoleConfig> {
        broker::parse_urls(&self.broker.amqp_url)?;
        let file = self.broker.file_config()?;
        let mut config =
            crate::console::ConsoleConfig::new(&self.broker.amqp_url, self.broker.topology(&file)?);
        config.listen = self.listen.clone();
        config.token = match &self.token {
            Some(t) => Some(crate::graph::auth::clean_token(t.expose(), "MMSEND_CONSOLE_TOKEN")?.0),
            None => None,
        };
        config.read_only = self.read_only;
        config.refresh = self.refresh;
        config.max_letters = self.max_letters;
        config.replay_rate = self.replay_rate;
        config.trusted_proxies = self.trusted_proxies.clone();
        config.grafana_url = self.grafana_url.clone();
        config.redis = self
            .redis_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(|url| file.fleet(url, crate::fleet::FailMode::Local));
        Ok(config)
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct HealthcheckArgs {
    /// The worker's metrics address; a wildcard (0.0.0.0, [::]) is asked on loopback.
    #[arg(long, env = "MMSEND_METRICS_ADDR", default_value = defaults::METRICS_ADDR)]
    pub(crate) metrics_addr: String,
    /// Ask /healthz (the process is up) instead of /readyz (connected and consuming).
    #[arg(long)]
    pub(crate) live: bool,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct DemoArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "MMSEND_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub(crate) amqp_url: String,
    /// Sample jobs to send.
    #[arg(long, default_value_t = 3000)]
    pub(crate) jobs: usize,
    /// Worker concurrency.
    #[arg(long, default_value_t = defaults::CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) concurrency: u16,
    /// Keep the demo queues (to try the dlq commands on them).
    #[arg(long)]
    pub(crate) keep: bool,
    /// Redis for the send ledger and fleet coordination ("" to run without).
    #[arg(
        long,
        env = "MMSEND_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/",
        hide_env_values = true
    )]
    pub(crate) redis_url: String,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct EnqueueArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// JSONL file of jobs, or - for standard input.
    #[arg(default_value = "-")]
    pub(crate) file: String,
    /// Validate only; publish nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Publisher confirms kept outstanding.
    #[arg(long, env = "MMSEND_MAX_INFLIGHT", default_value_t = crate::producer::DEFAULT_MAX_INFLIGHT)]
    pub(crate) max_inflight: usize,
    /// Print the report as JSON (no progress bar, no table).
    #[arg(long)]
    pub(crate) json: bool,
    /// Redis of the workers: count the published jobs per campaign (`enqueued`, for
    /// `mmsend campaign` progress and ETA). Unset: not counted.
    #[arg(long, env = "MMSEND_REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// Count dead letters by reason, class, code, campaign and page.
    Stats {
        #[command(flatten)]
        select: DlqSelect,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// One line per dead letter.
    List {
        #[command(flatten)]
        select: DlqSelect,
        /// Print one JSON object (the letters and what the scan did).
        #[arg(long)]
        json: bool,
    },
    /// The selected dead letters as JSONL (job + headers); `mmsend enqueue` reads it back as a replay.
    Export {
        #[command(flatten)]
        select: DlqSelect,
        /// Write here instead of standard output (- is standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Move the selected dead letters back to the work queue (attempts reset).
    Replay {
        #[command(flatten)]
        select: DlqSelect,
        /// Show what would be replayed; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many replays per second (0 = no limit).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete the selected dead letters (needs --yes).
    Purge {
        #[command(flatten)]
        select: DlqSelect,
        /// Really delete.
        #[arg(long)]
        yes: bool,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
}

/// `--reason`: a [`DeadReason`](crate::classify::DeadReason) for clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReasonArg(pub(crate) crate::classify::DeadReason);

/// `--class`: a [`Class`](crate::classify::Class) for clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClassArg(pub(crate) crate::classify::Class);

const REASON_ARGS: [ReasonArg; crate::classify::DeadReason::ALL.len()] = {
    let all = crate::classify::DeadReason::ALL;
    let mut out = [ReasonArg(all[0]); crate::classify::DeadReason::ALL.len()];
    let mut i = 0;
    while i < all.len() {
        out[i] = ReasonArg(all[i]);
        i += 1;
    }
    out
};

const CLASS_ARGS: [ClassArg; crate::classify::Class::ALL.len()] = {
    let all = crate::classify::Class::ALL;
    let mut out = [ClassArg(all[0]); crate::classify::Class::ALL.len()];
    let mut i = 0;
    while i < all.len() {
        out[i] = ClassArg(all[i]);
        i += 1;
    }
    out
};

impl ValueEnum for ReasonArg {
    fn value_variants<'a>() -> &'a [Self] {
        &REASON_ARGS
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.0.as_str()))
    }
}

impl ValueEnum for ClassArg {
    fn value_variants<'a>() -> &'a [Self] {
        &CLASS_ARGS
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.0.as_str()))
    }
}

/// Which dead letters a `dlq` command acts on.
#[derive(Debug, Clone, Args)]
pub(crate) struct DlqSelect {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// Why the job died (`delivery_limit`: moved by RabbitMQ itself).
    #[arg(long)]
    pub(crate) reason: Option<ReasonArg>,
    /// Class of the last failure.
    #[arg(long)]
    pub(crate) class: Option<ClassArg>,
    /// Graph error code or subcode, e.g. 2300005.
    #[arg(long)]
    pub(crate) code: Option<i64>,
    /// Campaign label of the job.
    #[arg(long)]
    pub(crate) campaign: Option<String>,
    /// Page id of the job.
    #[arg(long)]
    pub(crate) page: Option<String>,
    /// One job.
    #[arg(long)]
    pub(crate) job_id: Option<String>,
    /// Dead within this long (1h, 2d) or since this RFC 3339 instant (RabbitMQ's x-death time for letters it dead-lettered itself).
    #[arg(long)]
    pub(crate) since: Option<String>,
    /// Dead before this: a duration back from now (1h) or an RFC 3339 instant.
    #[arg(long)]
    pub(crate) until: Option<String>,
    /// Act on at most this many; the scan stops as soon as it has them.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Letters a scan may hold on the broker at once (about 300 bytes of
    /// broker memory each); it stops there. 0 = no bound.
    #[arg(long, env = "MMSEND_DLQ_MAX_HELD", default_value_t = crate::dlq::DEFAULT_MAX_HELD)]
    pub(crate) max_held: usize,
    /// The workers' Redis: replays and purges are recorded in its audit trail.
    #[arg(long, env = "MMSEND_REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
}

impl DlqSelect {
    pub(crate) fn filter(&self) -> anyhow::Result<crate::dlq::Filter> {
        let now = chrono::Utc::now();
        let time = |flag: &str, v: &Option<String>| {
            v.as_deref()
                .map(|s| crate::dlq::parse_since(s, now))
                .transpose()
                .map_err(|e| anyhow::anyhow!("{flag} {e}"))
        };
        let since = time("--since", &self.since)?;
        let until = time("--until", &self.until)?;
        Ok(crate::dlq::Filter {
            reason: self.reason.map(|r| r.0),
            class: self.class.map(|c| c.0),
            code: self.code,
            campaign: self.campaign.clone(),
            page: self.page.clone(),
            job_id: self.job_id.clone(),
            since,
            until,
            limit: self.limit,
        })
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum TopologyCommand {
    /// Declare the exchange, work queue, delay tiers and dead-letter queue (idempotent).
    Declare(BrokerArgs),
    /// Show every queue with its depth and consumers.
    Show(ShowArgs),
    /// Print the topology as RabbitMQ definitions JSON (for `rabbitmqctl import_definitions`).
    Definitions(BrokerArgs),
}

#[derive(Debug, Clone, Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// Print JSON ({"prefix", "queues": [{"name", "role", "messages", "consumers"}]}).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Where the broker is and which topology to use.
#[derive(Debug, Clone, Args)]
pub(crate) struct BrokerArgs {
    /// RabbitMQ URL, or a comma-separated list of cluster nodes tried in order.
    #[arg(long, env = "MMSEND_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub(crate) amqp_url: String,
    /// Name prefix of the exchange and queues.
    #[arg(long, env = "MMSEND_PREFIX", default_value = defaults::DEFAULT_PREFIX)]
    pub(crate) prefix: String,
    /// TOML file: classification overrides, retry schedule, tiers, pacing.
    #[arg(long, env = "MMSEND_CONFIG")]
    pub(crate) config: Option<PathBuf>,
}

impl BrokerArgs {
    pub(crate) fn file_config(&self) -> anyhow::Result<FileConfig> {
        Ok(FileConfig::load(self.config.as_deref())?)
    }

    pub(crate) fn topology(&self, file: &FileConfig) -> anyhow::Result<broker::Topology> {
        file.topology(&self.prefix)
            .map_err(|e| anyhow::anyhow!("--prefix / config: {e}"))
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct WorkerArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// Graph API base URL.
    #[arg(long, env = "MMSEND_GRAPH_BASE_URL", default_value = defaults::GRAPH_BASE_URL)]
    pub(crate) graph_base_url: String,
    /// Graph API version.
    #[arg(long, env = "MMSEND_GRAPH_VERSION", default_value = defaults::GRAPH_VERSION)]
    pub(crate) graph_version: String,
    /// Default Page (or system-user) access token. Prefer the environment variable.
    #[arg(long, env = "MMSEND_ACCESS_TOKEN", hide_env_values = true)]
    pub(crate) access_token: Option<Secret>,
    /// JSON file {"<page_id>": "<token>", …} of per-page tokens.
    #[arg(long, env = "MMSEND_PAGE_TOKENS_FILE")]
    pub(crate) page_tokens_file: Option<PathBuf>,
    /// App secret; when set, every call carries appsecret_proof.
    #[arg(long, env = "MMSEND_APP_SECRET", hide_env_values = true)]
    pub(crate) app_secret: Option<Secret>,
    /// Jobs processed at once.
    #[arg(long, env = "MMSEND_CONCURRENCY", default_value_t = defaults::CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) concurrency: u16,
    /// Deliveries held unacked (at least the concurrency); 0 = twice the concurrency (at least 8
    /// more), or three times (at least 16 more) with a Redis URL.
    #[arg(long, env = "MMSEND_PREFETCH", default_value_t = 0)]
    pub(crate) prefetch: u16,
    /// Threads that run jobs: 1 = one thread for all of them (the least CPU per job;
    /// scale out with more workers), 0 = one per core.
    #[arg(long, env = "MMSEND_WORKER_THREADS", default_value_t = defaults::WORKER_THREADS)]
    pub(crate) threads: usize,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, env = "MMSEND_METRICS_ADDR", default_value = defaults::METRICS_ADDR)]
    pub(crate) metrics_addr: String,
    /// On SIGTERM, how long jobs that wait (for a slot, for pacing) may still start;
    /// a Graph call in flight always runs to its own request timeout.
    #[arg(long, env = "MMSEND_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) shutdown_grace: Duration,
    /// Name written to x-mmsend-worker and held in the send ledger (default host:pid-nonce, unique per start).
    #[arg(long, env = "MMSEND_WORKER_ID")]
    pub(crate) worker_id: Option<String>,
    /// Redis for the send ledger and fleet-wide pacing and gates (unset: per process, no ledger).
    #[arg(long, env = "MMSEND_REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
    /// While Redis is unreachable: local (per-process pacing and gates, no ledger) or hold (jobs wait).
    #[arg(
        long,
        env = "MMSEND_REDIS_FAIL_MODE",
        value_enum,
        default_value = "local"
    )]
    pub(crate) redis_fail_mode: crate::fleet::FailMode,
    /// Do not run the delivery tracker in this worker (run `mmsend tracker`, or another
    /// worker's, instead). Without Redis there is no tracker anyway.
    #[arg(long, env = "MMSEND_NO_TRACKER")]
    pub(crate) no_tracker: bool,
}

impl WorkerArgs {
    /// Validates everything and builds the worker's config.
    pub(crate) fn to_config(&self) -> anyhow::Result<WorkerConfig> {
        broker::parse_urls(&self.broker.amqp_url)?;
        let file = self.broker.file_config()?;
        // a trailing newline (a Secret made from a file) is trimmed, and said
        let clean = |secret: &Option<Secret>, var: &str| -> anyhow::Result<Option<Secret>> {
            let Some(secret) = secret else {
                return Ok(None);
            };
            let (clean, trimmed) = crate::graph::auth::clean_token(secret.expose(), var)?;
            if trimmed {
                tracing::warn!(
                    "{var} has whitespace around it (a trailing newline?); using it trimmed"
                );
            }
            Ok(Some(clean))
        };
        let mut tokens = TokenStore::new(clean(&self.access_token, "MMSEND_ACCESS_TOKEN")?);
        if let Some(path) = &self.page_tokens_file {
            tokens = tokens.load_pages(path)?;
            crate::worker::tokens::warn_trimmed(&tokens, path);
        }
        let app_secret = clean(&self.app_secret, "MMSEND_APP_SECRET")?;
        if tokens.is_empty() {
            anyhow::bail!(
                "no access token: set MMSEND_ACCESS_TOKEN (default token) and/or MMSEND_PAGE_TOKENS_FILE (per-page tokens)"
            );
        }
        // the worker checks the base URL when it builds its client, and
        // sizes the idle pool to its concurrency
        let graph = ClientConfig {
            base_url: self.graph_base_url.clone(),
            version: self.graph_version.clone(),
            connect_timeout: file.graph.connect_timeout,
            request_timeout: file.graph.request_timeout,
            app_secret,
            ..ClientConfig::default()
        };
        let mut config = WorkerConfig::new(
            &self.broker.amqp_url,
            self.broker.topology(&file)?,
            graph,
            tokens,
        );
        config.tokens_file = self.page_tokens_file.clone();
        config.table = file.code_table()?;
        let mut config = config.with_policy(file.retry.clone());
        config.pacing = file.pacing.clone();
        config.gates = file.gates.enabled;
        config.concurrency = self.concurrency;
        config.prefetch = self.prefetch;
        config.shutdown_grace = self.shutdown_grace;
        if let Some(id) = &self.worker_id {
            config.worker_id = id.clone();
        }
        config.fleet = self
            .redis_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(|url| file.fleet(url, self.redis_fail_mode));
        config.tracker = !self.no_tracker;
        Ok(config)
    }
}

/// Sets up `tracing`: `MMSEND_LOG` is the filter (default `info`, `warn`
/// for the commands that print their own output).
pub fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Worker(_)
        | Command::Simulate(_)
        | Command::Console(_)
        | Command::Webhooks(_)
        | Command::Tracker(_) => "info",
        _ => "warn",
    };
    let format = cli.log_format;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MMSEND_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(crate::report::colour(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.compact().init(),
    }
}

/// A token cancelled by the first SIGINT or SIGTERM (a graceful stop). A
/// second signal ends the process at once, exit code 130 (SIGINT) or 143
/// (SIGTERM): for an operator who cannot wait for calls in flight to end.
/// Deliveries not yet settled go back to the queue when the connection
/// drops, as after SIGKILL.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                tracing::warn!("cannot listen for SIGINT/SIGTERM; stop the worker with SIGKILL");
                return;
            };
            let first = tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
            tracing::info!(
                signal = first,
                "shutdown requested; a second SIGINT or SIGTERM stops at once"
            );
            t.cancel();
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            tracing::warn!("second signal: stopping now; jobs not settled go back to the queue");
            std::process::exit(code);
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("shutdown requested; a second Ctrl-C stops at once");
                t.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    tracing::warn!(
                        "second signal: stopping now; jobs not settled go back to the queue"
                    );
                    std::process::exit(130);
                }
            }
        }
    });
    token
}

/// `topology declare` / `topology show`: (declare, then) print the queues.
async fn topology_command(
    args: &BrokerArgs,
    declare: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let topology = args.topology(&args.file_config()?)?;
    let conn = broker::connect(&args.amqp_url, "cli").await?;
    let shown = async {
        let warnings = match declare {
            true => topology.declare(&conn).await?.warnings,
            false => Vec::new(),
        };
        let queues = topology.show(&conn).await.context("reading queue depths")?;
        Ok::<_, anyhow::Error>((warnings, queues))
    }
    .await;
    let _ = conn.close(200, "bye".into()).await;
    let (warnings, queues) = shown?;
    for w in &warnings {
        eprintln!("warning: {}", report::printable(&w.to_string()));
    }
    if json {
        report::print_json(&serde_json::json!({
            "prefix": topology.prefix,
            "queues": queues,
        }))?;
    } else {
        if declare {
            report::print(format_args!("declared topology {:?}", topology.prefix))?;
        }
        report::print(report::queues(&queues))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `mmsend enqueue`: streams `path` (`-` = stdin) through
/// [`producer::enqueue`] with a progress bar (on a terminal), then prints a
/// summary table and the first rejected lines, or with `--json` the whole
/// report. Exit 1 when any line was invalid or unconfirmed.
async fn enqueue_command(args: &EnqueueArgs) -> anyhow::Result<ExitCode> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let file = args.broker.file_config()?;
    let topology = args.broker.topology(&file)?;
    let path = args.file.as_str();
    let (reader, total): (Box<dyn tokio::io::AsyncBufRead + Unpin>, Option<u64>) = if path == "-" {
        (
            Box::new(tokio::io::BufReader::new(tokio::io::stdin())),
            None,
        )
    } else {
        let f = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("cannot open {path}"))?;
        let len = f.metadata().await.ok().map(|m| m.len());
        (
            Box::new(tokio::io::BufReader::with_capacity(1 << 16, f)),
            len,
        )
    };
    let bar = match total {
        Some(len) => ProgressBar::new(len).with_style(ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {msg}",
        )?),
        None => ProgressBar::new_spinner().with_style(ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bytes} read {msg}",
        )?),
    };
    if args.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let producer = if args.dry_run {
        None
    } else {
        let mut p = producer::Producer::connect_and_declare(&args.broker.amqp_url, &topology)
            .await?
            .with_max_inflight(args.max_inflight);
        if let Some(url) = args.redis_url.as_deref().filter(|u| !u.trim().is_empty()) {
            let config = file.fleet(url, crate::fleet::FailMode::Local);
            match crate::fleet::campaign::Campaigns::connect(&config, &args.broker.prefix).await {
                Ok(campaigns) => p = p.counting(campaigns),
                Err(e) => eprintln!(
                    "warning: {}; publishing without counting the campaigns' enqueued jobs",
                    report::printable(&e.to_string())
                ),
            }
        }
        Some(p)
    };
    let verb = if args.dry_run { "valid" } else { "published" };
    let started = std::time::Instant::now();
    let mut last_draw = std::time::Instant::now();
    let result = producer::enqueue(reader, producer.as_ref(), |bytes, done| {
        if last_draw.elapsed().as_millis() >= 100 {
            last_draw = std::time::Instant::now();
            bar.set_position(bytes);
            let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!("{done} {verb}, {rate:.0}/s"));
        }
    })
    .await;
    bar.finish_and_clear();
    if let Some(p) = producer {
        p.close().await;
    }
    let report = result.with_context(|| format!("reading {path}"))?;
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["dry_run"] = args.dry_run.into();
        report::print_json(&value)?;
    } else {
        report::print(report::enqueue_summary(&report, args.dry_run))?;
        report::enqueue_errors(&report, 20)?;
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `mmsend healthcheck`: one line on stdout when healthy, the reason on
/// stderr and exit 1 when not.
async fn healthcheck_command(args: &HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let endpoint = if args.live {
        health::Endpoint::Live
    } else {
        health::Endpoint::Ready
    };
    match health::check(&args.metrics_addr, endpoint, args.timeout).await {
        Ok(h) => {
            report::print(format_args!("ok: {} answered {}", h.url, h.status))?;
            Ok(ExitCode::SUCCESS)
        }
        // A bad address is a usage error (2), not an unhealthy worker.
        Err(e @ health::HealthError::Address { .. }) => Err(e.into()),
        Err(e) => {
            report::eprint(format_args!("unhealthy: {e}"))?;
            Ok(ExitCode::from(1))
        }
    }
}

/// The async runtime a command runs on. The worker runs on
/// `--threads` threads: with one (the default) every job task, the consume
/// loop and the HTTP client share the main thread, which saves the
/// cross-thread wake-ups a multi-threaded scheduler pays per job (about 15 %
/// of the worker's CPU per job, see docs/src/performance-history.md); the
/// simulator serves on `--threads` threads too (one by default);
/// every other command gets one thread per core.
pub fn runtime(cli: &Cli) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match &cli.command {
        Command::Worker(args) => args.threads,
        Command::Simulate(args) => args.threads,
        _ => 0,
    };
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Worker(args) => {
            let config = args.to_config()?;
            let metrics = Metrics::new();
            let shutdown = shutdown_on_signals();
            let addr =
                metrics::serve(&args.metrics_addr, metrics.clone(), shutdown.clone()).await?;
            tracing::info!(%addr, worker = %config.worker_id, "metrics on http://{addr}/metrics");
            worker::run(config, metrics, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { command } => match command {
            TopologyCommand::Definitions(args) => {
                let topology = args.topology(&args.file_config()?)?;
                report::print_json(&topology.definitions("/"))?;
                Ok(ExitCode::SUCCESS)
            }
            TopologyCommand::Declare(args) => topology_command(&args, true, false).await,
            TopologyCommand::Show(args) => topology_command(&args.broker, false, args.json).await,
        },
        Command::Enqueue(args) => enqueue_command(&args).await,
        Command::Healthcheck(args) => healthcheck_command(&args).await,
        Command::Dlq { command } => crate::cli::dlq::run(command).await,
        Command::Campaign { command } => crate::cli::campaign::run(command).await,
        Command::Pages { command } => pages::run(command).await,
        Command::Demo(args) => {
            let report = crate::demo::run(crate::demo::DemoOptions {
                amqp_url: args.amqp_url.clone(),
                jobs: args.jobs,
                concurrency: args.concurrency,
                keep: args.keep,
                redis_url: Some(args.redis_url.clone()).filter(|u| !u.trim().is_empty()),
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                timeout: Duration::from_secs(110),
            })
            .await?;
            Ok(if report.balanced() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Simulate(args) => {
            simulator::serve(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Console(args) => {
            let config = args.to_config()?;
            let prefix = config.topology.prefix.clone();
            crate::console::serve(config, shutdown_on_signals(), |addr| {
                let _ = report::print(format_args!(
                    "dead-letter console of {prefix:?} on http://{addr}/ (Ctrl-C stops it)"
                ));
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tracker(args) => {
            let file = args.broker.file_config()?;
            broker::parse_urls(&args.broker.amqp_url)?;
            let topology = args.broker.topology(&file)?;
            let Some(url) = args.redis_url.as_deref().filter(|u| !u.trim().is_empty()) else {
                anyhow::bail!("MMSEND_REDIS_URL is not set: the tracker joins events to jobs through the send ledger in Redis; set it to the workers' Redis")
            };
            let metrics = Metrics::new();
            let shutdown = shutdown_on_signals();
            let fleet = std::sync::Arc::new(crate::fleet::Fleet::new(
                file.fleet(url, crate::fleet::FailMode::Hold),
                &topology.prefix,
                &format!("tracker-{}", worker::default_worker_id()),
                metrics.clone(),
            )?);
            let addr =
                metrics::serve(&args.metrics_addr, metrics.clone(), shutdown.clone()).await?;
            metrics.set_ready(true);
            let queue = topology.webhook_queue();
            let _ = report::print(format_args!(
                "delivery tracker on {queue:?}, metrics on http://{addr}/metrics (Ctrl-C stops it)"
            ));
            crate::tracker::run(
                crate::tracker::TrackerConfig {
                    amqp_url: args.broker.amqp_url.clone(),
                    topology,
                },
                fleet,
                metrics,
                shutdown,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Webhooks(args) => {
            let config = args.to_config()?;
            let queue = config.topology.webhook_queue();
            crate::webhooks::serve(
                config,
                crate::metrics::Metrics::new(),
                shutdown_on_signals(),
                |addr| {
                    let _ = report::print(format_args!(
                        "webhook receiver on http://{addr}/webhooks, storing into {queue:?} (Ctrl-C stops it)"
                    ));
                },
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

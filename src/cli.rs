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
use crate::config::FileConfig;
use crate::graph::{ClientConfig, Secret, TokenStore};
use crate::metrics::{self, Metrics};
use crate::simulator;
use crate::worker::{self, WorkerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "mmsend",
    version,
    about = "Send Meta Marketing Messages for Messenger from RabbitMQ, without losing a send",
    long_about = None
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "MMSEND_LOG_FORMAT",
        default_value = "pretty"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "MMSEND_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// Sample jobs to send.
    #[arg(long, default_value_t = 3000)]
    pub jobs: usize,
    /// Worker concurrency.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Keep the demo queues (to try the dlq commands on them).
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Clone, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// JSONL file of jobs, or - for standard input.
    #[arg(default_value = "-")]
    pub file: String,
    /// Validate only; publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Publisher confirms kept outstanding.
    #[arg(long, env = "MMSEND_MAX_INFLIGHT", default_value_t = crate::producer::DEFAULT_MAX_INFLIGHT)]
    pub max_inflight: usize,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count dead letters by reason, class, code, campaign and page.
    Stats {
        #[command(flatten)]
        select: DlqSelect,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// One line per dead letter.
    List {
        #[command(flatten)]
        select: DlqSelect,
    },
    /// The selected dead letters as JSONL (job + headers); `mmsend enqueue` reads it back.
    Export {
        #[command(flatten)]
        select: DlqSelect,
        /// Write here instead of standard output.
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
    },
    /// Delete the selected dead letters (needs --yes).
    Purge {
        #[command(flatten)]
        select: DlqSelect,
        /// Really delete.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead letters a `dlq` command acts on.
#[derive(Debug, Clone, Args)]
pub struct DlqSelect {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Dead reason: terminal, retries_exhausted, expired, invalid_job, delivery_limit, no_token.
    #[arg(long)]
    pub reason: Option<String>,
    /// Class of the last failure, e.g. region, mismatch, budget.
    #[arg(long)]
    pub class: Option<String>,
    /// Graph error code or subcode, e.g. 2300005.
    #[arg(long)]
    pub code: Option<i64>,
    /// Campaign label of the job.
    #[arg(long)]
    pub campaign: Option<String>,
    /// Page id of the job.
    #[arg(long)]
    pub page: Option<String>,
    /// One job.
    #[arg(long)]
    pub job_id: Option<String>,
    /// Dead within this long (1h, 2d) or since this RFC 3339 instant.
    #[arg(long)]
    pub since: Option<String>,
    /// Act on at most this many.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl DlqSelect {
    pub fn filter(&self) -> anyhow::Result<crate::dlq::Filter> {
        if let Some(r) = &self.reason {
            r.parse::<crate::classify::DeadReason>()
                .map_err(|e| anyhow::anyhow!("--reason: {e}"))?;
        }
        if let Some(c) = &self.class {
            c.parse::<crate::classify::Class>()
                .map_err(|e| anyhow::anyhow!("--class: {e}"))?;
        }
        let since = match &self.since {
            None => None,
            Some(s) => Some(match humantime::parse_duration(s) {
                Ok(d) => chrono::Utc::now() - chrono::Duration::from_std(d)?,
                Err(_) => chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "--since {s:?}: give a duration (30m, 2h, 1d) or an RFC 3339 time (2026-11-24T10:00:00Z)"
                        )
                    })?
                    .with_timezone(&chrono::Utc),
            }),
        };
        Ok(crate::dlq::Filter {
            reason: self.reason.clone(),
            class: self.class.clone(),
            code: self.code,
            campaign: self.campaign.clone(),
            page: self.page.clone(),
            job_id: self.job_id.clone(),
            since,
            limit: self.limit,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Declare the exchange, work queue, delay tiers and dead-letter queue (idempotent).
    Declare(BrokerArgs),
    /// Show every queue with its depth and consumers.
    Show(BrokerArgs),
    /// Print the topology as RabbitMQ definitions JSON (for `rabbitmqctl import_definitions`).
    Definitions(BrokerArgs),
}

/// Where the broker is and which topology to use.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL, or a comma-separated list of cluster nodes tried in order.
    #[arg(long, env = "MMSEND_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// Name prefix of the exchange and queues.
    #[arg(long, env = "MMSEND_PREFIX", default_value = "mmsend")]
    pub prefix: String,
    /// TOML file: classification overrides, retry schedule, tiers, pacing.
    #[arg(long, env = "MMSEND_CONFIG")]
    pub config: Option<PathBuf>,
}

impl BrokerArgs {
    pub fn file_config(&self) -> anyhow::Result<FileConfig> {
        Ok(FileConfig::load(self.config.as_deref())?)
    }

    pub fn topology(&self, file: &FileConfig) -> anyhow::Result<broker::Topology> {
        file.topology(&self.prefix)
            .map_err(|e| anyhow::anyhow!("--prefix / config: {e}"))
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Graph API base URL.
    #[arg(
        long,
        env = "MMSEND_GRAPH_BASE_URL",
        default_value = "https://graph.facebook.com"
    )]
    pub graph_base_url: String,
    /// Graph API version.
    #[arg(long, env = "MMSEND_GRAPH_VERSION", default_value = "v24.0")]
    pub graph_version: String,
    /// Default Page (or system-user) access token. Prefer the environment variable.
    #[arg(long, env = "MMSEND_ACCESS_TOKEN", hide_env_values = true)]
    pub access_token: Option<Secret>,
    /// JSON file {"<page_id>": "<token>", …} of per-page tokens.
    #[arg(long, env = "MMSEND_PAGE_TOKENS_FILE")]
    pub page_tokens_file: Option<PathBuf>,
    /// App secret; when set, every call carries appsecret_proof.
    #[arg(long, env = "MMSEND_APP_SECRET", hide_env_values = true)]
    pub app_secret: Option<Secret>,
    /// Jobs processed at once.
    #[arg(long, env = "MMSEND_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Deliveries held unacked (at least the concurrency); 0 = concurrency + a quarter (at least 8).
    #[arg(long, env = "MMSEND_PREFETCH", default_value_t = 0)]
    pub prefetch: u16,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, env = "MMSEND_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: String,
    /// How long in-flight jobs may take to finish on SIGTERM.
    #[arg(long, env = "MMSEND_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Name written to x-mmsend-worker (default host:pid).
    #[arg(long, env = "MMSEND_WORKER_ID")]
    pub worker_id: Option<String>,
}

impl WorkerArgs {
    /// Validates everything and builds the worker's config.
    pub fn to_config(&self) -> anyhow::Result<WorkerConfig> {
        let file = self.broker.file_config()?;
        let mut tokens = TokenStore::new(self.access_token.clone());
        if let Some(path) = &self.page_tokens_file {
            tokens = tokens.load_pages(path)?;
        }
        if tokens.is_empty() {
            anyhow::bail!(
                "no access token: set MMSEND_ACCESS_TOKEN (default token) and/or MMSEND_PAGE_TOKENS_FILE (per-page tokens)"
            );
        }
        let base = self.graph_base_url.trim_end_matches('/');
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            anyhow::bail!("MMSEND_GRAPH_BASE_URL {base:?} must start with https:// (or http:// for the simulator)");
        }
        let graph = ClientConfig {
            base_url: base.to_string(),
            version: self.graph_version.clone(),
            connect_timeout: file.graph.connect_timeout,
            request_timeout: file.graph.request_timeout,
            pool_max_idle_per_host: usize::from(self.concurrency),
            app_secret: self.app_secret.clone(),
        };
        let mut config = WorkerConfig::new(
            &self.broker.amqp_url,
            self.broker.topology(&file)?,
            graph,
            tokens,
        );
        config.table = file.code_table().map_err(anyhow::Error::msg)?;
        let mut config = config.with_policy(file.retry.clone());
        config.pacing = file.pacing.clone();
        config.gates = file.gates.enabled;
        config.concurrency = self.concurrency;
        config.prefetch = self.prefetch;
        config.shutdown_grace = self.shutdown_grace;
        if let Some(id) = &self.worker_id {
            config.worker_id = id.clone();
        }
        Ok(config)
    }
}

/// Sets up `tracing`: `MMSEND_LOG` is the filter (default `info`, `warn`
/// for the commands that print their own output).
pub fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Worker(_) | Command::Simulate(_) => "info",
        _ => "warn",
    };
    let format = cli.log_format;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MMSEND_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.compact().init(),
    }
}

/// A token cancelled by the first SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// `topology declare` / `topology show`: (declare, then) print the queues.
async fn topology_command(args: &BrokerArgs, declare: bool) -> anyhow::Result<ExitCode> {
    let topology = args.topology(&args.file_config()?)?;
    let conn = broker::connect(&args.amqp_url, "cli").await?;
    if declare {
        topology.declare(&conn).await?;
        println!("declared topology {:?}", topology.prefix);
    }
    let queues = topology.show(&conn).await.context("reading queue depths")?;
    println!("{}", crate::report::queues(&queues));
    let _ = conn.close(200, "bye".into()).await;
    Ok(ExitCode::SUCCESS)
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
                println!(
                    "{}",
                    serde_json::to_string_pretty(&topology.definitions("/"))?
                );
                Ok(ExitCode::SUCCESS)
            }
            TopologyCommand::Declare(args) => topology_command(&args, true).await,
            TopologyCommand::Show(args) => topology_command(&args, false).await,
        },
        Command::Enqueue(args) => {
            let file = args.broker.file_config()?;
            let topology = args.broker.topology(&file)?;
            let report = crate::producer::enqueue_command(
                &args.broker.amqp_url,
                &topology,
                &args.file,
                args.dry_run,
                args.max_inflight,
            )
            .await?;
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Dlq { command } => {
            let (select, op) = match command {
                DlqCommand::Stats { select, json } => (select, crate::dlq::Op::Stats { json }),
                DlqCommand::List { select } => (select, crate::dlq::Op::List),
                DlqCommand::Export { select, output } => {
                    (select, crate::dlq::Op::Export { output })
                }
                DlqCommand::Replay {
                    select,
                    dry_run,
                    rate,
                } => (select, crate::dlq::Op::Replay { dry_run, rate }),
                DlqCommand::Purge { select, yes } => (select, crate::dlq::Op::Purge { yes }),
            };
            let filter = select.filter()?;
            let file = select.broker.file_config()?;
            let topology = select.broker.topology(&file)?;
            let conn = broker::connect(&select.broker.amqp_url, "dlq").await?;
            let result = crate::dlq::command(&conn, &topology, &filter, op).await;
            let _ = conn.close(200, "bye".into()).await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            let report = crate::demo::run(crate::demo::DemoOptions {
                amqp_url: args.amqp_url.clone(),
                jobs: args.jobs,
                concurrency: args.concurrency,
                keep: args.keep,
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
    }
}

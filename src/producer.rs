//! Putting jobs on the queue: the library [`Producer`] and [`enqueue`], the
//! engine of `mmsend enqueue`.
//!
//! A job is validated ([`Job::parse`]) before it is published; an invalid
//! job is never sent. Each publish goes to the exchange with routing key
//! `<prefix>.send`, persistent, `mandatory`, with publisher confirms, and
//! carries `message_id` = `job_id`, `content_type: application/json`, the
//! AMQP `timestamp` and `x-mmsend-enqueued-at`. The body is the producer's
//! own JSON, unchanged (unknown fields included).
//!
//! The job id becomes the AMQP `message_id`, a short string of at most 255
//! bytes: validation refuses a longer id ([`crate::job::MAX_JOB_ID_BYTES`]),
//! so every job that passes can be published, and a bad line never stops
//! the lines after it. [`EnqueueReport`] accounts for every non-blank line:
//! `published + invalid + failed = lines`.
//!
//! A line of `mmsend dlq export` (`{"job": {…}, "headers": {…}}`) is
//! enqueued as `dlq replay` would send its letter back
//! ([`Exported`]): attempts reset, `x-mmsend-replays` + 1, the last error
//! kept, so a job whose last failure may have been a send
//! (`x-mmsend-ambiguous`) stays "maybe sent" and the worker treats a
//! 2300035 answer to it as a send, not a reason to retry.
//!
//! [`Producer::send_batch`] and [`enqueue`] keep up to `max_inflight`
//! confirms outstanding through one [`ConfirmWindow`], which is what makes
//! bulk enqueueing fast, and still report a result per job. [`enqueue`]
//! streams JSONL and returns an [`EnqueueReport`]; it prints nothing: the
//! progress bar, the summary table and `--json` are the CLI's
//! (`cli::enqueue_command`, `report::enqueue_summary`).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use mmsend::broker::Topology;
//! use mmsend::producer::Producer;
//!
//! let topology = Topology::with_prefix("mmsend").map_err(anyhow::Error::msg)?;
//! let producer = Producer::connect("amqp://guest:guest@127.0.0.1:5672/%2f", &topology).await?;
//! let job = br#"{"v":1,"job_id":"cmp42-000017","ad_account_id":"1234567890",
//!   "page_id":"9876543210","message_id":"120210000000000000",
//!   "subscription_token":"<recipient>","message":{"text":"Hi"}}"#;
//! producer.send(job).await?;
//! # Ok(()) }
//! ```

use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection};

use crate::broker::headers::ENQUEUED_AT;
use crate::broker::publish::{ConfirmWindow, Pending};
use crate::broker::{self, PublishError, Publisher, Topology, TopologyError};
use crate::dlq::letter::Exported;
use crate::fleet::campaign::{Campaigns, Tally};
use crate::job::{self, Job, JobError};

/// Confirms kept outstanding by [`Producer::send_batch`] by default.
pub const DEFAULT_MAX_INFLIGHT: usize = 256;

/// Why a job was not enqueued.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The job failed validation; nothing was published.
    #[error("invalid job: {0}")]
    Invalid(#[from] JobError),
    /// The broker did not confirm the publish.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// No broker could be reached.
    #[error(transparent)]
    Connect(#[from] broker::ConnectError),
    /// The confirm-mode channel could not be opened.
    #[error("cannot open a publishing channel: {0}")]
    Channel(lapin::Error),
    /// Declaring the topology failed (e.g. a queue with other arguments).
    #[error("cannot declare the topology: {0}")]
    Declare(#[from] TopologyError),
}

/// Publishes validated jobs with confirms.
pub struct Producer {
    conn: Option<Connection>,
    publisher: Publisher,
    routing_key: String,
    max_inflight: usize,
    counts: Option<Enqueued>,
}

/// The `enqueued` counters of campaigns ([`Producer::counting`]): counted
/// on each confirm, written to Redis at most once a second and on
/// [`Producer::close`].
struct Enqueued {
    campaigns: Campaigns,
    tally: Tally,
    last: std::sync::Mutex<Instant>,
    warned: std::sync::atomic::AtomicBool,
}

/// How often a producer writes its `enqueued` counts at most.
const COUNT_EVERY: Duration = Duration::from_secs(1);

impl Producer {
    /// Connects and opens a confirm-mode channel. The topology must exist
    /// (`mmsend topology declare`, or any worker, declares it).
    pub async fn connect(amqp_url: &str, topology: &Topology) -> Result<Producer, ProducerError> {
        let conn = broker::connect(amqp_url, "producer").await?;
        let mut p = Producer::on(&conn, topology).await?;
        p.conn = Some(conn);
        Ok(p)
    }

    /// Connects, declares the topology (idempotent, so a first run on a
    /// fresh broker works) and opens a confirm-mode channel.
    pub async fn connect_and_declare(
        amqp_url: &str,
        topology: &Topology,
    ) -> Result<Producer, ProducerError> {
        let conn = broker::connect(amqp_url, "enqueue").await?;
        topology.declare(&conn).await?;
        let mut p = Producer::on(&conn, topology).await?;
        p.conn = Some(conn);
        Ok(p)
    }

    /// A producer on an existing connection.
    pub async fn on(conn: &Connection, topology: &Topology) -> Result<Producer, ProducerError> {
        let publisher = Publisher::open(conn, topology.exchange())
            .await
            .map_err(ProducerError::Channel)?;
        Ok(Producer {
            conn: None,
            publisher,
            routing_key: topology.send_queue(),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            counts: None,
        })
    }

    /// Counts every confirmed job in its campaign's `enqueued` counter on
    /// Redis (`mmsend campaign show`: progress and ETA). A Redis failure
    /// never fails a publish: it is logged once, and the counts are kept
    /// for the next write.
    pub fn counting(mut self, campaigns: Campaigns) -> Self {
        self.counts = Some(Enqueued {
            campaigns,
            tally: Tally::default(),
            last: std::sync::Mutex::new(Instant::now()),
            warned: std::sync::atomic::AtomicBool::new(false),
        });
        self
    }

    /// One confirmed job of `campaign`.
    async fn counted(&self, campaign: &str) {
        let Some(c) = &self.counts else { return };
        c.tally.add(campaign, "enqueued", 1);
        let due = {
            let mut last = c.last.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.elapsed() >= COUNT_EVERY;
            if due {
                *last = Instant::now();
            }
            due
        };
        if due {
            self.write_counts().await;
        }
    }

    async fn write_counts(&self) {
        let Some(c) = &self.counts else { return };
        if let Err(e) = c.tally.flush(&c.campaigns).await {
            if !c.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, "campaign `enqueued` counts not written to Redis (kept for the next try); publishing goes on");
            }
        }
    }

    /// Sets how many confirms `send_batch` keeps outstanding (≥ 1).
    pub fn with_max_inflight(mut self, n: usize) -> Self {
        self.max_inflight = n.max(1);
        self
    }

    /// Validates, publishes, waits for the confirm.
    pub async fn send(&self, body: &[u8]) -> Result<Job, ProducerError> {
        let (job, pending) = self.start(body).await?;
        pending.wait().await?;
        self.counted(job.campaign_name()).await;
        Ok(job)
    }

    /// Validates and publishes without waiting for the confirm.
    async fn start(&self, body: &[u8]) -> Result<(Job, Pending), ProducerError> {
        self.start_with(body, None).await
    }

    /// [`Producer::start`]; the job of an export line goes with its
    /// letter's story, as a replay.
    async fn start_with(
        &self,
        body: &[u8],
        exported: Option<&Exported>,
    ) -> Result<(Job, Pending), ProducerError> {
        let job = Job::parse(body)?;
        let now = Utc::now();
        job.check_not_after(now)?;
        let mut props = properties(&job.job_id);
        if let Some(e) = exported {
            props = e.replay_properties(&props, now);
        }
        let pending = self.publisher.send(&self.routing_key, body, props).await?;
        Ok((job, pending))
    }

    /// Sends many jobs with up to `max_inflight` confirms outstanding;
    /// one result per job, in order.
    pub async fn send_batch<'a>(
        &self,
        bodies: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<Result<Job, ProducerError>> {
        let mut results: Vec<Option<Result<Job, ProducerError>>> = Vec::new();
        let mut window = ConfirmWindow::new(self.max_inflight);
        let settle =
            |results: &mut Vec<Option<Result<Job, ProducerError>>>,
             ((i, job), verdict): ((usize, Job), Result<(), PublishError>)| {
                results[i] = Some(verdict.map(|_| job).map_err(Into::into));
            };
        for body in bodies {
            let i = results.len();
            results.push(None);
            match self.start(body).await {
                Ok((job, pending)) => {
                    if let Some(done) = window.push((i, job), pending).await {
                        settle(&mut results, done);
                    }
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while let Some(done) = window.next().await {
            settle(&mut results, done);
        }
        let results: Vec<_> = results
            .into_iter()
            .map(|r| r.expect("every slot is filled"))
            .collect();
        for job in results.iter().flatten() {
            self.counted(job.campaign_name()).await;
        }
        results
    }

    /// Closes the connection if this producer opened it (after writing the
    /// last `enqueued` counts).
    pub async fn close(self) {
        self.write_counts().await;
        let _ = self.publisher.channel().close(200, "done".into()).await;
        if let Some(conn) = self.conn {
            let _ = conn.close(200, "done".into()).await;
        }
    }
}

/// The AMQP properties of a new job (`message_id` = the job id; a valid
/// job's id always fits, see [`job::amqp_message_id`]).
pub fn properties(job_id: &str) -> BasicProperties {
    let now = Utc::now();
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(ENQUEUED_AT),
        AMQPValue::LongString(LongString::from(
            now.to_rfc3339_opts(SecondsFormat::Millis, true),
        )),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(job::amqp_message_id(job_id).into())
        .with_app_id("mmsend".into())
        .with_timestamp(now.timestamp().max(0) as u64)
        .with_headers(headers)
}

/// One rejected line of an `enqueue` input.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LineError {
    /// Line number in the input, from 1 (blank lines count).
    pub line: usize,
    /// The job's id when it was valid (an unconfirmed publish); `None` for
    /// a line that failed validation.
    pub job_id: Option<String>,
    /// What went wrong, as a person reads it.
    pub error: String,
}

/// What `enqueue` did (`mmsend enqueue --json` prints it). Every
/// non-blank line is counted once: `published + invalid + failed = lines`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EnqueueReport {
    /// Non-blank lines read.
    pub lines: usize,
    /// Jobs confirmed by the broker (with no producer, a dry run: jobs
    /// that passed validation).
    pub published: usize,
    /// Lines that failed validation (never published).
    pub invalid: Vec<LineError>,
    /// Valid lines the broker did not confirm.
    pub failed: Vec<LineError>,
    /// Wall time of the whole input.
    pub seconds: f64,
}

impl EnqueueReport {
    /// Every line valid and confirmed (the command's exit status 0).
    pub fn ok(&self) -> bool {
        self.invalid.is_empty() && self.failed.is_empty()
    }
}

/// Streams JSONL from `input` (blank lines skipped), validating each line;
/// publishes the valid ones through `producer` (or only validates when it
/// is `None`). Calls `progress(bytes_read, published)` as it goes.
pub async fn enqueue<R: tokio::io::AsyncBufRead + Unpin>(
    mut input: R,
    producer: Option<&Producer>,
    mut progress: impl FnMut(u64, usize),
) -> std::io::Result<EnqueueReport> {
    use tokio::io::AsyncBufReadExt;
    let started = Instant::now();
    let mut report = EnqueueReport::default();
    let mut window = ConfirmWindow::new(producer.map_or(1, |p| p.max_inflight));
    let mut line = Vec::new();
    let mut bytes = 0u64;
    let mut line_no = 0usize;
    loop {
        line.clear();
        let n = input.read_until(b'\n', &mut line).await?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        line_no += 1;
        let body = line.trim_ascii();
        if body.is_empty() {
            continue;
        }
        let exported = Exported::parse(body);
        let body = exported.as_ref().map_or(body, |e| e.job.as_slice());
        report.lines += 1;
        let error_at = |error: String, job_id: Option<String>| LineError {
            line: line_no,
            job_id,
            error,
        };
        let Some(p) = producer else {
            match Job::parse(body).and_then(|j| j.check_not_after(Utc::now()).map(|_| j)) {
                Ok(_) => report.published += 1,
                Err(e) => report.invalid.push(error_at(e.to_string(), None)),
            }
            progress(bytes, report.published);
            continue;
        };
        match p.start_with(body, exported.as_ref()).await {
            Ok((job, pending)) => {
                let campaign = job.campaign_name().to_string();
                if let Some(done) = window.push((line_no, job.job_id, campaign), pending).await {
                    if let Some(c) = settle(&mut report, done) {
                        p.counted(&c).await;
                    }
                }
            }
            Err(ProducerError::Invalid(e)) => report.invalid.push(error_at(e.to_string(), None)),
            Err(e) => report.failed.push(error_at(e.to_string(), None)),
        }
        progress(bytes, report.published);
    }
    while let Some(done) = window.next().await {
        if let (Some(c), Some(p)) = (settle(&mut report, done), producer) {
            p.counted(&c).await;
        }
    }
    progress(bytes, report.published);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Counts one confirm verdict of `enqueue`; the campaign of a confirmed
/// job.
fn settle(
    report: &mut EnqueueReport,
    ((line, job_id, campaign), verdict): ((usize, String, String), Result<(), PublishError>),
) -> Option<String> {
    match verdict {
        Ok(()) => {
            report.published += 1;
            Some(campaign)
        }
        Err(e) => {
            report.failed.push(LineError {
                line,
                job_id: Some(job_id),
                error: e.to_string(),
            });
            None
        }
    }
}

//! `mmsend dlq …`: one scan of the dead-letter library ([`crate::dlq`]),
//! printed for people (tables, a progress bar on a terminal) or for machines
//! (`--json`: one JSON object; `export`: JSONL).
//!
//! Exit codes: 0 ok; 1 partly failed (a replay copy not confirmed, a run
//! interrupted by Ctrl-C); 2 usage or fatal (returned as an error). A reader
//! that goes away (`mmsend dlq list | head`) ends the run quietly: the scan
//! stops and returns every letter to the queue.

use std::io::{self, Write};
use std::process::ExitCode;

use lapin::Connection;
use serde::Serialize;

use super::{shutdown_on_signals, DlqCommand};
use crate::broker::{self, Topology};
use crate::dlq::{
    self, Action, DeadLetter, Flow, LetterSummary, Observer, Progress, ScanOptions, ScanReport,
    Stats, StatsBuilder, Stop,
};
use crate::fleet::campaign::{cli_user, Campaigns};
use crate::report::{self, ScanBar};

/// Rows of a letters table printed at once; more are printed in further
/// tables, so a long list never sits in memory.
const TABLE_ROWS: usize = 10_000;

/// Runs one `mmsend dlq` command.
pub(crate) async fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    let select = match &command {
        DlqCommand::Stats { select, .. }
        | DlqCommand::List { select, .. }
        | DlqCommand::Export { select, .. }
        | DlqCommand::Replay { select, .. }
        | DlqCommand::Purge { select, .. } => select.clone(),
    };
    let filter = select.filter()?;
    let topology = select.broker.topology(&select.broker.file_config()?)?;
    let conn = broker::connect(&select.broker.amqp_url, "dlq").await?;
    let max_held = (select.max_held > 0).then_some(select.max_held);
    let audit = match select.redis_url.as_deref().filter(|u| !u.trim().is_empty()) {
        Some(url)
            if matches!(
                command,
                DlqCommand::Replay { dry_run: false, .. } | DlqCommand::Purge { yes: true, .. }
            ) =>
        {
            let config = select
                .broker
                .file_config()?
                .fleet(url, crate::fleet::FailMode::Local);
            match Campaigns::connect(&config, &select.broker.prefix).await {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!(
                        "warning: {}; this run is not recorded in the audit trail",
                        report::printable(&e.to_string())
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let what = filter.describe();
    let campaign = filter.campaign.clone();
    let mut moved = None;
    let result = run_on(&conn, &topology, filter, max_held, command, &mut moved).await;
    if let (Some(audit), Some((action, count))) = (&audit, moved) {
        let recorded = audit
            .audit(
                &cli_user(),
                action,
                campaign.as_deref(),
                &what,
                Some(count as u64),
            )
            .await;
        if let Err(e) = recorded {
            eprintln!(
                "warning: not recorded in the audit trail: {}",
                report::printable(&e.to_string())
            );
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    result
}

async fn run_on(
    conn: &Connection,
    topology: &Topology,
    filter: dlq::Filter,
    max_held: Option<usize>,
    command: DlqCommand,
    moved: &mut Option<(&'static str, usize)>,
) -> anyhow::Result<ExitCode> {
    let warnings: Vec<String> = match topology.check_dead_queue(conn).await? {
        Some(w) => {
            eprintln!("warning: {}", report::printable(&w.to_string()));
            vec![w.to_string()]
        }
        None => Vec::new(),
    };
    let cancel = shutdown_on_signals();
    let options = |action| ScanOptions {
        max_held,
        ..ScanOptions::new(action).with_cancel(cancel.clone())
    };
    let bar = ScanBar::new(std::io::IsTerminal::is_terminal(&io::stderr()));
    let limit = filter.limit;
    match command {
        DlqCommand::Stats { json, .. } => {
            let mut builder = StatsBuilder::default();
            let mut obs = Watch::new(&bar, "selected", |d: &DeadLetter| {
                builder.add(d);
                Flow::Continue
            });
            let report =
                dlq::scan(conn, topology, filter, &options(Action::Peek), &mut obs).await?;
            let stats = builder.build();
            if json {
                print_json(&StatsDoc {
                    stats: &stats,
                    scan: &report,
                    counted_all: report.counted_all(),
                    warnings,
                })?;
            } else {
                print_stats(&stats, &report)?;
            }
            note_stop(&report);
            Ok(exit(&report))
        }
        // the letters a list, a dry-run replay or an unconfirmed purge shows
        DlqCommand::List { json: true, .. }
        | DlqCommand::Replay {
            dry_run: true,
            json: true,
            ..
        }
        | DlqCommand::Purge {
            yes: false,
            json: true,
            ..
        } => {
            let mut out = JsonLetters::start();
            let mut obs = Watch::new(&bar, "selected", |d: &DeadLetter| out.letter(&d.summary()));
            let report =
                dlq::scan(conn, topology, filter, &options(Action::Peek), &mut obs).await?;
            out.finish(&report, warnings)?;
            Ok(exit(&report))
        }
        DlqCommand::List { json: false, .. }
        | DlqCommand::Replay {
            dry_run: true,
            json: false,
            ..
        }
        | DlqCommand::Purge {
            yes: false,
            json: false,
            ..
        } => {
            let mut rows = Rows::default();
            let mut obs = Watch::new(&bar, "selected", |d: &DeadLetter| rows.push(d.summary()));
            let report =
                dlq::scan(conn, topology, filter, &options(Action::Peek), &mut obs).await?;
            rows.flush();
            let what = match command {
                DlqCommand::Replay { .. } => "would be replayed (dry run; nothing moved)",
                DlqCommand::Purge { .. } => "would be purged; add --yes to delete them",
                _ => "selected",
            };
            out(&selected_line(&report, what, limit))?;
            note_stop(&report);
            Ok(exit(&report))
        }
        DlqCommand::Export { output, .. } => {
            // `-o -` is standard output, as for `enqueue -`
            let output = output.filter(|p| p.as_os_str() != "-");
            let mut sink: Box<dyn Write> = match &output {
                Some(path) => Box::new(io::BufWriter::new(
                    std::fs::File::create(path)
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
                )),
                None => Box::new(io::BufWriter::new(io::stdout().lock())),
            };
            let mut error: Option<io::Error> = None;
            let mut obs = Watch::new(&bar, "exported", |d: &DeadLetter| {
                match writeln!(sink, "{}", d.to_export()) {
                    Ok(()) => Flow::Continue,
                    Err(e) => {
                        error = Some(e);
                        Flow::Stop
                    }
                }
            });
            let report =
                dlq::scan(conn, topology, filter, &options(Action::Peek), &mut obs).await?;
            let flushed = sink.flush();
            match error.or(flushed.err()) {
                Some(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
                Some(e) => anyhow::bail!("writing the export failed: {e}"),
                None => {}
            }
            eprintln!("{}", selected_line(&report, "exported", limit));
            Ok(exit(&report))
        }
        DlqCommand::Replay {
            dry_run: false,
            rate,
            json,
            ..
        } => {
            let mut obs = Watch::new(&bar, "replayed", |_: &DeadLetter| Flow::Continue);
            let report = dlq::scan(
                conn,
                topology,
                filter,
                &options(Action::Replay { rate }),
                &mut obs,
            )
            .await?;
            *moved = Some(("replay", report.replayed));
            if json {
                print_json(&ActionDoc {
                    scan: &report,
                    to: Some(topology.send_queue()),
                    counted_all: report.counted_all(),
                    warnings,
                })?;
            } else {
                let mut line = format!(
                    "replayed {} of {} dead letters to {}",
                    report.replayed,
                    report.depth_at_start,
                    topology.send_queue()
                );
                if report.failed > 0 {
                    line += &format!("; {} were not confirmed and stay in the DLQ", report.failed);
                }
                out(&line)?;
                note_stop(&report);
            }
            Ok(exit(&report))
        }
        DlqCommand::Purge {
            yes: true, json, ..
        } => {
            let mut rows = Rows::default();
            let mut obs = Watch::new(&bar, "purged", |d: &DeadLetter| {
                if !json {
                    rows.push(d.summary());
                }
                Flow::Continue
            });
            let report =
                dlq::scan(conn, topology, filter, &options(Action::Purge), &mut obs).await?;
            *moved = Some(("purge", report.purged));
            if json {
                print_json(&ActionDoc {
                    scan: &report,
                    to: None,
                    counted_all: report.counted_all(),
                    warnings,
                })?;
            } else {
                rows.flush();
                out(&format!(
                    "purged {} of {} dead letters",
                    report.purged, report.depth_at_start
                ))?;
                note_stop(&report);
            }
            Ok(exit(&report))
        }
    }
}

fn print_stats(stats: &Stats, report: &ScanReport) -> anyhow::Result<()> {
    out(&report::dlq_stats_summary(stats, report))
}

/// 0, or 1 when the run only partly did its job (a queue that ran dry
/// early included: something else had letters the run never saw).
fn exit(report: &ScanReport) -> ExitCode {
    if report.failed > 0
        || matches!(
            report.stop,
            Stop::Interrupted | Stop::HoldLimit | Stop::QueueEmpty
        )
    {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn note_stop(report: &ScanReport) {
    match report.stop {
        Stop::Interrupted => eprintln!(
            "interrupted after {} of {} letters; everything not moved is still in {}",
            report.read, report.depth_at_start, report.queue
        ),
        Stop::HoldLimit | Stop::QueueEmpty => eprintln!(
            "{} after {} of {} letters; run it again for the rest",
            report::stop_text(report.stop),
            report.read,
            report.depth_at_start
        ),
        _ => {}
    }
}

/// "5 of 100 dead letters selected", or, when the scan stopped early, what
/// was and was not counted.
fn selected_line(report: &ScanReport, what: &str, limit: Option<usize>) -> String {
    if report.counted_all() {
        return format!(
            "{} of {} dead letters {what}",
            report.selected, report.depth_at_start
        );
    }
    let why = match (report.stop, limit) {
        (Stop::Selected, Some(l)) => format!("stopped at --limit {l}"),
        (stop, _) => report::stop_text(stop).to_string(),
    };
    format!(
        "{} dead letters {what}; {why} after reading {} of the {} in {} (matches beyond were not counted)",
        report.selected, report.read, report.depth_at_start, report.queue
    )
}

/// Prints to standard output; a closed pipe is not an error.
fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn print_json(doc: &impl Serialize) -> anyhow::Result<()> {
    out(&serde_json::to_string_pretty(doc)?)
}

/// `dlq stats --json`.
#[derive(Serialize)]
struct StatsDoc<'a> {
    #[serde(flatten)]
    scan: &'a ScanReport,
    counted_all: bool,
    #[serde(flatten)]
    stats: &'a Stats,
    warnings: Vec<String>,
}

/// `dlq replay --json`, `dlq purge --yes --json`.
#[derive(Serialize)]
struct ActionDoc<'a> {
    #[serde(flatten)]
    scan: &'a ScanReport,
    /// Where replayed letters went.
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    counted_all: bool,
    warnings: Vec<String>,
}

/// The letters of `list --json` (and dry runs), written as they come:
/// `{"letters": [...], <the scan report>, "counted_all": …, "warnings": […]}`.
struct JsonLetters {
    out: io::BufWriter<io::StdoutLock<'static>>,
    count: usize,
    error: Option<io::Error>,
}

impl JsonLetters {
    fn start() -> JsonLetters {
        let mut j = JsonLetters {
            out: io::BufWriter::new(io::stdout().lock()),
            count: 0,
            error: None,
        };
        if let Err(e) = write!(j.out, "{{\"letters\": [") {
            j.error = Some(e);
        }
        j
    }

    fn letter(&mut self, d: &LetterSummary) -> Flow {
        if self.error.is_some() {
            return Flow::Stop;
        }
        let sep = if self.count == 0 { "\n  " } else { ",\n  " };
        let written = serde_json::to_string(d)
            .map_err(io::Error::other)
            .and_then(|s| write!(self.out, "{sep}{s}"));
        match written {
            Ok(()) => {
                self.count += 1;
                Flow::Continue
            }
            Err(e) => {
                self.error = Some(e);
                Flow::Stop
            }
        }
    }

    fn finish(mut self, report: &ScanReport, warnings: Vec<String>) -> anyhow::Result<()> {
        if self.error.is_none() {
            let tail = serde_json::to_value(ActionDoc {
                scan: report,
                to: None,
                counted_all: report.counted_all(),
                warnings,
            })?;
            let mut fields = String::new();
            if let serde_json::Value::Object(map) = tail {
                for (k, v) in map {
                    fields += &format!(",\n  {}: {}", serde_json::Value::from(k), v);
                }
            }
            if let Err(e) = write!(self.out, "\n  ]{fields}\n}}\n").and_then(|()| self.out.flush())
            {
                self.error = Some(e);
            }
        }
        match self.error {
            Some(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// Letter rows for a table, printed every [`TABLE_ROWS`].
#[derive(Default)]
struct Rows {
    rows: Vec<LetterSummary>,
    closed: bool,
}

impl Rows {
    fn push(&mut self, d: LetterSummary) -> Flow {
        if self.closed {
            return Flow::Stop;
        }
        self.rows.push(d);
        if self.rows.len() >= TABLE_ROWS {
            self.flush();
        }
        if self.closed {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    fn flush(&mut self) {
        if self.rows.is_empty() || self.closed {
            return;
        }
        let table = report::dlq_letters(&self.rows).to_string();
        self.rows.clear();
        let mut stdout = io::stdout().lock();
        if writeln!(stdout, "{table}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            self.closed = true;
        }
    }
}

/// An [`Observer`] that drives the progress bar and hands each selected
/// letter to `f`.
struct Watch<'a, F> {
    bar: &'a ScanBar,
    verb: &'static str,
    f: F,
}

impl<'a, F: FnMut(&DeadLetter) -> Flow> Watch<'a, F> {
    fn new(bar: &'a ScanBar, verb: &'static str, f: F) -> Watch<'a, F> {
        Watch { bar, verb, f }
    }
}

impl<F: FnMut(&DeadLetter) -> Flow> Observer for Watch<'_, F> {
    fn selected(&mut self, letter: &DeadLetter) -> Flow {
        (self.f)(letter)
    }

    fn progress(&mut self, p: &Progress) {
        self.bar.update(p, self.verb);
    }
}

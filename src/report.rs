//! What the CLI prints: tables for people (queue depths, DLQ stats and
//! letters, the enqueue summary, rendered with `comfy-table`, one function
//! per table; `demo` draws its summary with [`table`] too), JSON for
//! machines, the writers they go through, and the progress bar of long DLQ
//! scans.
//!
//! Text that came from data (job ids, campaigns, error messages, queue
//! names) is shown through [`printable`] before it reaches a terminal:
//! every table cell goes through it in [`table`], and the line printers
//! that quote data call it. A control character or a bidirectional
//! override in a dead letter would otherwise act on the operator's
//! terminal (an OSC 52 clipboard write, a new window title, a cleared
//! screen, text shown reversed). JSON output is not escaped here: serde
//! writes exact JSON, and a JSON reader sees the original text.
//!
//! Output goes through `print` / `print_json` / [`eprint`](fn@eprint), which return
//! the write error instead of panicking like `println!`: a reader that went
//! away (`mmsend topology show | head -1`) surfaces as an
//! [`std::io::ErrorKind::BrokenPipe`] error, which the binary turns into a
//! quiet exit.

use std::borrow::Cow;
use std::fmt::Display;
use std::io::{IsTerminal, Write};

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{CellAlignment, Table};

use crate::broker::topology::QueueInfo;
use crate::producer::EnqueueReport;

/// Writes `text` and a newline to standard output.
pub(crate) fn print(text: impl Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Writes `text` and a newline to standard error.
pub fn eprint(text: impl Display) -> std::io::Result<()> {
    let mut out = std::io::stderr().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Writes `value` as pretty JSON and a newline to standard output.
pub(crate) fn print_json(value: &impl serde::Serialize) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    out.flush()
}

/// Whether `error` (or anything in its chain) is a write to a closed pipe:
/// the reader is gone, there is nobody left to tell, so the binary ends
/// quietly with 0 instead of printing an error.
pub fn is_closed_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .and_then(|e| e.io_error_kind())
                .is_some_and(|k| k == std::io::ErrorKind::BrokenPipe)
    })
}

/// Ends the process quietly (exit 0) when a `println!`/`eprintln!`
/// anywhere panics on a closed pipe. The Rust runtime ignores SIGPIPE, so a
/// write to a pipe whose reader left fails with `BrokenPipe`; the writers in
/// this module return that error, and this hook covers the `print!` macros
/// elsewhere (restoring SIGPIPE would need `unsafe`, which the crate forbids).
/// Every other panic goes to the previous hook unchanged.
pub fn exit_quietly_on_closed_pipe() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // std's message: "failed printing to stdout: Broken pipe (os error 32)"
        if message.starts_with("failed printing to std")
            && message.to_ascii_lowercase().contains("broken pipe")
        {
            std::process::exit(0);
        }
        previous(info);
    }));
}

/// Whether to colour what goes to `stream`: only on a terminal, and never
/// when `NO_COLOR` is set to anything but the empty string (no-color.org).
pub(crate) fn colour(stream: &impl IsTerminal) -> bool {
    !no_colour_requested(std::env::var_os("NO_COLOR").as_deref()) && stream.is_terminal()
}

fn no_colour_requested(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}
use crate::dlq::{Group, LetterSummary, Phase, Progress, ScanReport, Stats, Stop};

/// `text` safe to print on a terminal: control characters (C0, DEL, C1)
/// and the invisible characters that reorder or break text (bidirectional
/// marks, embeddings, overrides and isolates; line and paragraph
/// separators) are shown as escapes instead of acting: `\e`, `\r`, `\n`,
/// `\t`, `\xNN` below U+0100, `\u{NNNN}` above. Text without any comes
/// back borrowed.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\u{1b}' => out.push_str("\\e"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x100 => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Whether [`printable`] escapes `c`.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// A table with a header row and right-aligned numeric columns. Every
/// cell is shown through [`printable`].
pub fn table(header: &[&str], numeric: &[usize], rows: Vec<Vec<String>>) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_BORDERS_ONLY).set_header(
        header
            .iter()
            .map(|h| printable(h).into_owned())
            .collect::<Vec<_>>(),
    );
    for row in rows {
        t.add_row(
            row.into_iter()
                .map(|cell| match printable(&cell) {
                    Cow::Borrowed(_) => cell,
                    Cow::Owned(escaped) => escaped,
                })
                .collect::<Vec<_>>(),
        );
    }
    for &i in numeric {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// `topology show`.
pub(crate) fn queues(queues: &[QueueInfo]) -> Table {
    table(
        &["queue", "role", "messages", "consumers"],
        &[2, 3],
        queues
            .iter()
            .map(|q| {
                vec![
                    q.name.clone(),
                    q.role.clone(),
                    q.messages.to_string(),
                    q.consumers.to_string(),
                ]
            })
            .collect(),
    )
}

/// `enqueue`'s summary: one row of counts.
pub(crate) fn enqueue_summary(r: &EnqueueReport, dry_run: bool) -> Table {
    let rate = r.published as f64 / r.seconds.max(0.001);
    table(
        &[
            "lines",
            if dry_run { "valid" } else { "published" },
            "invalid",
            "failed",
            "seconds",
            "jobs/s",
        ],
        &[0, 1, 2, 3, 4, 5],
        vec![vec![
            r.lines.to_string(),
            r.published.to_string(),
            r.invalid.len().to_string(),
            r.failed.len().to_string(),
            format!("{:.1}", r.seconds),
            format!("{rate:.0}"),
        ]],
    )
}

/// `enqueue`'s rejected lines on standard error, at most `max` of each kind.
pub(crate) fn enqueue_errors(r: &EnqueueReport, max: usize) -> std::io::Result<()> {
    for e in r.invalid.iter().take(max) {
        eprint(format_args!("line {}: {}", e.line, printable(&e.error)))?;
    }
    if r.invalid.len() > max {
        eprint(format_args!(
            "… and {} more invalid lines",
            r.invalid.len() - max
        ))?;
    }
    for e in r.failed.iter().take(max) {
        eprint(format_args!(
            "line {} (job {}): not confirmed: {}",
            e.line,
            printable(e.job_id.as_deref().unwrap_or("?")),
            printable(&e.error)
        ))?;
    }
    if r.failed.len() > max {
        eprint(format_args!(
            "… and {} more unconfirmed lines",
            r.failed.len() - max
        ))?;
    }
    Ok(())
}

/// `dlq stats`: one table per dimension (reason, class, code, campaign,
/// page) with counts, the oldest and newest death and the latest error.
pub(crate) fn dlq_stats(stats: &Stats) -> Vec<Table> {
    stats
        .dimensions()
        .iter()
        .map(|(title, groups)| {
            table(
                &[
                    title,
                    "count",
                    "oldest (UTC)",
                    "newest (UTC)",
                    "latest error",
                ],
                &[1],
                groups.iter().map(group_row).collect(),
            )
        })
        .collect()
}

fn group_row(g: &Group) -> Vec<String> {
    vec![
        g.key.clone(),
        g.count.to_string(),
        time(g.oldest),
        time(g.newest),
        cut(g.latest_error.as_deref().unwrap_or(""), 50),
    ]
}

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn cut(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars.saturating_sub(1)) {
        Some((i, _)) if s.chars().count() > max_chars => format!("{}…", &s[..i]),
        _ => s.to_string(),
    }
}

/// `dlq list` (and the previews of replay and purge): one row per letter.
pub(crate) fn dlq_letters(rows: &[LetterSummary]) -> Table {
    table(
        &[
            "job_id",
            "campaign",
            "reason",
            "class",
            "code",
            "attempts",
            "dead_at (UTC)",
            "last error",
        ],
        &[5],
        rows.iter()
            .map(|d| {
                let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                vec![
                    if d.key.job_id.is_empty() {
                        "-".into()
                    } else {
                        d.key.job_id.clone()
                    },
                    dash(&d.campaign),
                    d.reason.clone(),
                    dash(&d.class),
                    d.code.map_or_else(|| "-".into(), |c| c.to_string()),
                    d.attempts.to_string(),
                    time(d.dead_at),
                    cut(d.error.as_deref().unwrap_or(""), 60),
                ]
            })
            .collect(),
    )
}

/// The progress of a DLQ scan on standard error: letters read of the depth
/// at the start, rate and ETA. Hidden when standard error is not a terminal.
pub(crate) struct ScanBar {
    bar: indicatif::ProgressBar,
}

impl ScanBar {
    /// A bar drawn on standard error, or a hidden one.
    pub(crate) fn new(visible: bool) -> ScanBar {
        let bar = if visible {
            indicatif::ProgressBar::new(0)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} letters read, {per_sec}, ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        ScanBar { bar }
    }

    /// Shows `p`; `verb` says what happens to selected letters ("selected",
    /// "replayed").
    pub(crate) fn update(&self, p: &Progress, verb: &str) {
        self.bar.set_length(u64::from(p.depth_at_start));
        self.bar.set_position(p.read as u64);
        let msg = match p.phase {
            Phase::Reading => format!("({} {verb})", p.selected),
            Phase::Holding => "(returning the letters to the queue)".to_string(),
            Phase::Finished => String::new(),
        };
        self.bar.set_message(msg);
        if p.phase == Phase::Finished {
            self.bar.finish_and_clear();
        }
    }
}

/// The DLQ's stats as text: a line on the scan, then the tables of
/// [`dlq_stats`] (what `mmsend dlq stats` and the demo print).
pub fn dlq_stats_summary(stats: &Stats, report: &ScanReport) -> String {
    let mut text = format!(
        "{} dead letters in {} ({} selected)",
        report.depth_at_start,
        printable(&report.queue),
        stats.total
    );
    if !report.counted_all() {
        text += &format!(
            "; the scan stopped early ({}), so these count only the letters read",
            stop_text(report.stop)
        );
    }
    for t in dlq_stats(stats) {
        text += &format!("\n{t}");
    }
    text
}

/// Why a DLQ scan stopped, in words.
pub fn stop_text(stop: Stop) -> &'static str {
    match stop {
        Stop::Depth => "read every letter",
        Stop::QueueEmpty => "the queue ran out of letters before the depth at the start: something that is not mmsend took or removed some (a consumer of its own? a purge?), and letters it holds were not seen",
        Stop::Selected => "limit reached",
        Stop::Observer => "output closed",
        Stop::Interrupted => "interrupted",
        Stop::HoldLimit => "stopped at --max-held: a scan holds every letter it reads on the broker (about 300 bytes each); raise --max-held if the broker has the memory",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_queue_depths() {
        let out = queues(&[QueueInfo {
            name: "mm.send".into(),
            role: "work".into(),
            messages: 12,
            consumers: 2,
        }])
        .to_string();
        assert!(out.contains("mm.send") && out.contains("12") && out.contains("consumers"));
    }

    #[test]
    fn no_color_set_to_anything_but_empty_turns_colour_off() {
        use std::ffi::OsStr;
        assert!(!no_colour_requested(None));
        assert!(!no_colour_requested(Some(OsStr::new(""))));
        assert!(no_colour_requested(Some(OsStr::new("1"))));
        assert!(no_colour_requested(Some(OsStr::new("0"))));
    }

    #[test]
    fn enqueue_summary_names_the_verb() {
        let r = EnqueueReport {
            lines: 3,
            published: 2,
            ..Default::default()
        };
        let dry = enqueue_summary(&r, true).to_string();
        assert!(dry.contains("valid") && !dry.contains("published"), "{dry}");
        assert!(enqueue_summary(&r, false).to_string().contains("published"));
    }

    #[test]
    fn printable_escapes_what_would_act_on_a_terminal() {
        let nasty = "a\u{1b}]52;c;aGk=\u{7}b\u{1b}[2J\r\n\t\u{7f}\u{9b}\u{202e}\u{2066}\u{200f}z";
        assert_eq!(
            printable(nasty),
            "a\\e]52;c;aGk=\\x07b\\e[2J\\r\\n\\t\\x7f\\x9b\\u{202e}\\u{2066}\\u{200f}z"
        );
        assert!(matches!(printable("plain é ✓ 日本"), Cow::Borrowed(_)));
        // the same, through a table
        let t = table(&["id"], &[], vec![vec![nasty.to_string()]]).to_string();
        assert!(!t.chars().any(|c| c != '\n' && needs_escape(c)), "{t:?}");
        assert!(t.contains("\\e]52"), "{t}");
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short", 60), "short");
        let long = "é".repeat(100);
        let c = cut(&long, 60);
        assert_eq!(c.chars().count(), 60);
        assert!(c.ends_with('…'));
    }
}

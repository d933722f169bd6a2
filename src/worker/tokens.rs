//! Page tokens without restarts. A tech provider onboards businesses all
//! day; the worker picks up a changed `MMSEND_PAGE_TOKENS_FILE` by itself.
//!
//! The file is looked at once a second (its modification time, size and
//! inode; a content change that keeps all three within one second is
//! caught on the next change or a SIGHUP) and read again on `SIGHUP`. A
//! file that reads and validates becomes the tokens of every job that
//! starts after it, all at once (the whole set is swapped; no job sees half
//! a file). A file that does not (missing, broken JSON, a bad entry) leaves
//! the tokens as they were, says why in the log (never a token: the
//! errors name positions and page ids only) and counts
//! `mmsend_page_tokens_reloads_total{result="failed"}`; the next change or
//! SIGHUP tries again. `MMSEND_ACCESS_TOKEN`, the default token, is an
//! environment variable and changes only with a restart.
//!
//! Polling rather than inotify: Kubernetes updates a mounted Secret or
//! ConfigMap by swapping a symlink of the directory, which a watch on the
//! file misses; a stat a second costs nothing and sees every way a file
//! can change.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::graph::TokenStore;
use crate::metrics::Metrics;

/// How often the file is looked at.
const POLL: Duration = Duration::from_secs(1);

/// The tokens jobs use now; swapped whole by [`watch`].
pub(crate) type LiveTokens = Arc<ArcSwap<TokenStore>>;

/// What tells a changed file from the same one.
type Fingerprint = Option<(SystemTime, u64, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Says which pages of the file at `path` had whitespace around their
/// token (at start and at every reload).
pub(crate) fn warn_trimmed(store: &TokenStore, path: &Path) {
    if !store.trimmed_pages().is_empty() {
        tracing::warn!(
            pages = %store.trimmed_pages().join(","),
            "page tokens with whitespace around them in {}; using them trimmed",
            path.display()
        );
    }
}

/// Reads `path` again into `live` (see the module docs).
fn reload(path: &Path, live: &LiveTokens, metrics: &Metrics, why: &str) {
    let before = live.load();
    match before.reloaded(path) {
        Ok(store) => {
            let pages = store.page_count();
            warn_trimmed(&store, path);
            live.store(Arc::new(store));
            metrics.page_tokens_reloaded(true, pages);
            info!(
                pages,
                before = before.page_count(),
                why,
                "page tokens reloaded from {}",
                path.display()
            );
        }
        Err(e) => {
            metrics.page_tokens_reloaded(false, before.page_count());
            error!(
                error = %e,
                why,
                kept = before.page_count(),
                "page tokens file not reloaded; the tokens loaded before stay in use. Fix the file (it is read again when it changes, or on SIGHUP)"
            );
        }
    }
}

/// Watches the page tokens file until `stop` (see the module docs).
pub(crate) async fn watch(
    path: PathBuf,
    live: LiveTokens,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            error!(error = %e, "SIGHUP cannot be caught; the page tokens file is still read again when it changes");
            None
        }
    };
    let mut seen = fingerprint(&path);
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            _ = tick.tick() => "changed",
        };
        let now = fingerprint(&path);
        if why == "changed" && now == seen {
            continue;
        }
        seen = now;
        reload(&path, &live, &metrics, why);
    }
}

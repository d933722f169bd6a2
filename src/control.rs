//! Campaign control: pause, resume and cancel a campaign across the fleet
//! (DESIGN §13), for `mmsend campaign` and the console alike.
//!
//! - **Pause** writes the state; from the next claim on, no worker calls
//!   for the campaign (`before.lua` reads the state in the round trip every
//!   job makes anyway) and its jobs are parked in `<prefix>.held` with their
//!   story, counted as `held`. Calls already past their claim finish: the
//!   command waits [`SETTLE`] for them before it reports.
//! - **Resume** writes the state (new jobs flow at once), waits [`SETTLE`]
//!   for jobs being parked as the state changed, then moves the campaign's
//!   parked jobs back to the work queue with their story as it was — the
//!   DLQ's scan engine on the held queue: bounded by the depth at its
//!   start, each job acked only after its copy is confirmed, interrupted
//!   safely (what was not moved stays parked). Passes repeat until one finds
//!   nothing more to move.
//! - **Cancel** is final: the state says `cancelled`, every job of the
//!   campaign that comes by is dead-lettered `cancelled` without a call, and
//!   the parked ones are moved back to work to meet that fate (so every job
//!   ends in the DLQ, whence `campaign resume` and then `dlq replay --reason
//!   cancelled --campaign X` undo a mistaken cancel). A paused or cancelled
//!   campaign cannot be paused again; a cancelled one can be resumed (the
//!   undo).
//!
//! Every action is recorded in the audit trail with who, what and how many.

use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::broker::Topology;
use crate::dlq::scan::Source;
use crate::dlq::{self, Action, DlqError, Filter, ScanOptions};
use crate::fleet::campaign::{CampaignState, Campaigns, SETTLE};
use crate::fleet::FleetError;

/// Passes over the held queue a resume makes at most.
const MAX_PASSES: usize = 5;

/// Why a control action failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Redis failed or refused.
    #[error(transparent)]
    Redis(#[from] FleetError),
    /// Moving parked jobs failed (those moved stay moved; the rest stay
    /// parked).
    #[error(transparent)]
    Held(#[from] DlqError),
    /// The broker cannot be reached (the parked jobs are there).
    #[error(transparent)]
    Broker(#[from] crate::broker::ConnectError),
    /// The action does not apply to the campaign's state.
    #[error("campaign {campaign} is {state}: {hint}")]
    State {
        /// The campaign.
        campaign: String,
        /// Its state.
        state: CampaignState,
        /// What to do instead.
        hint: &'static str,
    },
}

/// What a control action did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ControlReport {
    /// The campaign.
    pub campaign: String,
    /// `pause`, `resume` or `cancel`.
    pub action: &'static str,
    /// The state before.
    pub previous: CampaignState,
    /// The state now.
    pub state: CampaignState,
    /// Parked jobs moved back to the work queue.
    pub moved: usize,
    /// Parked jobs whose copy was not confirmed (they stay parked).
    pub failed: usize,
    /// The move was interrupted (Ctrl-C, a console Stop): the rest stay
    /// parked; run the command again.
    pub interrupted: bool,
}

/// Pauses `campaign` (see the module docs).
pub async fn pause(
    campaigns: &Campaigns,
    campaign: &str,
    who: &str,
    why: &str,
) -> Result<ControlReport, ControlError> {
    let refuse =
        |s| (s != CampaignState::Active).then_some("only an active campaign can be paused");
    let previous = enter(campaigns, campaign, CampaignState::Paused, refuse, who, why).await?;
    tokio::time::sleep(SETTLE).await;
    let report = ControlReport {
        campaign: campaign.into(),
        action: "pause",
        previous,
        state: CampaignState::Paused,
        moved: 0,
        failed: 0,
        interrupted: false,
    };
    record(campaigns, who, &report, why).await?;
    Ok(report)
}

/// Resumes `campaign`: new jobs flow, parked jobs go back to work.
pub async fn resume(
    conn: &Connection,
    topology: &Topology,
    campaigns: &Campaigns,
    campaign: &str,
    who: &str,
    cancel: Option<CancellationToken>,
) -> Result<ControlReport, ControlError> {
    let previous = campaigns
        .set_state(campaign, CampaignState::Active, who, "")
        .await?;
    let report = move_parked(
        conn, topology, campaigns, campaign, "resume", previous, cancel,
    )
    .await?;
    record(campaigns, who, &report, "").await?;
    Ok(report)
}

/// Cancels `campaign` for good (see the module docs).
pub async fn cancel(
    conn: &Connection,
    topology: &Topology,
    campaigns: &Campaigns,
    campaign: &str,
    who: &str,
    why: &str,
    stop: Option<CancellationToken>,
) -> Result<ControlReport, ControlError> {
    let refuse = |s| {
        (s == CampaignState::Cancelled).then_some(
        "already cancelled (to undo: mmsend campaign resume, then mmsend dlq replay --reason cancelled --campaign)",
    )
    };
    let previous = enter(
        campaigns,
        campaign,
        CampaignState::Cancelled,
        refuse,
        who,
        why,
    )
    .await?;
    let mut report = move_parked(
        conn, topology, campaigns, campaign, "cancel", previous, stop,
    )
    .await?;
    report.state = CampaignState::Cancelled;
    record(campaigns, who, &report, why).await?;
    Ok(report)
}

/// Moves `campaign` to `to` unless `refuse` has a reason against its
/// current state (then nothing changes); the state it had before.
async fn enter(
    campaigns: &Campaigns,
    campaign: &str,
    to: CampaignState,
    refuse: impl Fn(CampaignState) -> Option<&'static str>,
    who: &str,
    why: &str,
) -> Result<CampaignState, ControlError> {
    let current = campaigns
        .show(campaign)
        .await?
        .map_or(CampaignState::Active, |v| v.state);
    if let Some(hint) = refuse(current) {
        return Err(ControlError::State {
            campaign: campaign.into(),
            state: current,
            hint,
        });
    }
    Ok(campaigns.set_state(campaign, to, who, why).await?)
}

async fn record(
    campaigns: &Campaigns,
    who: &str,
    r: &ControlReport,
    why: &str,
) -> Result<(), FleetError> {
    let mut what = format!("{} → {}", r.previous, r.state);
    if !why.is_empty() {
        what.push_str(&format!(": {why}"));
    }
    if r.interrupted {
        what.push_str(" (interrupted: the rest stay parked)");
    }
    let count = (r.action != "pause").then_some(r.moved as u64);
    campaigns
        .audit(who, r.action, Some(&r.campaign), &what, count)
        .await
}

/// Moves the campaign's parked jobs back to the work queue, pass after
/// pass until one finds none (at most [`MAX_PASSES`]), after [`SETTLE`].
async fn move_parked(
    conn: &Connection,
    topology: &Topology,
    campaigns: &Campaigns,
    campaign: &str,
    action: &'static str,
    previous: CampaignState,
    cancel: Option<CancellationToken>,
) -> Result<ControlReport, ControlError> {
    tokio::time::sleep(SETTLE).await;
    let mut report = ControlReport {
        campaign: campaign.into(),
        action,
        previous,
        state: CampaignState::Active,
        moved: 0,
        failed: 0,
        interrupted: false,
    };
    let filter = Filter {
        campaign: Some(campaign.to_string()),
        ..Filter::default()
    };
    for _ in 0..MAX_PASSES {
        let mut options = ScanOptions::new(Action::Replay { rate: 0 });
        options.source = Source::Held;
        options.cancel = cancel.clone();
        let scanned = dlq::scan(
            conn,
            topology,
            filter.clone(),
            &options,
            &mut |_: &dlq::DeadLetter| {},
        )
        .await;
        let scan = match scanned {
            Ok(scan) => scan,
            // no held queue: nothing was ever parked under this prefix
            Err(DlqError::Missing { .. }) => break,
            Err(e) => return Err(e.into()),
        };
        if scan.replayed > 0 {
            campaigns
                .add_held(campaign, -(scan.replayed as i64))
                .await?;
        }
        report.moved += scan.replayed;
        report.failed += scan.failed;
        if scan.stop == dlq::Stop::Interrupted {
            report.interrupted = true;
            break;
        }
        if scan.replayed == 0 {
            break;
        }
    }
    Ok(report)
}

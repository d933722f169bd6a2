//! `mmsend campaign …`: a campaign's progress and its controls
//! ([`crate::control`], [`crate::fleet::campaign`]), as tables for people or
//! one JSON object (`--json`).
//!
//! Every command needs Redis (the workers' `MMSEND_REDIS_URL`): without it
//! there is no campaign state, and the command refuses with one line.
//! Exit codes: 0 done; 1 a resume or cancel moved only part of the parked
//! jobs (interrupted, or a copy not confirmed: run it again); 2 usage or
//! fatal.

use std::process::ExitCode;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::{shutdown_on_signals, BrokerArgs};
use crate::broker;
use crate::control::{self, ControlReport};
use crate::fleet::campaign::{cli_user, AuditEntry, CampaignView, Campaigns, RejectedPage};
use crate::report::{self, print_json, table};

/// `mmsend campaign`.
#[derive(Debug, Subcommand)]
pub(crate) enum CampaignCommand {
    /// Every campaign: state, progress, rate, ETA; and the pages whose token Meta rejected.
    List {
        #[command(flatten)]
        on: CampaignArgs,
    },
    /// One campaign: its counters, dead letters by class and reason, and its audit trail.
    Show {
        /// The campaign (the jobs' `campaign`, else their `message_id`).
        campaign: String,
        #[command(flatten)]
        on: CampaignArgs,
    },
    /// Stop every call for the campaign across the fleet (within 2 s); its jobs are parked.
    Pause {
        /// The campaign.
        campaign: String,
        /// Why (kept with the state and in the audit trail).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        on: CampaignArgs,
    },
    /// New jobs flow again at once, and every parked job goes back to work.
    Resume {
        /// The campaign.
        campaign: String,
        #[command(flatten)]
        on: CampaignArgs,
    },
    /// Final: no further call; every job of the campaign is dead-lettered `cancelled` (needs --yes).
    Cancel {
        /// The campaign.
        campaign: String,
        /// Really cancel.
        #[arg(long)]
        yes: bool,
        /// Why (kept with the state and in the audit trail).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        on: CampaignArgs,
    },
}

/// Where the campaigns are.
#[derive(Debug, Clone, Args)]
pub(crate) struct CampaignArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// The workers' Redis (campaign state and counters live there).
    #[arg(long, env = "MMSEND_REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub(crate) json: bool,
}

impl CampaignArgs {
    async fn campaigns(&self) -> anyhow::Result<Campaigns> {
        let Some(url) = self.redis_url.as_deref().filter(|u| !u.trim().is_empty()) else {
            anyhow::bail!("mmsend campaign needs Redis: set MMSEND_REDIS_URL (or --redis-url) to the workers' Redis, where campaign state and counters live");
        };
        let file = self.broker.file_config()?;
        let config = file.fleet(url, crate::fleet::FailMode::Local);
        Ok(Campaigns::connect(&config, &self.broker.prefix).await?)
    }
}

/// Runs one `mmsend campaign` command.
pub(crate) async fn run(command: CampaignCommand) -> anyhow::Result<ExitCode> {
    let who = cli_user();
    match command {
        CampaignCommand::List { on } => {
            let campaigns = on.campaigns().await?;
            let list = campaigns.list().await?;
            let pages = campaigns.rejected_pages().await?;
            if on.json {
                print_json(&ListDoc {
                    campaigns: &list,
                    rejected_pages: &pages,
                })?;
            } else {
                print_list(&list, &pages)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        CampaignCommand::Show { campaign, on } => {
            let campaigns = on.campaigns().await?;
            let Some(view) = campaigns.show(&campaign).await? else {
                anyhow::bail!("no campaign {campaign:?} in Redis under prefix {:?} (no job of it was counted, or its counters expired); `mmsend campaign list` shows the known ones", on.broker.prefix);
            };
            let trail = campaigns.trail(Some(&campaign), 50).await?;
            if on.json {
                print_json(&ShowDoc {
                    view: &view,
                    trail: &trail,
                })?;
            } else {
                print_show(&view, &trail)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        CampaignCommand::Pause {
            campaign,
            reason,
            on,
        } => {
            let campaigns = on.campaigns().await?;
            let r = control::pause(&campaigns, &campaign, &who, reason.as_deref().unwrap_or(""))
                .await?;
            finish(&on, &r)
        }
        CampaignCommand::Resume { campaign, on } => {
            let campaigns = on.campaigns().await?;
            let (conn, topology) = broker_of(&on).await?;
            let r = control::resume(
                &conn,
                &topology,
                &campaigns,
                &campaign,
                &who,
                Some(shutdown_on_signals()),
            )
            .await;
            let _ = conn.close(200, "bye".into()).await;
            finish(&on, &r?)
        }
        CampaignCommand::Cancel {
            campaign,
            yes,
            reason,
            on,
        } => {
            if !yes {
                anyhow::bail!("cancelling {campaign} is final: every job of it still to be sent ends in the dead-letter queue without a call. Add --yes to cancel it (to stop it for now, use `mmsend campaign pause`)");
            }
            let campaigns = on.campaigns().await?;
            let (conn, topology) = broker_of(&on).await?;
            let r = control::cancel(
                &conn,
                &topology,
                &campaigns,
                &campaign,
                &who,
                reason.as_deref().unwrap_or(""),
                Some(shutdown_on_signals()),
            )
            .await;
            let _ = conn.close(200, "bye".into()).await;
            finish(&on, &r?)
        }
    }
}

async fn broker_of(on: &CampaignArgs) -> anyhow::Result<(lapin::Connection, broker::Topology)> {
    let topology = on.broker.topology(&on.broker.file_config()?)?;
    let conn = broker::connect(&on.broker.amqp_url, "campaign")
        .await
        .context("the parked jobs are in RabbitMQ")?;
    Ok((conn, topology))
}

fn finish(on: &CampaignArgs, r: &ControlReport) -> anyhow::Result<ExitCode> {
    if on.json {
        print_json(r)?;
    } else {
        let mut line = format!("campaign {}: {} → {}", r.campaign, r.previous, r.state);
        match r.action {
            "pause" => line.push_str(
                "; no worker calls for it now (calls that had started finished); its jobs are parked in the held queue as they come by",
            ),
            "resume" => line.push_str(&format!("; {} parked job(s) back to work", r.moved)),
            _ => line.push_str(&format!(
                "; {} parked job(s) back to work to be dead-lettered `cancelled`; every other job of it is dead-lettered as it comes by",
                r.moved
            )),
        }
        println!("{}", report::printable(&line));
        if r.failed > 0 || r.interrupted {
            eprintln!(
                "warning: {} job(s) not moved ({}); they stay parked: run the command again",
                r.failed,
                if r.interrupted {
                    "interrupted"
                } else {
                    "copies not confirmed"
                }
            );
        }
    }
    Ok(if r.failed > 0 || r.interrupted {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[derive(Serialize)]
struct ListDoc<'a> {
    campaigns: &'a [CampaignView],
    rejected_pages: &'a [RejectedPage],
}

#[derive(Serialize)]
struct ShowDoc<'a> {
    #[serde(flatten)]
    view: &'a CampaignView,
    trail: &'a [AuditEntry],
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn eta(seconds: Option<u64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 7200 => format!("{}m", s / 60),
        Some(s) => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn progress(v: &CampaignView) -> String {
    match v.enqueued {
        Some(n) if n > 0 => format!("{:.0}%", 100.0 * (v.sent + v.dead) as f64 / n as f64),
        _ => "-".into(),
    }
}

fn print_list(list: &[CampaignView], pages: &[RejectedPage]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if list.is_empty() {
        writeln!(
            out,
            "no campaigns yet (workers count a campaign's jobs once they settle them)"
        )?;
    } else {
        let rows = list
            .iter()
            .map(|v| {
                vec![
                    v.campaign.clone(),
                    v.state.to_string(),
                    v.enqueued.map_or("-".into(), |n| n.to_string()),
                    v.sent.to_string(),
                    v.dead.to_string(),
                    v.retried.to_string(),
                    v.held.to_string(),
                    progress(v),
                    format!("{:.1}", v.rate_per_min),
                    eta(v.eta_seconds),
                    when(v.last_activity),
                ]
            })
            .collect();
        writeln!(
            out,
            "{}",
            table(
                &[
                    "campaign",
                    "state",
                    "enqueued",
                    "sent",
                    "dead",
                    "retried",
                    "held",
                    "done",
                    "per min",
                    "eta",
                    "last activity"
                ],
                &[2, 3, 4, 5, 6, 7, 8],
                rows
            )
        )?;
    }
    if !pages.is_empty() {
        writeln!(
            out,
            "\npages whose token Meta rejected (held by their auth gate):"
        )?;
        let rows = pages
            .iter()
            .map(|p| {
                vec![
                    p.page_id.clone(),
                    p.code.clone(),
                    when(p.rejected_at),
                    when(p.held_until),
                ]
            })
            .collect();
        writeln!(
            out,
            "{}",
            table(&["page", "code", "rejected at", "held until"], &[], rows)
        )?;
    }
    out.flush()
}

fn print_show(v: &CampaignView, trail: &[AuditEntry]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let mut rows = vec![
        vec!["state".into(), v.state.to_string()],
        vec![
            "state set".into(),
            match &v.state_by {
                Some(by) => format!(
                    "{} by {by}{}",
                    when(v.state_at),
                    v.state_why
                        .as_deref()
                        .map_or(String::new(), |w| format!(": {w}"))
                ),
                None => "-".into(),
            },
        ],
        vec![
            "enqueued".into(),
            v.enqueued
                .map_or("- (not by mmsend's producers)".into(), |n| n.to_string()),
        ],
        vec!["sent".into(), v.sent.to_string()],
        vec!["dead".into(), v.dead.to_string()],
        vec!["retried".into(), v.retried.to_string()],
        vec!["held (parked)".into(), v.held.to_string()],
        vec!["suppressed duplicates".into(), v.suppressed.to_string()],
        vec!["done".into(), progress(v)],
        vec!["sends per minute".into(), format!("{:.1}", v.rate_per_min)],
        vec!["eta".into(), eta(v.eta_seconds)],
        vec!["first activity".into(), when(v.first_activity)],
        vec!["last activity".into(), when(v.last_activity)],
    ];
    for (class, n) in &v.dead_by_class {
        rows.push(vec![format!("dead, class {class}"), n.to_string()]);
    }
    for (reason, n) in &v.dead_by_reason {
        rows.push(vec![format!("dead, reason {reason}"), n.to_string()]);
    }
    writeln!(out, "campaign {}", report::printable(&v.campaign))?;
    writeln!(out, "{}", table(&["", "value"], &[], rows))?;
    writeln!(out, "\ndelivery (Meta's webhooks; share of sent)")?;
    if v.funnel.any() {
        writeln!(
            out,
            "{}",
            table(
                &["status", "sends", "of sent"],
                &[1, 2],
                v.funnel.rows(v.sent)
            )
        )?;
    } else {
        writeln!(
            out,
            "no webhook event yet (is `mmsend webhooks` subscribed and a tracker running? see the book's Delivery tracking)"
        )?;
    }
    if !trail.is_empty() {
        let rows = trail
            .iter()
            .map(|e| {
                vec![
                    when(Some(e.at)),
                    e.who.clone(),
                    e.action.clone(),
                    e.what.clone(),
                    e.count.map_or("-".into(), |n| n.to_string()),
                ]
            })
            .collect();
        writeln!(out, "\naudit trail (newest first)")?;
        writeln!(
            out,
            "{}",
            table(&["at", "who", "action", "what", "count"], &[4], rows)
        )?;
    }
    out.flush()
}

//! `mmsend pages check`: which marketing-message webhook fields each page
//! is subscribed to (`GET /{page-id}/subscribed_apps`), for every page with
//! a token: the pages of `MMSEND_PAGE_TOKENS_FILE`, and the `--page` ids
//! (with their own token from the file, else `MMSEND_ACCESS_TOKEN`).
//!
//! Meta unsubscribes an app from a page after about an hour of failed
//! webhook deliveries; a page whose sends are no longer echoed
//! (`mmsend_silent_pages`) is checked here first. Exit codes: 0 every page
//! is subscribed to all five marketing-message fields; 1 a page misses one
//! (or Meta refused to say: a token without the right permission); 2 usage
//! or no token.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::graph::{Client, ClientConfig, Secret, TokenStore};
use crate::report::{self, print_json, table};
use crate::webhooks::events::Field;

/// `mmsend pages`.
#[derive(Debug, Subcommand)]
pub(crate) enum PagesCommand {
    /// For every page with a token: is the app subscribed to its marketing-message webhooks?
    Check(CheckArgs),
}

/// `mmsend pages check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// A page to check besides those of MMSEND_PAGE_TOKENS_FILE (repeat for more).
    #[arg(long = "page")]
    pages: Vec<String>,
    /// Default Page (or system-user) access token. Prefer the environment variable.
    #[arg(long, env = "MMSEND_ACCESS_TOKEN", hide_env_values = true)]
    access_token: Option<Secret>,
    /// JSON file {"<page_id>": "<token>", …} of per-page tokens.
    #[arg(long, env = "MMSEND_PAGE_TOKENS_FILE")]
    page_tokens_file: Option<std::path::PathBuf>,
    /// App secret; when set, every call carries appsecret_proof.
    #[arg(long, env = "MMSEND_APP_SECRET", hide_env_values = true)]
    app_secret: Option<Secret>,
    /// Graph API base URL.
    #[arg(long, env = "MMSEND_GRAPH_BASE_URL", default_value = crate::config::defaults::GRAPH_BASE_URL)]
    graph_base_url: String,
    /// Graph API version.
    #[arg(long, env = "MMSEND_GRAPH_VERSION", default_value = crate::config::defaults::GRAPH_VERSION)]
    graph_version: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// One page's answer.
#[derive(Debug, Serialize)]
struct PageCheck {
    page_id: String,
    /// Apps subscribed to the page (Meta's answer).
    apps: Vec<crate::graph::client::SubscribedApp>,
    /// The marketing-message fields some app is subscribed to.
    subscribed: Vec<&'static str>,
    /// Those none is.
    missing: Vec<&'static str>,
    /// Meta's error, when it would not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub(crate) async fn run(command: PagesCommand) -> anyhow::Result<ExitCode> {
    let PagesCommand::Check(args) = command;
    let clean = |secret: &Option<Secret>, var: &str| -> anyhow::Result<Option<Secret>> {
        secret
            .as_ref()
            .map(|s| Ok(crate::graph::auth::clean_token(s.expose(), var)?.0))
            .transpose()
    };
    let mut tokens = TokenStore::new(clean(&args.access_token, "MMSEND_ACCESS_TOKEN")?);
    if let Some(path) = &args.page_tokens_file {
        tokens = tokens.load_pages(path)?;
    }
    let mut pages: Vec<String> = tokens.pages().into_iter().map(str::to_string).collect();
    for p in &args.pages {
        if !pages.contains(p) {
            pages.push(p.clone());
        }
    }
    if pages.is_empty() {
        anyhow::bail!(
            "no page to check: name pages with --page <id> (checked with MMSEND_ACCESS_TOKEN), or set MMSEND_PAGE_TOKENS_FILE"
        );
    }
    let client = Client::new(ClientConfig {
        base_url: args.graph_base_url.clone(),
        version: args.graph_version.clone(),
        app_secret: clean(&args.app_secret, "MMSEND_APP_SECRET")?,
        ..ClientConfig::default()
    })?;
    let mut checks = Vec::new();
    for page in pages {
        let Some(token) = tokens.token_for(&page) else {
            anyhow::bail!(
                "no access token for page {page}: set MMSEND_ACCESS_TOKEN or add the page to MMSEND_PAGE_TOKENS_FILE"
            );
        };
        checks.push(check(&client, token, page).await);
    }
    let all_good = checks
        .iter()
        .all(|c| c.error.is_none() && c.missing.is_empty());
    if args.json {
        print_json(&serde_json::json!({ "pages": checks, "ok": all_good }))?;
    } else {
        print_table(&checks)?;
    }
    Ok(if all_good {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn check(client: &Client, token: &Secret, page_id: String) -> PageCheck {
    match client.subscribed_apps(token, &page_id).await {
        Ok(apps) => {
            let (subscribed, missing) = Field::ALL.into_iter().map(Field::as_str).partition(|f| {
                apps.iter()
                    .any(|a| a.subscribed_fields.iter().any(|s| s == f))
            });
            PageCheck {
                page_id,
                apps,
                subscribed,
                missing,
                error: None,
            }
        }
        Err(e) => PageCheck {
            page_id,
            apps: Vec::new(),
            subscribed: Vec::new(),
            missing: Field::ALL.into_iter().map(Field::as_str).collect(),
            error: Some(e),
        },
    }
}

fn print_table(checks: &[PageCheck]) -> std::io::Result<()> {
    let short = |fields: &[&str]| -> String {
        if fields.is_empty() {
            return "-".into();
        }
        fields
            .iter()
            .map(|f| f.trim_start_matches("marketing_message_"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows = checks
        .iter()
        .map(|c| {
            vec![
                c.page_id.clone(),
                match (&c.error, c.apps.len()) {
                    (Some(_), _) => "? (error)".into(),
                    (None, 0) => "no app".into(),
                    (None, n) => format!("yes ({n} app{})", if n == 1 { "" } else { "s" }),
                },
                short(&c.subscribed),
                short(&c.missing),
            ]
        })
        .collect();
    report::print(format_args!(
        "{}",
        table(
            &["page", "subscribed", "marketing-message fields", "missing"],
            &[],
            rows
        )
    ))?;
    for c in checks {
        if let Some(e) = &c.error {
            report::print(format_args!(
                "page {}: Meta did not answer: {}",
                c.page_id,
                report::printable(e)
            ))?;
        }
    }
    if checks.iter().any(|c| !c.missing.is_empty()) {
        report::print(format_args!(
            "\nto subscribe a page: POST /{{page-id}}/subscribed_apps with subscribed_fields={} and the page's token (see the book, Delivery tracking)",
            Field::ALL.into_iter().map(Field::as_str).collect::<Vec<_>>().join(",")
        ))?;
    }
    Ok(())
}

#![warn(missing_docs, unreachable_pub)]
//! # mmsend
//!
//! A durable, queue-driven sender for Meta's Marketing Messages API for
//! Messenger. Producers put send jobs ([`job::Job`]) on RabbitMQ; a pool of
//! stateless workers takes each job, calls
//! `POST /{version}/act_{ad_account_id}/messages` through [`graph::Client`],
//! turns the outcome into a [`classify::Route`] with one data-driven table,
//! and settles the delivery exactly one way: acked when **sent**, copied to a
//! broker-side **delay tier** when retryable, or copied to the **dead-letter
//! queue** with the whole story in `x-mmsend-*` headers when terminal.
//! Operators inspect and replay dead letters with [`dlq`], or in a browser
//! with [`console`]; every outcome is counted in [`metrics`].
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! producer ──▶ broker (mmsend.send) ──▶ worker ──▶ job ──▶ graph ──▶ classify ──▶ settle
//!                   ▲                                                    │
//!                   └──── retry tiers (TTL, dead-letter back) ◀──────────┤
//!                                           dead-letter queue ◀──────────┘
//! ```
//!
//! ## Layout
//!
//! The library, in the order a job meets it:
//!
//! - [`job`]: the send job (schema v1) and its validation.
//! - [`producer`]: validate and publish jobs with confirms ([`producer::Producer`],
//!   [`producer::enqueue`], the engine of `mmsend enqueue`).
//! - [`broker`]: RabbitMQ: `topology` (declare, show), `publish` (confirmed,
//!   mandatory), `headers` (the `x-mmsend-*` story), connecting to a cluster.
//! - [`worker`]: the consume loop and settling: `process` (one delivery, start to
//!   settle), `pacing`, `gates`, `coordination` (local or fleet-wide).
//! - [`graph`]: the Graph API: `client` (one call), `error` (error bodies, usage
//!   hints), `auth` (tokens, `appsecret_proof`).
//! - [`classify`]: outcome → class → route: `verdict`, `route`, `table` (the one
//!   table of codes).
//! - [`fleet`]: what workers share through Redis (two Lua scripts): the send
//!   ledger, fleet-wide pacing and gates; `campaign`: campaign state,
//!   counters and the audit trail; `track`: the joins of Meta's webhook
//!   events to jobs, each campaign's funnel, the echo a maybe-sent job looks
//!   for, silent pages.
//! - [`tracker`]: the delivery tracker (in `mmsend worker` with Redis, or
//!   `mmsend tracker`): consumes the stored webhook payloads and joins them.
//! - [`control`]: pause, resume and cancel a campaign (state, the held
//!   queue, the audit trail), for the CLI and the console.
//! - [`results`]: the results stream, one event per settled job, for producers.
//! - [`schema`]: the JSON Schemas of the job and the results event (`schemas/`).
//! - [`dlq`]: the dead-letter library, printing nothing: `letter`, `filter`,
//!   `scan` (the engine), `stats`.
//! - [`console`]: `mmsend console`, the dead-letter queue in a browser: one
//!   shared snapshot, grouped views, confirmed replay and purge with progress.
//! - [`metrics`]: the registry, the typed recording API, `/metrics`, `/healthz`,
//!   `/readyz`.
//! - [`config`]: the one home of every default and the config file's plain
//!   sections; it uses nothing else of the crate.
//! - [`settings`]: the TOML config file as a whole, every stage's section,
//!   validated once at start.
//!
//! Public for the binary, the integration tests and the benches, not a stable API:
//!
//! - [`cli`]: clap definitions, one library call per subcommand; `cli/dlq.rs`
//!   prints `mmsend dlq`. Public because `src/main.rs` is a crate of its own.
//! - [`report`]: what the CLI prints (tables, JSON, a quiet exit on a closed
//!   pipe); public for `src/main.rs` and the benches' tables.
//! - [`simulator`]: the Graph API simulator (`mmsend simulate`); public for the
//!   integration tests and the benches.
//! - [`demo`]: `mmsend demo`; public for its integration test.
//! - [`webhooks`]: `mmsend webhooks`, the receiver of Meta's page webhooks;
//!   `events`: the events of a stored payload. Public for its integration
//!   test and bench.
//!
//! Crate-private: `health`, the probe behind `mmsend healthcheck`.

pub mod broker;
pub mod classify;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod demo;
pub mod dlq;
pub mod fleet;
pub mod graph;
mod health;
pub mod job;
pub mod metrics;
pub mod producer;
pub mod report;
pub mod results;
pub mod schema;
pub mod settings;
pub mod simulator;
pub mod tracker;
pub mod webhooks;
pub mod worker;

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
//! Operators inspect and replay dead letters with [`dlq`]; every outcome is
//! counted in [`metrics`].
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! producer ──▶ broker (mmsend.send) ──▶ worker ──▶ job ──▶ graph ──▶ classify ──▶ settle
//!                   ▲                                                    │
//!                   └──── retry tiers (TTL, dead-letter back) ◀──────────┤
//!                                           dead-letter queue ◀──────────┘
//! ```
pub mod broker;
pub mod classify;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod graph;
pub mod job;
pub mod metrics;
pub mod producer;
pub mod report;
pub mod simulator;
pub mod worker;

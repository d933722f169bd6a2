//! The Graph API side: one call ([`client`]), the shapes it can fail with
//! ([`error`]), and the credentials it carries ([`auth`]).
//!
//! Nothing here decides what to do about a failure; that is
//! [`crate::classify`]'s job. The client only reports, as faithfully as the
//! wire allows, what happened: a success with its tracking id, a Graph error
//! body, a bare HTTP status, or a transport error (and whether the request may
//! have reached Meta before it failed).
pub mod auth;
pub mod client;
pub mod error;

pub use auth::{Secret, TokenStore};
pub use client::{Client, ClientConfig, ClientError, Failure, FailureKind, Outcome, SendRequest};
pub use error::{GraphError, UsageHint};

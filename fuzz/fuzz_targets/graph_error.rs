//! Any bytes as a Graph API error body: parsed or None, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../src/graph/auth.rs"]
#[allow(dead_code)]
mod auth;

#[path = "../../src/graph/error.rs"]
#[allow(dead_code)]
mod error;

fuzz_target!(|data: &[u8]| {
    if let Some(e) = error::GraphError::parse(data) {
        assert!(e.code.is_some() || e.message.is_some());
        let _ = e.best_message();
    }
});

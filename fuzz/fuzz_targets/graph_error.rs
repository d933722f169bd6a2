//! Any bytes as a Graph API error body: parsed or None, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(e) = mmsend::graph::GraphError::parse(data) {
        assert!(e.code.is_some() || e.message.is_some());
        let _ = e.best_message();
    }
});

//! Any bytes into the job parser: it answers Ok or a readable error, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../src/job.rs"]
#[allow(dead_code)]
mod job;

fuzz_target!(|data: &[u8]| {
    match job::Job::parse(data) {
        Ok(job) => {
            // a valid job survives a round trip through its JSON form
            let again = job::Job::from_value(job.to_value()).expect("round trip");
            assert_eq!(again, job);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});

//! Arbitrary request sequences (and raw frames) against a small store; see
//! `bluebridge_server::fuzzing::check_requests` for the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bluebridge_server::fuzzing::check_requests(data);
});

//! Arbitrary bytes through the whole frame parser and request validation; see
//! `bluebridge_proto::fuzzing::check_frame` for the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bluebridge_proto::fuzzing::check_frame(data);
});

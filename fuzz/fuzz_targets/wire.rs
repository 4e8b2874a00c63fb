//! Fuzz target `wire`: see `checks::wire` for what it covers and checks.
#![no_main]

#[allow(dead_code)] // each target uses one of the shared checks
#[path = "checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::wire(data));

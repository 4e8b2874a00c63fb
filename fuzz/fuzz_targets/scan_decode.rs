//! Fuzz target `scan_decode`: see `checks::scan_decode` for what it covers and checks.
#![no_main]

#[allow(dead_code)] // each target uses one of the shared checks
#[path = "checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::scan_decode(data));

//! Every input the fuzzers found a crash, hang or memory blow-up with
//! (`fuzz/regressions/<target>/`), replayed through the very check its target
//! runs (`fuzz/fuzz_targets/checks.rs`, included here). No fuzzer, no
//! nightly, no services: a fixed finding stays fixed in the ordinary suite.

#[allow(dead_code)] // the file also serves the fuzz targets
#[path = "../../fuzz/fuzz_targets/checks.rs"]
mod checks;

use std::path::Path;
use std::time::{Duration, Instant};

/// Generous for one input: the targets' own timeout is 10 s, and what the
/// fuzzer flagged as a hang must now finish well within it.
const PER_INPUT: Duration = Duration::from_secs(10);
/// Peak memory one input may add. The targets' limits allow a decode of
/// 4 Mpx (about 100 MiB with the decoder's budget); the fuzzers' RSS limit is
/// 2 GiB, and the DICOM finding kept here allocated 2.6 GB.
const PER_INPUT_KIB: u64 = 512 * 1024;

/// This process's peak RSS (VmHWM), in KiB.
fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.expect("regression entry").path();
        let input = std::fs::read(&path).expect("read regression input");
        // Resets VmHWM to the current RSS, so the peak below is this input's.
        std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
        let before = peak_kib();
        let t0 = Instant::now();
        check(&input);
        let grew = peak_kib().saturating_sub(before);
        assert!(
            grew < PER_INPUT_KIB,
            "{} raised the peak RSS by {} MiB",
            path.display(),
            grew / 1024
        );
        assert!(
            t0.elapsed() < PER_INPUT,
            "{} took {:?}",
            path.display(),
            t0.elapsed()
        );
        n += 1;
    }
    n
}

#[test]
fn fuzz_regressions_stay_fixed() {
    let replayed = replay("scan_decode", checks::scan_decode)
        + replay("dicom", checks::dicom)
        + replay("wire", checks::wire)
        + replay("manifest_state", checks::manifest_state);
    // The DICOM finding is kept there; an empty replay would prove nothing.
    assert!(replayed >= 1, "no regression inputs found");
    eprintln!("replayed {replayed} fuzz regression inputs");
}

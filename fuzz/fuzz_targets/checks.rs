//! What each fuzz target checks, shared with the ordinary test suite:
//! `tests/tests/fuzz_regressions.rs` includes this file and replays every kept
//! crash input (`fuzz/regressions/<target>/`) through the same function, so a
//! fixed crash stays fixed without a fuzzer or a nightly toolchain.
//!
//! Only `pleura` and `serde_json` are used, which both crates have.

use pleura::model::Manifest;
use pleura::scan::{decode, detect_format, load_scan, Limits, ScanError};
use pleura::wire::{
    self, Activation, Heartbeat, ModelAnnouncement, Priority, RegistryEntry, ReloadFailure,
    ScanResult, MAX_CORRELATION_HEADERS, MAX_CORRELATION_NAME, MAX_CORRELATION_VALUE,
};

/// Small limits keep every allocation an input can provoke well inside
/// libFuzzer's RSS limit while still exercising the limit checks.
const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_pixels: 1 << 22,
};
const SIZE: u32 = 32;

/// The entry point the worker calls on every body: sniffing, limits, PNG/JPEG/
/// DICOM decoding and preprocessing. A scan becomes a `SIZE`² input in [0, 1],
/// or a `ScanError` with a stable code and a bounded message.
pub fn scan_decode(data: &[u8]) {
    let sniffed = detect_format(data);
    match load_scan(data, &LIMITS, SIZE) {
        Ok(input) => {
            assert!(sniffed.is_some(), "decoded a body no format claims");
            assert_eq!(input.len(), (SIZE * SIZE) as usize);
            assert!(
                input.iter().all(|v| (0.0..=1.0).contains(v)),
                "model input outside [0, 1]"
            );
        }
        Err(e) => {
            assert!(matches!(
                e.code(),
                "empty_body"
                    | "unsupported_format"
                    | "corrupt_image"
                    | "too_large"
                    | "blank_image"
                    | "unsupported_dicom"
            ));
            if sniffed.is_none() && !data.is_empty() && data.len() <= LIMITS.max_bytes {
                assert_eq!(e, ScanError::UnsupportedFormat);
            }
            // Messages are fixed strings (plus a UID or a number), never file content.
            assert!(e.to_string().len() < 200, "unbounded error message");
        }
    }
}

/// The DICOM path alone: the input is what follows the `DICM` magic, so the
/// fuzzer's time goes to the length walk, the transfer syntaxes, the parser
/// and the pixel pipeline rather than to rediscovering the magic.
pub fn dicom(body: &[u8]) {
    let mut bytes = Vec::with_capacity(body.len() + 4);
    bytes.extend_from_slice(b"DICM");
    bytes.extend_from_slice(body);
    if let Ok(image) = decode(&bytes, &LIMITS) {
        let pixels = u64::from(image.width) * u64::from(image.height);
        assert_eq!(
            image.data.len() as u64,
            pixels,
            "pixel buffer disagrees with the dimensions"
        );
        assert!(pixels <= LIMITS.max_pixels);
    }
}

/// Parses `json` as `$t`; when it parses, it must survive a write and a
/// re-read unchanged (results and registry records are re-published as read).
macro_rules! roundtrip {
    ($t:ty, $json:expr) => {
        if let Ok(doc) = serde_json::from_slice::<$t>($json) {
            let again = serde_json::to_vec(&doc).expect("an accepted document serialises");
            let back: $t = serde_json::from_slice(&again).expect("a written document reads back");
            assert_eq!(doc, back, "document changed in a write and re-read");
        }
    };
}

/// A job's metadata as the worker reads it (job id, priority markers,
/// correlation headers) and the documents it writes (result, heartbeat) or
/// reads (announcement). The first byte picks the parser.
pub fn wire(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 6 {
        0 => {
            if wire::validate_job_id(&text).is_ok() {
                assert!(!text.is_empty() && text.len() <= wire::MAX_JOB_ID_LEN);
                assert!(text.bytes().all(|b| b.is_ascii_graphic()));
            }
        }
        1 => {
            // The AMQP priority property, then the priority header.
            let amqp = rest.first().copied();
            let header = std::str::from_utf8(rest.get(1..).unwrap_or_default()).ok();
            let p = Priority::from_markers(amqp, header);
            assert_eq!(p.as_str().parse::<Priority>().ok(), Some(p));
            let _ = text.parse::<Priority>();
        }
        2 => {
            // Headers as `name<TAB>value` lines.
            let pairs: Vec<(&str, &str)> = text
                .lines()
                .map(|l| l.split_once('\t').unwrap_or((l, "")))
                .collect();
            let kept = wire::correlation_headers(pairs);
            assert!(kept.len() <= MAX_CORRELATION_HEADERS);
            for (k, v) in &kept {
                assert!(k.len() <= MAX_CORRELATION_NAME && v.len() <= MAX_CORRELATION_VALUE);
                assert!(!v.chars().any(char::is_control), "control character kept");
            }
        }
        3 => roundtrip!(ScanResult, rest),
        4 => roundtrip!(Heartbeat, rest),
        _ => roundtrip!(ModelAnnouncement, rest),
    }
}

/// `model.json`, parsed and validated as `ModelFiles::read_dir` does, and the
/// registry's records in Redis, parsed as `registry::Registry` does. The first
/// byte picks the document. A manifest that validates must still validate,
/// unchanged, after a write and a re-read: publishing writes what it read.
pub fn manifest_state(data: &[u8]) {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(manifest) = serde_json::from_slice::<Manifest>(json) {
                if manifest.validate().is_ok() {
                    roundtrip!(Manifest, json);
                    let again = serde_json::to_vec(&manifest).expect("serialises");
                    let back: Manifest = serde_json::from_slice(&again).expect("reads back");
                    back.validate().expect("a valid manifest stays valid");
                }
            }
        }
        1 => {
            if let Ok(entry) = serde_json::from_slice::<RegistryEntry>(json) {
                let _ = entry.manifest.validate();
                roundtrip!(RegistryEntry, json);
            }
        }
        2 => roundtrip!(Activation, json),
        _ => roundtrip!(ReloadFailure, json),
    }
}

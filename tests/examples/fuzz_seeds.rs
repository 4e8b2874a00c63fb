//! Writes the seed corpora of the fuzz targets (`fuzz/`) into a directory:
//! `fuzz_seeds DIR` makes `DIR/<target>/` for each target.
//!
//! Seeds are generated, never committed: the scan targets get the poison
//! corpus and its valid sources (only the small ones: the fuzzer runs at
//! `-max_len=65536`), the document targets one valid document of each kind.
//! The first byte of a document seed selects the parser, as the targets read it.

use std::path::{Path, PathBuf};

use pleura::model::{init_model, ResNetSpec};
use pleura::wire::{
    Activation, Classification, ErrorInfo, GateOutcome, JobContext, Label, ModelAnnouncement,
    Priority, RegistryEntry, ReloadFailure, ScanResult, Timings,
};
use pleura_tests::poison;

/// The fuzzers' `-max_len`: larger seeds would be cut anyway.
const MAX_SEED: usize = 64 * 1024;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create seed dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn doc(selector: u8, json: serde_json::Result<Vec<u8>>) -> Vec<u8> {
    let mut out = vec![selector];
    out.extend(json.expect("serialise"));
    out
}

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: fuzz_seeds DIR"));
    let corpus = poison::generate(&poison::Options {
        max_bytes: 1 << 20,
        max_pixels: 1 << 22,
        seed: 1,
        data: pleura_tests::data_dir(),
    });
    let mut sources = poison::synthetic_sources();
    if let Some(dir) = pleura_tests::data_dir() {
        sources.extend(poison::real_sources(&dir).unwrap_or_default());
    }
    let bodies = sources
        .iter()
        .map(|s| (&s.body, s.format))
        .chain(corpus.cases.iter().map(|c| (&c.body, "")));
    let (mut scans, mut dicoms) = (0, 0);
    for (i, (body, format)) in bodies.enumerate() {
        if body.len() > MAX_SEED {
            continue;
        }
        write(&out.join("scan_decode"), &format!("{i:05}"), body);
        scans += 1;
        // The DICOM target prepends the magic itself.
        let is_dicom = format == "dicom" || body.get(128..132) == Some(b"DICM");
        if is_dicom && body.len() > 132 {
            write(&out.join("dicom"), &format!("{i:05}"), &body[132..]);
            dicoms += 1;
        }
    }

    let wire = out.join("wire");
    write(&wire, "job-id", b"\x00scan-2024.06.01:0042_a");
    write(&wire, "priority", b"\x01\x09stat");
    write(
        &wire,
        "correlation",
        b"\x02x-pleura-study\t1.2.3\nx-pleura-site\tnorth\nx-other\tdropped",
    );
    let job = JobContext {
        job_id: "job-1".into(),
        priority: Priority::Stat,
        correlation: [("x-pleura-study".to_string(), "1.2.3".to_string())].into(),
        worker: "w1".into(),
    };
    let timings = Timings {
        queue: Some(1.5),
        decode: 4.25,
        infer: 60.0,
        total: 66.0,
    };
    let ok = ScanResult::ok(
        job.clone(),
        Classification {
            label: Label::Effusion,
            p_effusion: 0.73,
            threshold: 0.5,
            model_version: "init-0123456789ab".into(),
        },
        timings,
    );
    let err = ScanResult::error(
        job,
        ErrorInfo {
            code: "corrupt_image".into(),
            message: "corrupt image: truncated PNG".into(),
        },
        timings,
    );
    write(&wire, "result-ok", &doc(3, serde_json::to_vec_pretty(&ok)));
    write(
        &wire,
        "result-error",
        &doc(3, serde_json::to_vec_pretty(&err)),
    );
    let announcement = ModelAnnouncement {
        schema: 1,
        version: "v1".into(),
        at: "2026-01-01T00:00:00Z".into(),
    };
    write(
        &wire,
        "announcement",
        &doc(5, serde_json::to_vec_pretty(&announcement)),
    );

    let state = out.join("manifest_state");
    let manifest = init_model(&ResNetSpec::tiny(), 1)
        .expect("tiny model")
        .manifest;
    write(
        &state,
        "manifest",
        &doc(0, serde_json::to_vec_pretty(&manifest)),
    );
    let entry = RegistryEntry {
        schema: 1,
        version: manifest.version.clone(),
        manifest,
        manifest_sha256: "0".repeat(64),
        artifact_url: "file:///registry/v1".into(),
        key_id: Some("k1".into()),
        published_at: "2026-01-01T00:00:00Z".into(),
        published_by: "ci@host".into(),
        gate: GateOutcome::Forced {
            failures: vec!["auroc".into()],
            reason: "test".into(),
        },
    };
    write(&state, "entry", &doc(1, serde_json::to_vec_pretty(&entry)));
    let activation = Activation {
        schema: 1,
        version: "v2".into(),
        previous: Some("v1".into()),
        at: "2026-01-01T00:00:00Z".into(),
        by: "ops@host".into(),
        reason: "rollout".into(),
    };
    write(
        &state,
        "activation",
        &doc(2, serde_json::to_vec_pretty(&activation)),
    );
    let refusal = ReloadFailure {
        version: "v2".into(),
        code: "canary".into(),
        message: "canary mismatch".into(),
        at: "2026-01-01T00:00:00Z".into(),
    };
    write(
        &state,
        "refusal",
        &doc(3, serde_json::to_vec_pretty(&refusal)),
    );
    println!(
        "fuzz seeds in {}: scan_decode {scans}, dicom {dicoms}, wire 7, manifest_state 4",
        out.display()
    );
}

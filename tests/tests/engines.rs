//! tract and ONNX Runtime give the same answers on the real scans.
//!
//! Both engines load the seed-sized model (ResNet-18, width 64, 256²), run
//! the same preprocessed inputs, and must agree on `p_effusion` to 1e-4 on
//! every real PNG and DICOM; both also pass the same warm-up and canary.
//! ONNX Runtime comes from `PLEURA_ONNXRUNTIME_LIBRARY` (`make test` sets it
//! to what `make onnxruntime` installed); without it this test fails, since
//! `make test` always provides it.

use pleura::model::{init_model, Engine, EngineKind, EngineOptions, ResNetSpec};
use pleura::scan::{load_scan, Limits};
use pleura_tests::{data_dir, skip};

fn scans(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for sub in ["cxr/effusion", "cxr/nofinding", "dicom"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            out.push(e.unwrap().path());
        }
    }
    out.sort();
    out
}

#[test]
fn both_engines_agree_on_every_real_scan_to_1e4() {
    let Some(data) = data_dir() else {
        return skip("engines", "no real data (PLEURA_DATA or ../shared/data)");
    };
    let library = std::env::var_os("PLEURA_ONNXRUNTIME_LIBRARY")
        .expect("PLEURA_ONNXRUNTIME_LIBRARY names libonnxruntime.so (make test sets it)");
    let files = init_model(&ResNetSpec::default(), 3).unwrap();
    let tract = Engine::from_files(files.clone()).unwrap();
    let ort = Engine::from_files_with(
        files,
        &EngineOptions {
            kind: EngineKind::Onnxruntime,
            onnxruntime_library: Some(library.into()),
        },
    )
    .unwrap();
    assert_eq!(ort.kind(), EngineKind::Onnxruntime);
    for engine in [&tract, &ort] {
        engine.canary(1e-3).expect("the same canary passes on both");
    }
    let mut worst = 0f32;
    let paths = scans(&data);
    for path in &paths {
        let bytes = std::fs::read(path).unwrap();
        let Ok(input) = load_scan(&bytes, &Limits::default(), 256) else {
            continue; // not a chest scan this pipeline reads (none expected)
        };
        let (a, b) = (
            tract.probabilities(&input).unwrap(),
            ort.probabilities(&input).unwrap(),
        );
        let diff = (a[0] - b[0]).abs();
        worst = worst.max(diff);
        assert!(
            diff <= 1e-4,
            "{}: tract {} vs onnxruntime {}",
            path.display(),
            a[0],
            b[0]
        );
    }
    eprintln!(
        "engines agree on {} real scans: max |p_tract - p_onnxruntime| = {worst:e}",
        paths.len()
    );
    assert!(paths.len() >= 110);
}

//! tract and ONNX Runtime give the same answers on the real scans.
//!
//! Both engines load the seed-sized model (ResNet-18, width 64, 256²), run
//! the same preprocessed inputs, and must agree on `p_effusion` to 1e-4 on
//! every real PNG and DICOM; both also pass the same warm-up and canary.
//! Its int8 variant, calibrated on real scans, passes the canary on both
//! engines too, though its golden cases are recorded on ONNX Runtime.
//! ONNX Runtime comes from `PLEURA_ONNXRUNTIME_LIBRARY` (`make test` sets it
//! to what `make onnxruntime` installed); without it this test fails, since
//! `make test` always provides it.

use pleura::model::{init_model, quantize, Engine, EngineKind, EngineOptions, ResNetSpec};
use pleura::scan::{load_scan, Limits};
use pleura_tests::{data_dir, skip};

fn ort_options() -> EngineOptions {
    let library = std::env::var_os("PLEURA_ONNXRUNTIME_LIBRARY")
        .expect("PLEURA_ONNXRUNTIME_LIBRARY names libonnxruntime.so (make test sets it)");
    EngineOptions {
        kind: EngineKind::Onnxruntime,
        onnxruntime_library: Some(library.into()),
    }
}

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
    let files = init_model(&ResNetSpec::default(), 3).unwrap();
    let tract = Engine::from_files(files.clone()).unwrap();
    let ort = Engine::from_files_with(files, &ort_options()).unwrap();
    assert_eq!(ort.kind(), EngineKind::Onnxruntime);
    for engine in [&tract, &ort] {
        engine.canary(1e-3).expect("the same canary passes on both");
    }
    let mut worst = 0f32;
    let paths = scans(&data);
    let (mut tract_scorer, mut ort_scorer) = (tract.scorer().unwrap(), ort.scorer().unwrap());
    for path in &paths {
        let bytes = std::fs::read(path).unwrap();
        let Ok(input) = load_scan(&bytes, &Limits::default(), 256) else {
            continue; // not a chest scan this pipeline reads (none expected)
        };
        let (a, b) = (
            tract_scorer.probabilities(&input).unwrap(),
            ort_scorer.probabilities(&input).unwrap(),
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

#[test]
fn an_int8_variant_passes_the_canary_on_both_engines() {
    let Some(data) = data_dir() else {
        return skip("engines", "no real data (PLEURA_DATA or ../shared/data)");
    };
    let parent = init_model(&ResNetSpec::default(), 3).unwrap();
    // Every fourth real PNG calibrates; the rest are what it is checked on.
    let inputs: Vec<Vec<f32>> = scans(&data)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| load_scan(&std::fs::read(p).unwrap(), &Limits::default(), 256).unwrap())
        .collect();
    let calibration: Vec<Vec<f32>> = inputs.iter().step_by(4).cloned().collect();
    let (variant, cal) = quantize::int8_variant(&parent, &calibration, &ort_options()).unwrap();
    assert_eq!(cal.images, calibration.len());
    let ort = Engine::from_files_with(variant.clone(), &ort_options()).unwrap();
    let tract = Engine::from_files(variant).unwrap();
    let fp32 = Engine::from_files(parent).unwrap();
    for engine in [&ort, &tract] {
        engine
            .canary(1e-3)
            .expect("golden cases recorded on onnxruntime hold on both engines");
    }
    let (mut o, mut t, mut f) = (
        ort.scorer().unwrap(),
        tract.scorer().unwrap(),
        fp32.scorer().unwrap(),
    );
    let (mut engines, mut precision) = (0f32, 0f32);
    for input in inputs.iter().skip(1).step_by(4) {
        let (a, b, c) = (
            o.probabilities(input).unwrap()[0],
            t.probabilities(input).unwrap()[0],
            f.probabilities(input).unwrap()[0],
        );
        engines = engines.max((a - b).abs());
        precision = precision.max((a - c).abs());
    }
    eprintln!("int8: max |onnxruntime - tract| = {engines:e}, max |int8 - fp32| = {precision:e}");
    assert!(engines <= 1e-3, "the engines disagree on int8 by {engines}");
}

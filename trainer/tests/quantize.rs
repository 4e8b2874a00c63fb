//! int8 variants end to end: a model trained on phantoms with the real
//! libtorch, quantised from its own training split, and judged by the
//! promotion gate against it; a deliberately bad calibration set is refused.

use std::path::Path;

use pleura::model::{EngineKind, EngineOptions, Precision};
use pleura::registry::{gate, GatePolicy};
use pleura_trainer::quantize::{quantize, QuantizeConfig, QuantizeError};
use pleura_trainer::train::{train, TrainConfig};

const POLICY: GatePolicy = GatePolicy {
    min_auroc: 0.0,
    min_recall: 0.0,
    max_int8_auroc_loss: 0.005,
};

/// Scans no chest looks like: black but for one bright corner. Calibrated
/// on these, every activation range is far too small and real scans clip.
fn unrepresentative(dir: &Path, n: usize) {
    for (class, count) in [("effusion", n / 2), ("nofinding", n - n / 2)] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..count {
            let img = image::GrayImage::from_fn(64, 64, |x, y| {
                image::Luma([if x < 2 + i as u32 % 3 && y < 2 {
                    255
                } else {
                    0
                }])
            });
            img.save(dir.join(class).join(format!("corner_{i}.png")))
                .unwrap();
        }
    }
}

#[test]
fn the_gate_passes_a_faithful_int8_variant_and_refuses_a_badly_calibrated_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    pleura_phantom::write_dataset(&data, 160, 0.3, 128, 8).unwrap();
    let outcome = train(&TrainConfig {
        data: data.clone(),
        out: tmp.path().join("models"),
        width: 16,
        image_size: 128,
        batch_size: 8,
        epochs: 15,
        lr: 3e-3,
        progress: false,
        version: Some("parent".into()),
        ..TrainConfig::default()
    })
    .expect("training runs");
    let parent = outcome.exported.expect("exported");
    let parent_auroc = parent.manifest.metrics.as_ref().unwrap()["auroc"]
        .as_f64()
        .unwrap();
    assert!(
        parent_auroc > 0.75,
        "the parent must be good enough for a loss to show: {parent_auroc}"
    );
    let cfg = |out: &str| QuantizeConfig {
        model: parent.dir.clone(),
        data: None,
        calibration_data: None,
        calibration_images: 32,
        out: tmp.path().join(out),
        engine: EngineOptions {
            kind: EngineKind::Tract,
            onnxruntime_library: None,
        },
        loader_threads: 2,
    };

    let good = quantize(&cfg("good")).expect("quantises");
    let m = &good.files.manifest;
    assert_eq!(m.version, "parent-int8");
    assert_eq!(m.precision, Precision::Int8);
    let d = m.derived_from.as_ref().unwrap();
    assert_eq!((d.parent.as_str(), d.calibration_images), ("parent", 32));
    assert_eq!(d.calibration_fingerprint, good.calibration.fingerprint);
    assert_eq!(m.threshold, parent.manifest.threshold);
    assert!(good.dir.join("model.onnx").is_file());
    let failures = gate(m, Some(&parent.manifest), &POLICY);
    assert!(
        failures.is_empty(),
        "a variant calibrated on its training split keeps its parent's verdicts: {failures:?} \
         (max |diff| {}, {} verdicts changed)",
        good.max_abs_diff,
        good.verdicts_changed
    );

    let corners = tmp.path().join("corners");
    unrepresentative(&corners, 16);
    let bad = quantize(&QuantizeConfig {
        calibration_data: Some(corners),
        ..cfg("bad")
    })
    .expect("a bad calibration still makes a model");
    let failures = gate(&bad.files.manifest, Some(&parent.manifest), &POLICY);
    // Refused by one of the int8 rules: an AUROC lost, or verdicts at the
    // threshold changed (which one depends on how good the parent is).
    assert!(
        failures
            .iter()
            .any(|f| (f.contains("AUROC") && f.contains("loses"))
                || (f.contains("recall") && f.contains("differs"))),
        "int8 AUROC {:?} vs parent {:?}: {failures:?}",
        bad.int8.auroc,
        bad.parent.auroc
    );

    // The parent's dataset is required: another folder's split is refused.
    let other = tmp.path().join("other");
    pleura_phantom::write_dataset(&other, 40, 0.3, 64, 6).unwrap();
    let err = quantize(&QuantizeConfig {
        data: Some(other),
        ..cfg("other")
    })
    .expect_err("not the parent's validation set");
    assert!(
        matches!(&err, QuantizeError::Unsuitable(m) if m.contains("not the one")),
        "{err}"
    );
    // And a variant is not made twice into the same place.
    assert!(matches!(
        quantize(&cfg("good")),
        Err(QuantizeError::Exists(_))
    ));
}

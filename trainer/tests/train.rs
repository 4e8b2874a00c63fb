//! Training runs end to end on tiny phantoms, against the real libtorch.

use std::path::Path;

use pleura_trainer::train::{train, TrainConfig, TrainError};

fn phantoms(dir: &Path, n: usize, prevalence: f64) {
    pleura_phantom::write_dataset(dir, n, prevalence, 64, 11).expect("phantoms");
}

fn tiny(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        width: 4,
        image_size: 64,
        batch_size: 8,
        progress: false,
        loader_threads: 2,
        ..TrainConfig::default()
    }
}

#[test]
fn ablation_overfits_sixteen_images() {
    let tmp = tempfile::tempdir().unwrap();
    phantoms(&tmp.path().join("data"), 32, 0.5);
    let cfg = TrainConfig {
        ablation: Some(16),
        epochs: 60,
        lr: 3e-3,
        ..tiny(&tmp.path().join("data"), &tmp.path().join("out"))
    };
    let outcome = train(&cfg).expect("a healthy set-up overfits 16 images");
    assert!(outcome.exported.is_none(), "an ablation exports nothing");
    assert_eq!(outcome.report.validation.at_default.accuracy, 1.0);
    assert_eq!(outcome.report.validation.n, 16);
}

#[test]
fn ablation_with_a_learning_rate_of_zero_fails_loudly() {
    let tmp = tempfile::tempdir().unwrap();
    phantoms(&tmp.path().join("data"), 32, 0.5);
    let cfg = TrainConfig {
        ablation: Some(16),
        epochs: 3,
        lr: 0.0,
        ..tiny(&tmp.path().join("data"), &tmp.path().join("out"))
    };
    let err = train(&cfg).expect_err("nothing can be learnt with lr 0");
    assert!(
        matches!(err, TrainError::AblationFailed { n: 16, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("ABLATION FAILED") && msg.contains("100%"),
        "{msg}"
    );
}

#[test]
fn a_trained_model_is_exported_with_parity_and_served() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    phantoms(&data, 60, 0.3);
    let cfg = TrainConfig {
        epochs: 2,
        ..tiny(&data, &tmp.path().join("out"))
    };
    let outcome = train(&cfg).expect("training runs");
    let exported = outcome.exported.expect("a model is exported");
    assert!(
        exported.parity_max_abs_diff <= 1e-4,
        "{}",
        exported.parity_max_abs_diff
    );
    let m = &exported.manifest;
    assert!(m.trained && m.threshold > 0.0 && m.threshold < 1.0);
    assert!(m.metrics.as_ref().unwrap().get("auroc").is_some());
    assert!(!m.golden.is_empty(), "golden cases for canary checks");
    for f in [
        "model.onnx",
        "model.json",
        "report.json",
        "report.md",
        "roc.png",
        "pr.png",
        "loss.png",
        "auroc.png",
        "confusion.png",
    ] {
        assert!(exported.dir.join(f).is_file(), "{f} written");
    }
    // The fleet's engine loads it and classifies a scan with it.
    let engine = pleura::model::Engine::load(&exported.dir).expect("the fleet loads the export");
    let mut c =
        pleura::model::LocalClassifier::new(std::sync::Arc::new(engine), Default::default());
    let scan = std::fs::read(
        std::fs::read_dir(data.join("effusion"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    let v = c.classify(&scan).expect("classifies");
    assert!((0.0..=1.0).contains(&v.classification.p_effusion));
    assert_eq!(v.classification.model_version, m.version);
}

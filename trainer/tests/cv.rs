//! Cross-validation end to end on tiny phantoms, against the real libtorch: two
//! datasets of different image sizes with colliding patient ids, several images per
//! patient.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use pleura_trainer::cv::{cross_validate, CvConfig};
use pleura_trainer::train::TrainConfig;
use tch::nn::ModuleT;

/// `n` phantoms of `size`² under `dir`, with labels.csv rewritten so that two
/// consecutive images share a patient (ids P0, P1, ... in every dataset).
fn phantoms(dir: &Path, n: usize, size: u32, seed: u64) {
    pleura_phantom::write_dataset(dir, n, 0.4, size, seed).expect("phantoms");
    let labels = dir.join("labels.csv");
    let text = std::fs::read_to_string(&labels).unwrap();
    let mut out = String::from("image,patient_id\n");
    for (i, line) in text.lines().skip(1).enumerate() {
        let image = line.split(',').next().unwrap();
        out.push_str(&format!("{image},P{}\n", i / 2));
    }
    std::fs::write(&labels, out).unwrap();
}

fn two_datasets(root: &Path) -> (PathBuf, PathBuf) {
    let (full, thumbs) = (root.join("full"), root.join("thumbs"));
    phantoms(&full, 36, 96, 21);
    phantoms(&thumbs, 30, 64, 22);
    (full, thumbs)
}

fn tiny(data: &Path, more: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        data: data.to_path_buf(),
        more_data: vec![more.to_path_buf()],
        out: out.to_path_buf(),
        epochs: 2,
        width: 4,
        image_size: 64,
        batch_size: 8,
        device: "cpu".into(),
        progress: false,
        loader_threads: 2,
        ..TrainConfig::default()
    }
}

/// `pleura-trainer train --data full --data thumbs --out out ARGS...`, run to the end.
fn cross_validate_cli(
    full: &Path,
    thumbs: &Path,
    out: &Path,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pleura-trainer"))
        .args(["train", "--data"])
        .arg(full)
        .arg("--data")
        .arg(thumbs)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("runs pleura-trainer")
}

#[test]
fn three_folds_give_every_image_one_oof_prediction_and_a_report() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, thumbs) = two_datasets(tmp.path());
    let out = tmp.path().join("cv");
    let cfg = CvConfig {
        resamples: 200,
        ..CvConfig::new(tiny(&full, &thumbs, &out), 3)
    };
    let o = cross_validate(&cfg).expect("cross-validation runs");

    // Every image exactly once, each patient in one fold, namespaced per dataset.
    assert_eq!(o.oof.len(), 66);
    let paths: HashSet<&PathBuf> = o.oof.iter().map(|r| &r.path).collect();
    assert_eq!(paths.len(), 66);
    let mut fold_of: HashMap<&str, usize> = HashMap::new();
    for r in &o.oof {
        let patient = r.patient.as_deref().unwrap();
        assert!(patient.starts_with(&format!("{}:", r.dataset)), "{patient}");
        assert_eq!(
            *fold_of.entry(patient).or_insert(r.fold),
            r.fold,
            "{patient}"
        );
        assert!((1..=3).contains(&r.fold));
        assert!((0.0..=1.0).contains(&r.p) && (0.0..=1.0).contains(&r.p_calibrated));
        assert_eq!(r.margins.len(), 1, "one view without TTA");
    }
    assert_eq!(
        fold_of.len(),
        18 + 15,
        "P0 of full and P0 of thumbs are two patients"
    );

    let csv = std::fs::read_to_string(out.join("oof.csv")).unwrap();
    let mut lines = csv.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("dataset,image,patient,label,fold,p,p_calibrated"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 66);
    let keys: HashSet<(&str, &str)> = rows
        .iter()
        .map(|l| {
            let mut f = l.split(',');
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    assert_eq!(keys.len(), 66, "each (dataset, image) once");

    let r = &o.results;
    assert_eq!(r.k, 3);
    assert_eq!(r.folds.len(), 3);
    assert_eq!(r.folds.iter().map(|f| f.images).sum::<usize>(), 66);
    let names: Vec<&str> = r.per_dataset.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["full", "thumbs"]);
    assert_eq!(o.dataset("full").unwrap().images, 36);
    assert_eq!(r.overall.images, 66);
    assert!(r.calibration.temperature.is_finite() && r.calibration.temperature > 0.0);
    assert_eq!(r.calibration.reliability_after.len(), 10);
    assert_eq!(r.epoch_curve.len(), 2);
    if let Some(t) = r.threshold.calibrated {
        // Chosen on the pooled OOF p_calibrated, so it reaches the target there.
        let caught = o
            .oof
            .iter()
            .filter(|x| x.effusion && x.p_calibrated >= t)
            .count();
        let effusions = o.oof.iter().filter(|x| x.effusion).count();
        assert!(caught as f64 / effusions as f64 >= r.threshold.target_recall);
    }
    for f in [
        "report.md",
        "cv.json",
        "oof.csv",
        "roc.png",
        "pr.png",
        "reliability.png",
        "epochs.png",
        "folds/fold-1.ot",
        "folds/fold-2.ot",
        "folds/fold-3.ot",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let md = std::fs::read_to_string(&o.report).unwrap();
    for s in [
        "## Folds",
        "## Pooled out-of-fold figures",
        "## Calibration",
        "thumbs",
    ] {
        assert!(md.contains(s), "report.md has {s}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cv.json")).unwrap()).unwrap();
    assert!(json["calibration"]["temperature"].is_number());

    // The kept fold models are the ones the OOF predictions came from.
    assert_eq!(o.models.len(), 3);
    for m in &o.models {
        assert_eq!(m.epoch, 2, "last epoch by default");
        let row = o.oof.iter().find(|r| r.fold == m.fold).unwrap();
        let bytes = std::fs::read(&row.path).unwrap();
        let x = pleura::scan::load_scan(&bytes, &Default::default(), 64).unwrap();
        let xs = tch::Tensor::from_slice(&x).view([1, 1, 64, 64]);
        let p = m
            .net
            .forward_t(&xs, false)
            .softmax(1, tch::Kind::Float)
            .double_value(&[0, 0]);
        assert!(
            (p - f64::from(row.p)).abs() < 1e-4,
            "fold {}: {p} vs {}",
            m.fold,
            row.p
        );
    }
}

#[test]
fn the_cli_cross_validates_with_the_trial_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, thumbs) = two_datasets(tmp.path());
    let out = tmp.path().join("cv");
    let output = cross_validate_cli(
        &full,
        &thumbs,
        &out,
        &[
            "--folds",
            "2",
            "--bootstrap",
            "50",
            "--epochs",
            "2",
            "--width",
            "4",
            "--image-size",
            "64",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--label-smoothing",
            "0.05",
            "--mixup",
            "0.3",
            "--dropout",
            "0.2",
            "--warmup-epochs",
            "1",
            "--ema",
            "0.9",
            "--augment-strength",
            "1.5",
            "--tta-flip",
            "--fold-epoch",
            "best",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for s in [
        "2-fold cross-validation on 66 images",
        "fold AUROC (mean ± SD)",
        "OOF AUROC, full (36 images)",
        "calibration temperature on all: T =",
        "wall time",
    ] {
        assert!(stdout.contains(s), "{s} in:\n{stdout}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cv.json")).unwrap()).unwrap();
    assert_eq!(json["fold_epoch"], "best");
    assert_eq!(json["calibration"]["views"], 2, "flip TTA: two views");
    assert_eq!(json["settings"]["recipe"]["ema_decay"], 0.9);
    let csv = std::fs::read_to_string(out.join("oof.csv")).unwrap();
    let row = csv.lines().nth(1).unwrap();
    assert!(!row.ends_with(','), "margin_flip filled: {row}");

    // Cross-validation refuses what cannot be honest, with exit code 2.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_pleura-trainer"))
        .args(["train", "--data"])
        .arg(&full)
        .arg("--data")
        .arg(&full)
        .args(["--folds", "2", "--out"])
        .arg(tmp.path().join("dup"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("both named"));
    let unknown = cross_validate_cli(
        &full,
        &thumbs,
        &tmp.path().join("unknown"),
        &["--folds", "2", "--calibrate-on", "nope"],
    );
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("--calibrate-on nope"));
}

#[test]
fn a_normal_run_trains_on_two_datasets_and_exports_its_flip() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, thumbs) = two_datasets(tmp.path());
    let cfg = TrainConfig {
        epochs: 2,
        recipe: pleura_trainer::recipe::Recipe {
            tta_flip: true,
            ema_decay: Some(0.9),
            dropout: 0.3,
            mixup_alpha: 0.4,
            ..Default::default()
        },
        ..tiny(&full, &thumbs, &tmp.path().join("out"))
    };
    let outcome = pleura_trainer::train::train(&cfg).expect("training runs");
    let data = &outcome.report.data;
    assert_eq!(data["images"], 66);
    assert_eq!(data["split"]["by_patient"], true);
    let exported = outcome.exported.expect("exported");
    // Validated with the flip, so served with it; parity checked against tch.
    assert!(exported.manifest.spec.tta_flip);
    assert!(exported.parity_max_abs_diff <= 1e-4);
}

/// The recommended recipe's shape, end to end through the CLI: a lockbox held out of
/// every fold, Platt calibration, and the fold models exported as one servable graph
/// that the fleet's engine loads and that scores the lockbox exactly as reported.
#[test]
fn a_lockbox_is_held_out_and_the_exported_ensemble_serves_what_was_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, thumbs) = two_datasets(tmp.path());
    let out = tmp.path().join("rec");
    let output = cross_validate_cli(
        &full,
        &thumbs,
        &out,
        &[
            "--folds",
            "2",
            "--bootstrap",
            "50",
            "--epochs",
            "2",
            "--width",
            "4",
            "--image-size",
            "64",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--tta-flip",
            "--lockbox",
            "0.3",
            "--lockbox-dataset",
            "full",
            "--calibration",
            "platt",
            "--calibrate-on",
            "full",
            "--calibration-holdout",
            "0.3",
            "--export",
            "--version",
            "rec-1",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for s in [
        "LOCKBOX (",
        "calibration platt on full",
        "exported the 2-model ensemble with flip TTA",
    ] {
        assert!(stdout.contains(s), "{s} in:\n{stdout}");
    }

    // The lockbox is of `full` only, and in no fold.
    let cv: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cv.json")).unwrap()).unwrap();
    let lockbox = &cv["lockbox"];
    let held: Vec<String> = lockbox["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap().to_string())
        .collect();
    assert!(!held.is_empty() && held.len() < 36, "{}", held.len());
    let oof = std::fs::read_to_string(out.join("oof.csv")).unwrap();
    // The calibration holdout is of `full` too, and in no fold either.
    let holdout = &cv["ensemble_calibration"];
    let holdout_images = holdout["images"].as_u64().unwrap() as usize;
    assert_eq!(holdout["dataset"], "full");
    assert!(holdout_images > 0);
    assert_eq!(oof.lines().count() - 1, 66 - held.len() - holdout_images);
    for line in oof.lines().skip(1) {
        let image = line.split(',').nth(1).unwrap();
        assert!(
            !(line.starts_with("full,") && held.iter().any(|h| h == image)),
            "{image} is in the lockbox and in a fold"
        );
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Lockbox (held out of everything, scored once)"));
    assert!(
        std::fs::read_to_string(out.join("lockbox.csv"))
            .unwrap()
            .lines()
            .count()
            > 1
    );

    // The model directory: what it is, how it was calibrated, what it measured.
    let dir = out.join("model").join("rec-1");
    let files = pleura::model::ModelFiles::read_dir(&dir).expect("a valid model directory");
    let m = &files.manifest;
    assert_eq!((m.spec.members, m.spec.tta_flip), (2, true));
    let c = m.calibration.as_ref().unwrap();
    assert_eq!(c.method, pleura::model::manifest::CalibrationMethod::Platt);
    // Fitted, and the threshold chosen, on the full-size images' OOF predictions only.
    let full_oof = oof.lines().filter(|l| l.starts_with("full,")).count();
    assert_eq!(cv["calibration"]["fitted_on"], "full");
    assert_eq!(cv["calibration"]["images"], full_oof);
    assert_eq!(cv["threshold"]["chosen_on"], "full");
    // The served graph's calibration and threshold are the ensemble's own, from the
    // calibration holdout, not the single models' OOF ones.
    assert!(
        c.fitted_on.contains(&format!(
            "calibration holdout: {holdout_images} images of full"
        )),
        "{}",
        c.fitted_on
    );
    assert_eq!(
        f64::from(c.bias.unwrap()),
        holdout["scaling"]["bias"].as_f64().unwrap() as f32 as f64
    );
    assert_eq!(
        f64::from(m.threshold),
        holdout["threshold"].as_f64().unwrap() as f32 as f64
    );
    assert!(m.training.as_ref().unwrap()["threshold_rule"]
        .as_str()
        .unwrap()
        .contains("calibration holdout"));
    let metrics = m.metrics.as_ref().unwrap();
    assert!(metrics["measured_on"]
        .as_str()
        .unwrap()
        .starts_with("lockbox"));
    assert_eq!(metrics["auroc"], lockbox["ensemble"]["auroc"]["value"]);
    let training = m.training.as_ref().unwrap();
    assert_eq!(training["data"]["datasets"].as_array().unwrap().len(), 2);
    assert_eq!(training["lockbox"]["images"], held.len());

    // The fleet's engine loads it, and it scores the lockbox as the report says.
    let engine = pleura::model::Engine::load(&dir).expect("the worker's engine loads it");
    engine.canary(1e-5).unwrap();
    let mut scorer = engine.scorer().unwrap();
    let samples: Vec<pleura_trainer::data::Sample> = lockbox["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| pleura_trainer::data::Sample {
            path: full
                .join(if p[1].as_bool().unwrap() {
                    "effusion"
                } else {
                    "nofinding"
                })
                .join(p[0].as_str().unwrap()),
            effusion: p[1].as_bool().unwrap(),
            patient: None,
            dataset: "full".into(),
        })
        .collect();
    let inputs = pleura_trainer::cv::lockbox::load(&samples, 64, 2).unwrap();
    for (x, p) in inputs
        .iter()
        .zip(lockbox["predictions"].as_array().unwrap())
    {
        let served = scorer.probabilities(x).unwrap()[0];
        let reported = p[2].as_f64().unwrap() as f32;
        assert!(
            (served - reported).abs() < 1e-4,
            "{} served {served}, reported {reported}",
            p[0]
        );
    }
}

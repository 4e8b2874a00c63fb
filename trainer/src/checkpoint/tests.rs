//! Checkpoints written and resumed by real (tiny) training runs, and the
//! pieces they rely on: names, pruning, exact floats, seeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::control::{BatchProgress, RunControl};
use crate::optim::max_abs_diff;
use crate::train::{train, TrainConfig, TrainError};

/// Stands in for the training service: records what the run reports,
/// copies every checkpoint away as an upload would, and asks the run to
/// stop once it has trained `stop_at_batch` batches or seen
/// `stop_after_epochs` epochs.
#[derive(Debug, Default)]
struct Service {
    upload_to: Option<PathBuf>,
    stop_at_batch: Option<usize>,
    stop_after_epochs: Option<usize>,
    batches: Mutex<Vec<BatchProgress>>,
    epochs: Mutex<Vec<(usize, Option<PathBuf>)>>,
}

impl RunControl for Service {
    fn stop(&self) -> Option<String> {
        let batches = self.batches.lock().expect("lock").len();
        let epochs = self.epochs.lock().expect("lock").len();
        (self.stop_at_batch.is_some_and(|k| batches >= k)
            || self.stop_after_epochs.is_some_and(|k| epochs >= k))
        .then(|| "cancelled by the test".to_string())
    }

    fn batch(&self, progress: BatchProgress) {
        self.batches.lock().expect("lock").push(progress);
    }

    fn epoch(&self, record: &EpochRecord, checkpoint: Option<&Path>) {
        if let Some(dir) = checkpoint {
            // Complete by the time the service hears of it.
            let state = read_state(dir).expect("a complete checkpoint");
            assert_eq!(state.epoch, record.epoch);
            if let Some(to) = &self.upload_to {
                let copy = to.join(dir.file_name().expect("a name"));
                fs::create_dir_all(&copy).unwrap();
                for f in fs::read_dir(dir).unwrap() {
                    let f = f.unwrap();
                    fs::copy(f.path(), copy.join(f.file_name())).unwrap();
                }
            }
        }
        let dir = checkpoint.map(Path::to_path_buf);
        self.epochs.lock().expect("lock").push((record.epoch, dir));
    }
}

fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    pleura_phantom::write_dataset(&data, 40, 0.4, 64, 11).expect("phantoms");
    data
}

fn tiny(data: &Path, root: &Path, service: &Arc<Service>) -> TrainConfig {
    TrainConfig {
        data: data.to_path_buf(),
        out: root.join("out"),
        epochs: 3,
        width: 4,
        image_size: 64,
        batch_size: 8,
        lr: 3e-3,
        device: "cpu".into(),
        loader_threads: 1,
        progress: false,
        control: Some(service.clone() as Arc<dyn RunControl>),
        ..TrainConfig::default()
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn tensors(file: &Path) -> HashMap<String, tch::Tensor> {
    tch::Tensor::load_multi(file).unwrap().into_iter().collect()
}

/// Largest difference between two tensor files with the same names.
fn file_diff(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len());
    ta.iter()
        .map(|(k, t)| max_abs_diff(t, &tb[k]).unwrap())
        .fold(0.0, f64::max)
}

#[test]
fn a_resumed_run_ends_with_the_uninterrupted_runs_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let uploaded = tmp.path().join("uploaded");
    let service = Arc::new(Service {
        upload_to: Some(uploaded.clone()),
        ..Service::default()
    });
    let ckpt_a = tmp.path().join("ckpt-a");
    let cfg = TrainConfig {
        checkpoint_dir: Some(ckpt_a.clone()),
        run_id: Some("run-a".into()),
        version: Some("a".into()),
        ..tiny(&data, tmp.path(), &service)
    };
    let a = train(&cfg).expect("the uninterrupted run");

    // Every epoch checkpointed and reported; only the newest two kept.
    let told: Vec<usize> = service.epochs.lock().unwrap().iter().map(|e| e.0).collect();
    assert_eq!(told, [1, 2, 3]);
    assert_eq!(names_in(&ckpt_a), ["epoch-0002", "epoch-0003"]);
    assert_eq!(
        names_in(&uploaded),
        ["epoch-0001", "epoch-0002", "epoch-0003"]
    );
    let batches = service.batches.lock().unwrap().clone();
    let per_epoch = batches[0].batches;
    assert_eq!(batches.len(), 3 * per_epoch);
    assert!(batches
        .iter()
        .all(|p| p.epochs == 3 && p.images_per_second > 0.0));
    assert_eq!((batches[per_epoch].epoch, batches[per_epoch].batch), (2, 1));
    let first = read_state(&uploaded.join("epoch-0001")).unwrap();
    assert_eq!((first.epoch, first.epochs, first.records.len()), (1, 3, 1));

    let ckpt_b = tmp.path().join("ckpt-b");
    let cfg_b = TrainConfig {
        checkpoint_dir: Some(ckpt_b.clone()),
        resume: Some(uploaded.join("epoch-0001")),
        run_id: Some("run-b".into()),
        version: Some("b".into()),
        control: None,
        ..cfg.clone()
    };
    let b = train(&cfg_b).expect("the resumed run");
    assert_eq!(names_in(&ckpt_b), ["epoch-0002", "epoch-0003"]);

    // Bit for bit on the CPU: every draw derives from (seed, epoch), the
    // optimiser state is restored exactly, the best scores round-trip.
    // (On CUDA, non-deterministic kernels would loosen this to rounding.)
    let epoch3 = |root: &Path, f: &str| root.join("epoch-0003").join(f);
    for f in [WEIGHTS_FILE, BEST_WEIGHTS_FILE, OPTIMIZER_FILE] {
        let d = file_diff(&epoch3(&ckpt_a, f), &epoch3(&ckpt_b, f));
        assert_eq!(d, 0.0, "{f} differs by up to {d:e}");
    }
    let moved = file_diff(
        &uploaded.join("epoch-0001").join(WEIGHTS_FILE),
        &epoch3(&ckpt_a, WEIGHTS_FILE),
    );
    assert!(
        moved > 1e-3,
        "epochs 2 and 3 must change the weights ({moved})"
    );
    let (sa, sb) = (
        read_state(&ckpt_a.join("epoch-0003")).unwrap(),
        read_state(&ckpt_b.join("epoch-0003")).unwrap(),
    );
    assert_eq!(sa.best.scores, sb.best.scores);
    assert_eq!(sa.best.evaluation, sb.best.evaluation);
    assert_eq!(sa.config_fingerprint, sb.config_fingerprint);

    let (ma, mb) = (
        &a.exported.as_ref().unwrap().manifest,
        &b.exported.as_ref().unwrap().manifest,
    );
    assert_eq!(ma.sha256, mb.sha256, "the same ONNX, to the byte");
    assert_eq!(ma.spec, mb.spec);
    assert_eq!(ma.threshold, mb.threshold);
    assert_eq!(ma.metrics, mb.metrics);
    assert_eq!(ma.golden, mb.golden);
    let (ta, tb) = (ma.training.as_ref().unwrap(), mb.training.as_ref().unwrap());
    assert_eq!(ta["best_epoch"], tb["best_epoch"]);
    assert_eq!(ta["data"], tb["data"]);
    let without_version = |c: &serde_json::Value| {
        let mut c = c.clone();
        c.as_object_mut().unwrap().remove("version");
        c
    };
    assert_eq!(
        without_version(&ta["config"]),
        without_version(&tb["config"])
    );
    assert_eq!(ta["run_id"], "run-a");
    assert_eq!(tb["run_id"], "run-b");
    assert!(ta.get("resumed_from_epoch").is_none());
    assert_eq!(tb["resumed_from_epoch"], 1);
    assert!(b.report.notes.iter().any(|n| n.contains("Resumed")));
    assert_eq!(b.report.epochs.len(), 3);
    assert_eq!(a.report.best_epoch, b.report.best_epoch);
}

#[test]
fn a_stop_ends_the_run_at_the_next_batch_and_a_resume_checks_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let ckpt = tmp.path().join("ckpt");
    let service = Arc::new(Service {
        stop_at_batch: Some(5),
        ..Service::default()
    });
    let cfg = TrainConfig {
        checkpoint_dir: Some(ckpt.clone()),
        ..tiny(&data, tmp.path(), &service)
    };
    let err = train(&cfg).expect_err("the service stops it");
    let TrainError::Stopped { reason, epoch } = &err else {
        panic!("{err}")
    };
    assert_eq!(reason, "cancelled by the test");
    let batches = service.batches.lock().unwrap().clone();
    assert_eq!(batches.len(), 5, "not one batch after the stop");
    assert!(batches[0].batches <= 5, "the stop falls in epoch 2");
    assert_eq!(*epoch, 2);
    assert_eq!(names_in(&cfg.out), Vec::<String>::new(), "nothing exported");
    assert_eq!(names_in(&ckpt), ["epoch-0001"]);

    // The checkpoint resumes (stopped again at once, so nothing more runs).
    let from = ckpt.join("epoch-0001");
    let again = Arc::new(Service {
        stop_at_batch: Some(0),
        ..Service::default()
    });
    let resumed = TrainConfig {
        resume: Some(from.clone()),
        checkpoint_dir: None,
        ..tiny(&data, tmp.path(), &again)
    };
    let err = train(&resumed).expect_err("stopped at once");
    assert!(matches!(err, TrainError::Stopped { epoch: 2, .. }), "{err}");

    // Anything else is refused, and says why.
    let refused = |cfg: TrainConfig| match train(&cfg) {
        Err(TrainError::Resume(msg)) => msg,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let msg = refused(TrainConfig {
        lr: 1e-3,
        ..resumed.clone()
    });
    assert!(msg.contains("lr (checkpoint 0.003, now 0.001)"), "{msg}");
    let msg = refused(TrainConfig {
        epochs: 4,
        seed: 1,
        ..resumed.clone()
    });
    assert!(msg.contains("epochs") && msg.contains("seed"), "{msg}");
    let msg = refused(TrainConfig {
        resume: Some(ckpt.join("epoch-0009")),
        ..resumed.clone()
    });
    assert!(msg.contains("epoch-0009"), "{msg}");

    let other_format = tmp.path().join("other-format");
    fs::create_dir(&other_format).unwrap();
    for f in [WEIGHTS_FILE, BEST_WEIGHTS_FILE, OPTIMIZER_FILE] {
        fs::copy(from.join(f), other_format.join(f)).unwrap();
    }
    let mut state: serde_json::Value =
        serde_json::from_slice(&fs::read(from.join(STATE_FILE)).unwrap()).unwrap();
    state["format"] = 99.into();
    fs::write(other_format.join(STATE_FILE), state.to_string()).unwrap();
    let msg = refused(TrainConfig {
        resume: Some(other_format.clone()),
        ..resumed.clone()
    });
    assert!(msg.contains("format 99"), "{msg}");

    fs::remove_file(other_format.join(OPTIMIZER_FILE)).unwrap();
    state["format"] = FORMAT.into();
    fs::write(other_format.join(STATE_FILE), state.to_string()).unwrap();
    let msg = refused(TrainConfig {
        resume: Some(other_format),
        ..resumed
    });
    assert!(msg.contains(OPTIMIZER_FILE), "{msg}");
}

#[test]
fn a_stop_before_the_export_leaves_no_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let service = Arc::new(Service {
        stop_after_epochs: Some(1),
        ..Service::default()
    });
    let cfg = TrainConfig {
        epochs: 1,
        ..tiny(&data, tmp.path(), &service)
    };
    let err = train(&cfg).expect_err("stopped before the export");
    assert!(matches!(err, TrainError::Stopped { epoch: 1, .. }), "{err}");
    assert_eq!(service.epochs.lock().unwrap().as_slice(), [(1, None)]);
    assert_eq!(names_in(&cfg.out), Vec::<String>::new());
}

#[test]
fn checkpoint_names_and_seeds() {
    assert_eq!(dir_name(7), "epoch-0007");
    assert_eq!(epoch_of("epoch-0007"), Some(7));
    assert_eq!(epoch_of("epoch-12345"), Some(12345));
    assert_eq!(epoch_of("epoch-"), None);
    assert_eq!(epoch_of("epoch-7a"), None);
    assert_eq!(temp_epoch(&temp_name(3)), Some(3));
    assert_eq!(temp_epoch("epoch-0003"), None);
    // The data seed is the one runs used before checkpoints existed.
    assert_eq!(EpochSeeds::derive(5, 2).data, 5 * 1_000_003 + 2);
    assert_ne!(
        EpochSeeds::derive(5, 2).torch,
        EpochSeeds::derive(5, 3).torch
    );
    assert!(EpochSeeds::derive(u64::MAX, 9).torch >= 0);
}

#[test]
fn pruning_keeps_the_newest_two_and_only_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for name in [
        "epoch-0001",
        "epoch-0002",
        "epoch-0003",
        "epoch-0004",
        ".epoch-0002.tmp-1",
        ".epoch-0004.tmp-1",
        "notes",
    ] {
        fs::create_dir(root.join(name)).unwrap();
    }
    prune(root, 4);
    assert_eq!(
        names_in(root),
        [".epoch-0004.tmp-1", "epoch-0003", "epoch-0004", "notes"]
    );
}

#[test]
fn floats_round_trip_exactly() {
    #[derive(Serialize, Deserialize)]
    struct T {
        #[serde(with = "exact_f64")]
        x: f64,
        #[serde(with = "exact_f32s")]
        v: Vec<f32>,
    }
    let t = T {
        x: 0.1 + 0.2,
        v: vec![
            1.0 / 3.0,
            f32::MIN_POSITIVE,
            0.987_654_3,
            f32::NAN,
            f32::INFINITY,
        ],
    };
    let back: T = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
    assert_eq!(back.x.to_bits(), t.x.to_bits());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back.v), bits(&t.v));
}

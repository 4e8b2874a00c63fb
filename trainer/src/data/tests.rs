//! Tests of datasets, splits and the loader, on phantoms and on the real data.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use pleura::scan::{load_scan, Limits};

use super::dataset::class_dir;
use super::*;
use crate::augment::AugmentConfig;
use pleura_phantom::write_dataset;
use std::collections::HashSet;

/// A phantom dataset of `n` 64² images with 30% effusions (one patient per image).
fn phantom_dataset(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), n, 0.3, 64, 11).unwrap();
    dir
}

/// A dataset of placeholder files (never decoded) with the given (name, effusion) list.
fn fake_dataset(files: &[(&str, bool)], labels: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for class in ["effusion", "nofinding"] {
        fs::create_dir_all(dir.path().join(class)).unwrap();
    }
    for (name, effusion) in files {
        fs::write(dir.path().join(class_dir(*effusion)).join(name), b"x").unwrap();
    }
    if let Some(csv) = labels {
        fs::write(dir.path().join(LABELS_FILE), csv).unwrap();
    }
    dir
}

fn names(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn patients(samples: &[Sample]) -> HashSet<String> {
    samples.iter().filter_map(|s| s.patient.clone()).collect()
}

fn has_both_classes(samples: &[Sample]) -> bool {
    samples.iter().any(|s| s.effusion) && samples.iter().any(|s| !s.effusion)
}

// --- scan_dataset ------------------------------------------------------------------

#[test]
fn scans_a_phantom_dataset() {
    let dir = phantom_dataset(20);
    let ds = scan_dataset(dir.path()).unwrap();
    assert_eq!(ds.len(), 20);
    assert_eq!(ds.n_effusion(), 6);
    assert!(ds.has_patient_ids());
    assert_eq!(patients(&ds.samples).len(), 20);
    let mut sorted = ds.samples.clone();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(sorted, ds.samples);
    for s in &ds.samples {
        let folder = s.path.parent().unwrap().file_name().unwrap();
        assert_eq!(folder == "effusion", s.effusion);
        assert_eq!(s.class(), if s.effusion { 0 } else { 1 });
    }
    // The label of phantom_00000 in labels.csv gives its patient id, P00000.
    let first = ds
        .samples
        .iter()
        .find(|s| s.path.ends_with("phantom_00000.png"))
        .unwrap();
    assert_eq!(first.patient.as_deref(), Some("P00000"));
}

#[test]
fn scan_is_recursive_and_filters_extensions() {
    let dir = fake_dataset(&[("a.png", true), ("b.txt", true), ("c.JPG", false)], None);
    let nested = dir.path().join("nofinding/site2/2024");
    fs::create_dir_all(&nested).unwrap();
    fs::write(nested.join("d.dcm"), b"x").unwrap();
    fs::write(nested.join("e.jpeg"), b"x").unwrap();
    fs::write(dir.path().join("effusion/._a.png"), b"x").unwrap();
    fs::write(dir.path().join("effusion/notes"), b"x").unwrap();
    let ds = scan_dataset(dir.path()).unwrap();
    assert_eq!(names(&ds.samples), ["a.png", "c.JPG", "d.dcm", "e.jpeg"]);
    assert_eq!(ds.n_effusion(), 1);
    assert!(ds.samples.iter().all(|s| s.patient.is_none()));
    assert!(!ds.has_patient_ids());
}

#[test]
fn scan_errors_are_typed_and_clear() {
    let missing = tempfile::tempdir().unwrap();
    let err = scan_dataset(&missing.path().join("nope")).unwrap_err();
    assert!(matches!(err, DataError::NotADirectory(_)), "{err}");

    fs::create_dir(missing.path().join("effusion")).unwrap();
    fs::write(missing.path().join("effusion/a.png"), b"x").unwrap();
    let err = scan_dataset(missing.path()).unwrap_err();
    assert!(matches!(err, DataError::MissingClassDir { .. }), "{err}");
    assert!(err.to_string().contains("nofinding"), "{err}");

    let empty = fake_dataset(&[("a.png", true), ("readme.txt", false)], None);
    let err = scan_dataset(empty.path()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::EmptyClass {
                class: "nofinding",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("no images"), "{err}");
}

#[test]
fn labels_columns_in_any_order() {
    let files = [
        ("a.png", true),
        ("b.png", false),
        ("c.png", false),
        ("d.png", true),
    ];
    // patient_id first, extra columns, a quoted field with a comma, CRLF, a BOM, an
    // empty id, a row for a file that does not exist, and d.png not listed at all.
    let csv = "\u{feff}patient_id,age,image,finding_labels\r\n\
               17,50,a.png,\"Effusion,Mass\"\r\n\
               18,61,b.png,No Finding\r\n\
               ,70,c.png,No Finding\r\n\
               99,1,ghost.png,x\r\n";
    let dir = fake_dataset(&files, Some(csv));
    let ds = scan_dataset(dir.path()).unwrap();
    let by_name: HashMap<String, Option<String>> = names(&ds.samples)
        .into_iter()
        .zip(ds.samples.iter().map(|s| s.patient.clone()))
        .collect();
    assert_eq!(by_name["a.png"].as_deref(), Some("17"));
    assert_eq!(by_name["b.png"].as_deref(), Some("18"));
    assert_eq!(by_name["c.png"], None);
    assert_eq!(by_name["d.png"], None);
    assert!(!ds.has_patient_ids());

    // The real data's order, with a column after patient_id.
    let csv = "image,label,finding_labels,view_position,patient_id,age,sex\n\
               a.png,effusion,Effusion,PA,1,60,M\n\
               b.png,nofinding,No Finding,AP,2,61,F\n\
               c.png,nofinding,No Finding,PA,2,61,F\n\
               d.png,effusion,Effusion,PA,3,62,M\n";
    let dir = fake_dataset(&files, Some(csv));
    let ds = scan_dataset(dir.path()).unwrap();
    assert!(ds.has_patient_ids());
    let ids: Vec<_> = ds
        .samples
        .iter()
        .map(|s| s.patient.clone().unwrap())
        .collect();
    // Path order: effusion/a, effusion/d, nofinding/b, nofinding/c.
    assert_eq!(ids, ["1", "3", "2", "2"]);
}

#[test]
fn malformed_labels_are_errors() {
    let files = [("a.png", true), ("b.png", false)];
    for (csv, expect) in [
        ("image,label\na.png,effusion\n", "patient_id"),
        ("patient_id,label\n1,effusion\n", "`image`"),
        (
            "image,patient_id\na.png,1\na.png,2\n",
            "two different patient ids",
        ),
        ("image,x,patient_id\na.png\n", "line 2"),
        ("", "empty"),
    ] {
        let dir = fake_dataset(&files, Some(csv));
        let err = scan_dataset(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Labels { .. }), "{err}");
        assert!(err.to_string().contains(expect), "{csv:?}: {err}");
    }
    // The same file name in both classes cannot be matched to one patient.
    let dir = fake_dataset(
        &[("a.png", true), ("b.png", false)],
        Some("image,patient_id\na.png,1\n"),
    );
    fs::write(dir.path().join("nofinding/a.png"), b"x").unwrap();
    let err = scan_dataset(dir.path()).unwrap_err();
    assert!(err.to_string().contains("ambiguous"), "{err}");
}

// --- split -------------------------------------------------------------------------

/// 10 effusion and 14 no-finding images, 22 patients: P1 has two images (one of each
/// class), P2 has two no-finding images.
fn patient_dataset() -> (tempfile::TempDir, Dataset) {
    let mut files = Vec::new();
    let mut csv = String::from("view_position,image,patient_id\n");
    let mut add = |name: String, effusion: bool, patient: String| {
        csv.push_str(&format!("PA,{name},{patient}\n"));
        files.push((name, effusion));
    };
    add("p1_a.png".into(), true, "P1".into());
    add("p1_b.png".into(), false, "P1".into());
    add("p2_a.png".into(), false, "P2".into());
    add("p2_b.png".into(), false, "P2".into());
    for i in 0..9 {
        add(format!("e{i}.png"), true, format!("E{i}"));
    }
    for i in 0..11 {
        add(format!("n{i}.png"), false, format!("N{i}"));
    }
    let refs: Vec<(&str, bool)> = files.iter().map(|(n, e)| (n.as_str(), *e)).collect();
    let dir = fake_dataset(&refs, Some(csv.as_str()));
    let ds = scan_dataset(dir.path()).unwrap();
    (dir, ds)
}

#[test]
fn patient_split_keeps_patients_whole() {
    let (_dir, ds) = patient_dataset();
    assert_eq!(ds.len(), 24);
    assert!(ds.has_patient_ids());
    let mut p1_in_val = 0;
    for seed in 0..40 {
        let sp = split(&ds, 0.25, seed);
        assert!(sp.summary.by_patient);
        let (train_p, val_p) = (patients(&sp.train), patients(&sp.val));
        assert!(
            train_p.is_disjoint(&val_p),
            "seed {seed}: a patient on both sides"
        );
        assert_eq!(sp.train.len() + sp.val.len(), ds.len());
        for pair in [["p1_a.png", "p1_b.png"], ["p2_a.png", "p2_b.png"]] {
            let val_names = names(&sp.val);
            let sides: Vec<bool> = pair
                .iter()
                .map(|n| val_names.iter().any(|v| v == n))
                .collect();
            assert_eq!(sides[0], sides[1], "seed {seed}: {pair:?} split apart");
        }
        if names(&sp.val).iter().any(|n| n == "p1_a.png") {
            p1_in_val += 1;
        }
        assert!(
            has_both_classes(&sp.train) && has_both_classes(&sp.val),
            "seed {seed}"
        );
        // About a quarter in validation, stratified.
        assert!(
            (4..=8).contains(&sp.val.len()),
            "seed {seed}: {:?}",
            sp.summary
        );
        assert!(
            (2..=4).contains(&sp.summary.val_effusion),
            "seed {seed}: {:?}",
            sp.summary
        );
        assert_eq!(sp.summary.patients_train, Some(train_p.len()));
        assert_eq!(sp.summary.patients_val, Some(val_p.len()));
        assert_eq!(
            sp.summary.patients_train.unwrap() + sp.summary.patients_val.unwrap(),
            22
        );
    }
    // The two-image patient is not parked on one side by construction.
    assert!(
        (1..40).contains(&p1_in_val),
        "P1 in validation {p1_in_val}/40 times"
    );
    // Deterministic under the seed.
    assert_eq!(split(&ds, 0.25, 3).val, split(&ds, 0.25, 3).val);
}

#[test]
fn stratified_split_without_patients() {
    let dir = phantom_dataset(20);
    fs::remove_file(dir.path().join(LABELS_FILE)).unwrap();
    let ds = scan_dataset(dir.path()).unwrap();
    assert!(!ds.has_patient_ids());
    let a = split(&ds, 0.3, 5);
    assert!(!a.summary.by_patient);
    assert_eq!(a.summary.patients_train, None);
    assert!(has_both_classes(&a.train) && has_both_classes(&a.val));
    // 6 effusions and 14 no-finding, 30% of each.
    assert_eq!((a.summary.val, a.summary.val_effusion), (6, 2));
    assert_eq!(a.summary.train, 14);
    let mut all: Vec<Sample> = a.train.iter().chain(&a.val).cloned().collect();
    all.sort_by(|x, y| x.path.cmp(&y.path));
    assert_eq!(all, ds.samples);
    // Deterministic under a seed, and the seed matters.
    let b = split(&ds, 0.3, 5);
    assert_eq!((a.train.clone(), a.val.clone()), (b.train, b.val));
    assert!((6..12).any(|s| split(&ds, 0.3, s).val != a.val));
}

#[test]
fn tiny_splits_keep_both_classes_on_both_sides() {
    let ds = scan_dataset(
        fake_dataset(
            &[
                ("a.png", true),
                ("b.png", true),
                ("c.png", false),
                ("d.png", false),
            ],
            None,
        )
        .path(),
    )
    .unwrap();
    for (fraction, seed) in [(0.01, 1), (0.99, 2), (0.5, 3)] {
        let sp = split(&ds, fraction, seed);
        assert!(has_both_classes(&sp.train), "{fraction}: {:?}", sp.summary);
        assert!(has_both_classes(&sp.val), "{fraction}: {:?}", sp.summary);
    }
    // Fraction 0 is an explicit "no validation".
    assert!(split(&ds, 0.0, 1).val.is_empty());
    assert!(split(&ds, f64::NAN, 1).val.is_empty());
}

// --- subsample ---------------------------------------------------------------------

#[test]
fn subsample_is_stratified_and_deterministic() {
    let dir = phantom_dataset(20);
    let ds = scan_dataset(dir.path()).unwrap();
    let sub = subsample(&ds, 10, 1);
    assert_eq!((sub.len(), sub.n_effusion()), (10, 3));
    assert!(sub.samples.iter().all(|s| ds.samples.contains(s)));
    assert!(sub.samples.windows(2).all(|w| w[0].path < w[1].path));
    assert_eq!(sub, subsample(&ds, 10, 1));
    assert!((2..8).any(|s| subsample(&ds, 10, s) != sub));
    // Rounding would give 0 effusions of 2; both classes are kept.
    let two = subsample(&ds, 2, 1);
    assert_eq!((two.len(), two.n_effusion()), (2, 1));
    assert_eq!(subsample(&ds, 100, 1), ds);
    assert!(subsample(&ds, 0, 1).is_empty());
}

#[test]
fn subsample_to_a_prevalence() {
    let dir = phantom_dataset(20); // 6 effusion, 14 no finding
    let ds = scan_dataset(dir.path()).unwrap();
    let p = subsample_prevalence(&ds, 0.125, 4);
    assert_eq!((p.len(), p.n_effusion()), (16, 2));
    let p = subsample_prevalence(&ds, 0.5, 4);
    assert_eq!((p.len(), p.n_effusion()), (12, 6));
    let p = subsample_prevalence(&ds, 0.01, 4);
    assert_eq!(p.n_effusion(), 1, "keeps one positive");
    assert_eq!(
        subsample_prevalence(&ds, 0.125, 4),
        subsample_prevalence(&ds, 0.125, 4)
    );
}

// --- Loader ------------------------------------------------------------------------

const SIZE: u32 = 32;

fn phantom_loader(n: usize, threads: usize) -> (tempfile::TempDir, Loader) {
    let dir = phantom_dataset(n);
    let ds = scan_dataset(dir.path()).unwrap();
    let loader = Loader::new(ds.samples, SIZE, Limits::default(), threads, 2);
    (dir, loader)
}

fn collect(epoch: Epoch) -> Vec<Batch> {
    epoch.map(|b| b.unwrap()).collect()
}

#[test]
fn epoch_yields_every_sample_once_with_right_labels() {
    let (_dir, loader) = phantom_loader(20, 3);
    let batches = collect(loader.epoch(6, Some(1), None));
    assert_eq!(
        batches.iter().map(Batch::len).collect::<Vec<_>>(),
        [6, 6, 6, 2]
    );
    assert_eq!(loader.num_batches(6), 4);
    let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_ne!(
        seen,
        (0..20).collect::<Vec<_>>(),
        "training order is shuffled"
    );
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    let pixels = (SIZE * SIZE) as usize;
    for b in &batches {
        assert_eq!(b.images.len(), b.len() * pixels);
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(b.labels[k], loader.samples()[i].class());
            // The loader's pixels are exactly the shared preprocessing of the file.
            let bytes = fs::read(&loader.samples()[i].path).unwrap();
            let expected = load_scan(&bytes, &Limits::default(), SIZE).unwrap();
            assert_eq!(&b.images[k * pixels..(k + 1) * pixels], &expected[..]);
        }
    }
    // Validation order is the sample order.
    let val: Vec<usize> = collect(loader.epoch(7, None, None))
        .iter()
        .flat_map(|b| b.indices.clone())
        .collect();
    assert_eq!(val, (0..20).collect::<Vec<_>>());
}

#[test]
fn batches_are_deterministic_for_a_seed() {
    let (_dir, loader) = phantom_loader(20, 4);
    let aug = Some((AugmentConfig::default(), 99));
    let a = collect(loader.epoch(5, Some(7), aug));
    let b = collect(loader.epoch(5, Some(7), aug));
    assert_eq!(a, b);
    // The same on a single thread, i.e. independent of scheduling.
    let (_dir1, single) = phantom_loader(20, 1);
    assert_eq!(collect(single.epoch(5, Some(7), aug)), a);
    // Another shuffle seed changes the order; another augmentation seed the pixels.
    let other_order = collect(loader.epoch(5, Some(8), aug));
    assert_ne!(other_order[0].indices, a[0].indices);
    let other_aug = collect(loader.epoch(5, Some(7), Some((AugmentConfig::default(), 100))));
    assert_eq!(other_aug[0].indices, a[0].indices);
    assert_ne!(other_aug[0].images, a[0].images);
    // Augmentation changes the images but not the range.
    let plain = collect(loader.epoch(5, Some(7), None));
    assert_ne!(plain[0].images, a[0].images);
    assert!(a
        .iter()
        .flat_map(|b| &b.images)
        .all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn second_epoch_is_served_from_the_cache() {
    let (_dir, loader) = phantom_loader(12, 2);
    assert_eq!((loader.decoded_count(), loader.cache().cached()), (0, 0));
    let first = collect(loader.epoch(4, Some(1), None));
    assert_eq!(loader.decoded_count(), 12);
    assert_eq!(loader.cache().cached(), 12);
    assert_eq!(loader.cache().bytes(), 12 * (SIZE * SIZE) as usize * 4);
    let second = collect(loader.epoch(4, Some(1), None));
    assert_eq!(loader.decoded_count(), 12, "second epoch decoded again");
    assert_eq!(first, second);

    let (_dir2, fresh) = phantom_loader(12, 3);
    fresh.preload().unwrap();
    assert_eq!(fresh.decoded_count(), 12);
    collect(fresh.epoch(5, None, None));
    assert_eq!(fresh.decoded_count(), 12);
}

#[test]
fn corrupt_image_is_an_error_naming_the_path() {
    let dir = phantom_dataset(10);
    let truncated = dir.path().join("effusion/truncated.png");
    let good = fs::read(
        dir.path()
            .join("nofinding")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    fs::write(&truncated, &good[..good.len() / 3]).unwrap();
    let ds = scan_dataset(dir.path()).unwrap();
    let loader = Loader::new(ds.samples, SIZE, Limits::default(), 2, 2);

    let results: Vec<_> = loader.epoch(4, Some(3), None).collect();
    let err = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("an error");
    assert!(
        matches!(
            err,
            DataError::Decode {
                code: "corrupt_image",
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&truncated.display().to_string()), "{msg}");
    assert!(msg.contains("corrupt_image"), "{msg}");
    // The epoch ends at the error.
    assert!(results.last().unwrap().is_err());

    let err = loader.preload().unwrap_err();
    assert!(err.to_string().contains("truncated.png"), "{err}");

    // Not an image at all.
    let garbage = dir.path().join("nofinding/garbage.jpg");
    fs::write(&garbage, b"not a scan").unwrap();
    let ds = scan_dataset(dir.path()).unwrap();
    let loader = Loader::new(ds.samples, SIZE, Limits::default(), 1, 1);
    let err = loader.preload().unwrap_err();
    let msg = err.to_string();
    // Lowest index first: garbage.jpg (nofinding/) sorts after effusion/truncated.png.
    assert!(
        msg.contains("truncated.png") || msg.contains("garbage.jpg"),
        "{msg}"
    );
    let shared = loader.shared.clone();
    let err = shared.image(
        shared
            .samples
            .iter()
            .position(|s| s.path == garbage)
            .unwrap(),
    );
    let err = err.unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Decode {
                code: "unsupported_format",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("garbage.jpg"), "{err}");
}

#[test]
fn dropping_an_epoch_stops_its_threads() {
    let (_dir, loader) = phantom_loader(20, 3);
    let mut epoch = loader.epoch(2, Some(1), None);
    assert!(epoch.next().unwrap().is_ok());
    // Workers hold clones of the shared state while they run.
    assert!(Arc::strong_count(&loader.shared) > 2);
    drop(epoch);
    assert_eq!(
        Arc::strong_count(&loader.shared),
        1,
        "a worker outlived its epoch"
    );
    // Exhausting an epoch also releases them, before the iterator is dropped.
    let mut epoch = loader.epoch(8, None, None);
    while epoch.next().is_some() {}
    assert_eq!(Arc::strong_count(&loader.shared), 2);
}

#[test]
fn invalid_arguments_and_empty_loaders() {
    let (_dir, loader) = phantom_loader(4, 1);
    let r: Vec<_> = loader.epoch(0, None, None).collect();
    assert_eq!(r.len(), 1);
    assert!(matches!(r[0], Err(DataError::InvalidArgument(_))));
    let bad = AugmentConfig {
        hflip_p: 2.0,
        ..AugmentConfig::default()
    };
    let r: Vec<_> = loader.epoch(2, None, Some((bad, 1))).collect();
    assert!(matches!(r.as_slice(), [Err(DataError::InvalidArgument(_))]));

    let empty = Loader::new(Vec::new(), SIZE, Limits::default(), 2, 2);
    assert!(empty.is_empty());
    assert_eq!(empty.epoch(4, Some(1), None).count(), 0);
    empty.preload().unwrap();
}

// --- real data ---------------------------------------------------------------------

/// The shared real-data folder, or `None` (with a visible message) when it is absent.
fn real_data(sub: &str) -> Option<PathBuf> {
    let base = std::env::var_os("PLEURA_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data"))
        });
    let dir = base.join(sub);
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIP real-data test: {} not found (set PLEURA_DATA)",
            dir.display()
        );
        None
    }
}

#[test]
fn real_cxr_scan_and_patient_split() {
    let Some(root) = real_data("cxr") else { return };
    let ds = scan_dataset(&root).unwrap();
    assert_eq!((ds.n_effusion(), ds.len() - ds.n_effusion()), (50, 60));
    assert!(ds.has_patient_ids());
    let sp = split(&ds, 0.2, 42);
    assert!(sp.summary.by_patient);
    assert!(patients(&sp.train).is_disjoint(&patients(&sp.val)));
    assert_eq!((sp.summary.val, sp.summary.val_effusion), (22, 10));
    eprintln!("cxr split: {}", serde_json::to_string(&sp.summary).unwrap());

    // Both RGBA files and a few others go through the shared preprocessing.
    let is_rgba = |s: &Sample| {
        let p = s.path.to_string_lossy();
        p.ends_with("00000100_000.png") || p.ends_with("00004934_000.png")
    };
    let mut few: Vec<Sample> = ds.samples.iter().filter(|s| is_rgba(s)).cloned().collect();
    assert_eq!(few.len(), 2);
    few.extend(
        subsample(&ds, 6, 1)
            .samples
            .into_iter()
            .filter(|s| !is_rgba(s))
            .take(4),
    );
    let n = few.len();
    let loader = Loader::new(few, 64, Limits::default(), 2, 1);
    loader.preload().unwrap();
    let batches = collect(loader.epoch(4, Some(1), Some((AugmentConfig::default(), 1))));
    assert_eq!(batches.iter().map(Batch::len).sum::<usize>(), n);
}

#[test]
fn real_thumbnails_split_by_patient() {
    let Some(root) = real_data("cxr-thumbs-64") else {
        return;
    };
    let ds = scan_dataset(&root).unwrap();
    assert_eq!((ds.n_effusion(), ds.len()), (170, 667));
    assert!(ds.has_patient_ids());
    let unique = patients(&ds.samples).len();
    assert!(unique < ds.len(), "patients repeat in this set");
    for seed in [1, 2, 3] {
        let sp = split(&ds, 0.2, seed);
        assert!(sp.summary.by_patient);
        assert!(
            patients(&sp.train).is_disjoint(&patients(&sp.val)),
            "seed {seed}"
        );
        let share = sp.val.len() as f64 / ds.len() as f64;
        assert!((0.15..0.25).contains(&share), "seed {seed}: {share}");
        let eff_share = sp.summary.val_effusion as f64 / sp.val.len() as f64;
        assert!(
            (0.18..0.34).contains(&eff_share),
            "seed {seed}: {eff_share}"
        );
    }
    // Every thumbnail (RGB, RGBA) decodes.
    let loader = Loader::new(ds.samples, 64, Limits::default(), 2, 2);
    loader.preload().unwrap();
    assert_eq!(loader.cache().cached(), 667);
}

// --- combined datasets and folds ------------------------------------------------------

/// Writes placeholder images (never decoded) under `root`: `patients` patients, patient
/// `p` (raw id `p`) with `1 + p % per` images, effusion for every patient with
/// `p % every == 0`. `labels.csv` carries the patient ids.
fn grouped_dataset(root: &std::path::Path, patients: usize, per: usize, every: usize) {
    for class in ["effusion", "nofinding"] {
        fs::create_dir_all(root.join(class)).unwrap();
    }
    let mut csv = String::from("image,label,patient_id\n");
    for p in 0..patients {
        let effusion = p % every == 0;
        for j in 0..1 + p % per {
            let name = format!("{p:05}_{j:03}.png");
            fs::write(root.join(class_dir(effusion)).join(&name), b"x").unwrap();
            csv.push_str(&format!("{name},{},{p}\n", class_dir(effusion)));
        }
    }
    fs::write(root.join(LABELS_FILE), csv).unwrap();
}

/// Fold of each patient; fails the test if a patient spans two folds.
fn patient_folds(samples: &[Sample], folds: &Folds) -> HashMap<String, usize> {
    let mut of: HashMap<String, usize> = HashMap::new();
    for (s, &f) in samples.iter().zip(&folds.fold_of) {
        let p = s.patient.clone().expect("every image has a patient");
        let first = *of.entry(p.clone()).or_insert(f);
        assert_eq!(first, f, "patient {p} is in folds {first} and {f}");
    }
    of
}

#[test]
fn combined_datasets_namespace_patients_and_folds_keep_them_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("alpha"), tmp.path().join("beta"));
    // The same raw patient ids 0..40 in both datasets.
    grouped_dataset(&a, 40, 4, 4);
    grouped_dataset(&b, 40, 3, 3);
    let ds = scan_datasets(&[a.clone(), b.clone()]).unwrap();
    let (na, nb) = (
        scan_dataset(&a).unwrap().len(),
        scan_dataset(&b).unwrap().len(),
    );
    assert_eq!(ds.len(), na + nb);
    assert!(ds.has_patient_ids());
    for s in &ds.samples {
        let p = s.patient.as_deref().unwrap();
        assert!(
            p.starts_with(&format!("{}:", s.dataset)),
            "{p} is namespaced by {}",
            s.dataset
        );
        assert!(s.path.starts_with(tmp.path().join(&s.dataset)));
    }
    assert_eq!(patients(&ds.samples).len(), 80, "40 + 40 distinct patients");
    // One folder alone is read exactly as before: names unprefixed.
    let alone = scan_datasets(std::slice::from_ref(&a)).unwrap();
    assert_eq!(alone, scan_dataset(&a).unwrap());
    assert!(alone
        .samples
        .iter()
        .all(|s| !s.patient.as_ref().unwrap().contains(':')));

    let mut apart = false;
    for seed in 0..8 {
        let folds = kfold(&ds.samples, 3, seed).unwrap();
        assert_eq!(folds.fold_of.len(), ds.len());
        assert!(folds.fold_of.iter().all(|&f| f < 3));
        assert_eq!(
            folds.summary.iter().map(|f| f.images).sum::<usize>(),
            ds.len()
        );
        let of = patient_folds(&ds.samples, &folds);
        // Raw id 0 exists in both datasets; were the ids not namespaced, the two would
        // be one patient and could never be in different folds.
        apart |= of["alpha:0"] != of["beta:0"];
        for f in 0..3 {
            let (train, val) = folds.train_val(&ds.samples, f);
            assert_eq!(train.len() + val.len(), ds.len());
            assert!(patients(&train).is_disjoint(&patients(&val)), "fold {f}");
            assert!(has_both_classes(&val) && has_both_classes(&train));
        }
    }
    assert!(apart, "the two datasets' patient 0 were never apart");

    let err = scan_datasets(&[a.clone(), a.clone()]).unwrap_err();
    assert!(matches!(err, DataError::DuplicateDataset { .. }), "{err}");
}

#[test]
fn folds_are_stratified_and_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    // 120 patients with 1..=5 images each, a quarter of them with effusion.
    grouped_dataset(tmp.path(), 120, 5, 4);
    let ds = scan_dataset(tmp.path()).unwrap();
    let share = ds.n_effusion() as f64 / ds.len() as f64;
    let k = 5;
    for seed in [0, 1, 2] {
        let folds = kfold(&ds.samples, k, seed).unwrap();
        patient_folds(&ds.samples, &folds);
        for f in &folds.summary {
            let fold_share = f.effusion as f64 / f.images as f64;
            assert!(
                (fold_share - share).abs() < 0.03,
                "seed {seed} fold {}: {fold_share:.3} vs {share:.3}",
                f.fold
            );
            let even = ds.len() as f64 / k as f64;
            assert!(
                (f.images as f64 - even).abs() <= 0.1 * even,
                "seed {seed} fold {}: {} images, even is {even}",
                f.fold,
                f.images
            );
        }
        assert_eq!(kfold(&ds.samples, k, seed).unwrap(), folds, "same seed");
    }
    assert_ne!(
        kfold(&ds.samples, k, 1).unwrap().fold_of,
        kfold(&ds.samples, k, 2).unwrap().fold_of,
        "another seed, other folds"
    );
}

#[test]
fn folds_refuse_what_cannot_hold_both_classes() {
    let tmp = tempfile::tempdir().unwrap();
    // 12 patients, effusion in patients 0 and 6 only: two positive groups.
    grouped_dataset(tmp.path(), 12, 2, 6);
    let ds = scan_dataset(tmp.path()).unwrap();
    assert!(kfold(&ds.samples, 2, 0).is_ok());
    let err = kfold(&ds.samples, 3, 0).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TooFewForFolds {
                k: 3,
                positive_groups: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        kfold(&ds.samples, 1, 0),
        Err(DataError::InvalidArgument(_))
    ));
}

#[test]
fn folds_without_patient_ids_split_images() {
    let dir = fake_dataset(
        &[
            ("a.png", true),
            ("b.png", true),
            ("c.png", true),
            ("d.png", false),
            ("e.png", false),
            ("f.png", false),
        ],
        None,
    );
    let ds = scan_dataset(dir.path()).unwrap();
    let folds = kfold(&ds.samples, 3, 4).unwrap();
    assert_eq!(folds.without_patient, 6);
    for f in &folds.summary {
        assert_eq!((f.images, f.effusion, f.patients), (2, 1, 2), "{f:?}");
    }
}

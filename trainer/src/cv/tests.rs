//! Tests of the pooling, the pooled threshold and the bootstrap, on known numbers.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::stats::{self, group_members, Bootstrap, MeanSd};
use super::*;

#[test]
fn the_threshold_is_chosen_on_the_pooled_oof_predictions() {
    // Two folds, interleaved in sample order: fold 0 holds samples 0, 2, 4, 6; fold 1
    // holds 1, 3, 5, 7.
    let members = vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]];
    let fold_scores = vec![vec![0.9f32, 0.8, 0.3, 0.1], vec![0.6f32, 0.5, 0.4, 0.2]];
    let positives = [true, true, true, false, false, true, false, false];
    let p = pool(&members, &fold_scores, f32::NAN);
    assert_eq!(p, vec![0.9, 0.6, 0.8, 0.5, 0.3, 0.4, 0.1, 0.2]);

    // Pooled, from the top: 0.9 (E), 0.8 (E), 0.6 (E), 0.5 (N), 0.4 (E): recall 1.0 is
    // first reached at 0.4, halfway to the next lower score 0.3 gives 0.35.
    let chosen = metrics::threshold_for_recall(&p, &positives, 1.0).unwrap();
    assert!((chosen.threshold - 0.35).abs() < 1e-6, "{chosen:?}");
    assert!((chosen.precision - 0.8).abs() < 1e-12);
    // Neither fold alone would give it: fold 0's effusions are 0.9 and 0.8 (0.55),
    // fold 1's are 0.6 and 0.4 (0.3).
    for (k, (scores, expected)) in fold_scores.iter().zip([0.55f32, 0.3]).enumerate() {
        let y: Vec<bool> = members[k].iter().map(|&i| positives[i]).collect();
        let own = metrics::threshold_for_recall(scores, &y, 1.0).unwrap();
        assert!((own.threshold - expected).abs() < 1e-6, "fold {k}: {own:?}");
    }
    // A lower target takes the highest threshold that reaches it.
    let three_quarters = metrics::threshold_for_recall(&p, &positives, 0.75).unwrap();
    assert!((three_quarters.threshold - 0.55).abs() < 1e-6);
}

/// `n_patients` patients with 1..=3 images; effusion patients score higher on average.
fn synthetic(n_patients: usize, seed: u64) -> (Vec<f32>, Vec<bool>, Vec<String>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut p, mut y, mut g) = (Vec::new(), Vec::new(), Vec::new());
    for patient in 0..n_patients {
        let effusion = rng.random::<f64>() < 0.3;
        for _ in 0..rng.random_range(1..=3) {
            let noise: f32 = rng.random();
            p.push(if effusion {
                0.3 + 0.7 * noise
            } else {
                0.7 * noise
            });
            y.push(effusion);
            g.push(format!("p{patient}"));
        }
    }
    (p, y, g)
}

fn auroc_ci(n_patients: usize, seed: u64) -> stats::Estimate {
    let (p, y, g) = synthetic(n_patients, seed);
    let all: Vec<usize> = (0..p.len()).collect();
    let groups = group_members(&all, &g);
    let boot = Bootstrap {
        resamples: 1000,
        seed: 3,
    };
    let [auroc] = bootstrap(&groups, boot, |idx: &[usize]| {
        let s: Vec<f32> = idx.iter().map(|&i| p[i]).collect();
        let l: Vec<bool> = idx.iter().map(|&i| y[i]).collect();
        [metrics::auroc(&s, &l)]
    });
    auroc
}

#[test]
fn bootstrap_intervals_hold_the_estimate_and_narrow_with_more_patients() {
    let small = auroc_ci(60, 1);
    let large = auroc_ci(1500, 1);
    for e in [small, large] {
        let (v, lo, hi) = (e.value.unwrap(), e.lo.unwrap(), e.hi.unwrap());
        assert!(lo <= v && v <= hi, "{e:?}");
        assert!(hi - lo > 0.0);
        assert_eq!(e.resamples, 1000);
    }
    let width = |e: stats::Estimate| e.hi.unwrap() - e.lo.unwrap();
    // Width shrinks like 1/sqrt(n): 25 times the patients, about a fifth of the width.
    assert!(
        width(large) < width(small) / 3.0,
        "{} vs {}",
        width(large),
        width(small)
    );
    // Fixed seed, same interval.
    assert_eq!(auroc_ci(60, 1), small);
}

#[test]
fn bootstrap_resamples_patients_not_images() {
    // One patient with 10 positives and one with 10 negatives: every resample holds
    // whole patients, so AUROC is defined only when both are drawn (about half the
    // time), and is then exactly 1.
    let g: Vec<String> = (0..20).map(|i| format!("p{}", i / 10)).collect();
    let y: Vec<bool> = (0..20).map(|i| i < 10).collect();
    let p: Vec<f32> = (0..20).map(|i| if i < 10 { 0.9 } else { 0.1 }).collect();
    let all: Vec<usize> = (0..20).collect();
    let groups = group_members(&all, &g);
    assert_eq!(groups.len(), 2);
    let [auroc, count] = bootstrap(
        &groups,
        Bootstrap {
            resamples: 400,
            seed: 9,
        },
        |idx: &[usize]| {
            let s: Vec<f32> = idx.iter().map(|&i| p[i]).collect();
            let l: Vec<bool> = idx.iter().map(|&i| y[i]).collect();
            [metrics::auroc(&s, &l), Some(idx.len() as f64)]
        },
    );
    assert!((150..250).contains(&auroc.resamples), "{auroc:?}");
    assert_eq!((auroc.lo, auroc.hi), (Some(1.0), Some(1.0)));
    assert_eq!((count.lo, count.hi), (Some(20.0), Some(20.0)));
}

#[test]
fn figures_count_the_operating_point_and_intervals() {
    let (p, y, g) = synthetic(200, 5);
    let s = Scored {
        p: &p,
        p_calibrated: &p,
        positives: &y,
        groups: &g,
    };
    let all: Vec<usize> = (0..p.len()).collect();
    let boot = Bootstrap {
        resamples: 300,
        seed: 1,
    };
    let f = stats::figures("all", &s, &all, 0.5, boot);
    assert_eq!(f.images, p.len());
    assert_eq!(f.patients, 200);
    let c = metrics::Confusion::at(&p, &y, 0.5);
    assert_eq!(f.confusion, c);
    assert_eq!(f.recall.value, Some(c.recall()));
    for e in [f.auroc, f.recall, f.precision, f.specificity, f.ece_after] {
        let (v, lo, hi) = (e.value.unwrap(), e.lo.unwrap(), e.hi.unwrap());
        assert!(lo <= v + 1e-9 && v <= hi + 1e-9, "{e:?}");
    }
    let none = stats::figures(
        "none",
        &s,
        &all,
        0.5,
        Bootstrap {
            resamples: 0,
            seed: 1,
        },
    );
    assert_eq!(none.auroc.value, f.auroc.value);
    assert_eq!((none.auroc.lo, none.auroc.resamples), (None, 0));
}

#[test]
fn mean_and_sd() {
    let m = MeanSd::of([Some(1.0), Some(3.0), None]);
    assert_eq!(m.mean, Some(2.0));
    assert!((m.sd.unwrap() - 2f64.sqrt()).abs() < 1e-12);
    assert_eq!(m.n, 2);
    assert_eq!(MeanSd::of([Some(1.0)]).sd, None);
    assert_eq!(MeanSd::of([None]).show(), "n/a");
}

#[test]
fn oof_csv_has_a_row_per_image_and_quotes_fields() {
    let row = OofRow {
        dataset: "cxr".into(),
        image: "a,b.png".into(),
        path: "/x/a,b.png".into(),
        patient: Some("cxr:1".into()),
        effusion: true,
        fold: 2,
        p: 0.25,
        p_calibrated: 0.5,
        margins: vec![-1.0, 0.5],
    };
    let csv = write::oof_csv(&[row]);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("dataset,image,patient,label,fold,p,p_calibrated,margin,margin_flip")
    );
    assert_eq!(
        lines.next(),
        Some("cxr,\"a,b.png\",cxr:1,effusion,2,0.25,0.5,-1,0.5")
    );
    assert_eq!(lines.next(), None);
}

//! Writes a cross-validation's output directory: `cv.json`, `oof.csv`,
//! `folds/fold-K.ot`, `roc.png`, `pr.png`, `reliability.png`, `epochs.png` and
//! `report.md`.

use std::fmt::{self, Write as _};
use std::fs;
use std::path::Path;

use plotters::prelude::SeriesLabelPosition;

use super::outcome::{CvOutcome, CvResults, FoldEpoch, OofRow};
use super::stats::Figures;
use crate::calibration::{ReliabilityBin, ECE_BINS};
use crate::report::{
    font_available, human_duration, io_err, json_inline, opt3, pr_steps, write_file, LineChart,
    ReportError, Series, Style, BLUE_, GREEN_, GREY, ORANGE, RED_,
};
use pleura::model::manifest::CalibrationMethod;

/// Every file of the output directory, creating it if needed.
pub(super) fn write_all(o: &CvOutcome) -> Result<(), ReportError> {
    let dir = &o.dir;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_file(
        &dir.join("cv.json"),
        serde_json::to_string_pretty(&o.results)?.as_bytes(),
    )?;
    write_file(&dir.join("oof.csv"), oof_csv(&o.oof).as_bytes())?;
    if let Some(lb) = &o.results.lockbox {
        let mut csv = String::from("image,label,p_calibrated\n");
        for (image, effusion, p) in &lb.predictions {
            csv.push_str(&format!(
                "{},{},{p}\n",
                field(image),
                if *effusion { "effusion" } else { "nofinding" }
            ));
        }
        write_file(&dir.join("lockbox.csv"), csv.as_bytes())?;
    }
    for m in &o.models {
        if let Some(path) = &m.path {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            m.vs.save(path)
                .map_err(|e| ReportError::Plot(format!("saving {}: {e}", path.display())))?;
        }
    }
    let text = font_available();
    let r = &o.results;
    plot_roc(&dir.join("roc.png"), r, text)?;
    plot_pr(&dir.join("pr.png"), r, text)?;
    plot_reliability(&dir.join("reliability.png"), r, text)?;
    plot_epochs(&dir.join("epochs.png"), r, text)?;
    write_file(&dir.join("report.md"), render(o).as_bytes())
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// `dataset,image,patient,label,fold,p,p_calibrated,margin,margin_flip`: one row per
/// image, in dataset order; `margin_flip` is empty without flip TTA.
pub(super) fn oof_csv(rows: &[OofRow]) -> String {
    let mut out =
        String::from("dataset,image,patient,label,fold,p,p_calibrated,margin,margin_flip\n");
    for r in rows {
        let view = |v: usize| r.margins.get(v).map(|m| m.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            field(&r.dataset),
            field(&r.image),
            field(r.patient.as_deref().unwrap_or("")),
            if r.effusion { "effusion" } else { "nofinding" },
            r.fold,
            r.p,
            r.p_calibrated,
            view(0),
            view(1)
        ));
    }
    out
}

const DATASET_COLOURS: [plotters::style::RGBColor; 4] = [GREEN_, ORANGE, RED_, GREY];

fn plot_roc(path: &Path, r: &CvResults, text: bool) -> Result<(), ReportError> {
    let mut series = vec![
        Series::new("chance", vec![(0.0, 0.0), (1.0, 1.0)], GREY, Style::Dashed),
        Series::new(
            format!("all ({})", opt3(r.overall.auroc.value)),
            r.roc.clone(),
            BLUE_,
            Style::Line,
        ),
    ];
    if r.roc_per_dataset.len() > 1 {
        for (i, (name, roc)) in r.roc_per_dataset.iter().enumerate() {
            let auroc = r
                .per_dataset
                .iter()
                .find(|f| &f.name == name)
                .and_then(|f| f.auroc.value);
            series.push(Series::new(
                format!("{name} ({})", opt3(auroc)),
                roc.clone(),
                DATASET_COLOURS[i % DATASET_COLOURS.len()],
                Style::Line,
            ));
        }
    }
    let c = r.overall.confusion;
    if r.threshold.calibrated.is_some() {
        series.push(Series::new(
            "threshold",
            vec![(1.0 - c.specificity(), c.recall())],
            RED_,
            Style::Points,
        ));
    }
    LineChart {
        title: format!("Out-of-fold ROC ({} folds)", r.k),
        x_desc: "false positive rate (1 - specificity)",
        y_desc: "true positive rate (recall)",
        x_range: -0.01..1.01,
        y_range: -0.01..1.01,
        integer_x: false,
        legend: SeriesLabelPosition::LowerRight,
        series,
    }
    .draw(path, text)
}

fn plot_pr(path: &Path, r: &CvResults, text: bool) -> Result<(), ReportError> {
    let o = &r.overall;
    let prevalence = o.effusion as f64 / o.images.max(1) as f64;
    let c = o.confusion;
    let mut series = vec![
        Series::new(
            format!("chance (prevalence {prevalence:.3})"),
            vec![(0.0, prevalence), (1.0, prevalence)],
            GREY,
            Style::Dashed,
        ),
        Series::new("precision-recall", pr_steps(&r.pr), BLUE_, Style::Line),
    ];
    if r.threshold.calibrated.is_some() {
        series.push(Series::new(
            "threshold",
            vec![(c.recall(), c.precision())],
            RED_,
            Style::Points,
        ));
    }
    LineChart {
        title: format!(
            "Out-of-fold precision-recall (PR-AUC {})",
            opt3(o.pr_auc.value)
        ),
        x_desc: "recall (sensitivity)",
        y_desc: "precision (PPV)",
        x_range: -0.01..1.01,
        y_range: -0.01..1.05,
        integer_x: false,
        legend: SeriesLabelPosition::LowerLeft,
        series,
    }
    .draw(path, text)
}

fn reliability_points(bins: &[ReliabilityBin]) -> Vec<(f64, f64)> {
    bins.iter()
        .filter(|b| b.count > 0)
        .map(|b| (b.mean_p, b.positive_rate))
        .collect()
}

fn plot_reliability(path: &Path, r: &CvResults, text: bool) -> Result<(), ReportError> {
    let c = &r.calibration;
    let series = vec![
        Series::new(
            "perfect calibration",
            vec![(0.0, 0.0), (1.0, 1.0)],
            GREY,
            Style::Dashed,
        ),
        Series::new(
            format!("T = 1 (ECE {})", opt3(c.ece_before)),
            reliability_points(&c.reliability_before),
            ORANGE,
            Style::Line,
        ),
        Series::new(
            format!("{} (ECE {})", scaling_label(c), opt3(c.ece_after)),
            reliability_points(&c.reliability_after),
            BLUE_,
            Style::Line,
        ),
    ];
    LineChart {
        title: format!("Reliability of OOF p_effusion ({ECE_BINS} equal-width bins)"),
        x_desc: "mean predicted p_effusion in the bin",
        y_desc: "share with effusion",
        x_range: -0.01..1.01,
        y_range: -0.01..1.01,
        integer_x: false,
        legend: SeriesLabelPosition::UpperLeft,
        series,
    }
    .draw(path, text)
}

/// `T = 1.234` or `T = 1.234, b = -0.567`.
fn scaling_label(c: &super::outcome::Calibration) -> String {
    match c.method {
        CalibrationMethod::Temperature => format!("T = {:.3}", c.temperature),
        CalibrationMethod::Platt => format!("T = {:.3}, b = {:.3}", c.temperature, c.bias),
    }
}

fn plot_epochs(path: &Path, r: &CvResults, text: bool) -> Result<(), ReportError> {
    let points = |f: &dyn Fn(&super::outcome::EpochPoint) -> Option<f64>| {
        r.epoch_curve
            .iter()
            .filter_map(|e| f(e).map(|v| (e.epoch as f64, v)))
            .collect::<Vec<_>>()
    };
    let pooled = points(&|e| e.pooled_auroc);
    let mean = points(&|e| e.mean_fold_auroc);
    let values = pooled.iter().chain(&mean).map(|p| p.1);
    let (lo, hi) = values.fold((1.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let y_range = if lo <= hi {
        (lo - 0.05).max(0.0)..(hi + 0.05).min(1.01)
    } else {
        0.0..1.01
    };
    let last = r.epoch_curve.len().max(1) as f64;
    LineChart {
        title: "Out-of-fold AUROC after each epoch".into(),
        x_desc: "epoch",
        y_desc: "AUROC",
        x_range: 0.5..last + 0.5,
        y_range,
        integer_x: true,
        legend: SeriesLabelPosition::LowerRight,
        series: vec![
            Series::new("pooled over folds", pooled, BLUE_, Style::Line),
            Series::new("mean of folds", mean, ORANGE, Style::Line),
        ],
    }
    .draw(path, text)
}

fn render(o: &CvOutcome) -> String {
    let mut out = String::new();
    markdown(o, &mut out).expect("formatting into a String does not fail");
    out
}

fn figures_rows(out: &mut String, all: &[&Figures]) -> fmt::Result {
    writeln!(
        out,
        "| Set | Images | Effusion | Patients | AUROC | PR-AUC | Recall | Precision | Specificity | ECE before | ECE after |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---|---|---|---|---|---|---|")?;
    for f in all {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f.name,
            f.images,
            f.effusion,
            f.patients,
            f.auroc.show(),
            f.pr_auc.show(),
            f.recall.show(),
            f.precision.show(),
            f.specificity.show(),
            f.ece_before.show(),
            f.ece_after.show()
        )?;
    }
    Ok(())
}

fn markdown(o: &CvOutcome, out: &mut String) -> fmt::Result {
    let r = &o.results;
    writeln!(out, "# Pleura effusion: {}-fold cross-validation\n", r.k)?;
    writeln!(out, "- Created: {}", r.created_at)?;
    writeln!(out, "- Device: {}", r.device)?;
    writeln!(
        out,
        "- Time: {} wall, {} training ({} per fold on average)\n",
        human_duration(r.wall_seconds),
        human_duration(r.training_seconds),
        human_duration(r.training_seconds / r.k.max(1) as f64)
    )?;

    writeln!(out, "## Headline (pooled out-of-fold, all images)\n")?;
    let f = &r.overall;
    writeln!(
        out,
        "AUROC **{}**, PR-AUC {}; at the threshold: recall **{}**, precision {}, specificity {}. \
         95% intervals: patient-level bootstrap, {} resamples (seed {}).\n",
        f.auroc.show(),
        f.pr_auc.show(),
        f.recall.show(),
        f.precision.show(),
        f.specificity.show(),
        r.bootstrap.resamples,
        r.bootstrap.seed
    )?;
    writeln!(
        out,
        "Mean ± SD over the {} folds: AUROC {}, PR-AUC {}, recall {}, precision {}.\n",
        r.k,
        r.fold_auroc.show(),
        r.fold_pr_auc.show(),
        r.fold_recall.show(),
        r.fold_precision.show()
    )?;

    if let Some(lb) = &r.lockbox {
        let f = &lb.ensemble;
        writeln!(out, "## Lockbox (held out of everything, scored once)\n")?;
        writeln!(
            out,
            "{} images of `{}` ({} effusion, {} patients), a fixed {:.0}% of its patients (seed {:#x}, not `--seed`), were set aside before any fold was made. The ensemble of the {} fold models, calibrated and thresholded as it is served, scores them: AUROC **{}**, PR-AUC {}; at the threshold recall **{}**, precision **{}**, specificity {}; ECE {} (unscaled {}). Fold models alone: AUROC {} (mean ± SD), so the ensemble's gain is {}.\n",
            f.images,
            lb.dataset,
            f.effusion,
            f.patients,
            lb.fraction * 100.0,
            lb.seed,
            r.k,
            f.auroc.show(),
            f.pr_auc.show(),
            f.recall.show(),
            f.precision.show(),
            f.specificity.show(),
            f.ece_after.show(),
            f.ece_before.show(),
            lb.member_auroc_mean.show(),
            match (f.auroc.value, lb.member_auroc_mean.mean) {
                (Some(e), Some(m)) => format!("{:+.3}", e - m),
                _ => "n/a".into(),
            }
        )?;
    }

    if let Some(e) = &r.ensemble_calibration {
        writeln!(out, "## The served ensemble's calibration and threshold\n")?;
        writeln!(
            out,
            "Fitted on the ensemble's own predictions of a calibration holdout: {} images of `{}` ({} effusion) held out of every fold (a fixed split), since averaging the members pulls probabilities towards the middle and the out-of-fold threshold below (one model each) does not carry over. {}; ECE {} → {}; threshold **{}** for recall {:.2} (there: recall {:.3}, precision {:.3}).\n",
            e.images,
            e.dataset,
            e.effusion,
            match e.method {
                CalibrationMethod::Temperature => format!("T = {:.3}", e.scaling.temperature),
                CalibrationMethod::Platt => format!("T = {:.3}, b = {:.3}", e.scaling.temperature, e.scaling.bias),
            },
            opt3(e.ece_before),
            opt3(e.ece_after),
            e.threshold.map_or("none".into(), |t| t.to_string()),
            r.threshold.target_recall,
            e.recall,
            e.precision
        )?;
    }

    writeln!(out, "## Settings\n")?;
    writeln!(
        out,
        "- Folds: {} (by patient, stratified; seed {}); each contributes its **{}** epoch{}",
        r.k,
        r.bootstrap.seed,
        r.fold_epoch,
        match r.fold_epoch {
            FoldEpoch::Last => " (fixed epoch count, chosen by no fold)",
            FoldEpoch::Best => " (best validation AUROC of the fold itself: optimistic)",
        }
    )?;
    if let serde_json::Value::Object(map) = &r.settings {
        for (k, v) in map {
            writeln!(out, "- {k}: {}", json_inline(v))?;
        }
    }
    writeln!(out)?;

    writeln!(out, "## Data\n")?;
    writeln!(
        out,
        "| Dataset | Images | Effusion | Patients | Without patient id |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for d in &r.data {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            d.name, d.images, d.effusion, d.patients, d.without_patient
        )?;
    }
    writeln!(
        out,
        "\nEvery image goes through the fleet's preprocessing (`load_scan`: grayscale, resized to the input size, min-max), whatever its original size. Patient ids are namespaced by dataset.\n"
    )?;

    writeln!(out, "## Folds\n")?;
    writeln!(
        out,
        "| Fold | Images | Effusion | Patients | Epoch used | Best epoch | AUROC | PR-AUC | Recall | Precision | AUROC last / best epoch | Time |"
    )?;
    writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    )?;
    for x in &r.folds {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {} / {} | {} |",
            x.fold,
            x.images,
            x.effusion,
            x.patients,
            x.epoch_used,
            x.best_epoch,
            opt3(x.auroc),
            opt3(x.pr_auc),
            x.recall,
            x.precision,
            opt3(x.auroc_last_epoch),
            opt3(x.auroc_best_epoch),
            human_duration(x.seconds)
        )?;
    }
    writeln!(
        out,
        "| mean ± SD | | | | | | {} | {} | {} | {} | | |\n",
        r.fold_auroc.show(),
        r.fold_pr_auc.show(),
        r.fold_recall.show(),
        r.fold_precision.show()
    )?;
    writeln!(
        out,
        "Recall and precision per fold are at the pooled threshold below.\n"
    )?;

    writeln!(out, "## Pooled out-of-fold figures\n")?;
    let mut rows: Vec<&Figures> = vec![&r.overall];
    rows.extend(&r.per_dataset);
    figures_rows(out, &rows)?;
    writeln!(
        out,
        "\nPoint estimate [95% interval]. Recall, precision and specificity at the threshold below, on p_calibrated; AUROC and PR-AUC of p_calibrated. Each dataset is measured alone (e.g. the full-size scans the fleet sees, apart from thumbnails).\n"
    )?;
    writeln!(
        out,
        "Pooled OOF AUROC with every fold's last epoch: {}; with every fold's best epoch: {} (optimistic).\n",
        opt3(r.oof_auroc_last_epoch),
        opt3(r.oof_auroc_best_epoch)
    )?;

    writeln!(out, "## Threshold\n")?;
    let t = &r.threshold;
    match (t.calibrated, t.uncalibrated) {
        (Some(c), u) => writeln!(
            out,
            "**{c}** on p_calibrated (calibration applied; {} on the uncalibrated p): the highest threshold (halfway to the next lower score) reaching recall {:.2} on the pooled OOF predictions of {} ({} images), not on one fold. There: recall {:.3}, precision {:.3}.\n",
            u.map_or("none".into(), |u| u.to_string()),
            t.target_recall,
            t.chosen_on,
            t.images,
            t.recall,
            t.precision
        )?,
        (None, _) => writeln!(
            out,
            "No threshold reaches recall {:.2} on the pooled OOF predictions.\n",
            t.target_recall
        )?,
    }

    writeln!(out, "## Calibration\n")?;
    let c = &r.calibration;
    writeln!(
        out,
        "Fitted on the OOF predictions of **{}** ({} images); the ECEs and the table below are of those. Applied: **{}** ({}). Temperature alone: ECE {}; Platt (temperature and a bias on the log-odds, which also undoes the shift class weights build in): {}, ECE {}.\n",
        c.fitted_on,
        c.images,
        match c.method {
            CalibrationMethod::Temperature => "temperature",
            CalibrationMethod::Platt => "Platt",
        },
        scaling_label(c),
        opt3(c.ece_temperature),
        c.platt.map_or("n/a".into(), |f| format!(
            "T = {:.4}, b = {:.4}, NLL {:.4} → {:.4}",
            f.scaling.temperature, f.scaling.bias, f.nll_before, f.nll_after
        )),
        opt3(c.ece_platt)
    )?;
    writeln!(
        out,
        "Temperature **T = {:.4}** fitted on the pooled OOF margins (minimum NLL, golden-section search on log T in [0.05, 20]; {} view{} per image). NLL {} → {}. ECE (10 equal-width bins of p_effusion, image-weighted |mean p − share with effusion|): **{} → {}**.\n",
        c.fit.map_or(1.0, |f| f.temperature),
        c.views,
        if c.views == 1 { "" } else { "s" },
        c.fit.map_or("n/a".into(), |f| format!("{:.4}", f.nll_before)),
        c.fit.map_or("n/a".into(), |f| format!("{:.4}", f.nll_after)),
        opt3(c.ece_before),
        opt3(c.ece_temperature)
    )?;
    writeln!(
        out,
        "| Bin | Images | Mean p (unscaled) | Effusion share | Mean p (calibrated) | Effusion share |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for (b, a) in c.reliability_before.iter().zip(&c.reliability_after) {
        writeln!(
            out,
            "| {:.1}-{:.1} | {} / {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            b.lo, b.hi, b.count, a.count, b.mean_p, b.positive_rate, a.mean_p, a.positive_rate
        )?;
    }
    writeln!(
        out,
        "\n(Images per bin: unscaled / with the applied calibration.)\n"
    )?;

    writeln!(out, "## Epochs\n")?;
    writeln!(out, "| Epoch | Pooled OOF AUROC | Mean fold AUROC |")?;
    writeln!(out, "|---:|---:|---:|")?;
    for e in &r.epoch_curve {
        writeln!(
            out,
            "| {} | {} | {} |",
            e.epoch,
            opt3(e.pooled_auroc),
            opt3(e.mean_fold_auroc)
        )?;
    }
    writeln!(
        out,
        "\nAn epoch's pooled AUROC is that of an intermediate model of these runs (its learning rate had not yet decayed), not of a shorter run; a peak well before the end suggests trying fewer epochs, confirmed by its own cross-validation.\n"
    )?;

    writeln!(out, "## Caveats\n")?;
    for n in &r.notes {
        writeln!(out, "- {n}")?;
    }
    writeln!(out, "\n## Files\n")?;
    writeln!(
        out,
        "- `oof.csv`: every image's out-of-fold prediction (dataset, image, patient, label, fold, p, p_calibrated, margins)."
    )?;
    writeln!(out, "- `cv.json`: everything above, for machines.")?;
    if r.lockbox.is_some() {
        writeln!(
            out,
            "- `lockbox.csv`: every lockbox image's calibrated ensemble p_effusion."
        )?;
    }
    if o.models.iter().any(|m| m.path.is_some()) {
        writeln!(
            out,
            "- `folds/fold-K.ot`: each fold model's weights (tch VarStore)."
        )?;
    }
    writeln!(out, "\n## Plots\n")?;
    for (title, file) in [
        ("Out-of-fold ROC", "roc.png"),
        ("Out-of-fold precision-recall", "pr.png"),
        ("Reliability", "reliability.png"),
        ("AUROC per epoch", "epochs.png"),
    ] {
        writeln!(out, "### {title}\n\n![]({file})\n")?;
    }
    Ok(())
}

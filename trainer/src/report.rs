//! The training report: `report.json` for machines, PNG plots and
//! `report.md` for the people deciding whether a model may triage scans.
//!
//! The report leads with what matters for a 1-in-10 finding (recall and
//! precision for effusion at the threshold we will serve, AUROC, PR-AUC
//! against its prevalence baseline) and carries the caller's caveats, so a
//! small or lucky validation set is not mistaken for a proven model.
//!
//! Plots are drawn with plotters' bitmap backend. Its text rendering needs a
//! font registered at runtime; we load a system TTF rather than ship one. If
//! none is found the plots are still drawn, without any text, rather than
//! failing a training run over labels.

use std::fmt::{self, Display, Write as _};
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use serde::{Deserialize, Serialize};

use crate::metrics::{Evaluation, Summary, DEFAULT_THRESHOLD};

/// serde_json writes a NaN or infinite `f64` (a diverged loss) as `null`;
/// read `null` back as NaN so such a report still loads.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One epoch of training, as recorded by the training loop.
///
/// Non-finite numbers are written to JSON as `null` and read back as NaN.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number as the training loop counts it.
    pub epoch: usize,
    /// Mean training loss.
    #[serde(deserialize_with = "f64_or_nan")]
    pub train_loss: f64,
    /// Training accuracy at 0.5 (a sanity signal only).
    #[serde(deserialize_with = "f64_or_nan")]
    pub train_accuracy: f64,
    /// Mean validation loss.
    #[serde(deserialize_with = "f64_or_nan")]
    pub val_loss: f64,
    /// Validation AUROC; `None` when validation lacks a class.
    pub val_auroc: Option<f64>,
    /// Validation recall for effusion.
    #[serde(deserialize_with = "f64_or_nan")]
    pub val_recall: f64,
    /// Validation precision for effusion.
    #[serde(deserialize_with = "f64_or_nan")]
    pub val_precision: f64,
    /// Learning rate used in the epoch.
    #[serde(deserialize_with = "f64_or_nan")]
    pub lr: f64,
    /// Wall time of the epoch.
    #[serde(deserialize_with = "f64_or_nan")]
    pub seconds: f64,
    /// Training throughput.
    #[serde(deserialize_with = "f64_or_nan")]
    pub images_per_second: f64,
}

/// Everything written about one training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Version of the exported model, if it was exported.
    pub model_version: Option<String>,
    /// When the report was made (see [`timestamp_now`]).
    pub created_at: String,
    /// Data summary from the caller (counts, split, prevalence, source path).
    pub data: serde_json::Value,
    /// Training configuration from the caller.
    pub config: serde_json::Value,
    /// Per-epoch history.
    pub epochs: Vec<EpochRecord>,
    /// The epoch whose model was kept (an `EpochRecord::epoch` value).
    pub best_epoch: usize,
    /// Validation of the best epoch.
    pub validation: Evaluation,
    /// ROC curve of the best epoch, `(fpr, tpr)`.
    pub roc: Vec<(f64, f64)>,
    /// Precision–recall curve of the best epoch, `(recall, precision)`.
    pub pr: Vec<(f64, f64)>,
    /// Total training wall time.
    #[serde(deserialize_with = "f64_or_nan")]
    pub training_seconds: f64,
    /// Where it trained, e.g. `"cuda:0 (NVIDIA H100)"` or `"cpu"`.
    pub device: String,
    /// Honest caveats, e.g. "validation rests on 22 images (10 effusion):
    /// wide uncertainty" (see [`sample_size_notes`]).
    pub notes: Vec<String>,
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Creating the directory or writing a file failed.
    #[error("writing {}: {source}", .path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// plotters failed to draw or encode a plot.
    #[error("plotting: {0}")]
    Plot(String),
    /// `report.json` could not be serialised.
    #[error("serialising report.json: {0}")]
    Json(#[from] serde_json::Error),
}

/// The current time as RFC 3339 UTC with seconds, for [`Report::created_at`].
pub fn timestamp_now() -> String {
    pleura::time::now_rfc3339_seconds()
}

/// Caveats about how far the validation numbers can be trusted, for
/// [`Report::notes`]: how few images they rest on, the 95% interval of the
/// recall and precision at the chosen threshold, and that the threshold was
/// tuned on the same images it is measured on.
pub fn sample_size_notes(validation: &Evaluation) -> Vec<String> {
    let mut notes = Vec::new();
    let (n, pos) = (validation.n, validation.n_positive);
    if pos == 0 {
        notes.push(format!(
            "validation holds no effusion among {n} images: recall, precision, \
             AUROC and the threshold are undefined"
        ));
        return notes;
    }
    if pos < 100 {
        notes.push(format!(
            "validation rests on {n} images ({pos} effusion): wide uncertainty"
        ));
    }
    if let Some(at) = &validation.at_chosen {
        let c = at.confusion;
        if let Some((lo, hi)) = crate::metrics::wilson_interval(c.tp, c.tp + c.fn_) {
            notes.push(format!(
                "recall {:.3} at the chosen threshold is {}/{} effusions: 95% interval {lo:.2}-{hi:.2}",
                at.recall,
                c.tp,
                c.tp + c.fn_
            ));
        }
        if let Some((lo, hi)) = crate::metrics::wilson_interval(c.tp, c.tp + c.fp) {
            notes.push(format!(
                "precision {:.3} at the chosen threshold is {}/{} flags: 95% interval {lo:.2}-{hi:.2}",
                at.precision,
                c.tp,
                c.tp + c.fp
            ));
        }
        notes.push(
            "the threshold was chosen on the validation images it is measured on, so its \
             recall is optimistic: confirm it on held-out data"
                .to_string(),
        );
    }
    notes
}

/// Writes `report.json`, `loss.png`, `auroc.png`, `roc.png`, `pr.png`,
/// `confusion.png` and `report.md` into `dir`, creating it if needed.
pub fn write_report(dir: &Path, report: &Report) -> Result<(), ReportError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let json = serde_json::to_string_pretty(report)?;
    write_file(&dir.join("report.json"), json.as_bytes())?;

    let text = font_available();
    plot_loss(&dir.join("loss.png"), report, text)?;
    plot_auroc(&dir.join("auroc.png"), report, text)?;
    plot_roc(&dir.join("roc.png"), report, text)?;
    plot_pr(&dir.join("pr.png"), report, text)?;
    plot_confusion(&dir.join("confusion.png"), &report.validation, text)?;

    write_file(&dir.join("report.md"), render_markdown(report).as_bytes())
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    fs::write(path, bytes).map_err(io_err(path))
}

// ---------------------------------------------------------------- markdown

/// `Some(x)` with three decimals, or "n/a".
pub(crate) fn opt3(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".to_string(), |x| format!("{x:.3}"))
}

pub(crate) fn human_duration(seconds: f64) -> String {
    if seconds.is_finite() && seconds >= 0.0 {
        humantime::format_duration(Duration::from_secs(seconds.round() as u64)).to_string()
    } else {
        format!("{seconds} s")
    }
}

/// A JSON value as prose: strings without quotes, the rest compact JSON.
pub(crate) fn json_inline(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Which summaries the markdown table shows, as (column header, summary).
fn summary_columns(v: &Evaluation) -> Vec<(String, Summary)> {
    let mut cols = Vec::new();
    if let Some(at) = v.at_chosen {
        cols.push((format!("Chosen threshold ({})", at.threshold), at));
    }
    cols.push((
        format!("Default threshold ({DEFAULT_THRESHOLD})"),
        v.at_default,
    ));
    cols
}

fn render_markdown(r: &Report) -> String {
    // Writing to a String cannot fail; the helper keeps the `?`s out.
    fn go(r: &Report, out: &mut String) -> fmt::Result {
        let v = &r.validation;
        writeln!(out, "# Pleura effusion model report\n")?;
        let version = r.model_version.as_deref().unwrap_or("(not exported)");
        writeln!(out, "- Model version: `{version}`")?;
        writeln!(out, "- Created: {}", r.created_at)?;
        writeln!(out, "- Device: {}", r.device)?;
        writeln!(
            out,
            "- Training time: {} ({} epochs, best epoch {})\n",
            human_duration(r.training_seconds),
            r.epochs.len(),
            r.best_epoch
        )?;

        writeln!(out, "## Validation (best epoch)\n")?;
        let prevalence = if v.n > 0 {
            v.n_positive as f64 / v.n as f64
        } else {
            0.0
        };
        writeln!(
            out,
            "{} images, {} with effusion (prevalence {:.3}). Effusion is the positive class; \
             a scan is flagged when p_effusion >= threshold.\n",
            v.n, v.n_positive, prevalence
        )?;
        match &v.chosen {
            Some(c) => writeln!(
                out,
                "**Chosen threshold: {}** for target recall {:.3} (achieved recall {:.3}, \
                 precision {:.3}).\n",
                c.threshold, c.target_recall, c.recall, c.precision
            )?,
            None => writeln!(
                out,
                "**No threshold chosen**: the target recall cannot be reached on this \
                 validation set (it has no effusion, or their scores are not numbers). \
                 Only the default threshold is shown.\n"
            )?,
        }

        let cols = summary_columns(v);
        write!(out, "| Metric |")?;
        for (name, _) in &cols {
            write!(out, " {name} |")?;
        }
        write!(out, "\n|---|")?;
        for _ in &cols {
            write!(out, "---:|")?;
        }
        writeln!(out)?;
        type Cell = fn(&Summary) -> String;
        let rows: [(&str, Cell); 9] = [
            ("Recall (sensitivity)", |s| format!("{:.3}", s.recall)),
            ("Precision (PPV)", |s| format!("{:.3}", s.precision)),
            ("Specificity", |s| format!("{:.3}", s.specificity)),
            ("F1", |s| format!("{:.3}", s.f1)),
            ("Accuracy (misleading at low prevalence)", |s| {
                format!("{:.3}", s.accuracy)
            }),
            ("Effusion caught (TP)", |s| s.confusion.tp.to_string()),
            ("Effusion missed (FN)", |s| s.confusion.fn_.to_string()),
            ("False alarms (FP)", |s| s.confusion.fp.to_string()),
            ("Correctly clear (TN)", |s| s.confusion.tn.to_string()),
        ];
        for (name, cell) in rows {
            write!(out, "| {name} |")?;
            for (_, s) in &cols {
                write!(out, " {} |", cell(s))?;
            }
            writeln!(out)?;
        }
        // Threshold-free, so the same in every column.
        for (name, value) in [("AUROC", v.auroc), ("PR-AUC (average precision)", v.pr_auc)] {
            write!(out, "| {name} |")?;
            for _ in &cols {
                write!(out, " {} |", opt3(value))?;
            }
            writeln!(out)?;
        }
        writeln!(
            out,
            "\nAUROC and PR-AUC do not depend on the threshold. PR-AUC of a random \
             ranking is the prevalence ({prevalence:.3}); AUROC's is 0.5.\n"
        )?;
        if let Some(loss) = v.loss {
            writeln!(out, "Validation loss: {loss:.4}\n")?;
        }

        writeln!(out, "## Data\n")?;
        match &r.data {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (k, val) in map {
                    writeln!(out, "- {k}: {}", json_inline(val))?;
                }
            }
            serde_json::Value::Null => writeln!(out, "- (no data summary given)")?,
            other => writeln!(out, "- {}", json_inline(other))?,
        }
        writeln!(
            out,
            "\nThe full training configuration is in `report.json`.\n"
        )?;

        writeln!(out, "## Caveats\n")?;
        if r.notes.is_empty() {
            writeln!(out, "- (none recorded)")?;
        }
        for note in &r.notes {
            writeln!(out, "- {note}")?;
        }

        writeln!(out, "\n## Plots\n")?;
        for (title, file) in [
            ("ROC curve", "roc.png"),
            ("Precision-recall curve", "pr.png"),
            ("Confusion matrix", "confusion.png"),
            ("Loss per epoch", "loss.png"),
            ("Validation AUROC per epoch", "auroc.png"),
        ] {
            writeln!(out, "### {title}\n\n![]({file})\n")?;
        }
        Ok(())
    }
    let mut out = String::new();
    go(r, &mut out).expect("formatting into a String does not fail");
    out
}

// ---------------------------------------------------------------- fonts

/// The family every text style here uses; plotters' own defaults (tick
/// labels) ask for "sans-serif" too, so one registration covers both.
const FONT: &str = "sans-serif";

/// Common locations of a plain sans TTF across Linux distributions, macOS
/// and Windows. The first that loads wins.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system font with plotters once per process; `false` if none
/// could be loaded, in which case plots are drawn without text.
pub(crate) fn font_available() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        for path in FONT_CANDIDATES {
            let Ok(bytes) = fs::read(path) else { continue };
            // plotters keeps fonts for the life of the process and wants
            // `&'static`; this runs at most once per candidate, once per
            // process, so the leak is bounded.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        tracing::warn!("no system TTF font found: report plots are drawn without text");
        false
    })
}

// ---------------------------------------------------------------- plots

const SIZE: (u32, u32) = (800, 600);
const TITLE_PX: u32 = 26;
const LABEL_PX: u32 = 17;
const AXIS_DESC_PX: u32 = 19;

pub(crate) const BLUE_: RGBColor = RGBColor(31, 119, 180);
pub(crate) const ORANGE: RGBColor = RGBColor(255, 127, 14);
pub(crate) const GREEN_: RGBColor = RGBColor(44, 160, 44);
pub(crate) const RED_: RGBColor = RGBColor(214, 39, 40);
pub(crate) const GREY: RGBColor = RGBColor(120, 120, 120);

fn plot_err<E: Display>(path: &Path) -> impl FnOnce(E) -> ReportError + '_ {
    move |e| ReportError::Plot(format!("{}: {e}", path.display()))
}

/// How one series of a [`LineChart`] is drawn.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Style {
    /// A solid line.
    Line,
    /// A dashed reference line (chance level, diagonal).
    Dashed,
    /// Dots, e.g. an operating point.
    Points,
}

pub(crate) struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    style: Style,
}

impl Series {
    pub(crate) fn new(
        label: impl Into<String>,
        points: Vec<(f64, f64)>,
        color: RGBColor,
        style: Style,
    ) -> Self {
        // Non-finite values (a diverged epoch) would break the axis ranges.
        let points = points
            .into_iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        Series {
            label: label.into(),
            points,
            color,
            style,
        }
    }
}

/// The common case of every plot but the confusion matrix: titled axes,
/// a few series, a legend.
pub(crate) struct LineChart {
    pub(crate) title: String,
    pub(crate) x_desc: &'static str,
    pub(crate) y_desc: &'static str,
    pub(crate) x_range: Range<f64>,
    pub(crate) y_range: Range<f64>,
    /// Tick labels only at whole numbers (epochs).
    pub(crate) integer_x: bool,
    pub(crate) legend: SeriesLabelPosition,
    pub(crate) series: Vec<Series>,
}

impl LineChart {
    pub(crate) fn draw(self, path: &Path, text: bool) -> Result<(), ReportError> {
        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err(path))?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if text {
            builder
                .caption(&self.title, (FONT, TITLE_PX))
                .x_label_area_size(55)
                .y_label_area_size(75);
        }
        let mut chart = builder
            .build_cartesian_2d(self.x_range.clone(), self.y_range.clone())
            .map_err(plot_err(path))?;

        let whole_numbers = |x: &f64| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{}", x.round())
            } else {
                String::new()
            }
        };
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.12))
            .x_labels(10)
            .y_labels(10);
        if text {
            mesh.x_desc(self.x_desc)
                .y_desc(self.y_desc)
                .label_style((FONT, LABEL_PX))
                .axis_desc_style((FONT, AXIS_DESC_PX));
        }
        if self.integer_x {
            mesh.x_label_formatter(&whole_numbers);
        }
        mesh.draw().map_err(plot_err(path))?;

        for s in &self.series {
            let color = s.color;
            // A one-point line (a single epoch) would be invisible: dot it.
            let style = match s.style {
                Style::Line | Style::Dashed if s.points.len() == 1 => Style::Points,
                other => other,
            };
            let anno = match style {
                // Segment by segment: plotters' joins for thick polylines
                // sprout spikes where a path doubles back by a pixel or two,
                // which the saw-toothed PR curve does.
                Style::Line => chart.draw_series(
                    s.points
                        .windows(2)
                        .map(|w| PathElement::new(vec![w[0], w[1]], color.stroke_width(3))),
                ),
                Style::Dashed => chart.draw_series(DashedLineSeries::new(
                    s.points.iter().copied(),
                    10,
                    7,
                    color.stroke_width(2),
                )),
                Style::Points => {
                    chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 7, color.filled())))
                }
            }
            .map_err(plot_err(path))?;
            if text && !s.label.is_empty() {
                let anno = anno.label(s.label.as_str());
                // Separate closures: the two legend glyphs are different types.
                if style == Style::Points {
                    anno.legend(move |(x, y)| {
                        EmptyElement::at((x + 10, y)) + Circle::new((0, 0), 6, color.filled())
                    });
                } else {
                    anno.legend(move |(x, y)| {
                        EmptyElement::at((x, y))
                            + PathElement::new(vec![(0, 0), (20, 0)], color.stroke_width(3))
                    });
                }
            }
        }
        if text && self.series.iter().any(|s| !s.label.is_empty()) {
            chart
                .configure_series_labels()
                .position(self.legend)
                .label_font((FONT, LABEL_PX))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .margin(12)
                .draw()
                .map_err(plot_err(path))?;
        }
        root.present().map_err(plot_err(path))
    }
}

/// A range covering the finite `values` with 5% padding on each side,
/// kept within `bounds`; a usable range even for no or constant values.
fn padded_range(values: impl IntoIterator<Item = f64>, bounds: Range<f64>) -> Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return bounds;
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.5_f64.max(0.05 * hi.abs())
    };
    let (lo, hi) = ((lo - pad).max(bounds.start), (hi + pad).min(bounds.end));
    if hi > lo {
        lo..hi
    } else {
        bounds
    }
}

/// Epoch axis: the recorded epochs, at least one unit wide.
fn epoch_range(r: &Report) -> Range<f64> {
    let epochs = r.epochs.iter().map(|e| e.epoch as f64);
    let lo = epochs.clone().fold(f64::INFINITY, f64::min);
    let hi = epochs.fold(f64::NEG_INFINITY, f64::max);
    if lo > hi {
        0.0..1.0
    } else if hi - lo < 1.0 {
        (lo - 0.5)..(hi + 0.5)
    } else {
        // A little room so a best-epoch marker at either end is not clipped.
        let pad = 0.02 * (hi - lo);
        (lo - pad)..(hi + pad)
    }
}

/// The best epoch's point on a per-epoch curve, as a marker series.
fn best_marker(r: &Report, value: impl Fn(&EpochRecord) -> Option<f64>) -> Series {
    let points = r
        .epochs
        .iter()
        .filter(|e| e.epoch == r.best_epoch)
        .filter_map(|e| value(e).map(|v| (e.epoch as f64, v)))
        .collect();
    Series::new(
        format!("best epoch ({})", r.best_epoch),
        points,
        RED_,
        Style::Points,
    )
}

fn plot_loss(path: &Path, r: &Report, text: bool) -> Result<(), ReportError> {
    let train = Series::new(
        "train loss",
        r.epochs
            .iter()
            .map(|e| (e.epoch as f64, e.train_loss))
            .collect(),
        BLUE_,
        Style::Line,
    );
    let val = Series::new(
        "validation loss",
        r.epochs
            .iter()
            .map(|e| (e.epoch as f64, e.val_loss))
            .collect(),
        ORANGE,
        Style::Line,
    );
    let best = best_marker(r, |e| Some(e.val_loss));
    let ys = train.points.iter().chain(&val.points).map(|p| p.1);
    LineChart {
        title: "Loss per epoch".to_string(),
        x_desc: "epoch",
        y_desc: "loss",
        x_range: epoch_range(r),
        y_range: padded_range(ys, 0.0..f64::MAX),
        integer_x: true,
        legend: SeriesLabelPosition::UpperRight,
        series: vec![train, val, best],
    }
    .draw(path, text)
}

fn plot_auroc(path: &Path, r: &Report, text: bool) -> Result<(), ReportError> {
    let auroc = Series::new(
        "validation AUROC",
        r.epochs
            .iter()
            .filter_map(|e| e.val_auroc.map(|a| (e.epoch as f64, a)))
            .collect(),
        GREEN_,
        Style::Line,
    );
    let best = best_marker(r, |e| e.val_auroc);
    let y_range = padded_range(auroc.points.iter().map(|p| p.1), 0.0..1.0);
    LineChart {
        title: format!("Validation AUROC per epoch (best epoch {})", r.best_epoch),
        x_desc: "epoch",
        y_desc: "AUROC",
        x_range: epoch_range(r),
        y_range,
        integer_x: true,
        legend: SeriesLabelPosition::LowerRight,
        series: vec![auroc, best],
    }
    .draw(path, text)
}

/// Operating points to mark on the ROC and PR plots: the chosen threshold
/// (if any) and the default, with `point` mapping a summary to plot space.
fn operating_points(v: &Evaluation, point: impl Fn(&Summary) -> (f64, f64)) -> Vec<Series> {
    let mut out = Vec::new();
    if let Some(at) = &v.at_chosen {
        out.push(Series::new(
            format!("chosen threshold {}", at.threshold),
            vec![point(at)],
            RED_,
            Style::Points,
        ));
    }
    out.push(Series::new(
        format!("threshold {DEFAULT_THRESHOLD}"),
        vec![point(&v.at_default)],
        ORANGE,
        Style::Points,
    ));
    out
}

fn plot_roc(path: &Path, r: &Report, text: bool) -> Result<(), ReportError> {
    let v = &r.validation;
    let mut series = vec![
        Series::new("chance", vec![(0.0, 0.0), (1.0, 1.0)], GREY, Style::Dashed),
        Series::new("ROC", r.roc.clone(), BLUE_, Style::Line),
    ];
    series.extend(operating_points(v, |s| (1.0 - s.specificity, s.recall)));
    LineChart {
        title: format!("ROC curve (AUROC {})", opt3(v.auroc)),
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

/// The PR curve as a step function: each point's precision holds back to
/// the previous recall, so the area under the drawn line is the reported
/// average precision.
pub(crate) fn pr_steps(pr: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(pr.len() * 2);
    for (i, &(r, p)) in pr.iter().enumerate() {
        if i > 0 {
            out.push((pr[i - 1].0, p));
        }
        out.push((r, p));
    }
    // Thresholds that only add false alarms leave recall unchanged and give
    // zero-length segments, which plotters draws as stray arrowheads.
    out.dedup();
    out
}

fn plot_pr(path: &Path, r: &Report, text: bool) -> Result<(), ReportError> {
    let v = &r.validation;
    let prevalence = if v.n > 0 {
        v.n_positive as f64 / v.n as f64
    } else {
        0.0
    };
    let mut series = vec![
        Series::new(
            format!("chance (prevalence {prevalence:.3})"),
            vec![(0.0, prevalence), (1.0, prevalence)],
            GREY,
            Style::Dashed,
        ),
        Series::new("precision-recall", pr_steps(&r.pr), BLUE_, Style::Line),
    ];
    series.extend(operating_points(v, |s| (s.recall, s.precision)));
    LineChart {
        title: format!("Precision-recall curve (PR-AUC {})", opt3(v.pr_auc)),
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

/// White to `BLUE_` by `t` in `[0, 1]`.
fn shade(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let mix = |to: u8| (255.0 + (f64::from(to) - 255.0) * t).round() as u8;
    RGBColor(mix(BLUE_.0), mix(BLUE_.1), mix(BLUE_.2))
}

fn plot_confusion(path: &Path, v: &Evaluation, text: bool) -> Result<(), ReportError> {
    let summary = v.at_chosen.unwrap_or(v.at_default);
    let c = summary.confusion;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(path))?;

    // Rows are the truth, columns the prediction; effusion first in both,
    // so the diagonal holds the correct calls.
    let cells = [
        [(c.tp, "true positive"), (c.fn_, "missed (false negative)")],
        [
            (c.fp, "false alarm (false positive)"),
            (c.tn, "true negative"),
        ],
    ];
    let classes = ["effusion", "nofinding"];
    let max = cells
        .iter()
        .flatten()
        .map(|&(n, _)| n)
        .max()
        .unwrap_or(0)
        .max(1);
    let (left, top, cell_w, cell_h) = (230, 130, 250, 190);

    let centred =
        |px: u32| TextStyle::from((FONT, px).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
    let draw_text = |s: &str, style: &TextStyle, at: (i32, i32)| {
        root.draw_text(s, style, at).map_err(plot_err(path))
    };

    for (row, row_cells) in cells.iter().enumerate() {
        for (col, &(n, what)) in row_cells.iter().enumerate() {
            let x0 = left + col as i32 * cell_w;
            let y0 = top + row as i32 * cell_h;
            let t = n as f64 / max as f64;
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell_w, y0 + cell_h)],
                shade(t).filled(),
            ))
            .map_err(plot_err(path))?;
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell_w, y0 + cell_h)],
                BLACK.mix(0.5).stroke_width(2),
            ))
            .map_err(plot_err(path))?;
            if text {
                let ink = if t > 0.55 { WHITE } else { BLACK };
                let (cx, cy) = (x0 + cell_w / 2, y0 + cell_h / 2);
                draw_text(&n.to_string(), &centred(52).color(&ink), (cx, cy - 15))?;
                draw_text(what, &centred(17).color(&ink), (cx, cy + 40))?;
            }
        }
    }

    if text {
        let title = match &v.chosen {
            Some(ch) => format!(
                "Confusion matrix at threshold {} (target recall {})",
                summary.threshold, ch.target_recall
            ),
            None => format!("Confusion matrix at threshold {}", summary.threshold),
        };
        draw_text(&title, &centred(TITLE_PX), (SIZE.0 as i32 / 2, 35))?;
        let grid_mid_x = left + cell_w;
        let grid_mid_y = top + cell_h;
        draw_text(
            "predicted",
            &centred(AXIS_DESC_PX + 2),
            (grid_mid_x, top - 55),
        )?;
        let rotated = centred(AXIS_DESC_PX + 2).transform(FontTransform::Rotate270);
        draw_text("actual", &rotated, (60, grid_mid_y))?;
        let right = TextStyle::from((FONT, AXIS_DESC_PX).into_font())
            .pos(Pos::new(HPos::Right, VPos::Center));
        for (i, class) in classes.iter().enumerate() {
            let i = i as i32;
            draw_text(
                class,
                &centred(AXIS_DESC_PX),
                (left + i * cell_w + cell_w / 2, top - 20),
            )?;
            draw_text(class, &right, (left - 15, top + i * cell_h + cell_h / 2))?;
        }
        let footer = format!(
            "recall {:.3}   precision {:.3}   specificity {:.3}   (n = {})",
            summary.recall,
            summary.precision,
            summary.specificity,
            c.total()
        );
        draw_text(
            &footer,
            &centred(LABEL_PX + 1),
            (SIZE.0 as i32 / 2, top + 2 * cell_h + 35),
        )?;
    }
    root.present().map_err(plot_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{evaluate, pr_curve, roc_curve};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const FILES: [&str; 7] = [
        "report.json",
        "loss.png",
        "auroc.png",
        "roc.png",
        "pr.png",
        "confusion.png",
        "report.md",
    ];
    const PNGS: [&str; 5] = [
        "loss.png",
        "auroc.png",
        "roc.png",
        "pr.png",
        "confusion.png",
    ];

    /// A plausible run: 200 validation scans at 10% prevalence, 12 epochs.
    fn synthetic_report() -> Report {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let positives: Vec<bool> = (0..200).map(|i| i % 10 == 0).collect();
        let scores: Vec<f32> = positives
            .iter()
            .map(|&p| {
                let base: f32 = if p { 0.62 } else { 0.3 };
                (base + rng.random_range(-0.3f32..0.3)).clamp(0.0, 1.0)
            })
            .collect();
        let mut validation = evaluate(&scores, &positives, 0.9);
        validation.loss = Some(0.31);
        let epochs = (1..=12)
            .map(|epoch| {
                let t = epoch as f64;
                EpochRecord {
                    epoch,
                    train_loss: 0.7 / t.sqrt(),
                    train_accuracy: 0.8 + 0.01 * t,
                    val_loss: 0.55 / t.sqrt() + 0.004 * t,
                    val_auroc: Some(0.7 + 0.2 * (1.0 - (-t / 4.0).exp())),
                    val_recall: 0.6 + 0.02 * t,
                    val_precision: 0.4 + 0.01 * t,
                    lr: 1e-3,
                    seconds: 61.5,
                    images_per_second: 140.0,
                }
            })
            .collect();
        let notes = sample_size_notes(&validation);
        Report {
            model_version: Some("2025-06-01-r3".to_string()),
            created_at: "2025-06-01T12:00:00Z".to_string(),
            data: serde_json::json!({
                "source": "/data/cxr",
                "train": 1800, "validation": 200,
                "prevalence": 0.1, "split": "by patient, seed 7",
            }),
            config: serde_json::json!({"epochs": 12, "lr": 1e-3, "batch": 32}),
            epochs,
            best_epoch: 9,
            roc: roc_curve(&scores, &positives),
            pr: pr_curve(&scores, &positives),
            validation,
            training_seconds: 738.0,
            device: "cuda:0".to_string(),
            notes,
        }
    }

    fn assert_pngs(dir: &Path, min_bytes: u64) {
        for name in PNGS {
            let bytes = fs::read(dir.join(name)).unwrap();
            assert!(
                bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
                "{name} is not a PNG"
            );
            assert!(
                bytes.len() as u64 > min_bytes,
                "{name} is only {} bytes",
                bytes.len()
            );
        }
    }

    #[test]
    fn writes_all_files() {
        let dir = tempfile::tempdir().unwrap();
        let report = synthetic_report();
        write_report(dir.path(), &report).unwrap();
        for name in FILES {
            assert!(dir.path().join(name).is_file(), "{name} missing");
        }
        // Text makes the plots bigger; without a font they are still there.
        assert_pngs(dir.path(), if font_available() { 5_000 } else { 2_000 });

        let json = fs::read_to_string(dir.path().join("report.json")).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        // serde_json's default float parser may be off in the last bit of an
        // f64, so compare metrics loosely; the f32 threshold, which serving
        // uses, and the counts must come back exactly.
        let (a, b) = (&back.validation, &report.validation);
        assert_eq!(a.chosen.map(|c| c.threshold), b.chosen.map(|c| c.threshold));
        assert_eq!(
            a.at_chosen.map(|s| s.confusion),
            b.at_chosen.map(|s| s.confusion)
        );
        assert_eq!(a.at_default.confusion, b.at_default.confusion);
        assert_eq!((a.n, a.n_positive), (b.n, b.n_positive));
        let close = |x: f64, y: f64| (x - y).abs() < 1e-12;
        assert!(close(a.auroc.unwrap(), b.auroc.unwrap()));
        assert!(close(a.pr_auc.unwrap(), b.pr_auc.unwrap()));
        assert!(close(
            a.at_chosen.unwrap().precision,
            b.at_chosen.unwrap().precision
        ));
        assert_eq!(back.roc.len(), report.roc.len());
        for (p, q) in back.pr.iter().zip(&report.pr) {
            assert!(close(p.0, q.0) && close(p.1, q.1));
        }
        assert_eq!(back.epochs.len(), 12);
        assert_eq!(back.best_epoch, 9);
        assert_eq!(back.data, report.data);
        assert_eq!(back.config, report.config);
        assert_eq!(back.notes, report.notes);

        let md = fs::read_to_string(dir.path().join("report.md")).unwrap();
        for needle in [
            "2025-06-01-r3",
            "cuda:0",
            "12m 18s",
            "Recall",
            "Precision",
            "Specificity",
            "AUROC",
            "PR-AUC",
            "F1",
            "(TP)",
            "/data/cxr",
            "validation rests on 200 images (20 effusion)",
        ] {
            assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
        }
        let chosen = report.validation.chosen.unwrap();
        assert!(md.contains(&format!("Chosen threshold: {}", chosen.threshold)));
        for png in PNGS {
            assert!(
                md.contains(&format!("![]({png})")),
                "report.md does not embed {png}"
            );
        }
    }

    #[test]
    fn degenerate_report_still_writes() {
        // No epochs, no effusion, nothing chosen, empty curves: a failed or
        // tiny run must still leave a readable report behind.
        let dir = tempfile::tempdir().unwrap();
        let validation = evaluate(&[0.2, 0.7, f32::NAN], &[false, false, false], 0.9);
        let report = Report {
            model_version: None,
            created_at: timestamp_now(),
            data: serde_json::Value::Null,
            config: serde_json::Value::Null,
            epochs: Vec::new(),
            best_epoch: 0,
            notes: sample_size_notes(&validation),
            validation,
            roc: Vec::new(),
            pr: Vec::new(),
            training_seconds: f64::NAN,
            device: "cpu".to_string(),
        };
        write_report(&dir.path().join("nested/out"), &report).unwrap();
        for name in FILES {
            assert!(
                dir.path().join("nested/out").join(name).is_file(),
                "{name} missing"
            );
        }
        let json = fs::read_to_string(dir.path().join("nested/out/report.json")).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert!(back.training_seconds.is_nan());
        let md = fs::read_to_string(dir.path().join("nested/out/report.md")).unwrap();
        assert!(md.contains("No threshold chosen"));
        assert!(md.contains("holds no effusion"));
        assert!(md.contains("| AUROC | n/a |"));
    }

    #[test]
    fn plots_without_a_font_have_no_text_but_exist() {
        let dir = tempfile::tempdir().unwrap();
        let r = synthetic_report();
        let d = dir.path();
        plot_loss(&d.join("loss.png"), &r, false).unwrap();
        plot_auroc(&d.join("auroc.png"), &r, false).unwrap();
        plot_roc(&d.join("roc.png"), &r, false).unwrap();
        plot_pr(&d.join("pr.png"), &r, false).unwrap();
        plot_confusion(&d.join("confusion.png"), &r.validation, false).unwrap();
        assert_pngs(d, 1_000);
    }

    #[test]
    fn diverged_epoch_round_trips_as_nan() {
        let mut e = synthetic_report().epochs[0].clone();
        e.train_loss = f64::NAN;
        e.val_loss = f64::INFINITY;
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"train_loss\":null"), "{json}");
        let back: EpochRecord = serde_json::from_str(&json).unwrap();
        assert!(back.train_loss.is_nan() && back.val_loss.is_nan());
        assert_eq!(back.lr, e.lr);
    }

    #[test]
    fn unwritable_dir_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = write_report(&file, &synthetic_report()).unwrap_err();
        assert!(matches!(err, ReportError::Io { .. }), "{err}");
    }

    #[test]
    fn pr_steps_area_is_average_precision() {
        let pr = [
            (0.0, 1.0),
            (0.5, 1.0),
            (0.5, 0.5),
            (1.0, 2.0 / 3.0),
            (1.0, 0.5),
        ];
        let steps = pr_steps(&pr);
        let area: f64 = steps.windows(2).map(|w| (w[1].0 - w[0].0) * w[1].1).sum();
        assert!((area - 5.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn ranges_are_usable() {
        assert_eq!(padded_range([], 0.0..1.0), 0.0..1.0);
        let r = padded_range([0.3, 0.3], 0.0..1.0);
        assert!(r.start < 0.3 && r.end > 0.3);
        let r = padded_range([0.8, 0.9, f64::NAN], 0.0..1.0);
        assert!(r.start < 0.8 && r.end > 0.9 && r.end <= 1.0);
    }

    /// `cargo test -p pleura-trainer --lib report -- --ignored` writes a
    /// sample into the temp dir for eyeballing the plots.
    #[test]
    #[ignore = "writes a sample report to the system temp dir"]
    fn sample_report_for_eyeballing() {
        let dir = std::env::temp_dir().join("pleura-report-sample");
        write_report(&dir, &synthetic_report()).unwrap();
        println!("sample report in {}", dir.display());
        let mut r = synthetic_report();
        r.epochs[3].val_loss = f64::NAN;
        r.epochs.truncate(1);
        r.best_epoch = 1;
        let no_text = dir.join("no-text");
        fs::create_dir_all(&no_text).unwrap();
        plot_loss(&no_text.join("loss.png"), &r, false).unwrap();
        plot_confusion(&no_text.join("confusion.png"), &r.validation, false).unwrap();
        plot_loss(&dir.join("loss-one-epoch.png"), &r, true).unwrap();
    }
}

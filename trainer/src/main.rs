//! `pleura-trainer`: parses arguments, sets up logging, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pleura::wire::TrainFlags;
use pleura_trainer::cv::{CvConfig, CvOutcome, FoldEpoch};
use pleura_trainer::quantize::{QuantizeConfig, QuantizeOutcome};
use pleura_trainer::recipe::Recipe;
use pleura_trainer::train::TrainConfig;

/// Retrain, evaluate and export the Pleura effusion model.
#[derive(Parser, Debug)]
#[command(name = "pleura-trainer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train on a folder with effusion/ and nofinding/ (and optionally labels.csv),
    /// evaluate on a held-out split, and export model.onnx + model.json + a report
    /// to OUT/<version>/. With --folds K: cross-validate instead (K models,
    /// out-of-fold figures, threshold, temperature; report in OUT/).
    Train(Box<TrainArgs>),
    /// Make the int8 variant of a trained model: calibrated on scans from its
    /// own training split, measured against it on its validation split with
    /// the engine that will serve it, written to OUT/<version>-int8/.
    Quantize(Box<QuantizeArgs>),
    /// The training service: takes run requests from the `{ns}.train` queue,
    /// one at a time, with progress, cancel and resume in Redis (see
    /// `pleura train`). Stops cleanly on SIGTERM: the run in progress is
    /// released at its next batch and another trainer resumes it.
    Serve {
        /// Pleura configuration file; `PLEURA_CONFIG` and `PLEURA_*`
        /// variables also work.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Draw synthetic CXR-like phantoms in the training layout (for demos and
    /// tests; never a substitute for real data in evaluation).
    Synth {
        /// Output folder (gets effusion/, nofinding/ and labels.csv).
        #[arg(long)]
        out: PathBuf,
        /// Number of images.
        #[arg(long, default_value_t = 400)]
        n: usize,
        /// Share of effusion images.
        #[arg(long, default_value_t = 0.1)]
        prevalence: f64,
        /// Seed of the phantoms.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Side of the square PNGs.
        #[arg(long, default_value_t = 1024)]
        size: u32,
    },
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Dataset folder: effusion/ and nofinding/ with PNG, JPEG or DICOM files, and an
    /// optional labels.csv (columns image, patient_id) for a split by patient. Give it
    /// more than once to train on several datasets together (patient ids are then
    /// prefixed with each folder's name, which must differ).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Output folder; the model goes to OUT/<version>/.
    #[arg(long, default_value = "models")]
    out: PathBuf,
    #[command(flatten)]
    flags: TrainFlags,
    /// Fail-fast check: train on N images only and require 100% training accuracy.
    #[arg(long)]
    ablation: Option<usize>,
    /// After exporting, publish to the registry (promotion gate, signature,
    /// activation, announcement), as `pleura models publish` does.
    #[arg(long)]
    publish: bool,
    /// With --publish: publish even if the promotion gate fails (needs --reason).
    #[arg(long, requires = "publish", requires = "reason")]
    force: bool,
    /// With --publish: why, recorded in the activation history.
    #[arg(long, requires = "publish")]
    reason: Option<String>,
    /// With --publish: Pleura configuration file (registry, Redis, broker,
    /// signing key); `PLEURA_CONFIG` and `PLEURA_*` variables also work.
    #[arg(long, requires = "publish")]
    config: Option<PathBuf>,
    /// Also make the int8 variant (see `quantize`); with --publish it is
    /// published after the fp32 model and becomes the active one.
    #[arg(long)]
    int8: bool,
    #[command(flatten)]
    quant: QuantOptions,
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Cross-validate with K patient-grouped, stratified folds instead of one split:
    /// K models, out-of-fold predictions (oof.csv), a threshold and a temperature from
    /// the pooled predictions, bootstrap intervals, report.md and cv.json in OUT/, and
    /// the fold models in OUT/folds/.
    #[arg(long, value_name = "K", conflicts_with_all = ["ablation", "publish", "int8"])]
    folds: Option<usize>,
    /// With --folds: which epoch each fold contributes: last (a fixed epoch count,
    /// unbiased) or best (its best validation AUROC, slightly optimistic).
    #[arg(long, value_enum, default_value_t = FoldEpoch::Last, requires = "folds")]
    fold_epoch: FoldEpoch,
    /// With --folds: bootstrap resamples (by patient) for the 95% intervals; 0 for none.
    #[arg(long, default_value_t = pleura_trainer::cv::DEFAULT_RESAMPLES, requires = "folds")]
    bootstrap: usize,
    /// With --folds: how the OOF predictions are calibrated: temperature, or platt
    /// (temperature and a bias on the log-odds, which also undoes the shift class
    /// weights build in). Both are fitted and reported; this one is applied.
    #[arg(long, value_enum, default_value_t = CalibrationArg::Temperature, requires = "folds")]
    calibration: CalibrationArg,
    /// With --folds: hold this share of one dataset's patients out of every fold
    /// (a fixed split, whatever --seed), and score it once at the end with the
    /// ensemble of the fold models: the estimate for scans nothing chose anything on.
    #[arg(long, value_name = "FRACTION", requires = "folds")]
    lockbox: Option<f64>,
    /// With --lockbox: the dataset (a --data folder's name) it is drawn from; default
    /// the first --data.
    #[arg(long, value_name = "NAME", requires = "lockbox")]
    lockbox_dataset: Option<String>,
    /// With --folds: fit the calibration and choose the threshold on this dataset's
    /// out-of-fold predictions only (a --data folder's name: the scans the fleet
    /// serves), instead of all of them.
    #[arg(long, value_name = "NAME", requires = "folds")]
    calibrate_on: Option<String>,
    /// With --folds: also hold this share of the --calibrate-on dataset's patients
    /// (else the first --data's) out of every fold, and calibrate and threshold the
    /// exported ensemble on its own predictions of them (a threshold chosen on one
    /// model's out-of-fold predictions does not carry over to an average of several).
    #[arg(long, value_name = "FRACTION", requires = "folds")]
    calibration_holdout: Option<f64>,
    /// With --folds: also export the fold models as one servable ensemble graph (flip
    /// TTA with --tta-flip, the calibration, the pooled OOF threshold) to
    /// OUT/model/<version>/, ready for `pleura-worker --model` or `pleura models publish`.
    #[arg(long, requires = "folds")]
    export: bool,
}

/// `--calibration`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum CalibrationArg {
    /// One temperature.
    Temperature,
    /// Temperature and bias.
    Platt,
}

/// Trial settings of the recipe; each is off (neutral) by default.
#[derive(clap::Args, Debug, Clone)]
struct RecipeArgs {
    /// Label smoothing X in [0, 0.5): targets 1 - X and X instead of 1 and 0.
    #[arg(long, default_value_t = 0.0, value_name = "X")]
    label_smoothing: f64,
    /// Mixup with Beta(ALPHA, ALPHA) weights: each batch blended with a permutation of
    /// itself, images and labels alike. 0 is off.
    #[arg(long, default_value_t = 0.0, value_name = "ALPHA")]
    mixup: f64,
    /// Dropout P before the final layer, in training only (the exported graph is
    /// unchanged).
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    dropout: f64,
    /// Linear learning-rate warm-up over the first N epochs, batch by batch.
    #[arg(long, default_value_t = 0, value_name = "N")]
    warmup_epochs: usize,
    /// Evaluate, keep and export an exponential moving average of the weights with
    /// this decay (e.g. 0.99).
    #[arg(long, value_name = "DECAY")]
    ema: Option<f64>,
    /// Scale the augmentation's rotation, shift, scale, brightness, contrast and noise
    /// ranges by S (1 = the default ranges).
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    augment_strength: f64,
    /// Evaluate with flip TTA: p averaged over the image and its horizontal flip
    /// (validation and out-of-fold predictions; without --folds the exported graph
    /// then flips too, so that it serves what was measured).
    #[arg(long)]
    tta_flip: bool,
}

impl RecipeArgs {
    fn recipe(&self) -> Recipe {
        Recipe {
            label_smoothing: self.label_smoothing,
            mixup_alpha: self.mixup,
            dropout: self.dropout,
            warmup_epochs: self.warmup_epochs,
            ema_decay: self.ema,
            augment_strength: self.augment_strength,
            tta_flip: self.tta_flip,
        }
    }
}

/// How an int8 variant is made (shared by `train --int8` and `quantize`).
#[derive(clap::Args, Debug, Clone)]
struct QuantOptions {
    /// Calibration scans drawn from the training split.
    #[arg(long, default_value_t = 64)]
    calibration_images: usize,
    /// The engine that will serve the int8 model, on which it is measured:
    /// onnxruntime (runs QDQ with int8 kernels) or tract.
    #[arg(long, default_value = DEFAULT_INT8_ENGINE)]
    int8_engine: pleura::model::EngineKind,
    /// libonnxruntime.so for the onnxruntime engine (`make onnxruntime`
    /// installs it; default: the dynamic loader's search path).
    #[arg(long, env = "PLEURA_ONNXRUNTIME_LIBRARY")]
    onnxruntime_library: Option<PathBuf>,
}

#[cfg(feature = "onnxruntime")]
const DEFAULT_INT8_ENGINE: &str = "onnxruntime";
#[cfg(not(feature = "onnxruntime"))]
const DEFAULT_INT8_ENGINE: &str = "tract";

#[derive(clap::Args, Debug)]
struct QuantizeArgs {
    /// The fp32 model directory written by `train`.
    #[arg(long)]
    model: PathBuf,
    /// The dataset it was trained on (default: the path in its manifest).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Calibrate on this dataset instead of the training split (for
    /// experiments; the gate still judges on the parent's validation set).
    #[arg(long)]
    calibration_data: Option<PathBuf>,
    /// Output folder; the variant goes to OUT/<parent>-int8/.
    #[arg(long, default_value = "models")]
    out: PathBuf,
    /// Decoding threads.
    #[arg(long, default_value_t = 2)]
    loader_threads: usize,
    #[command(flatten)]
    quant: QuantOptions,
    /// Publish the variant through the promotion gate and activate it.
    #[arg(long)]
    publish: bool,
    /// With --publish: why, recorded in the activation history.
    #[arg(long, requires = "publish")]
    reason: Option<String>,
    /// With --publish: Pleura configuration file.
    #[arg(long, requires = "publish")]
    config: Option<PathBuf>,
}

impl QuantOptions {
    fn config(
        &self,
        model: PathBuf,
        data: Option<PathBuf>,
        out: PathBuf,
        threads: usize,
    ) -> QuantizeConfig {
        QuantizeConfig {
            model,
            data,
            calibration_data: None,
            calibration_images: self.calibration_images,
            out,
            engine: pleura::model::EngineOptions {
                kind: self.int8_engine,
                onnxruntime_library: self.onnxruntime_library.clone(),
            },
            loader_threads: threads,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve { config } = &cli.command {
        return serve(config.as_deref());
    }
    pleura::telemetry::init_tracing(pleura::config::LogFormat::Human, "warn");
    match cli.command {
        Command::Synth {
            out,
            n,
            prevalence,
            seed,
            size,
        } => {
            if !(0.0..=1.0).contains(&prevalence) || n == 0 {
                eprintln!("pleura-trainer: --n must be >= 1 and --prevalence within [0, 1]");
                return ExitCode::from(2);
            }
            match pleura_phantom::write_dataset(&out, n, prevalence, size, seed) {
                Ok(summary) => {
                    println!(
                        "wrote {} phantoms ({} effusion, {} nofinding) to {}",
                        summary.total,
                        summary.effusion,
                        summary.no_finding,
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pleura-trainer: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Quantize(a) => quantize_command(*a),
        Command::Serve { .. } => unreachable!("handled above"),
        Command::Train(a) if a.folds.is_some() => cross_validate_command(*a),
        Command::Train(a) if a.int8 && a.data.len() > 1 => {
            // Quantising re-makes the parent's split from one dataset.
            eprintln!("pleura-trainer: --int8 needs a single --data");
            ExitCode::from(2)
        }
        Command::Train(a) => {
            // Settings are checked before hours of training, not after.
            let publish = if a.publish {
                match pleura::config::Settings::load(a.config.as_deref()) {
                    Ok(s) => Some((s, a.force, a.reason.clone())),
                    Err(e) => {
                        eprintln!("pleura-trainer: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                None
            };
            let quant = a.int8.then(|| {
                a.quant.config(
                    PathBuf::new(),
                    Some(a.data[0].clone()),
                    a.out.clone(),
                    a.flags.loader_threads,
                )
            });
            let mut cfg = train_config(&a);
            cfg.ablation = a.ablation;
            match pleura_trainer::train::train(&cfg) {
                Ok(outcome) => {
                    print_summary(&outcome);
                    let Some(exported) = &outcome.exported else {
                        return ExitCode::SUCCESS;
                    };
                    if let Some((settings, force, reason)) = &publish {
                        let code = publish_export(settings, &exported.dir, *force, reason.clone());
                        if code != ExitCode::SUCCESS {
                            return code;
                        }
                    }
                    let Some(mut quant) = quant else {
                        return ExitCode::SUCCESS;
                    };
                    quant.model = exported.dir.clone();
                    match pleura_trainer::quantize::quantize(&quant) {
                        Ok(q) => {
                            print_quantized(&q, publish.as_ref().map(|(s, _, _)| s));
                            match &publish {
                                Some((settings, _, reason)) => {
                                    publish_export(settings, &q.dir, false, reason.clone())
                                }
                                None => ExitCode::SUCCESS,
                            }
                        }
                        Err(e) => {
                            eprintln!("pleura-trainer: the fp32 model was exported but its int8 variant was not: {e}");
                            ExitCode::FAILURE
                        }
                    }
                }
                Err(e @ pleura_trainer::train::TrainError::Config(_)) => {
                    eprintln!("pleura-trainer: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("pleura-trainer: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The training settings of `train`'s arguments: datasets, flags and recipe.
fn train_config(a: &TrainArgs) -> TrainConfig {
    let mut cfg = TrainConfig::from_flags(a.data[0].clone(), a.out.clone(), &a.flags);
    cfg.more_data = a.data[1..].to_vec();
    cfg.recipe = a.recipe.recipe();
    cfg
}

fn cross_validate_command(a: TrainArgs) -> ExitCode {
    use pleura::model::manifest::CalibrationMethod;
    let cfg = CvConfig {
        fold_epoch: a.fold_epoch,
        resamples: a.bootstrap,
        calibration: match a.calibration {
            CalibrationArg::Temperature => CalibrationMethod::Temperature,
            CalibrationArg::Platt => CalibrationMethod::Platt,
        },
        lockbox: a.lockbox.map(|fraction| pleura_trainer::cv::LockboxSpec {
            dataset: a.lockbox_dataset.clone(),
            fraction,
        }),
        calibrate_on: a.calibrate_on.clone(),
        calibration_holdout: a.calibration_holdout,
        ..CvConfig::new(train_config(&a), a.folds.unwrap_or(0))
    };
    match pleura_trainer::cv::cross_validate(&cfg) {
        Ok(outcome) => {
            print_cv_summary(&outcome);
            if !a.export {
                return ExitCode::SUCCESS;
            }
            let out = outcome.dir.join("model");
            match pleura_trainer::cv::export_ensemble(&cfg, &outcome, &out, a.flags.version.clone())
            {
                Ok(e) => {
                    println!(
                        "exported the {}-model ensemble{} to {} (version {}, threshold {}, parity max abs diff {:.1e})",
                        outcome.models.len(),
                        if e.manifest.spec.tta_flip { " with flip TTA" } else { "" },
                        e.dir.display(),
                        e.manifest.version,
                        e.manifest.threshold,
                        e.parity_max_abs_diff
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pleura-trainer: the cross-validation finished but its ensemble was not exported: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(
            e @ (pleura_trainer::train::TrainError::Config(_)
            | pleura_trainer::train::TrainError::Data(
                pleura_trainer::data::DataError::TooFewForFolds { .. }
                | pleura_trainer::data::DataError::DuplicateDataset { .. },
            )),
        ) => {
            eprintln!("pleura-trainer: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("pleura-trainer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_cv_summary(o: &CvOutcome) {
    let r = &o.results;
    let images: usize = r.data.iter().map(|d| d.images).sum();
    println!(
        "{}-fold cross-validation on {images} images ({} effusion), each fold's {} epoch",
        r.k, r.overall.effusion, r.fold_epoch
    );
    println!("  fold AUROC (mean ± SD): {}", r.fold_auroc.show());
    println!("  OOF AUROC, all images: {}", r.overall.auroc.show());
    if r.per_dataset.len() > 1 {
        for f in &r.per_dataset {
            println!(
                "  OOF AUROC, {} ({} images): {}",
                f.name,
                f.images,
                f.auroc.show()
            );
        }
    }
    match r.threshold.calibrated {
        Some(t) => println!(
            "  threshold {t} (target recall {:.2}, on the pooled OOF p_calibrated of {}; {} uncalibrated)",
            r.threshold.target_recall,
            r.threshold.chosen_on,
            r.threshold
                .uncalibrated
                .map_or("none".into(), |u| u.to_string())
        ),
        None => println!(
            "  no threshold reaches recall {:.2} on the pooled OOF predictions",
            r.threshold.target_recall
        ),
    }
    for f in std::iter::once(&r.overall).chain(if r.per_dataset.len() > 1 {
        r.per_dataset.iter()
    } else {
        [].iter()
    }) {
        println!(
            "  at it, {}: recall {}  precision {}",
            f.name,
            f.recall.show(),
            f.precision.show()
        );
    }
    let c = &r.calibration;
    let fmt = |x: Option<f64>| x.map_or("n/a".into(), |x| format!("{x:.3}"));
    println!(
        "  calibration {} on {}: T = {:.3}, b = {:.3}; ECE {} -> {} (temperature alone {}, platt {})",
        match c.method {
            pleura::model::manifest::CalibrationMethod::Temperature => "temperature",
            pleura::model::manifest::CalibrationMethod::Platt => "platt",
        },
        c.fitted_on,
        c.temperature,
        c.bias,
        fmt(c.ece_before),
        fmt(c.ece_after),
        fmt(c.ece_temperature),
        fmt(c.ece_platt)
    );
    if let Some(e) = &r.ensemble_calibration {
        println!(
            "  ensemble calibration on its holdout ({} images of {}, {} effusion): T = {:.3}, b = {:.3}; ECE {} -> {}; threshold {} (recall {:.3}, precision {:.3})",
            e.images,
            e.dataset,
            e.effusion,
            e.scaling.temperature,
            e.scaling.bias,
            fmt(e.ece_before),
            fmt(e.ece_after),
            e.threshold.map_or("none".into(), |t| t.to_string()),
            e.recall,
            e.precision
        );
    }
    if let Some(lb) = &r.lockbox {
        let f = &lb.ensemble;
        println!(
            "  LOCKBOX ({} images of {}, {} effusion; ensemble): AUROC {}  recall {}  precision {}  ECE {}  (fold models alone: AUROC {})",
            f.images,
            lb.dataset,
            f.effusion,
            f.auroc.show(),
            f.recall.show(),
            f.precision.show(),
            f.ece_after.show(),
            lb.member_auroc_mean.show()
        );
    }
    println!(
        "  wall time {:.1} s ({:.1} s training) on {}",
        r.wall_seconds, r.training_seconds, r.device
    );
    println!("report: {}", o.report.display());
}

fn serve(config: Option<&std::path::Path>) -> ExitCode {
    let settings = match pleura::config::Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pleura-trainer: {e}");
            return ExitCode::from(2);
        }
    };
    pleura::telemetry::init_tracing(settings.log_format, &settings.log_level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The executor only moves bytes; training has its own threads.
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(pleura_trainer::serve::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ pleura_trainer::serve::ServeError::Config(_)) => {
            tracing::error!(error = %e, "trainer service not started");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = %e, "trainer service failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Prints what quantising measured, and what the promotion gate will say of
/// the variant (under `settings`' policy, or the defaults and `PLEURA_*`),
/// so a variant that would be refused is seen before anyone publishes it.
fn print_quantized(q: &QuantizeOutcome, settings: Option<&pleura::config::Settings>) {
    let fmt = |x: Option<f64>| x.map(|x| format!("{x:.4}")).unwrap_or_else(|| "n/a".into());
    println!(
        "int8 variant {} calibrated on {} training scans (fingerprint {})",
        q.files.manifest.version,
        q.calibration.images,
        &q.calibration.fingerprint[..12]
    );
    println!(
        "validation ({} scans, threshold {:.4}):",
        q.int8.at_chosen.confusion.total(),
        q.int8.at_chosen.threshold
    );
    for (what, m) in [("fp32", &q.parent), ("int8", &q.int8)] {
        println!(
            "  {what}: AUROC {}  recall {:.3}  precision {:.3}  specificity {:.3}",
            fmt(m.auroc),
            m.at_chosen.recall,
            m.at_chosen.precision,
            m.at_chosen.specificity
        );
    }
    println!(
        "  max |p_int8 - p_fp32| {:.4}; verdicts changed: {}",
        q.max_abs_diff, q.verdicts_changed
    );
    println!("wrote {}", q.dir.display());
    let policy = match settings {
        Some(s) => Some(s.gate_policy()),
        None => pleura::config::Settings::load(None)
            .ok()
            .map(|s| s.gate_policy()),
    };
    if let Some(policy) = policy {
        let failures = pleura::registry::gate(&q.files.manifest, None, &policy);
        if failures.is_empty() {
            println!("promotion gate: passes");
        } else {
            println!("promotion gate: would refuse it: {}", failures.join("; "));
        }
    }
}

fn quantize_command(a: QuantizeArgs) -> ExitCode {
    let settings = if a.publish {
        match pleura::config::Settings::load(a.config.as_deref()) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("pleura-trainer: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let mut cfg = a.quant.config(a.model, a.data, a.out, a.loader_threads);
    cfg.calibration_data = a.calibration_data;
    match pleura_trainer::quantize::quantize(&cfg) {
        Ok(q) => {
            print_quantized(&q, settings.as_ref());
            match settings {
                Some(s) => publish_export(&s, &q.dir, false, a.reason),
                None => ExitCode::SUCCESS,
            }
        }
        Err(e @ pleura_trainer::quantize::QuantizeError::Unsuitable(_)) => {
            eprintln!("pleura-trainer: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("pleura-trainer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_summary(o: &pleura_trainer::train::TrainOutcome) {
    let v = &o.report.validation;
    let fmt = |x: Option<f64>| x.map(|x| format!("{x:.4}")).unwrap_or_else(|| "n/a".into());
    println!(
        "best epoch {} of {}",
        o.report.best_epoch,
        o.report.epochs.len()
    );
    println!("validation: {} images, {} effusion", v.n, v.n_positive);
    println!("  AUROC {}   PR-AUC {}", fmt(v.auroc), fmt(v.pr_auc));
    println!(
        "  at 0.5:     recall {:.3}  precision {:.3}  specificity {:.3}",
        v.at_default.recall, v.at_default.precision, v.at_default.specificity
    );
    if let (Some(c), Some(s)) = (v.chosen, v.at_chosen) {
        println!(
            "  at {:.4} (target recall {:.2}): recall {:.3}  precision {:.3}  specificity {:.3}",
            c.threshold, c.target_recall, s.recall, s.precision, s.specificity
        );
    }
    println!(
        "training time {:.1} s on {}",
        o.report.training_seconds, o.report.device
    );
    match &o.exported {
        Some(e) => println!(
            "exported {} to {} (parity max |tract - tch| = {:.2e})",
            e.manifest.version,
            e.dir.display(),
            e.parity_max_abs_diff
        ),
        None => println!(
            "ablation passed: 100% training accuracy; report in {}",
            o.report_dir.display()
        ),
    }
}

/// Publishes the exported model through the same library call as
/// `pleura models publish`: gate, signature, activation, announcement.
fn publish_export(
    settings: &pleura::config::Settings,
    dir: &std::path::Path,
    force: bool,
    reason: Option<String>,
) -> ExitCode {
    use pleura::registry::{self, PublishRequest, Registry};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let request = PublishRequest {
        dir: dir.to_path_buf(),
        key_file: settings.signing_key_file.clone(),
        force,
        reason,
        activate: true,
        by: registry::who(),
    };
    let (amqp_tls, redis_tls) = match (settings.amqp_tls(), settings.redis_tls()) {
        (Ok(amqp), Ok(redis)) => (amqp, redis),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("pleura-trainer: the model was exported but not published: {e}");
            return ExitCode::FAILURE;
        }
    };
    let published = runtime.block_on(async {
        let registry = Registry::connect_with_tls(
            &settings.redis_url,
            &redis_tls,
            settings.names(),
            &settings.registry_url,
        )
        .await?;
        let announcer =
            pleura::fleet::Announcer::new(&settings.amqp_url, settings.names()).with_tls(amqp_tls);
        registry::publish(&registry, &announcer, &settings.gate_policy(), &request).await
    });
    match published {
        Ok(p) => {
            let entry = &p.published.entry;
            println!(
                "published {} to {}{}",
                entry.version,
                entry.artifact_url,
                match &p.published.activation {
                    Some(a) => format!(
                        "; active now (was {})",
                        a.previous.as_deref().unwrap_or("none")
                    ),
                    None => String::new(),
                }
            );
            for w in p.warnings() {
                eprintln!("pleura-trainer: warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pleura-trainer: the model was exported but not published: {e}");
            ExitCode::FAILURE
        }
    }
}

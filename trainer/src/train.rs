//! The training loop.
//!
//! Effusion is about one scan in ten, so plain cross-entropy lets a model
//! score 90% by calling everything "nofinding". The loss is therefore
//! class-weighted (inverse training frequency by default), the epoch kept is
//! the one with the best validation AUROC, and the decision threshold is the
//! highest one that still reaches the target recall on validation.
//!
//! `--ablation N` is the seed's fail-fast check: train on N images without
//! augmentation and require 100% training accuracy. A pipeline that cannot
//! overfit 16 images has a bug (labels, loss, learning rate); better to learn
//! that in a minute than after a night of training.
//!
//! A run can be watched and stopped between batches through
//! [`RunControl`], and checkpointed after every epoch and resumed from a
//! checkpoint ([`crate::checkpoint`]) so that it ends with the model the
//! uninterrupted run would have made.
//!
//! [`train_fold`] is the same loop for one cross-validation fold
//! ([`crate::cv`]): given training and validation lists, no split, no
//! checkpoint, no export; it keeps every epoch's validation predictions and
//! both the last and the best epoch's weights. The trial settings of
//! [`crate::recipe`] (all neutral by default) act inside the loop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use pleura::model::onnx::ResNetSpec;
use pleura::scan::Limits;

use crate::augment::AugmentConfig;
use crate::checkpoint::{self, BestState, CheckpointError, CheckpointState, EpochSeeds};
use crate::data::{self, Batch, Loader, Sample};
use crate::export::{self, ExportRequest, Exported};
use crate::metrics::{self, Evaluation};
use crate::model::{self, ResNet};
use crate::optim::{Adam, AdamConfig};
use crate::recipe::{self, Ema};
use crate::report::{self, EpochRecord, Report};
use crate::train_config::validate;

pub use crate::checkpoint::read_state;
pub use crate::control::{BatchProgress, RunControl};
pub use crate::train_config::{TrainConfig, TrainError};

pub use pleura::wire::{BadFlag, ClassWeights, Schedule};

/// What a run produced.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The exported model; `None` for an ablation run.
    pub exported: Option<Exported>,
    /// The report written beside the model (or in `out/ablation-*/`).
    pub report: Report,
    /// Directory holding the report.
    pub report_dir: PathBuf,
}

/// Runs a training (or ablation) run end to end: data, epochs (from a
/// checkpoint when resuming), then the ablation verdict or the export of the
/// best epoch.
pub fn train(cfg: &TrainConfig) -> Result<TrainOutcome, TrainError> {
    validate(cfg)?;
    let started = Instant::now();
    tch::manual_seed(cfg.seed as i64);
    let device = model::device_from(&cfg.device)?;
    let data = Prepared::new(cfg)?;
    let identity = data.run_identity(cfg);
    let mut run = Run::new(cfg, device, &data)?;
    let mut sofar = match &cfg.resume {
        Some(dir) => run.resume(dir, &identity, &data)?,
        None => SoFar::default(),
    };
    let elapsed = |sofar: &SoFar| sofar.earlier_seconds + started.elapsed().as_secs_f64();

    for epoch in sofar.records.len()..cfg.epochs {
        let (record, eval, scores) = run.epoch(epoch)?;
        report_epoch(cfg, &record);
        sofar.records.push(record);
        if cfg.ablation.is_some() {
            // Measured in eval mode on the training images: what would be served.
            sofar.best_ablation_acc = sofar.best_ablation_acc.max(eval.at_default.accuracy);
            if eval.at_default.accuracy >= 1.0 {
                sofar.best = Some(Best::new(epoch, eval, scores));
                notify_epoch(cfg, &sofar, None);
                break;
            }
        } else if Best::improves(sofar.best.as_ref(), &eval) {
            // Field by field: the kept weights are the evaluated ones.
            run.best_vs
                .copy(run.ema.as_ref().map_or(&run.vs, |e| &e.vs))?;
            sofar.best = Some(Best::new(epoch, eval, scores));
        }
        let saved = match &cfg.checkpoint_dir {
            Some(root) => Some(run.checkpoint(root, &sofar, &identity, elapsed(&sofar))?),
            None => None,
        };
        notify_epoch(cfg, &sofar, saved.as_deref());
    }

    if let Some(n) = cfg.ablation {
        if sofar.best.is_none() {
            return Err(TrainError::AblationFailed {
                n,
                epochs: cfg.epochs,
                accuracy: sofar.best_ablation_acc * 100.0,
                lr: cfg.lr,
            });
        }
    }
    let best = sofar
        .best
        .take()
        .ok_or_else(|| TrainError::Config("no epoch ran".into()))?;
    let positives: Vec<bool> = data.val.iter().map(|s| s.effusion).collect();
    let mut notes = data.notes(cfg);
    if let Some(from) = sofar.resumed_from {
        notes.push(format!(
            "Resumed from the checkpoint written after epoch {from}; the epochs up to it ran in an earlier process."
        ));
    }
    let mut rep = Report {
        model_version: None,
        created_at: pleura::time::now_rfc3339_seconds(),
        data: data.summary(cfg),
        config: serde_json::to_value(cfg).expect("config serialises"),
        epochs: std::mem::take(&mut sofar.records),
        best_epoch: best.epoch,
        validation: best.eval.clone(),
        roc: metrics::roc_curve(&best.scores, &positives),
        pr: metrics::pr_curve(&best.scores, &positives),
        training_seconds: elapsed(&sofar),
        device: format!("{device:?}"),
        notes,
    };

    if cfg.ablation.is_some() {
        let dir = cfg.out.join(format!("ablation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::Report(e.to_string()))?;
        report::write_report(&dir, &rep).map_err(|e| TrainError::Report(e.to_string()))?;
        return Ok(TrainOutcome {
            exported: None,
            report: rep,
            report_dir: dir,
        });
    }

    check_stop(cfg, rep.epochs.len())?;
    let exported = run.export_best(&best, &rep, sofar.resumed_from)?;
    rep.model_version = Some(exported.manifest.version.clone());
    rep.training_seconds = elapsed(&sofar);
    report::write_report(&exported.dir, &rep).map_err(|e| TrainError::Report(e.to_string()))?;
    let dir = exported.dir.clone();
    Ok(TrainOutcome {
        exported: Some(exported),
        report: rep,
        report_dir: dir,
    })
}

/// What training on one cross-validation fold produced.
pub struct FoldRun {
    /// Per-epoch history.
    pub records: Vec<EpochRecord>,
    /// Per epoch (0-based), per view, the validation images' margins
    /// `logit_effusion - logit_nofinding`, in validation order: one view, or the
    /// image's and its flip's under flip TTA (see `calibration`).
    pub epoch_margins: Vec<Vec<Vec<f32>>>,
    /// Per epoch, the validation p_effusion (averaged over the views).
    pub epoch_scores: Vec<Vec<f32>>,
    /// The epoch (1-based) with the best validation AUROC, ties to the lower loss: what
    /// `train` keeps.
    pub best_epoch: usize,
    /// The weights after the last epoch (the average under `--ema`), batch-norm
    /// statistics recomputed on the fold's training images.
    pub last: (nn::VarStore, ResNet),
    /// The weights of `best_epoch`.
    pub best: (nn::VarStore, ResNet),
    /// The network's shape.
    pub spec: ResNetSpec,
    /// Wall time of the fold.
    pub seconds: f64,
    /// Where it trained.
    pub device: String,
}

/// Trains on `train` and evaluates on `val` after every epoch, with `cfg`'s
/// settings (its data, split and export settings are not used): the training
/// loop of [`train`] without a split, checkpoints or export, for
/// cross-validation. Keeps both the last and the best epoch's weights, and
/// every epoch's validation predictions, so the caller can choose.
pub fn train_fold(
    cfg: &TrainConfig,
    train: Vec<Sample>,
    val: Vec<Sample>,
) -> Result<FoldRun, TrainError> {
    validate(cfg)?;
    if cfg.ablation.is_some() || cfg.checkpoint_dir.is_some() || cfg.resume.is_some() {
        return Err(TrainError::Config(
            "a fold is not an ablation, and is not checkpointed or resumed".into(),
        ));
    }
    let started = Instant::now();
    tch::manual_seed(cfg.seed as i64);
    let device = model::device_from(&cfg.device)?;
    let data = Prepared::from_samples(cfg, train, val);
    let mut run = Run::new(cfg, device, &data)?;
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    let mut best: Option<Best> = None;
    for epoch in 0..cfg.epochs {
        let (record, eval, scores) = run.epoch(epoch)?;
        report_epoch(cfg, &record);
        out.0.push(record);
        out.1.push(std::mem::take(&mut run.margins));
        out.2.push(scores.clone());
        if Best::improves(best.as_ref(), &eval) {
            // Field by field: the kept weights are the evaluated ones.
            run.best_vs
                .copy(run.ema.as_ref().map_or(&run.vs, |e| &e.vs))?;
            best = Some(Best::new(epoch, eval, scores));
        }
    }
    let best_epoch = best.map_or(cfg.epochs, |b| b.epoch);
    let last = match run.ema {
        Some(e) => (e.vs, e.net),
        None => (run.vs, run.net),
    };
    Ok(FoldRun {
        records: out.0,
        epoch_margins: out.1,
        epoch_scores: out.2,
        best_epoch,
        last,
        best: (run.best_vs, run.best_net),
        spec: run.spec,
        seconds: started.elapsed().as_secs_f64(),
        device: format!("{device:?}"),
    })
}

/// What the epochs have produced so far (restored from a checkpoint on resume).
#[derive(Default)]
struct SoFar {
    records: Vec<EpochRecord>,
    best: Option<Best>,
    best_ablation_acc: f64,
    /// Training time spent by earlier trainers on this run.
    earlier_seconds: f64,
    /// The checkpoint's epoch (1-based) when resumed.
    resumed_from: Option<usize>,
}

/// `Err(Stopped)` when the control asks the run to stop.
fn check_stop(cfg: &TrainConfig, epoch: usize) -> Result<(), TrainError> {
    match cfg.control.as_ref().and_then(|c| c.stop()) {
        Some(reason) => {
            tracing::info!(epoch, %reason, "run stopped");
            Err(TrainError::Stopped { reason, epoch })
        }
        None => Ok(()),
    }
}

fn notify_epoch(cfg: &TrainConfig, sofar: &SoFar, checkpoint: Option<&Path>) {
    if let (Some(control), Some(record)) = (&cfg.control, sofar.records.last()) {
        control.epoch(record, checkpoint);
    }
}

/// The data of a run: the dataset, its split, and the class weights.
struct Prepared {
    dataset: data::Dataset,
    train: Vec<Sample>,
    val: Vec<Sample>,
    split: Option<data::SplitSummary>,
    weights: [f64; 2],
}

impl Prepared {
    fn new(cfg: &TrainConfig) -> Result<Prepared, TrainError> {
        let mut dataset = if cfg.more_data.is_empty() {
            data::scan_dataset(&cfg.data)?
        } else {
            data::scan_datasets(&cfg.datasets())?
        };
        if let Some(n) = cfg.ablation {
            dataset = data::subsample(&dataset, n, cfg.seed);
        }
        let (train, val, split) = if cfg.ablation.is_some() {
            // The ablation trains and measures on the same few images: the
            // question is only whether the set-up can learn them at all.
            (dataset.samples.clone(), dataset.samples.clone(), None)
        } else {
            let s = data::split(&dataset, cfg.val_fraction, cfg.seed);
            (s.train, s.val, Some(s.summary))
        };
        Ok(Prepared::with(dataset, train, val, split, cfg))
    }

    /// Given training and validation lists (a cross-validation fold).
    fn from_samples(cfg: &TrainConfig, train: Vec<Sample>, val: Vec<Sample>) -> Prepared {
        let dataset = data::Dataset {
            root: cfg.data.clone(),
            samples: train.iter().chain(&val).cloned().collect(),
        };
        Prepared::with(dataset, train, val, None, cfg)
    }

    fn with(
        dataset: data::Dataset,
        train: Vec<Sample>,
        val: Vec<Sample>,
        split: Option<data::SplitSummary>,
        cfg: &TrainConfig,
    ) -> Prepared {
        let n_pos = positives(&train);
        let weights = class_weights(cfg.class_weights, n_pos, train.len() - n_pos);
        tracing::info!(
            train = train.len(),
            train_effusion = n_pos,
            val = val.len(),
            val_effusion = positives(&val),
            weight_effusion = weights[0],
            weight_nofinding = weights[1],
            "data ready"
        );
        Prepared {
            dataset,
            train,
            val,
            split,
            weights,
        }
    }

    /// What the report and the manifest say about the data.
    fn summary(&self, cfg: &TrainConfig) -> serde_json::Value {
        let root = match cfg.more_data.is_empty() {
            true => serde_json::json!(cfg.data.display().to_string()),
            false => serde_json::json!(cfg.datasets()),
        };
        serde_json::json!({
            "root": root,
            "images": self.dataset.samples.len(),
            "effusion": positives(&self.dataset.samples),
            "train": self.train.len(),
            "train_effusion": positives(&self.train),
            "val": self.val.len(),
            "val_effusion": positives(&self.val),
            "split": self.split,
            "class_weights": self.weights,
            "fingerprint": data::fingerprint(&self.val),
        })
    }

    /// The settings and data a resumed run must share with the run that
    /// wrote its checkpoint: everything the weights, the order of batches or
    /// the choice of the best epoch depend on. Paths, devices, thread counts
    /// and the version are left out: another trainer may see the same data
    /// under another path, on another device.
    fn run_identity(&self, cfg: &TrainConfig) -> serde_json::Value {
        let mut identity = serde_json::json!({
            "format": checkpoint::FORMAT,
            "train_images": self.train.len(),
            "train_fingerprint": data::fingerprint(&self.train),
            "val_images": self.val.len(),
            "val_fingerprint": data::fingerprint(&self.val),
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "width": cfg.width,
            "image_size": cfg.image_size,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "schedule": cfg.schedule,
            "class_weights": cfg.class_weights,
            "seed": cfg.seed,
            "augment": cfg.augment,
            "target_recall": cfg.target_recall,
            "val_fraction": cfg.val_fraction,
        });
        // Only when set, so that checkpoints of runs without trial settings keep
        // their fingerprint.
        if !cfg.recipe.is_default() {
            identity["recipe"] = serde_json::json!(cfg.recipe);
        }
        identity
    }

    /// The caveats a reader of the report must see.
    fn notes(&self, cfg: &TrainConfig) -> Vec<String> {
        let n_val_pos = positives(&self.val);
        let mut notes = vec![format!(
            "Validation rests on {} images ({} effusion); with so few, every metric has a wide uncertainty.",
            self.val.len(),
            n_val_pos
        )];
        if n_val_pos < 30 {
            notes.push(format!(
                "Recall is measured on {n_val_pos} positive images: one image moves it by {:.1} points.",
                100.0 / n_val_pos.max(1) as f64
            ));
        }
        if cfg.ablation.is_some() {
            notes.push("Ablation run: trained and measured on the same images; says nothing about generalisation.".into());
        }
        notes
    }
}

fn positives(samples: &[Sample]) -> usize {
    samples.iter().filter(|s| s.effusion).count()
}

/// The epoch kept so far, with its validation scores.
struct Best {
    /// 1-based.
    epoch: usize,
    eval: Evaluation,
    scores: Vec<f32>,
}

impl Best {
    fn new(epoch: usize, eval: Evaluation, scores: Vec<f32>) -> Best {
        Best {
            epoch: epoch + 1,
            eval,
            scores,
        }
    }

    /// Whether `eval` beats the best so far. AUROC moves in steps of
    /// 1/(positives x negatives), so on a small validation set ties are
    /// common; the lower validation loss breaks them, since it also rewards
    /// probabilities on the right side of the threshold.
    fn improves(best: Option<&Best>, eval: &Evaluation) -> bool {
        match (best, eval.auroc) {
            (None, _) => true,
            (Some(b), Some(a)) => {
                let b_auroc = b.eval.auroc.unwrap_or(f64::NEG_INFINITY);
                a > b_auroc
                    || (a == b_auroc
                        && eval.loss.unwrap_or(f64::INFINITY)
                            < b.eval.loss.unwrap_or(f64::INFINITY))
            }
            (Some(_), None) => false,
        }
    }
}

/// The network, its optimiser and loaders while a run trains.
struct Run<'a> {
    cfg: &'a TrainConfig,
    device: Device,
    spec: ResNetSpec,
    vs: nn::VarStore,
    net: ResNet,
    /// The best epoch's weights, copied in as training goes.
    best_vs: nn::VarStore,
    best_net: ResNet,
    opt: Adam,
    loss_weights: Tensor,
    train_loader: Loader,
    val_loader: Loader,
    augment: Option<AugmentConfig>,
    /// The average of the weights under `--ema`: what is evaluated and kept.
    ema: Option<Ema>,
    /// The last evaluation's margins per view (see `recipe::Views`), each in
    /// validation order.
    margins: Vec<Vec<f32>>,
}

impl<'a> Run<'a> {
    fn new(cfg: &'a TrainConfig, device: Device, data: &Prepared) -> Result<Run<'a>, TrainError> {
        let spec = ResNetSpec {
            image_size: cfg.image_size,
            ..ResNetSpec::with_width(cfg.width)
        };
        let loader = |samples: &[Sample]| {
            Loader::new(
                samples.to_vec(),
                cfg.image_size,
                Limits::default(),
                cfg.loader_threads,
                LOADER_PREFETCH,
            )
        };
        let vs = nn::VarStore::new(device);
        let net = ResNet::new(&vs.root(), &spec).with_dropout(cfg.recipe.dropout);
        let best_vs = nn::VarStore::new(device);
        let best_net = ResNet::new(&best_vs.root(), &spec);
        // Made after the network and its shadow so that runs without an average
        // draw the same initial weights as before.
        let ema = match cfg.recipe.ema_decay {
            Some(decay) => Some(Ema::new(&vs, &spec, decay)?),
            None => None,
        };
        let adam = AdamConfig {
            weight_decay: cfg.weight_decay,
            ..AdamConfig::default()
        };
        let opt = Adam::new(&vs, adam, cfg.lr)?;
        let w = data.weights;
        Ok(Run {
            cfg,
            device,
            spec,
            net,
            vs,
            best_vs,
            best_net,
            opt,
            loss_weights: Tensor::from_slice(&[w[0] as f32, w[1] as f32]).to_device(device),
            train_loader: loader(&data.train),
            val_loader: loader(&data.val),
            augment: cfg
                .recipe
                .augmentation(cfg.augment && cfg.ablation.is_none()),
            ema,
            margins: Vec::new(),
        })
    }

    /// The network that is evaluated, kept and exported: the average under
    /// `--ema`, else the trained one.
    fn eval_net(&self) -> &ResNet {
        self.ema.as_ref().map_or(&self.net, |e| &e.net)
    }

    /// One epoch: train, recompute batch-norm statistics, evaluate.
    ///
    /// Everything random in it derives from (seed, epoch), and the learning
    /// rate from the epoch, so an epoch after a resume replays as it would
    /// have in the uninterrupted run.
    fn epoch(&mut self, epoch: usize) -> Result<(EpochRecord, Evaluation, Vec<f32>), TrainError> {
        let cfg = self.cfg;
        let lr = cfg.schedule.lr(cfg.lr, epoch, cfg.epochs);
        self.opt.set_lr(lr);
        let t0 = Instant::now();
        let seeds = EpochSeeds::derive(cfg.seed, epoch);
        tch::manual_seed(seeds.torch);
        let epoch_seed = seeds.data;
        let fit = self.fit(epoch, epoch_seed, lr)?;
        let train_seconds = t0.elapsed().as_secs_f64();
        self.precise_batch_norm(epoch_seed)?;
        let (eval, scores, val_loss, margins) = evaluate(
            self.eval_net(),
            &self.val_loader,
            &self.loss_weights,
            cfg,
            self.device,
        )?;
        self.margins = margins;
        let record = EpochRecord {
            epoch: epoch + 1,
            train_loss: fit.loss_sum / fit.seen.max(1) as f64,
            train_accuracy: fit.correct as f64 / fit.seen.max(1) as f64,
            val_loss,
            val_auroc: eval.auroc,
            val_recall: eval.at_default.recall,
            val_precision: eval.at_default.precision,
            lr,
            seconds: t0.elapsed().as_secs_f64(),
            images_per_second: fit.seen as f64 / train_seconds,
        };
        Ok((record, eval, scores))
    }

    /// The training pass of one epoch: class-weighted cross-entropy, Adam.
    /// The control may stop it before any batch.
    fn fit(&mut self, epoch: usize, epoch_seed: u64, lr: f64) -> Result<Fit, TrainError> {
        let cfg = self.cfg;
        let t0 = Instant::now();
        let bar = epoch_bar(cfg.progress, self.train_loader.len(), epoch, cfg.epochs);
        let mut fit = Fit::default();
        let augment = self.augment.map(|a| (a, epoch_seed));
        let batches = self.train_loader.num_batches(cfg.batch_size);
        let mut loader = self
            .train_loader
            .epoch(cfg.batch_size, Some(epoch_seed), augment);
        for index in 0..batches {
            check_stop(cfg, epoch + 1)?;
            let Some(batch) = loader.next() else { break };
            let batch = batch?;
            let (xs, ys) = tensors(&batch, cfg.image_size, self.device);
            let n = batch.labels.len();
            let recipe = &cfg.recipe;
            self.opt
                .set_lr(lr * recipe.warmup_factor(epoch, index, batches));
            // Off in an ablation, like augmentation: it asks only whether the
            // images can be learnt.
            let mix = recipe
                .mixup(epoch_seed, index, n)
                .filter(|_| cfg.ablation.is_none());
            let (xs, partner) = match &mix {
                Some(m) => {
                    let (mixed, other) = m.apply(&xs, &ys);
                    (mixed, Some((other, m.lambda)))
                }
                None => (xs, None),
            };
            let logits = self.net.forward_t(&xs, true);
            let loss = recipe::loss(
                &logits,
                &ys,
                partner.as_ref().map(|(o, l)| (o, *l)),
                &self.loss_weights,
                recipe.label_smoothing,
            );
            self.opt.backward_step(&loss)?;
            if let Some(ema) = &mut self.ema {
                ema.update(&self.vs);
            }
            fit.loss_sum += loss.double_value(&[]) * n as f64;
            fit.correct += logits
                .argmax(1, false)
                .eq_tensor(&ys)
                .sum(Kind::Int64)
                .int64_value(&[]) as usize;
            fit.seen += n;
            let images_per_second = fit.seen as f64 / t0.elapsed().as_secs_f64();
            bar.inc(n as u64);
            bar.set_message(format!(
                "loss {:.4}  {images_per_second:.1} img/s",
                fit.loss_sum / fit.seen as f64,
            ));
            if let Some(control) = &cfg.control {
                control.batch(BatchProgress {
                    epoch: epoch + 1,
                    epochs: cfg.epochs,
                    batch: index + 1,
                    batches,
                    images_per_second,
                });
            }
        }
        bar.finish_and_clear();
        Ok(fit)
    }

    /// Precise BN before every evaluation: see
    /// `ResNet::recompute_batch_norm_stats`. Un-augmented training images,
    /// as the served model sees un-augmented scans.
    fn precise_batch_norm(&self, epoch_seed: u64) -> Result<(), TrainError> {
        let (cfg, device) = (self.cfg, self.device);
        let mut load_error = None;
        let batches = self
            .train_loader
            .epoch(cfg.batch_size.max(2), Some(epoch_seed ^ 0xb17c), None)
            .map_while(|b| match b {
                Ok(b) => Some(tensors(&b, cfg.image_size, device).0),
                Err(e) => {
                    load_error = Some(e);
                    None
                }
            });
        self.eval_net().recompute_batch_norm_stats(batches)?;
        match load_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Writes the checkpoint of the epoch just completed (`sofar`'s last).
    fn checkpoint(
        &self,
        root: &Path,
        sofar: &SoFar,
        identity: &serde_json::Value,
        training_seconds: f64,
    ) -> Result<PathBuf, TrainError> {
        let cfg = self.cfg;
        let best = sofar
            .best
            .as_ref()
            .ok_or_else(|| TrainError::Config("checkpoint before any epoch".into()))?;
        let epoch = sofar.records.len();
        let state = CheckpointState {
            format: checkpoint::FORMAT,
            epoch,
            epochs: cfg.epochs,
            config_fingerprint: checkpoint::fingerprint(identity),
            config: identity.clone(),
            seed: cfg.seed,
            next_epoch_seeds: EpochSeeds::derive(cfg.seed, epoch),
            records: sofar.records.clone(),
            best: BestState {
                epoch: best.epoch,
                evaluation: best.eval.clone(),
                val_loss: best.eval.loss.unwrap_or(f64::NAN),
                scores: best.scores.clone(),
            },
            training_seconds,
            created_at: pleura::time::now_rfc3339_seconds(),
        };
        let snapshot = checkpoint::Snapshot {
            vs: &self.vs,
            best_vs: &self.best_vs,
            opt: &self.opt,
            state: &state,
        };
        let dir = checkpoint::write(root, &snapshot)?;
        tracing::info!(dir = %dir.display(), epoch, "checkpoint written");
        Ok(dir)
    }

    /// Loads the checkpoint at `dir` into the run and returns what its
    /// epochs produced, after checking that it belongs to this run.
    fn resume(
        &mut self,
        dir: &Path,
        identity: &serde_json::Value,
        data: &Prepared,
    ) -> Result<SoFar, TrainError> {
        let bad = |e: CheckpointError| TrainError::Resume(e.to_string());
        let state = checkpoint::read_state(dir).map_err(bad)?;
        state.check_matches(identity).map_err(bad)?;
        if state.best.scores.len() != data.val.len() {
            return Err(TrainError::Resume(format!(
                "the checkpoint scores {} validation images, this split has {}",
                state.best.scores.len(),
                data.val.len()
            )));
        }
        checkpoint::load_tensors(dir, &mut self.vs, &mut self.best_vs, &mut self.opt)
            .map_err(bad)?;
        // Recomputed rather than read: the scores and loss round-trip
        // exactly, the floats of a stored evaluation might not.
        let positives: Vec<bool> = data.val.iter().map(|s| s.effusion).collect();
        let mut eval = metrics::evaluate(&state.best.scores, &positives, self.cfg.target_recall);
        eval.loss = Some(state.best.val_loss);
        tracing::info!(dir = %dir.display(), epoch = state.epoch, best_epoch = state.best.epoch, "resuming");
        Ok(SoFar {
            best: Some(Best {
                epoch: state.best.epoch,
                eval,
                scores: state.best.scores,
            }),
            best_ablation_acc: 0.0,
            earlier_seconds: state.training_seconds,
            resumed_from: Some(state.epoch),
            records: state.records,
        })
    }

    /// Exports the best epoch's weights, parity-checked against tract.
    fn export_best(
        &mut self,
        best: &Best,
        rep: &Report,
        resumed_from: Option<usize>,
    ) -> Result<Exported, TrainError> {
        let cfg = self.cfg;
        self.vs.copy(&self.best_vs)?;
        let threshold = best
            .eval
            .chosen
            .map(|c| c.threshold)
            .unwrap_or(pleura::model::manifest::DEFAULT_THRESHOLD)
            .clamp(1e-6, 1.0 - 1e-6);
        let parity_inputs = first_images(&self.val_loader, 8, cfg)?;
        let mut training = serde_json::json!({
            "config": rep.config,
            "data": rep.data,
            "best_epoch": best.epoch,
            "training_seconds": rep.training_seconds,
            "device": rep.device,
            "code_revision": export::code_revision(),
        });
        if let Some(fields) = training.as_object_mut() {
            if let Some(id) = &cfg.run_id {
                fields.insert("run_id".into(), id.clone().into());
            }
            if let Some(epoch) = resumed_from {
                fields.insert("resumed_from_epoch".into(), epoch.into());
            }
        }
        let metrics = serde_json::to_value(&best.eval).expect("metrics serialise");
        if cfg.recipe.tta_flip {
            // The threshold and metrics were measured with the flip, so the
            // served graph must flip too: a one-member "ensemble" with it.
            let req = export::EnsembleExportRequest {
                spec: &self.spec,
                members: &[&self.vs],
                tta_flip: true,
                temperature: 1.0,
                calibration: None,
                threshold,
                metrics,
                training,
                parity_inputs: &parity_inputs,
                version: cfg.version.clone(),
            };
            return Ok(export::export_ensemble(&req, &cfg.out)?);
        }
        let req = ExportRequest {
            spec: &self.spec,
            threshold,
            metrics,
            training,
            parity_inputs: &parity_inputs,
            version: cfg.version.clone(),
        };
        Ok(export::export(
            &self.net,
            &self.vs,
            self.device,
            &req,
            &cfg.out,
        )?)
    }
}

/// Batches the loaders decode ahead of the training step.
const LOADER_PREFETCH: usize = 4;

/// Running totals of one training pass.
#[derive(Default)]
struct Fit {
    loss_sum: f64,
    correct: usize,
    seen: usize,
}

/// Logs an epoch, and shows it on the terminal when progress is on.
fn report_epoch(cfg: &TrainConfig, record: &EpochRecord) {
    tracing::info!(
        epoch = record.epoch,
        train_loss = record.train_loss,
        val_loss = record.val_loss,
        val_auroc = record.val_auroc.unwrap_or(f64::NAN),
        val_recall = record.val_recall,
        val_precision = record.val_precision,
        images_per_second = record.images_per_second,
        "epoch done"
    );
    if cfg.progress {
        eprintln!(
            "epoch {:>3}/{}  train loss {:.4}  val loss {:.4}  val AUROC {}  recall@0.5 {:.3}  precision@0.5 {:.3}  {:.1} img/s",
            record.epoch,
            cfg.epochs,
            record.train_loss,
            record.val_loss,
            record.val_auroc.map(|a| format!("{a:.4}")).unwrap_or_else(|| "n/a".into()),
            record.val_recall,
            record.val_precision,
            record.images_per_second
        );
    }
}

/// Loss weights for (effusion, nofinding).
pub fn class_weights(choice: ClassWeights, n_pos: usize, n_neg: usize) -> [f64; 2] {
    match choice {
        ClassWeights::None => [1.0, 1.0],
        ClassWeights::Manual(a, b) => [a, b],
        ClassWeights::Auto => {
            // Inverse frequency, scaled so the weights average 1 and the
            // loss keeps the magnitude of the unweighted one.
            let (p, n) = (n_pos.max(1) as f64, n_neg.max(1) as f64);
            let (wp, wn) = (1.0 / p, 1.0 / n);
            let s = (wp + wn) / 2.0;
            [wp / s, wn / s]
        }
    }
}

fn tensors(batch: &Batch, size: u32, device: Device) -> (Tensor, Tensor) {
    let n = batch.labels.len() as i64;
    let s = size as i64;
    let xs = Tensor::from_slice(&batch.images)
        .view([n, 1, s, s])
        .to_device(device);
    let ys = Tensor::from_slice(&batch.labels).to_device(device);
    (xs, ys)
}

/// What a validation pass gives: metrics, p_effusion per image, mean loss,
/// and each view's margins (one view, or two under flip TTA).
type Evaluated = (Evaluation, Vec<f32>, f64, Vec<Vec<f32>>);

/// Validation pass in eval mode (see [`Evaluated`]).
fn evaluate(
    net: &ResNet,
    loader: &Loader,
    loss_weights: &Tensor,
    cfg: &TrainConfig,
    device: Device,
) -> Result<Evaluated, TrainError> {
    let mut scores = Vec::with_capacity(loader.len());
    let mut margins: Vec<Vec<f32>> = Vec::new();
    let mut positives = Vec::with_capacity(loader.len());
    let mut loss_sum = 0.0;
    let to_vec = |t: &Tensor| Vec::<f32>::try_from(&t.to_device(Device::Cpu));
    tch::no_grad(|| -> Result<(), TrainError> {
        for batch in loader.epoch(cfg.batch_size.max(1), None, None) {
            let batch = batch?;
            let (xs, ys) = tensors(&batch, cfg.image_size, device);
            let out = recipe::eval_views(net, &xs, cfg.recipe.tta_flip);
            // Plain cross-entropy whatever the training loss, so that epochs and
            // recipes compare on one scale.
            let loss = recipe::loss(&out.logits, &ys, None, loss_weights, 0.0);
            loss_sum += loss.double_value(&[]) * batch.labels.len() as f64;
            scores.extend(to_vec(&out.p)?);
            margins.resize_with(out.margins.len(), Vec::new);
            for (all, view) in margins.iter_mut().zip(&out.margins) {
                all.extend(to_vec(view)?);
            }
            positives.extend(batch.labels.iter().map(|&l| l == 0));
        }
        Ok(())
    })?;
    let mut eval = metrics::evaluate(&scores, &positives, cfg.target_recall);
    let val_loss = loss_sum / scores.len().max(1) as f64;
    eval.loss = Some(val_loss);
    Ok((eval, scores, val_loss, margins))
}

fn first_images(loader: &Loader, n: usize, cfg: &TrainConfig) -> Result<Vec<Vec<f32>>, TrainError> {
    let side = (cfg.image_size * cfg.image_size) as usize;
    let mut out = Vec::new();
    for batch in loader.epoch(n.max(1), None, None) {
        let batch = batch?;
        out.extend(batch.images.chunks(side).map(<[f32]>::to_vec));
        if out.len() >= n {
            break;
        }
    }
    out.truncate(n);
    Ok(out)
}

fn epoch_bar(enabled: bool, len: usize, epoch: usize, epochs: usize) -> ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_weights_are_inverse_frequency_and_average_one() {
        let [wp, wn] = class_weights(ClassWeights::Auto, 10, 90);
        assert!((wp / wn - 9.0).abs() < 1e-9);
        assert!(((wp + wn) / 2.0 - 1.0).abs() < 1e-9);
        assert_eq!(class_weights(ClassWeights::None, 10, 90), [1.0, 1.0]);
        assert_eq!(
            class_weights(ClassWeights::Manual(3.0, 1.0), 10, 90),
            [3.0, 1.0]
        );
    }

    #[test]
    fn flags_parse() {
        assert_eq!("auto".parse::<ClassWeights>().unwrap(), ClassWeights::Auto);
        assert_eq!(
            "2,0.5".parse::<ClassWeights>().unwrap(),
            ClassWeights::Manual(2.0, 0.5)
        );
        assert!("0,1".parse::<ClassWeights>().is_err());
        assert_eq!(
            "step:5:0.5".parse::<Schedule>().unwrap(),
            Schedule::Step {
                every: 5,
                gamma: 0.5
            }
        );
        assert!("linear".parse::<Schedule>().is_err());
    }

    #[test]
    fn schedules_decay_as_documented() {
        let c = Schedule::Cosine;
        assert_eq!(c.lr(1.0, 0, 10), 1.0);
        assert!((c.lr(1.0, 5, 10) - 0.5).abs() < 1e-12);
        let s = Schedule::Step {
            every: 2,
            gamma: 0.1,
        };
        assert!((s.lr(1.0, 3, 10) - 0.1).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(0.3, 7, 10), 0.3);
    }
}

//! Checkpoints: everything a run needs to continue after its trainer dies.
//!
//! A training service runs long jobs on machines that come and go; a run
//! whose trainer died is picked up by another trainer from its last
//! checkpoint, and must end with the model the uninterrupted run would have
//! made. So a checkpoint holds all the state that the rest of the run depends
//! on, not just the weights:
//!
//! - `weights.ot`: the network after the epoch (batch-norm statistics
//!   included), in libtorch's tensor-archive format;
//! - `best.ot`: the best epoch's weights so far, which the export uses;
//! - `optimizer.ot`: Adam's step counts and moment estimates
//!   ([`crate::optim::Adam::save`]);
//! - `state.json` ([`CheckpointState`]): epochs completed, the epoch records,
//!   the best epoch with its validation scores, the seeds, and a fingerprint
//!   of every setting the rest of the run depends on.
//!
//! Every random draw of an epoch is a pure function of (seed, epoch)
//! ([`EpochSeeds`]), so no generator state needs saving: the seeds are
//! recorded so that a trainer whose derivation differs refuses to resume
//! instead of silently continuing a different run.
//!
//! A checkpoint directory is written under a temporary name and renamed into
//! place once complete, so `epoch-NNNN/` exists only complete. Only the two
//! newest are kept: the caller may still be copying the one before the
//! newest.
//!
//! # Layout
//!
//! - `checkpoint.rs`: the layout, [`CheckpointState`], [`write()`],
//!   [`read_state`], [`load_tensors`], [`EpochSeeds`].
//! - `tests`: tiny training runs checkpointed, stopped, resumed and refused.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use crate::metrics::Evaluation;
use crate::optim::{Adam, OptimError};
use crate::report::EpochRecord;

/// Version of the checkpoint layout; a trainer reads only its own.
pub const FORMAT: u32 = 1;
/// The run's progress, [`CheckpointState`].
pub const STATE_FILE: &str = "state.json";
/// The network after the epoch.
pub const WEIGHTS_FILE: &str = "weights.ot";
/// The best epoch's network so far.
pub const BEST_WEIGHTS_FILE: &str = "best.ot";
/// Adam's state.
pub const OPTIMIZER_FILE: &str = "optimizer.ot";

const DIR_PREFIX: &str = "epoch-";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file or directory could not be created, read, written or renamed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `state.json` is not valid.
    #[error("{}: {source}", .path.display())]
    Json {
        /// The state file.
        path: PathBuf,
        /// The parse or serialisation error.
        #[source]
        source: serde_json::Error,
    },
    /// libtorch could not save or load a tensor file.
    #[error("{}: {source}", .path.display())]
    Torch {
        /// The tensor file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: tch::TchError,
    },
    /// The optimiser state could not be saved or does not fit the model.
    #[error("{}: {source}", .path.display())]
    Optimizer {
        /// The optimiser file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: OptimError,
    },
    /// Written by a trainer with another checkpoint layout.
    #[error("{}: checkpoint format {found}, this trainer reads format {FORMAT}", .path.display())]
    Format {
        /// The state file.
        path: PathBuf,
        /// The format it declares.
        found: u32,
    },
    /// Made by another configuration or dataset, or inconsistent in itself.
    #[error("{0}")]
    Mismatch(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The seeds of one epoch, derived from the run's seed and the epoch alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSeeds {
    /// Shuffle order, augmentation and the precise-BN pass (`data`, `augment`).
    pub data: u64,
    /// libtorch's generators (`tch::manual_seed`), reseeded at the epoch's
    /// start so that anything random inside torch replays after a resume.
    pub torch: i64,
}

impl EpochSeeds {
    /// The seeds of `epoch` (0-based) of a run seeded with `seed`.
    pub fn derive(seed: u64, epoch: usize) -> EpochSeeds {
        let data = seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64);
        // splitmix64's finaliser: decorrelates it from the data seed; masked
        // to stay a non-negative i64 whatever the platform does with signs.
        let mut z = data.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        EpochSeeds {
            data,
            torch: (z & (i64::MAX as u64)) as i64,
        }
    }
}

/// The best epoch so far, as a checkpoint keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BestState {
    /// 1-based.
    pub epoch: usize,
    /// Its validation, for readers; a resume recomputes it from `scores`
    /// and `val_loss`, which round-trip exactly, so the exported metrics
    /// are those of the uninterrupted run to the last bit.
    pub evaluation: Evaluation,
    /// Mean validation loss.
    #[serde(with = "exact_f64")]
    pub val_loss: f64,
    /// `p_effusion` of every validation image, in validation order.
    #[serde(with = "exact_f32s")]
    pub scores: Vec<f32>,
}

/// `state.json`: where a run stands after a completed epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// [`FORMAT`].
    pub format: u32,
    /// Epochs completed.
    pub epoch: usize,
    /// Epochs of the whole run.
    pub epochs: usize,
    /// sha256 of `config`: a resume must match it exactly.
    pub config_fingerprint: String,
    /// The settings and data the rest of the run depends on (see
    /// `train::run_identity`); shown in a mismatch, so the reader learns
    /// which differs.
    pub config: serde_json::Value,
    /// The run's seed.
    pub seed: u64,
    /// The seeds the next epoch uses; a resume checks its own derivation
    /// gives the same ones.
    pub next_epoch_seeds: EpochSeeds,
    /// The epochs so far.
    pub records: Vec<EpochRecord>,
    /// The best epoch so far.
    pub best: BestState,
    /// Training wall time so far, over every trainer that worked on the run.
    pub training_seconds: f64,
    /// When the checkpoint was written (RFC 3339).
    pub created_at: String,
}

impl CheckpointState {
    /// Refuses a checkpoint made by another configuration or dataset, or by
    /// a trainer that derives its seeds differently.
    pub fn check_matches(&self, identity: &serde_json::Value) -> Result<(), CheckpointError> {
        let fingerprint = fingerprint(identity);
        if self.config_fingerprint != fingerprint {
            let differing = differing_keys(&self.config, identity);
            return Err(CheckpointError::Mismatch(format!(
                "the checkpoint was made by a different configuration or dataset (differs in: {})",
                if differing.is_empty() {
                    "the fingerprint only".to_string()
                } else {
                    differing.join(", ")
                }
            )));
        }
        if self.epoch == 0 || self.epoch > self.epochs || self.records.len() != self.epoch {
            return Err(CheckpointError::Mismatch(format!(
                "inconsistent checkpoint: {} epochs done of {}, {} records",
                self.epoch,
                self.epochs,
                self.records.len()
            )));
        }
        if self.best.epoch == 0 || self.best.epoch > self.epoch {
            return Err(CheckpointError::Mismatch(format!(
                "inconsistent checkpoint: best epoch {} after {} epochs",
                self.best.epoch, self.epoch
            )));
        }
        if EpochSeeds::derive(self.seed, self.epoch) != self.next_epoch_seeds {
            return Err(CheckpointError::Mismatch(
                "the checkpoint's trainer derives its epoch seeds differently; resuming would not continue the same run"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// sha256 of the identity's JSON. Compared as text, because parsing JSON
/// floats back is not exact.
pub fn fingerprint(identity: &serde_json::Value) -> String {
    pleura::model::manifest::sha256_hex(identity.to_string().as_bytes())
}

fn differing_keys(stored: &serde_json::Value, current: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (stored.as_object(), current.as_object()) else {
        return vec!["the whole configuration".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| match (a.get(*k), b.get(*k)) {
            // A float read back from JSON may be a bit off; a real change is not.
            (Some(x), Some(y)) if x.is_f64() && y.is_f64() => {
                let (x, y) = (
                    x.as_f64().unwrap_or(f64::NAN),
                    y.as_f64().unwrap_or(f64::NAN),
                );
                (x - y).abs() > 1e-12 * x.abs().max(y.abs())
            }
            (x, y) => x != y,
        })
        .map(|k| {
            format!(
                "{k} (checkpoint {}, now {})",
                show(a.get(k)),
                show(b.get(k))
            )
        })
        .collect()
}

fn show(v: Option<&serde_json::Value>) -> String {
    v.map_or_else(|| "absent".into(), ToString::to_string)
}

/// The directory name of the checkpoint after `epoch` (1-based).
pub fn dir_name(epoch: usize) -> String {
    format!("{DIR_PREFIX}{epoch:04}")
}

/// The epoch a checkpoint directory name stands for.
fn epoch_of(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(DIR_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A temporary directory's name and the epoch it was being written for.
fn temp_name(epoch: usize) -> String {
    format!(".{}.tmp-{}", dir_name(epoch), std::process::id())
}

fn temp_epoch(name: &str) -> Option<usize> {
    let rest = name.strip_prefix('.')?;
    let (dir, _pid) = rest.split_once(".tmp-")?;
    epoch_of(dir)
}

/// Reads and checks a checkpoint's `state.json`: its format, and that the
/// tensor files beside it are there.
pub fn read_state(dir: &Path) -> Result<CheckpointState, CheckpointError> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    // The format is read on its own first, so that a layout this trainer
    // does not know is reported as such rather than as a parse error.
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let head: Head = serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Json {
        path: path.clone(),
        source,
    })?;
    if head.format != FORMAT {
        return Err(CheckpointError::Format {
            path,
            found: head.format,
        });
    }
    let state: CheckpointState =
        serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Json {
            path: path.clone(),
            source,
        })?;
    for file in [WEIGHTS_FILE, BEST_WEIGHTS_FILE, OPTIMIZER_FILE] {
        let p = dir.join(file);
        if !p.is_file() {
            return Err(CheckpointError::Io {
                path: p,
                source: io::Error::new(io::ErrorKind::NotFound, "missing from the checkpoint"),
            });
        }
    }
    Ok(state)
}

/// Loads a checkpoint's tensors into a run's network, best-epoch copy and
/// optimiser. A failure part way leaves them partly loaded: the caller
/// abandons the run.
pub fn load_tensors(
    dir: &Path,
    vs: &mut VarStore,
    best_vs: &mut VarStore,
    opt: &mut Adam,
) -> Result<(), CheckpointError> {
    for (store, file) in [(vs, WEIGHTS_FILE), (best_vs, BEST_WEIGHTS_FILE)] {
        let path = dir.join(file);
        store
            .load(&path)
            .map_err(|source| CheckpointError::Torch { path, source })?;
    }
    let path = dir.join(OPTIMIZER_FILE);
    opt.load(&path)
        .map_err(|source| CheckpointError::Optimizer { path, source })
}

/// What one checkpoint is made of.
pub struct Snapshot<'a> {
    /// The network after the epoch.
    pub vs: &'a VarStore,
    /// The best epoch's network.
    pub best_vs: &'a VarStore,
    /// The optimiser.
    pub opt: &'a Adam,
    /// `state.json`.
    pub state: &'a CheckpointState,
}

/// Writes `root/epoch-NNNN/` for `snapshot.state.epoch`, complete or not at
/// all, then deletes the checkpoints older than the one before it. Returns
/// the new directory.
///
/// A directory of that name already there was left by an earlier trainer on
/// this run (one that got further before it died); it is replaced.
pub fn write(root: &Path, snapshot: &Snapshot) -> Result<PathBuf, CheckpointError> {
    let epoch = snapshot.state.epoch;
    fs::create_dir_all(root).map_err(io_err(root))?;
    let tmp = root.join(temp_name(epoch));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = fill(&tmp, snapshot) {
        // Only this call wrote into `tmp`; nothing else can lose by its removal.
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dir = root.join(dir_name(epoch));
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
    sync_dir(root);
    prune(root, epoch);
    Ok(dir)
}

fn fill(tmp: &Path, s: &Snapshot) -> Result<(), CheckpointError> {
    for (store, file) in [(s.vs, WEIGHTS_FILE), (s.best_vs, BEST_WEIGHTS_FILE)] {
        let path = tmp.join(file);
        store.save(&path).map_err(|source| CheckpointError::Torch {
            path: path.clone(),
            source,
        })?;
        sync_file(&path)?;
    }
    let path = tmp.join(OPTIMIZER_FILE);
    s.opt
        .save(&path)
        .map_err(|source| CheckpointError::Optimizer {
            path: path.clone(),
            source,
        })?;
    sync_file(&path)?;
    let path = tmp.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(s.state).map_err(|source| CheckpointError::Json {
        path: path.clone(),
        source,
    })?;
    let mut f = fs::File::create(&path).map_err(io_err(&path))?;
    f.write_all(&json).map_err(io_err(&path))?;
    f.sync_all().map_err(io_err(&path))?;
    sync_dir(tmp);
    Ok(())
}

/// The rename makes a checkpoint visible; syncing first makes sure a
/// machine crash cannot leave a visible directory of empty files.
fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// Best effort: not every platform can open a directory to sync it.
fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Deletes checkpoints older than the one before `epoch`'s, and temporary
/// directories abandoned by earlier trainers. Failing to delete costs disk
/// space, not the run, so it is logged and training goes on.
fn prune(root: &Path, epoch: usize) {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(root = %root.display(), %error, "cannot list checkpoints to prune");
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let old = match (epoch_of(name), temp_epoch(name)) {
            (Some(n), _) => n + 1 < epoch,
            (None, Some(n)) => n < epoch,
            (None, None) => false,
        };
        if old {
            let path = entry.path();
            if let Err(error) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), %error, "cannot delete an old checkpoint");
            }
        }
    }
}

/// Writes an `f64` as the decimal text that reads back to the same bits
/// (serde_json's own float parsing may be off by one unit in the last place).
mod exact_f64 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(x)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(D::Error::custom)
    }
}

/// [`exact_f64`] for a list of `f32`.
mod exact_f32s {
    use serde::{de::Error, ser::SerializeSeq, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(xs: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(xs.len()))?;
        for x in xs {
            seq.serialize_element(&x.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| t.parse().map_err(D::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests;

//! Publishing and activating, as the library calls that `pleura models
//! publish`, `pleura models activate` and `pleura-trainer train --publish`
//! all make.
//!
//! Publishing is one sequence: read the model directory (hash-checked), read
//! the signing key, run the promotion gate, sign, upload, record, activate,
//! and announce. Everything up to the activation is all-or-nothing for the
//! caller: an error means nothing was activated. The announcement is best
//! effort (workers also reconcile on a timer), so its outcome is reported in
//! [`Publication::announced`] instead of failing a publish that took effect.
//! Nothing here prints: callers decide what to tell people.

use std::path::PathBuf;

use super::error::RegistryError;
use super::gate::GatePolicy;
use super::signing::{self, SignatureError};
use super::state::{PublishOptions, Published, Registry};
use crate::fleet::announce::{AnnounceError, Announcer};
use crate::model::{ManifestError, ModelFiles};
use crate::wire::Activation;

/// What to publish, and how.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// The model directory (`model.onnx` + `model.json`).
    pub dir: PathBuf,
    /// The private key to sign with. Without one the model is published
    /// unsigned, and workers refuse it unless they allow unsigned models.
    pub key_file: Option<PathBuf>,
    /// Publish even if the promotion gate fails; needs a `reason`.
    pub force: bool,
    /// Why; recorded in the entry and the activation history.
    pub reason: Option<String>,
    /// Activate and announce after publishing.
    pub activate: bool,
    /// Who is publishing (see [`super::who`]).
    pub by: String,
}

/// Why a publish or an activation did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// `force` without a reason: an override must say why.
    #[error("--force needs a --reason, which the history records")]
    ForceWithoutReason,
    /// The model directory is unusable (missing files, a hash mismatch).
    #[error("model {}: {source}", dir.display())]
    Model {
        /// The directory given.
        dir: PathBuf,
        /// What is wrong with it.
        source: ManifestError,
    },
    /// The signing key could not be read.
    #[error("signing key {}: {source}", path.display())]
    Key {
        /// The key file given.
        path: PathBuf,
        /// What is wrong with it.
        source: SignatureError,
    },
    /// The registry refused (the gate, an existing version, an unknown
    /// version) or could not be reached.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl PublishError {
    /// Whether trying the same call again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, PublishError::Registry(e) if e.is_transient())
    }
}

/// What publishing did.
#[derive(Debug)]
pub struct Publication {
    /// The entry written and, when activated, the activation.
    pub published: Published,
    /// Whether the fleet was told; `None` when nothing was activated.
    pub announced: Option<Result<(), AnnounceError>>,
}

/// What an activation did.
#[derive(Debug)]
pub struct Promotion {
    /// The activation recorded.
    pub activation: Activation,
    /// Whether the fleet was told.
    pub announced: Result<(), AnnounceError>,
}

impl Publication {
    /// What a person should be told: an unsigned model (which workers refuse
    /// unless they allow unsigned models) and an announcement that did not
    /// go out (workers then switch at their next reconcile).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.published.entry.key_id.is_none() {
            out.push(format!(
                "{} was published unsigned (no signing key given); workers refuse it \
                 unless allow_unsigned_models is on",
                self.published.entry.version
            ));
        }
        if let Some(Err(e)) = &self.announced {
            out.push(announce_warning(e));
        }
        out
    }
}

impl Promotion {
    /// What a person should be told: an announcement that did not go out.
    pub fn warnings(&self) -> Vec<String> {
        match &self.announced {
            Ok(()) => Vec::new(),
            Err(e) => vec![announce_warning(e)],
        }
    }
}

fn announce_warning(e: &AnnounceError) -> String {
    format!("could not announce the activation ({e}); workers pick it up at their next reconcile")
}

/// Publishes a model directory: gate, sign, upload, record, and (with
/// `activate`) activate and announce.
pub async fn publish(
    registry: &Registry,
    announcer: &Announcer,
    policy: &GatePolicy,
    request: &PublishRequest,
) -> Result<Publication, PublishError> {
    if request.force
        && request
            .reason
            .as_deref()
            .is_none_or(|r| r.trim().is_empty())
    {
        return Err(PublishError::ForceWithoutReason);
    }
    let files = ModelFiles::read_dir(&request.dir).map_err(|source| PublishError::Model {
        dir: request.dir.clone(),
        source,
    })?;
    let key = request
        .key_file
        .as_ref()
        .map(|path| {
            signing::read_signing_key(path).map_err(|source| PublishError::Key {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;
    let options = PublishOptions {
        force: request.force,
        reason: request.reason.clone(),
        activate: request.activate,
        by: request.by.clone(),
    };
    let published = registry
        .publish(&files, key.as_ref(), policy, &options)
        .await?;
    let announced = match &published.activation {
        Some(activation) => Some(announcer.announce(activation).await),
        None => None,
    };
    Ok(Publication {
        published,
        announced,
    })
}

/// Makes a published `version` active (a promotion or a rollback), records
/// who and why, and announces it.
pub async fn activate(
    registry: &Registry,
    announcer: &Announcer,
    version: &str,
    reason: &str,
    by: &str,
) -> Result<Promotion, PublishError> {
    let activation = registry.activate(version, reason, by).await?;
    let announced = announcer.announce(&activation).await;
    Ok(Promotion {
        activation,
        announced,
    })
}

//! The model registry: immutable artifacts in an object store, state in Redis.
//!
//! - **Artifacts** (`model.onnx`, `model.json`, `model.sig`) live under
//!   `<registry_url>/<version>/` in any store `object_store` speaks:
//!   `file://` (a directory or a mounted volume, the default) or `s3://`
//!   (AWS or any S3-compatible server; endpoint and credentials come from
//!   the usual `AWS_*` variables).
//! - **State** lives in Redis under the namespace: each version's
//!   [`RegistryEntry`] (written once), an index of versions, the **active**
//!   version, the history of [`Activation`]s and, per version, the workers
//!   that refused it.
//!
//! Versions are immutable: publishing a version that exists fails, and an
//! artifact already in the store with other bytes is never overwritten.
//! Activation is one Lua script, so the active key and its history entry
//! can never disagree.
//!
//! Workers fetch with [`Registry::fetch`] and check with [`Artifact::verify`]
//! (hash and signature) before they load anything; the CLI's
//! `pleura models verify` runs the very same check.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::manifest::{
    rfc3339_seconds, sha256_hex, Manifest, ManifestError, ModelFiles, MANIFEST_FILE, ONNX_FILE,
};
use crate::signing::{self, SignatureError, SigningKey, Trust, SIGNATURE_FILE};
use crate::wire::{
    Activation, GateOutcome, Names, RegistryEntry, ReloadFailure, REGISTRY_SCHEMA_VERSION,
};

/// Activations kept in the history list.
pub const HISTORY_LEN: isize = 1000;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `registry_url` is not a `file://` or `s3://` URL this build can open.
    #[error("registry url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The artifact store failed (network, permissions, disk). Transient.
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    /// Redis failed. Transient.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No such version in the registry.
    #[error("version {0} is not published")]
    NotFound(String),
    /// The version exists already; versions are immutable.
    #[error("version {version} is already published{}", if *.same { " with these exact files (use `pleura models activate` to make it active)" } else { " with different files; versions are immutable, pick a new one" })]
    VersionExists { version: String, same: bool },
    /// The promotion gate refused the candidate.
    #[error("promotion gate failed: {}; fix the model, or pass --force with --reason", .0.join("; "))]
    GateFailed(Vec<String>),
    /// Files in the store or registry state do not parse.
    #[error("corrupt registry data: {0}")]
    Corrupt(String),
    /// The model directory to publish is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl RegistryError {
    /// Whether trying again later may succeed (the store or Redis was down),
    /// as opposed to a verdict about the model or the request.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Store(object_store::Error::NotFound { .. }) => false,
            RegistryError::Store(_) | RegistryError::Redis(_) => true,
            _ => false,
        }
    }
}

/// The object store holding model artifacts, with the key prefix under it.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
}

impl ArtifactStore {
    /// Opens `file:///abs/dir` (created if missing) or `s3://bucket/prefix`.
    /// For S3, region, endpoint (`AWS_ENDPOINT_URL` for S3-compatible
    /// servers), `AWS_ALLOW_HTTP` and credentials come from the environment,
    /// as every AWS tool reads them.
    pub fn open(url: &str) -> Result<ArtifactStore, RegistryError> {
        let bad = |reason: String| RegistryError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|_| bad("not an absolute file path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|e| bad(e.to_string()))?;
                let store = LocalFileSystem::new_with_prefix(&dir)?;
                Ok(ArtifactStore {
                    store: Arc::new(store),
                    prefix: String::new(),
                    url: url.trim_end_matches('/').to_string(),
                })
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("no bucket".into()))?;
                let store = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()?;
                Ok(ArtifactStore {
                    store: Arc::new(store),
                    prefix: parsed.path().trim_matches('/').to_string(),
                    url: format!("s3://{bucket}{}", parsed.path().trim_end_matches('/')),
                })
            }
            other => Err(bad(format!("scheme {other:?} is not file or s3"))),
        }
    }

    /// The store's URL (never holds credentials: they come from the environment).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, version: &str, file: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(format!("{version}/{file}"))
        } else {
            ObjectPath::from(format!("{}/{version}/{file}", self.prefix))
        }
    }

    /// Where `version` lives, for people.
    pub fn version_url(&self, version: &str) -> String {
        format!("{}/{version}/", self.url)
    }

    async fn get(&self, version: &str, file: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        match self.store.get(&self.path(version, file)).await {
            Ok(r) => Ok(Some(r.bytes().await?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `bytes` unless the object exists. An existing object with the
    /// same bytes is fine (a retried publish); with other bytes it is
    /// [`RegistryError::VersionExists`], never overwritten.
    async fn put_new(&self, version: &str, file: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        match self.get(version, file).await? {
            Some(existing) if existing == bytes => Ok(()),
            Some(_) => Err(RegistryError::VersionExists {
                version: version.into(),
                same: false,
            }),
            None => {
                self.store
                    .put(&self.path(version, file), PutPayload::from(bytes.to_vec()))
                    .await?;
                Ok(())
            }
        }
    }

    /// Uploads a version: the ONNX first, the manifest, then the signature.
    pub async fn upload(&self, artifact: &Artifact) -> Result<(), RegistryError> {
        let v = &artifact.version;
        self.put_new(v, ONNX_FILE, &artifact.onnx).await?;
        self.put_new(v, MANIFEST_FILE, &artifact.manifest_json)
            .await?;
        if let Some(sig) = &artifact.signature {
            self.put_new(v, SIGNATURE_FILE, sig).await?;
        }
        Ok(())
    }

    /// Downloads a version's files, unverified.
    pub async fn download(&self, version: &str) -> Result<Artifact, RegistryError> {
        let missing = || RegistryError::NotFound(version.to_string());
        let manifest_json = self
            .get(version, MANIFEST_FILE)
            .await?
            .ok_or_else(missing)?;
        let onnx = self.get(version, ONNX_FILE).await?.ok_or_else(missing)?;
        let signature = self.get(version, SIGNATURE_FILE).await?;
        Ok(Artifact {
            version: version.to_string(),
            onnx,
            manifest_json,
            signature,
        })
    }
}

/// A version's files as they travel to and from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    /// The version they are stored under.
    pub version: String,
    /// `model.onnx`.
    pub onnx: Vec<u8>,
    /// The exact `model.json` bytes (the signature covers these bytes).
    pub manifest_json: Vec<u8>,
    /// `model.sig`, absent for an unsigned model.
    pub signature: Option<Vec<u8>>,
}

/// Why fetched files must not be served.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The manifest does not parse, breaks a rule, or the ONNX does not
    /// match its hash (a corrupt or torn artifact).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The manifest names another version than the one it is stored under.
    #[error("stored as {stored} but the manifest says {manifest}")]
    VersionMismatch { stored: String, manifest: String },
    /// Unsigned, signed by an untrusted key, or signed over other files.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

impl VerifyError {
    /// A stable code for metrics and refusal records.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Manifest(ManifestError::HashMismatch { .. }) => "hash_mismatch",
            VerifyError::Manifest(_) | VerifyError::VersionMismatch { .. } => "bad_manifest",
            VerifyError::Signature(SignatureError::Unsigned) => "unsigned",
            VerifyError::Signature(_) => "bad_signature",
        }
    }
}

/// Files that passed [`Artifact::verify`].
#[derive(Debug, Clone)]
pub struct Verified {
    /// The manifest and ONNX, hash-checked.
    pub files: ModelFiles,
    /// The key that signed them; `None` for an allowed unsigned model.
    pub key_id: Option<String>,
}

impl Artifact {
    /// Signs `files` (if a key is given) into an artifact ready to upload.
    pub fn build(files: &ModelFiles, key: Option<&SigningKey>) -> Result<Artifact, RegistryError> {
        files.verify()?;
        let mut manifest_json = serde_json::to_vec_pretty(&files.manifest)
            .map_err(|e| RegistryError::Corrupt(format!("cannot encode the manifest: {e}")))?;
        manifest_json.push(b'\n');
        let version = files.manifest.version.clone();
        let signature = key.map(|k| {
            let sig = signing::sign(k, &version, &files.onnx, &manifest_json);
            serde_json::to_vec_pretty(&sig).expect("a signature serialises")
        });
        Ok(Artifact {
            version,
            onnx: files.onnx.clone(),
            manifest_json,
            signature,
        })
    }

    /// The checks a worker makes before loading: the manifest parses and is
    /// valid, names the version it is stored under, the ONNX hashes to it,
    /// and a trusted key signed exactly these bytes (unless `trust` allows
    /// unsigned models and there is no signature).
    pub fn verify(&self, trust: &Trust) -> Result<Verified, VerifyError> {
        let manifest: Manifest =
            serde_json::from_slice(&self.manifest_json).map_err(|source| ManifestError::Parse {
                path: MANIFEST_FILE.into(),
                source,
            })?;
        if manifest.version != self.version {
            return Err(VerifyError::VersionMismatch {
                stored: self.version.clone(),
                manifest: manifest.version,
            });
        }
        let files = ModelFiles {
            manifest,
            onnx: self.onnx.clone(),
        };
        files.verify()?;
        let key_id = trust.verify(
            &self.version,
            &self.onnx,
            &self.manifest_json,
            self.signature.as_deref(),
        )?;
        Ok(Verified { files, key_id })
    }
}

/// The promotion gate's rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatePolicy {
    /// Lowest validation AUROC a candidate may have.
    pub min_auroc: f64,
    /// Lowest validation recall at the candidate's own threshold.
    pub min_recall: f64,
}

/// A model's validation AUROC, from the trainer's metrics.
pub fn manifest_auroc(m: &Manifest) -> Option<f64> {
    m.metrics.as_ref()?.get("auroc")?.as_f64()
}

/// A model's validation recall at its own threshold.
pub fn manifest_recall(m: &Manifest) -> Option<f64> {
    let metrics = m.metrics.as_ref()?;
    metrics
        .get("at_chosen")
        .and_then(|s| s.get("recall"))
        .or_else(|| metrics.get("chosen").and_then(|s| s.get("recall")))?
        .as_f64()
}

/// The fingerprint of the validation set a model was measured on.
pub fn manifest_fingerprint(m: &Manifest) -> Option<&str> {
    m.training
        .as_ref()?
        .get("data")?
        .get("fingerprint")?
        .as_str()
}

/// Checks a candidate against the gate and, when both were measured on the
/// same validation set, against the active model. Returns the failed rules;
/// empty means it passes.
pub fn gate(candidate: &Manifest, active: Option<&Manifest>, policy: &GatePolicy) -> Vec<String> {
    let mut failures = Vec::new();
    if !candidate.trained {
        failures.push("the model is untrained".to_string());
    }
    match manifest_auroc(candidate) {
        Some(a) if a >= policy.min_auroc => {}
        Some(a) => failures.push(format!(
            "validation AUROC {a:.3} is below {:.3}",
            policy.min_auroc
        )),
        None => failures.push("the manifest has no validation AUROC".into()),
    }
    match manifest_recall(candidate) {
        Some(r) if r >= policy.min_recall => {}
        Some(r) => failures.push(format!(
            "validation recall {r:.3} at the model's threshold is below {:.3}",
            policy.min_recall
        )),
        None => failures.push("the manifest has no validation recall".into()),
    }
    if let Some(active) = active {
        let same_set = manifest_fingerprint(candidate)
            .is_some_and(|f| Some(f) == manifest_fingerprint(active));
        if same_set {
            let pairs = [
                ("AUROC", manifest_auroc(candidate), manifest_auroc(active)),
                (
                    "recall",
                    manifest_recall(candidate),
                    manifest_recall(active),
                ),
            ];
            for (what, new, old) in pairs {
                if let (Some(new), Some(old)) = (new, old) {
                    if new < old {
                        failures.push(format!(
                            "{what} {new:.3} regresses from the active {} ({old:.3}) on the same validation set",
                            active.version
                        ));
                    }
                }
            }
        }
    }
    failures
}

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Publish even if the gate fails (recorded with `reason`).
    pub force: bool,
    /// Why; required with `force`, and recorded in the activation history.
    pub reason: Option<String>,
    /// Make the version active after publishing.
    pub activate: bool,
    /// Who is publishing.
    pub by: String,
}

/// What [`Registry::publish`] did.
#[derive(Debug, Clone)]
pub struct Published {
    /// The registry entry written.
    pub entry: RegistryEntry,
    /// The activation, when the version was made active.
    pub activation: Option<Activation>,
}

/// Registry state in Redis plus the artifact store.
#[derive(Clone)]
pub struct Registry {
    redis: ConnectionManager,
    names: Names,
    store: ArtifactStore,
}

// Makes a version's entry and its index entry appear together, once.
const PUBLISH_SCRIPT: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
"#;

// Sets the active version and records the activation in one step, so the
// history always says what the active key says. Returns the previous version.
const ACTIVATE_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOTPUBLISHED')
end
local prev = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], ARGV[1])
local rec = cjson.decode(ARGV[2])
if prev then rec['previous'] = prev else rec['previous'] = cjson.null end
redis.call('LPUSH', KEYS[3], cjson.encode(rec))
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
return prev
"#;

/// `user@host`, for the history.
pub fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    format!("{user}@{host}")
}

fn now() -> String {
    rfc3339_seconds(SystemTime::now())
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, json: &str) -> Result<T, RegistryError> {
    serde_json::from_str(json).map_err(|e| RegistryError::Corrupt(format!("{what}: {e}")))
}

impl Registry {
    /// A registry over an open Redis connection and artifact store.
    pub fn new(redis: ConnectionManager, names: Names, store: ArtifactStore) -> Registry {
        Registry {
            redis,
            names,
            store,
        }
    }

    /// Connects to Redis and opens the artifact store.
    pub async fn connect(
        redis_url: &str,
        names: Names,
        registry_url: &str,
    ) -> Result<Registry, RegistryError> {
        let store = ArtifactStore::open(registry_url)?;
        let client = redis::Client::open(redis_url)?;
        let redis = ConnectionManager::new(client).await?;
        Ok(Registry::new(redis, names, store))
    }

    /// The registry `settings` describe (`redis_url`, `namespace`, `registry_url`).
    pub async fn for_settings(
        settings: &crate::config::Settings,
    ) -> Result<Registry, RegistryError> {
        Registry::connect(
            &settings.redis_url,
            settings.names(),
            &settings.registry_url,
        )
        .await
    }

    /// The artifact store.
    pub fn store(&self) -> &ArtifactStore {
        &self.store
    }

    /// The fleet's names.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The Redis connection (shared, reconnecting).
    pub fn redis(&self) -> ConnectionManager {
        self.redis.clone()
    }

    /// One version's entry.
    pub async fn entry(&self, version: &str) -> Result<Option<RegistryEntry>, RegistryError> {
        let json: Option<String> = self
            .redis
            .clone()
            .get(self.names.model_key(version))
            .await?;
        json.map(|j| parse(version, &j)).transpose()
    }

    /// Every published version, oldest first.
    pub async fn entries(&self) -> Result<Vec<RegistryEntry>, RegistryError> {
        let mut redis = self.redis.clone();
        let versions: Vec<String> = redis.zrange(self.names.models_index(), 0, -1).await?;
        if versions.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = versions.iter().map(|v| self.names.model_key(v)).collect();
        let docs: Vec<Option<String>> = redis.mget(&keys).await?;
        versions
            .iter()
            .zip(docs)
            .filter_map(|(v, d)| d.map(|d| parse(v, &d)))
            .collect()
    }

    /// The active version, if any.
    pub async fn active(&self) -> Result<Option<String>, RegistryError> {
        Ok(self
            .redis
            .clone()
            .get(self.names.active_model_key())
            .await?)
    }

    /// The newest `n` activations, newest first.
    pub async fn history(&self, n: usize) -> Result<Vec<Activation>, RegistryError> {
        let docs: Vec<String> = self
            .redis
            .clone()
            .lrange(self.names.activations_key(), 0, n as isize - 1)
            .await?;
        docs.iter().map(|d| parse("activation", d)).collect()
    }

    /// The workers that refused `version`, and why.
    pub async fn refusals(
        &self,
        version: &str,
    ) -> Result<BTreeMap<String, ReloadFailure>, RegistryError> {
        let map: BTreeMap<String, String> = self
            .redis
            .clone()
            .hgetall(self.names.refusals_key(version))
            .await?;
        map.into_iter()
            .map(|(w, d)| Ok((w, parse("refusal", &d)?)))
            .collect()
    }

    /// Records that `worker` refused a version.
    pub async fn record_refusal(
        &self,
        worker: &str,
        failure: &ReloadFailure,
    ) -> Result<(), RegistryError> {
        let json = serde_json::to_string(failure).expect("a refusal serialises");
        let _: () = self
            .redis
            .clone()
            .hset(self.names.refusals_key(&failure.version), worker, json)
            .await?;
        Ok(())
    }

    /// Fetches a version's files from the store, unverified.
    pub async fn fetch(&self, version: &str) -> Result<Artifact, RegistryError> {
        self.store.download(version).await
    }

    /// Publishes `files`: gate, sign, upload, record, and optionally activate.
    pub async fn publish(
        &self,
        files: &ModelFiles,
        key: Option<&SigningKey>,
        policy: &GatePolicy,
        options: &PublishOptions,
    ) -> Result<Published, RegistryError> {
        files.verify()?;
        let version = files.manifest.version.clone();
        if let Some(existing) = self.entry(&version).await? {
            return Err(RegistryError::VersionExists {
                same: existing.manifest.sha256 == files.manifest.sha256,
                version,
            });
        }
        let active = match self.active().await? {
            Some(v) => self.entry(&v).await?.map(|e| e.manifest),
            None => None,
        };
        let failures = gate(&files.manifest, active.as_ref(), policy);
        let gate_outcome = if failures.is_empty() {
            GateOutcome::Passed
        } else if options.force {
            GateOutcome::Forced {
                failures,
                reason: options
                    .reason
                    .clone()
                    .unwrap_or_else(|| "no reason given".into()),
            }
        } else {
            return Err(RegistryError::GateFailed(failures));
        };

        let artifact = Artifact::build(files, key)?;
        self.store.upload(&artifact).await?;
        let entry = RegistryEntry {
            schema: REGISTRY_SCHEMA_VERSION,
            version: version.clone(),
            manifest: files.manifest.clone(),
            manifest_sha256: sha256_hex(&artifact.manifest_json),
            artifact_url: self.store.version_url(&version),
            key_id: key.map(|k| signing::key_id(&k.verifying_key())),
            published_at: now(),
            published_by: options.by.clone(),
            gate: gate_outcome,
        };
        let json = serde_json::to_string(&entry).expect("an entry serialises");
        let millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let created: i64 = redis::Script::new(PUBLISH_SCRIPT)
            .key(self.names.model_key(&version))
            .key(self.names.models_index())
            .arg(json)
            .arg(millis)
            .arg(&version)
            .invoke_async(&mut self.redis.clone())
            .await?;
        if created == 0 {
            // Someone published the same version between our check and now.
            return Err(RegistryError::VersionExists {
                version,
                same: false,
            });
        }
        let activation = if options.activate {
            let reason = match (&entry.gate, &options.reason) {
                (_, Some(r)) => r.clone(),
                (GateOutcome::Passed, None) => "published; gate passed".into(),
                (GateOutcome::Forced { .. }, None) => "published with --force".into(),
            };
            Some(self.activate(&version, &reason, &options.by).await?)
        } else {
            None
        };
        Ok(Published { entry, activation })
    }

    /// Makes `version` active and records why. Used for promotion and
    /// rollback alike. Announcing it to the fleet is the caller's next step
    /// ([`crate::broker::announce_model`]); workers that miss the
    /// announcement converge on their reconcile timer.
    pub async fn activate(
        &self,
        version: &str,
        reason: &str,
        by: &str,
    ) -> Result<Activation, RegistryError> {
        let mut activation = Activation {
            schema: REGISTRY_SCHEMA_VERSION,
            version: version.to_string(),
            previous: None,
            at: now(),
            by: by.to_string(),
            reason: reason.to_string(),
        };
        let json = serde_json::to_string(&activation).expect("an activation serialises");
        let previous: Result<Option<String>, redis::RedisError> =
            redis::Script::new(ACTIVATE_SCRIPT)
                .key(self.names.model_key(version))
                .key(self.names.active_model_key())
                .key(self.names.activations_key())
                .arg(version)
                .arg(json)
                .arg(HISTORY_LEN)
                .invoke_async(&mut self.redis.clone())
                .await;
        activation.previous = match previous {
            Ok(p) => p,
            Err(e) if e.to_string().contains("NOTPUBLISHED") => {
                return Err(RegistryError::NotFound(version.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        Ok(activation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::init_model;
    use crate::onnx::ResNetSpec;

    fn tiny(seed: u64) -> ModelFiles {
        let spec = ResNetSpec {
            image_size: 32,
            ..ResNetSpec::with_width(4)
        };
        init_model(&spec, seed).unwrap()
    }

    fn trained(mut files: ModelFiles, auroc: f64, recall: f64, fingerprint: &str) -> ModelFiles {
        files.manifest.trained = true;
        files.manifest.metrics = Some(serde_json::json!({
            "auroc": auroc, "at_chosen": {"recall": recall}
        }));
        files.manifest.training = Some(serde_json::json!({"data": {"fingerprint": fingerprint}}));
        files
    }

    const POLICY: GatePolicy = GatePolicy {
        min_auroc: 0.8,
        min_recall: 0.85,
    };

    #[test]
    fn the_gate_refuses_untrained_weak_and_regressing_models() {
        let untrained = tiny(1).manifest;
        assert_eq!(gate(&untrained, None, &POLICY).len(), 3);
        let good = trained(tiny(1), 0.93, 0.9, "A").manifest;
        assert!(gate(&good, None, &POLICY).is_empty());
        let weak = trained(tiny(2), 0.7, 0.8, "A").manifest;
        assert_eq!(gate(&weak, None, &POLICY).len(), 2);
        // Same validation set: must not regress. Another set: not comparable.
        let slightly_worse = trained(tiny(3), 0.91, 0.9, "A").manifest;
        let failures = gate(&slightly_worse, Some(&good), &POLICY);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("regresses"));
        let other_set = trained(tiny(3), 0.91, 0.9, "B").manifest;
        assert!(gate(&other_set, Some(&good), &POLICY).is_empty());
    }

    #[test]
    fn verify_refuses_corrupt_unsigned_and_foreign_artifacts() {
        let key = signing::generate();
        let files = tiny(7);
        let trust = Trust {
            keys: vec![key.verifying_key()],
            allow_unsigned: false,
        };
        let signed = Artifact::build(&files, Some(&key)).unwrap();
        let ok = signed.verify(&trust).unwrap();
        assert_eq!(ok.files, files);
        assert!(ok.key_id.is_some());

        let mut corrupt = signed.clone();
        let mid = corrupt.onnx.len() / 2;
        corrupt.onnx[mid] ^= 0xff;
        assert_eq!(corrupt.verify(&trust).unwrap_err().code(), "hash_mismatch");

        let unsigned = Artifact::build(&files, None).unwrap();
        assert_eq!(unsigned.verify(&trust).unwrap_err().code(), "unsigned");

        let foreign = Artifact::build(&files, Some(&signing::generate())).unwrap();
        assert_eq!(foreign.verify(&trust).unwrap_err().code(), "bad_signature");

        let mut renamed = signed.clone();
        renamed.version = "other".into();
        assert_eq!(renamed.verify(&trust).unwrap_err().code(), "bad_manifest");
    }

    #[tokio::test]
    async fn a_file_store_round_trips_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(dir.path()).unwrap();
        let store = ArtifactStore::open(url.as_str()).unwrap();
        let a = Artifact::build(&tiny(1), None).unwrap();
        store.upload(&a).await.unwrap();
        store.upload(&a).await.unwrap(); // a retried publish is harmless
        assert_eq!(store.download(&a.version).await.unwrap(), a);
        let mut other = a.clone();
        other.onnx.push(0);
        assert!(matches!(
            store.upload(&other).await,
            Err(RegistryError::VersionExists { same: false, .. })
        ));
        assert!(matches!(
            store.download("nope").await,
            Err(RegistryError::NotFound(_))
        ));
    }
}

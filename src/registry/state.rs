//! [`Registry`]: the registry's state in Redis, over its artifact store.
//!
//! Under the namespace: each version's [`RegistryEntry`] (written once), an
//! index of versions, the **active** version, the history of
//! [`Activation`]s and, per version, the workers that refused it.
//! Publishing and activation are Lua scripts, so an entry and its index
//! entry, or the active key and its history entry, can never disagree.

use std::collections::BTreeMap;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use super::artifact::Artifact;
use super::error::RegistryError;
use super::gate::{gate, GatePolicy};
use super::signing::{self, SigningKey};
use super::store::ArtifactStore;
use crate::model::manifest::sha256_hex;
use crate::model::ModelFiles;
use crate::time;
use crate::tls::ClientTls;
use crate::wire::{
    Activation, GateOutcome, Names, RegistryEntry, ReloadFailure, REGISTRY_SCHEMA_VERSION,
};

/// Activations kept in the history list.
pub const HISTORY_LEN: isize = 1000;

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
    time::now_rfc3339_seconds()
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

    /// Connects to Redis and opens the artifact store. A `rediss://` URL
    /// trusts the system roots; see [`Registry::connect_with_tls`].
    pub async fn connect(
        redis_url: &str,
        names: Names,
        registry_url: &str,
    ) -> Result<Registry, RegistryError> {
        Self::connect_with_tls(redis_url, &ClientTls::default(), names, registry_url).await
    }

    /// Like [`Registry::connect`], with `redis_tls` for a `rediss://` URL.
    pub async fn connect_with_tls(
        redis_url: &str,
        redis_tls: &ClientTls,
        names: Names,
        registry_url: &str,
    ) -> Result<Registry, RegistryError> {
        let store = ArtifactStore::open(registry_url)?;
        let client = redis_tls.redis_client(redis_url)?;
        let redis = ConnectionManager::new(client).await?;
        Ok(Registry::new(redis, names, store))
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
        let created: i64 = redis::Script::new(PUBLISH_SCRIPT)
            .key(self.names.model_key(&version))
            .key(self.names.models_index())
            .arg(json)
            .arg(time::now_ms())
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
    /// ([`super::publish::activate`] does both); workers that miss the
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

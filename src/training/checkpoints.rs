//! [`CheckpointStore`]: each run's epoch checkpoints in an object store
//! (`runs_url`), where any trainer can find them to resume the run.
//!
//! Layout: `<run>/epoch-NNNN/<file>` for each checkpoint, and `<run>/latest`
//! naming the newest complete one. `latest` is written only after every
//! file of its checkpoint is in, so a trainer killed mid-upload leaves the
//! previous checkpoint as the one to resume.

use std::path::Path;
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::TrainingError;
use crate::registry::open_url;

/// Where runs keep their checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
}

/// The pointer to a run's newest checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Latest {
    /// Epochs completed.
    pub epoch: usize,
    /// The checkpoint's files, relative to its folder.
    pub files: Vec<String>,
}

fn store_err(e: impl std::fmt::Display) -> TrainingError {
    TrainingError::Store(e.to_string())
}

impl CheckpointStore {
    /// Opens `runs_url` (`file:///dir` or `s3://bucket/prefix`).
    pub fn open(url: &str) -> Result<CheckpointStore, TrainingError> {
        let (store, prefix, url) = open_url(url).map_err(store_err)?;
        Ok(CheckpointStore { store, prefix, url })
    }

    /// The store's URL, for people.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Uploads the checkpoint folder `dir` (its plain files) as `run_id`'s
    /// checkpoint after `epoch`, then points `latest` at it.
    pub async fn upload(
        &self,
        run_id: &str,
        epoch: usize,
        dir: &Path,
    ) -> Result<(), TrainingError> {
        let mut files = Vec::new();
        let entries =
            std::fs::read_dir(dir).map_err(|e| store_err(format!("{}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(store_err)?;
            if !entry.file_type().map_err(store_err)?.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(entry.path()).map_err(store_err)?;
            self.store
                .put(
                    &self.key(&format!("{run_id}/epoch-{epoch:04}/{name}")),
                    PutPayload::from(bytes),
                )
                .await
                .map_err(store_err)?;
            files.push(name);
        }
        files.sort();
        let latest = serde_json::to_vec(&Latest { epoch, files }).expect("latest serialises");
        self.store
            .put(
                &self.key(&format!("{run_id}/latest")),
                PutPayload::from(latest),
            )
            .await
            .map_err(store_err)?;
        // The older ones are no longer needed to resume.
        if epoch > 1 {
            let _ = self
                .delete_prefix(&format!("{run_id}/epoch-{:04}/", epoch - 1))
                .await;
        }
        Ok(())
    }

    /// `run_id`'s newest complete checkpoint, if it has one.
    pub async fn latest(&self, run_id: &str) -> Result<Option<Latest>, TrainingError> {
        match self.store.get(&self.key(&format!("{run_id}/latest"))).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(store_err)?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| TrainingError::Corrupt(format!("{run_id}/latest: {e}")))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Downloads the checkpoint `latest` describes into `dest` (created).
    pub async fn download(
        &self,
        run_id: &str,
        latest: &Latest,
        dest: &Path,
    ) -> Result<(), TrainingError> {
        std::fs::create_dir_all(dest).map_err(store_err)?;
        for name in &latest.files {
            let key = self.key(&format!("{run_id}/epoch-{:04}/{name}", latest.epoch));
            let bytes = self
                .store
                .get(&key)
                .await
                .map_err(store_err)?
                .bytes()
                .await
                .map_err(store_err)?;
            std::fs::write(dest.join(name), &bytes).map_err(store_err)?;
        }
        Ok(())
    }

    /// Deletes everything of `run_id` (once it has ended, nothing will
    /// resume it).
    pub async fn delete_run(&self, run_id: &str) -> Result<(), TrainingError> {
        self.delete_prefix(&format!("{run_id}/")).await
    }

    async fn delete_prefix(&self, rel: &str) -> Result<(), TrainingError> {
        let prefix = self.key(rel.trim_end_matches('/'));
        let listed: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(store_err)?;
        for meta in listed {
            self.store.delete(&meta.location).await.map_err(store_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn latest_points_at_the_newest_complete_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(tmp.path().join("runs"))
            .unwrap()
            .to_string();
        let store = CheckpointStore::open(&url).unwrap();
        assert_eq!(store.latest("r1").await.unwrap(), None);
        for epoch in 1..=2 {
            let dir = tmp.path().join(format!("local-{epoch}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("weights.ot"), vec![epoch as u8; 10]).unwrap();
            std::fs::write(dir.join("state.json"), b"{}").unwrap();
            store.upload("r1", epoch, &dir).await.unwrap();
        }
        let latest = store.latest("r1").await.unwrap().unwrap();
        assert_eq!(latest.epoch, 2);
        assert_eq!(latest.files, vec!["state.json", "weights.ot"]);
        assert!(
            !tmp.path().join("runs/r1/epoch-0001").exists(),
            "superseded checkpoint kept"
        );
        let dest = tmp.path().join("resume");
        store.download("r1", &latest, &dest).await.unwrap();
        assert_eq!(
            std::fs::read(dest.join("weights.ot")).unwrap(),
            vec![2u8; 10]
        );
        store.delete_run("r1").await.unwrap();
        assert_eq!(store.latest("r1").await.unwrap(), None);
    }
}

//! [`ArtifactStore`]: model artifacts in any store `object_store` speaks.
//!
//! `file://` (a directory or a mounted volume) or `s3://` (AWS or any
//! S3-compatible server; endpoint and credentials come from the usual
//! `AWS_*` variables). Objects are written once: an existing object with
//! other bytes is never overwritten.

use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::artifact::Artifact;
use super::error::RegistryError;
use super::signing::SIGNATURE_FILE;
use crate::model::manifest::{MANIFEST_FILE, ONNX_FILE};

/// Opens `file:///abs/dir` (created if missing) or `s3://bucket/prefix`:
/// the store, the key prefix inside it, and the URL as it is printed. For
/// S3, region, endpoint (`AWS_ENDPOINT_URL` for S3-compatible servers),
/// `AWS_ALLOW_HTTP` and credentials come from the environment, as every AWS
/// tool reads them. The registry and the training runs' checkpoints both
/// open their stores here.
pub fn open_url(url: &str) -> Result<(Arc<dyn ObjectStore>, String, String), RegistryError> {
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
            // Deleting the last object of a folder removes the folder: a runs
            // store does not fill with empty checkpoint folders.
            let store = LocalFileSystem::new_with_prefix(&dir)?.with_automatic_cleanup(true);
            Ok((
                Arc::new(store),
                String::new(),
                url.trim_end_matches('/').to_string(),
            ))
        }
        "s3" => {
            // object_store's HTTP client speaks TLS through rustls with
            // whichever provider the process installed; we build with
            // ring only.
            crate::tls::install_crypto_provider();
            let bucket = parsed
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| bad("no bucket".into()))?;
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()?;
            Ok((
                Arc::new(store),
                parsed.path().trim_matches('/').to_string(),
                format!("s3://{bucket}{}", parsed.path().trim_end_matches('/')),
            ))
        }
        other => Err(bad(format!("scheme {other:?} is not file or s3"))),
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
        let (store, prefix, url) = open_url(url)?;
        Ok(ArtifactStore { store, prefix, url })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{init_model, ResNetSpec};

    #[tokio::test]
    async fn a_file_store_round_trips_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(dir.path()).unwrap();
        let store = ArtifactStore::open(url.as_str()).unwrap();
        let a = Artifact::build(&init_model(&ResNetSpec::tiny(), 1).unwrap(), None).unwrap();
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

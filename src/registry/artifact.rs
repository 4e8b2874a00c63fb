//! [`Artifact`]: a version's files as they travel, and [`Artifact::verify`],
//! the one check workers and `pleura models verify` share.

use super::error::RegistryError;
use super::signing::{self, SignatureError, SigningKey, Trust};
use crate::model::manifest::MANIFEST_FILE;
use crate::model::{Manifest, ManifestError, ModelFiles};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{init_model, ResNetSpec};

    #[test]
    fn verify_refuses_corrupt_unsigned_and_foreign_artifacts() {
        let key = signing::generate();
        let files = init_model(&ResNetSpec::tiny(), 7).unwrap();
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
}

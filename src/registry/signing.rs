//! Ed25519 signatures over published models.
//!
//! A hash in the manifest proves that `model.onnx` is the file the manifest
//! describes; it proves nothing about who wrote either. So every published
//! version also carries `model.sig`: an ed25519 signature over the version,
//! the SHA-256 of `model.onnx` and the SHA-256 of the exact `model.json`
//! bytes. Workers accept a model only if a key they trust signed it (or the
//! operator explicitly allowed unsigned models), which is what Triton's
//! checksum-only POLL mode cannot offer.
//!
//! Keys are 32 raw bytes written as hex: `NAME.key` (the private seed, mode
//! 0600) and `NAME.pub`. A key's id is the first 16 hex digits of the
//! SHA-256 of its public bytes; it tells operators which key signed what.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::TryRngCore;
use serde::{Deserialize, Serialize};

use crate::model::manifest::sha256_hex;

/// File name of the signature inside a published version.
pub const SIGNATURE_FILE: &str = "model.sig";
/// The only algorithm written and accepted.
pub const ALGORITHM: &str = "ed25519";
/// Version of the [`ModelSignature`] document and of the signed message.
pub const SIGNATURE_SCHEMA: u32 = 1;

/// Why a key or signature is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// A key file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key is not 64 hex digits of a valid ed25519 key.
    #[error("bad key: {0}")]
    BadKey(String),
    /// The model has no signature and unsigned models are not allowed.
    #[error("the model is unsigned and allow_unsigned_models is off")]
    Unsigned,
    /// `model.sig` is not a signature document this code understands.
    #[error("malformed signature: {0}")]
    Malformed(String),
    /// The signature names other files than the ones fetched.
    #[error("signature does not cover these files: {0}")]
    Mismatch(String),
    /// No trusted key verifies the signature.
    #[error("no trusted key verifies the signature (signed by key {key_id})")]
    Untrusted { key_id: String },
}

/// `model.sig`: who signed which files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSignature {
    /// [`SIGNATURE_SCHEMA`].
    pub schema: u32,
    /// [`ALGORITHM`].
    pub algorithm: String,
    /// Id of the signing key ([`key_id`]).
    pub key_id: String,
    /// The model version signed.
    pub version: String,
    /// SHA-256 of `model.onnx`.
    pub onnx_sha256: String,
    /// SHA-256 of the exact `model.json` bytes.
    pub manifest_sha256: String,
    /// The 64-byte signature over [`signed_message`], hex.
    pub signature: String,
}

/// The bytes that are signed. Domain-separated, so a Pleura model signature
/// can never be replayed as a signature over anything else.
pub fn signed_message(version: &str, onnx_sha256: &str, manifest_sha256: &str) -> Vec<u8> {
    format!(
        "pleura-model-signature-v{SIGNATURE_SCHEMA}\nversion={version}\nonnx_sha256={onnx_sha256}\nmanifest_sha256={manifest_sha256}\n"
    )
    .into_bytes()
}

/// The id of a public key: 16 hex digits of the SHA-256 of its bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    sha256_hex(key.as_bytes())[..16].to_string()
}

/// A fresh signing key from the operating system's random source.
pub fn generate() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .expect("the OS random source works");
    SigningKey::from_bytes(&seed)
}

/// Writes `dir/NAME.key` (private, mode 0600) and `dir/NAME.pub`, refusing
/// to overwrite either. Returns both paths.
pub fn write_keypair(
    key: &SigningKey,
    dir: &Path,
    name: &str,
) -> Result<(PathBuf, PathBuf), SignatureError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SignatureError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    for path in [&private, &public] {
        if path.exists() {
            return Err(SignatureError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "refusing to overwrite an existing key",
                ),
            });
        }
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&private).map_err(io(&private))?;
    writeln!(f, "{}", hex::encode(key.to_bytes())).map_err(io(&private))?;
    fs::write(
        &public,
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
    )
    .map_err(io(&public))?;
    Ok((private, public))
}

fn hex32(text: &str, what: &str) -> Result<[u8; 32], SignatureError> {
    let bytes = hex::decode(text.trim())
        .map_err(|e| SignatureError::BadKey(format!("{what} is not hex: {e}")))?;
    bytes
        .try_into()
        .map_err(|_| SignatureError::BadKey(format!("{what} must be 32 bytes (64 hex digits)")))
}

/// Reads a private key file written by [`write_keypair`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey, SignatureError> {
    let text = fs::read_to_string(path).map_err(|source| SignatureError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(SigningKey::from_bytes(&hex32(
        &text,
        &format!("private key {}", path.display()),
    )?))
}

/// A trusted public key given as 64 hex digits or as the path of a `.pub` file.
pub fn parse_public_key(spec: &str) -> Result<VerifyingKey, SignatureError> {
    let spec = spec.trim();
    let is_hex = spec.len() == 64 && spec.bytes().all(|b| b.is_ascii_hexdigit());
    let text = if is_hex {
        spec.to_string()
    } else {
        fs::read_to_string(spec).map_err(|source| SignatureError::Io {
            path: PathBuf::from(spec),
            source,
        })?
    };
    VerifyingKey::from_bytes(&hex32(&text, "public key")?)
        .map_err(|e| SignatureError::BadKey(format!("not an ed25519 public key: {e}")))
}

/// Signs a model's files.
pub fn sign(key: &SigningKey, version: &str, onnx: &[u8], manifest_json: &[u8]) -> ModelSignature {
    let (onnx_sha256, manifest_sha256) = (sha256_hex(onnx), sha256_hex(manifest_json));
    let signature = key.sign(&signed_message(version, &onnx_sha256, &manifest_sha256));
    ModelSignature {
        schema: SIGNATURE_SCHEMA,
        algorithm: ALGORITHM.into(),
        key_id: key_id(&key.verifying_key()),
        version: version.into(),
        onnx_sha256,
        manifest_sha256,
        signature: hex::encode(signature.to_bytes()),
    }
}

/// The keys a worker or `pleura models verify` accepts, and whether an
/// unsigned model may be served at all.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Keys whose signatures are accepted.
    pub keys: Vec<VerifyingKey>,
    /// Serve models without a signature (the hash is still checked).
    pub allow_unsigned: bool,
}

impl Trust {
    /// Parses each entry with [`parse_public_key`].
    pub fn from_specs(specs: &[String], allow_unsigned: bool) -> Result<Trust, SignatureError> {
        Ok(Trust {
            keys: specs
                .iter()
                .map(|s| parse_public_key(s))
                .collect::<Result<_, _>>()?,
            allow_unsigned,
        })
    }

    /// Checks `signature` (the raw `model.sig`, if any) over the fetched
    /// files. Returns the id of the key that verified it, or `None` for an
    /// unsigned model that this trust allows.
    pub fn verify(
        &self,
        version: &str,
        onnx: &[u8],
        manifest_json: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<Option<String>, SignatureError> {
        let Some(raw) = signature else {
            return if self.allow_unsigned {
                Ok(None)
            } else {
                Err(SignatureError::Unsigned)
            };
        };
        let sig: ModelSignature =
            serde_json::from_slice(raw).map_err(|e| SignatureError::Malformed(e.to_string()))?;
        if sig.schema != SIGNATURE_SCHEMA || sig.algorithm != ALGORITHM {
            return Err(SignatureError::Malformed(format!(
                "schema {} algorithm {:?} is not supported",
                sig.schema, sig.algorithm
            )));
        }
        // Verify over hashes computed here, never over the ones the signature
        // document claims: the claims only make the error message precise.
        let (onnx_sha256, manifest_sha256) = (sha256_hex(onnx), sha256_hex(manifest_json));
        if sig.version != version {
            return Err(SignatureError::Mismatch(format!(
                "signed version {:?}, fetched {version:?}",
                sig.version
            )));
        }
        if sig.onnx_sha256 != onnx_sha256 || sig.manifest_sha256 != manifest_sha256 {
            return Err(SignatureError::Mismatch(
                "the signed hashes differ from the fetched files'".into(),
            ));
        }
        let bytes: [u8; 64] = hex::decode(&sig.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| SignatureError::Malformed("signature is not 64 hex bytes".into()))?;
        let signature = Signature::from_bytes(&bytes);
        let message = signed_message(version, &onnx_sha256, &manifest_sha256);
        self.keys
            .iter()
            .find(|k| k.verify_strict(&message, &signature).is_ok())
            .map(|k| Some(key_id(k)))
            .ok_or(SignatureError::Untrusted { key_id: sig.key_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (Vec<u8>, Vec<u8>) {
        (b"onnx bytes".to_vec(), br#"{"version":"v1"}"#.to_vec())
    }

    #[test]
    fn a_signature_verifies_only_under_the_signing_key_and_files() {
        let key = generate();
        let other = generate();
        let (onnx, json) = files();
        let sig = serde_json::to_vec(&sign(&key, "v1", &onnx, &json)).unwrap();
        let trust = Trust {
            keys: vec![other.verifying_key(), key.verifying_key()],
            allow_unsigned: false,
        };
        assert_eq!(
            trust.verify("v1", &onnx, &json, Some(&sig)).unwrap(),
            Some(key_id(&key.verifying_key()))
        );
        // Another version, other bytes, or a key we do not trust: refused.
        assert!(matches!(
            trust.verify("v2", &onnx, &json, Some(&sig)),
            Err(SignatureError::Mismatch(_))
        ));
        assert!(matches!(
            trust.verify("v1", b"evil", &json, Some(&sig)),
            Err(SignatureError::Mismatch(_))
        ));
        let strangers = Trust {
            keys: vec![other.verifying_key()],
            allow_unsigned: true,
        };
        assert!(matches!(
            strangers.verify("v1", &onnx, &json, Some(&sig)),
            Err(SignatureError::Untrusted { .. })
        ));
    }

    #[test]
    fn a_forged_signature_with_matching_claims_is_refused() {
        // An attacker who rewrites the claimed hashes to match tampered
        // files still cannot produce the signature over them.
        let key = generate();
        let (onnx, json) = files();
        let mut sig = sign(&key, "v1", &onnx, &json);
        sig.onnx_sha256 = sha256_hex(b"evil");
        let raw = serde_json::to_vec(&sig).unwrap();
        let trust = Trust {
            keys: vec![key.verifying_key()],
            allow_unsigned: false,
        };
        assert!(matches!(
            trust.verify("v1", b"evil", &json, Some(&raw)),
            Err(SignatureError::Untrusted { .. })
        ));
    }

    #[test]
    fn unsigned_models_need_explicit_permission() {
        let (onnx, json) = files();
        let strict = Trust::default();
        assert!(matches!(
            strict.verify("v1", &onnx, &json, None),
            Err(SignatureError::Unsigned)
        ));
        let lax = Trust {
            keys: vec![],
            allow_unsigned: true,
        };
        assert_eq!(lax.verify("v1", &onnx, &json, None).unwrap(), None);
    }

    #[test]
    fn keypairs_round_trip_through_files_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate();
        let (private, public) = write_keypair(&key, dir.path(), "ops").unwrap();
        assert_eq!(
            read_signing_key(&private).unwrap().to_bytes(),
            key.to_bytes()
        );
        let pub_path = public.to_str().unwrap().to_string();
        assert_eq!(parse_public_key(&pub_path).unwrap(), key.verifying_key());
        let hex_key = hex::encode(key.verifying_key().as_bytes());
        assert_eq!(parse_public_key(&hex_key).unwrap(), key.verifying_key());
        assert!(write_keypair(&generate(), dir.path(), "ops").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&private).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

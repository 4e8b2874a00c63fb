//! TLS for the fleet's two services: `amqps://` to RabbitMQ and `rediss://`
//! to Redis, through rustls with the ring provider (no aws-lc-rs, no
//! OpenSSL).
//!
//! [`ClientTls`] is what one service's connections trust and who they are:
//! a CA bundle that **replaces** the system roots (so a certificate from any
//! other CA, public or private, is refused), and optionally a client
//! certificate with its key. It is read from PEM files, as Kubernetes mounts
//! Secrets, and checked when read, so a missing file, a key without its
//! certificate or a certificate that does not match its key stops start-up
//! with a [`TlsError`] naming the file, instead of failing every connection
//! later. Without a CA bundle, a TLS URL trusts the system roots.
//!
//! The material is read once: after a certificate rotation, restart the
//! process (the chart's rolling update does). Reconnections, including
//! lapin's automatic recovery, reuse what was read.
//!
//! Nothing here logs, and neither [`ClientTls`]'s `Debug` nor any error
//! shows a key or a file's contents.

use std::fmt;
use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use redis::{ConnectionAddr, IntoConnectionInfo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Installs ring as the process's rustls provider, unless one is installed
/// already (the first install wins; a second is harmless). lapin's and
/// redis's TLS, and object_store's HTTP client, all build their rustls
/// configurations from the process default, so this runs before each.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why TLS material could not be used. Errors name the setting and the
/// file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{setting} {}: {source}", path.display())]
    Read {
        /// The setting that named the file (`amqp_tls_ca_file`, ...).
        setting: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no usable PEM certificate.
    #[error("{setting} {}: no PEM certificate in it", path.display())]
    NoCertificate {
        /// The setting that named the file.
        setting: String,
        /// The file.
        path: PathBuf,
    },
    /// A certificate in the CA bundle cannot be a trust anchor.
    #[error("{setting} {}: a certificate in it cannot be a trust anchor", path.display())]
    BadCa {
        /// The setting that named the file.
        setting: String,
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[error("{setting} {}: no PEM private key in it", path.display())]
    NoKey {
        /// The setting that named the file.
        setting: String,
        /// The file.
        path: PathBuf,
    },
    /// Only one of a client certificate and its key was given.
    #[error("{present} is set but {missing} is not: a client certificate needs its key, and a key its certificate")]
    HalfIdentity {
        /// The setting that is set.
        present: String,
        /// The setting that is missing.
        missing: String,
    },
    /// The client key is of a kind rustls cannot sign with, or is not the
    /// key of the client certificate.
    #[error("{cert} and {key} are not a certificate and its key ({reason})")]
    KeyMismatch {
        /// The certificate's setting.
        cert: String,
        /// The key's setting.
        key: String,
        /// rustls's reason; it never quotes the key.
        reason: String,
    },
}

/// The PEM files of one service, as the settings name them.
#[derive(Debug, Clone, Copy)]
pub struct PemFiles<'a> {
    /// Prefix of the settings these came from, so errors can name them:
    /// `amqp_tls` makes `amqp_tls_ca_file`, `amqp_tls_cert_file`, ...
    pub settings: &'static str,
    /// CA bundle: the only roots trusted when set.
    pub ca_file: Option<&'a Path>,
    /// Client certificate (chain), leaf first.
    pub cert_file: Option<&'a Path>,
    /// The client certificate's private key.
    pub key_file: Option<&'a Path>,
}

/// What one service's TLS connections trust, and the client identity they
/// present. The default trusts the system roots and presents none.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// The CA bundle, PEM. `None`: the system roots.
    ca_pem: Option<Vec<u8>>,
    identity: Option<Identity>,
}

/// A client certificate chain and its key, both PEM.
#[derive(Clone)]
struct Identity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Says what is configured, never what it contains.
        f.debug_struct("ClientTls")
            .field(
                "roots",
                &if self.ca_pem.is_some() {
                    "ca bundle"
                } else {
                    "system"
                },
            )
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// Reads and checks the files. With none set, this is the default:
    /// system roots, no client certificate.
    pub fn from_files(files: &PemFiles<'_>) -> Result<ClientTls, TlsError> {
        let setting = |what: &str| format!("{}_{what}", files.settings);
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                setting: setting(what),
                path: path.to_path_buf(),
                source,
            })
        };
        let certificates = |what: &str, path: &Path, pem: &[u8]| {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .ok()
                .filter(|c: &Vec<_>| !c.is_empty())
                .ok_or_else(|| TlsError::NoCertificate {
                    setting: setting(what),
                    path: path.to_path_buf(),
                })?;
            Ok::<_, TlsError>(certs)
        };

        let ca_pem = match files.ca_file {
            None => None,
            Some(path) => {
                let pem = read("ca_file", path)?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates("ca_file", path, &pem)? {
                    roots.add(cert).map_err(|_| TlsError::BadCa {
                        setting: setting("ca_file"),
                        path: path.to_path_buf(),
                    })?;
                }
                Some(pem)
            }
        };

        let identity = match (files.cert_file, files.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(TlsError::HalfIdentity {
                    present: setting("cert_file"),
                    missing: setting("key_file"),
                })
            }
            (None, Some(_)) => {
                return Err(TlsError::HalfIdentity {
                    present: setting("key_file"),
                    missing: setting("cert_file"),
                })
            }
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read("cert_file", cert_path)?;
                let chain = certificates("cert_file", cert_path, &cert_pem)?;
                let key_pem = read("key_file", key_path)?;
                // The parse error is dropped on purpose: it can quote a line
                // of the file, and this file is a secret.
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
                    setting: setting("key_file"),
                    path: key_path.to_path_buf(),
                })?;
                check_pair(chain, key).map_err(|reason| TlsError::KeyMismatch {
                    cert: setting("cert_file"),
                    key: setting("key_file"),
                    reason,
                })?;
                Some(Identity { cert_pem, key_pem })
            }
        };
        Ok(ClientTls { ca_pem, identity })
    }

    /// Whether anything was configured (a CA bundle or a client identity).
    pub fn is_configured(&self) -> bool {
        self.ca_pem.is_some() || self.identity.is_some()
    }

    /// Whether a client certificate is presented.
    pub fn has_client_certificate(&self) -> bool {
        self.identity.is_some()
    }

    /// lapin's TLS configuration for connecting to `url`: empty unless it is
    /// `amqps://` (lapin ignores it then, and the system roots need not be
    /// read).
    ///
    /// lapin is built without a root store of its own (see the workspace
    /// `Cargo.toml`): whatever this passes as the certificate chain is all
    /// it trusts. Hence the CA bundle alone when set, which is what makes it
    /// replace the system roots, and the system roots otherwise.
    pub fn amqp_config(&self, url: &str) -> OwnedTLSConfig {
        if scheme(url) != "amqps" {
            return OwnedTLSConfig::default();
        }
        install_crypto_provider();
        let cert_chain = match &self.ca_pem {
            Some(pem) => String::from_utf8_lossy(pem).into_owned(),
            None => system_roots_pem(),
        };
        OwnedTLSConfig {
            identity: self.identity.as_ref().map(|i| OwnedIdentity::PKCS8 {
                pem: i.cert_pem.clone(),
                key: i.key_pem.clone(),
            }),
            cert_chain: Some(cert_chain),
        }
    }

    /// A Redis client for `url`: over TLS with this configuration for
    /// `rediss://`, in the clear for `redis://` (refused when TLS material
    /// is configured, since that is a deployment mistake that would
    /// otherwise send credentials in the clear).
    pub fn redis_client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        let info = url.into_connection_info()?;
        match info.addr() {
            ConnectionAddr::TcpTls { .. } => {
                install_crypto_provider();
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: self.identity.as_ref().map(|i| redis::ClientTlsConfig {
                            client_cert: i.cert_pem.clone(),
                            client_key: i.key_pem.clone(),
                        }),
                        root_cert: self.ca_pem.clone(),
                    },
                )
            }
            _ if self.is_configured() => Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "TLS files are configured but the Redis URL is not rediss://",
            ))),
            _ => redis::Client::open(info),
        }
    }
}

/// Checks that `key` is a key rustls can sign with and belongs to the leaf
/// of `chain`.
fn check_pair(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), String> {
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The system's roots, as PEM for lapin's certificate chain. Unreadable or
/// unparsable system certificates are skipped: what remains is still a
/// valid (if smaller) root store, and a connection to a server whose CA is
/// missing fails with an unknown-issuer error that says so.
fn system_roots_pem() -> String {
    use base64::Engine;
    let mut pem = String::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem
}

/// The scheme of `url` (`amqps`, `rediss`, ...), lower-cased; never more of
/// the URL, which may hold a password.
pub fn scheme(url: &str) -> String {
    url.split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_trusts_the_system_and_shows_no_material() {
        let tls = ClientTls::default();
        assert!(!tls.is_configured());
        assert_eq!(
            format!("{tls:?}"),
            "ClientTls { roots: \"system\", client_certificate: false }"
        );
        assert!(tls.amqp_config("amqp://h/%2f").cert_chain.is_none());
        let config = tls.amqp_config("amqps://h/%2f");
        assert!(config.identity.is_none());
        // Every system root made it through the PEM round trip.
        let roots = rustls_native_certs::load_native_certs().certs.len();
        let pem = config.cert_chain.unwrap();
        assert_eq!(
            CertificateDer::pem_slice_iter(pem.as_bytes()).count(),
            roots
        );
    }

    #[test]
    fn a_plain_redis_url_with_tls_configured_is_refused() {
        // Checked before the material is used, so any bytes will do.
        let tls = ClientTls {
            ca_pem: Some(b"not used".to_vec()),
            identity: None,
        };
        let err = tls.redis_client("redis://127.0.0.1:6379/0").unwrap_err();
        assert!(err.to_string().contains("not rediss://"), "{err}");
        assert!(ClientTls::default()
            .redis_client("redis://127.0.0.1:6379/0")
            .is_ok());
        assert!(ClientTls::default()
            .redis_client("rediss://127.0.0.1:6380/0")
            .is_ok());
    }

    #[test]
    fn scheme_is_all_of_the_url_that_errors_may_show() {
        assert_eq!(scheme("AMQPS://u:secret@h/%2f"), "amqps");
        assert_eq!(scheme("nonsense"), "");
    }
}

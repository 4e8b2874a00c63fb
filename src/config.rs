//! Configuration shared by the worker and the CLI.
//!
//! Precedence, lowest first: built-in defaults, the TOML file (`--config` or
//! `PLEURA_CONFIG`), then `PLEURA_*` environment variables (`PLEURA_AMQP_URL`,
//! `PLEURA_INFERENCE_THREADS`, ...). Unknown keys are an error everywhere, so
//! a typo in a deployment fails at start-up instead of being silently ignored.
//! `pleura.example.toml` at the repository root documents every key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variables with the `PLEURA_` prefix that are not config keys.
const NON_CONFIG_ENV: &[&str] = &["PLEURA_CONFIG", "PLEURA_DATA", "PLEURA_PYTHON"];

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be parsed into [`Settings`].
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value parsed but makes no sense.
    #[error("configuration: {0}")]
    Invalid(String),
    /// A TLS file is missing, unreadable, or not what its setting says.
    #[error("configuration: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Every setting of a Pleura process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Prefix of every queue, exchange and Redis key, so several fleets can
    /// share one broker and one Redis.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// RabbitMQ URL. Credentials in it are never logged.
    #[serde(default = "default_amqp_url")]
    pub amqp_url: String,
    /// Redis URL. Credentials in it are never logged.
    #[serde(default = "default_redis_url")]
    pub redis_url: String,
    /// File holding the RabbitMQ URL (a mounted Kubernetes Secret); when
    /// set it replaces `amqp_url`. Surrounding whitespace is ignored.
    #[serde(default)]
    pub amqp_url_file: Option<PathBuf>,
    /// File holding the Redis URL; when set it replaces `redis_url`.
    #[serde(default)]
    pub redis_url_file: Option<PathBuf>,
    /// CA bundle (PEM) that RabbitMQ's certificate must chain to, for an
    /// `amqps://` URL. It replaces the system roots: no other CA is trusted
    /// for this connection. Unset: the system roots.
    ///
    /// TLS settings are per service rather than shared: RabbitMQ and Redis
    /// are often run (or bought) separately, each with its own CA, and a
    /// client certificate is an identity on one server (RabbitMQ's EXTERNAL
    /// login, a Redis ACL user). One CA for both is the same path twice.
    #[serde(default)]
    pub amqp_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM, leaf first) presented to RabbitMQ. Set
    /// together with `amqp_tls_key_file`, or not at all.
    #[serde(default)]
    pub amqp_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `amqp_tls_cert_file`.
    #[serde(default)]
    pub amqp_tls_key_file: Option<PathBuf>,
    /// CA bundle (PEM) that Redis's certificate must chain to, for a
    /// `rediss://` URL; replaces the system roots. Unset: the system roots.
    #[serde(default)]
    pub redis_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM, leaf first) presented to Redis (its
    /// `tls-auth-clients`). Set together with `redis_tls_key_file`, or not
    /// at all.
    #[serde(default)]
    pub redis_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `redis_tls_cert_file`.
    #[serde(default)]
    pub redis_tls_key_file: Option<PathBuf>,
    /// Directory holding `model.onnx` and `model.json`. Pins the worker to this
    /// local model and bypasses the registry.
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// Where published model artifacts live: `file:///dir` (a directory or a
    /// mounted volume) or `s3://bucket/prefix` (endpoint and credentials from
    /// the standard `AWS_*` environment variables).
    #[serde(default = "default_registry_url")]
    pub registry_url: String,
    /// Public keys whose model signatures are trusted: each is 64 hex digits
    /// or the path of a `.pub` file from `pleura models keygen`. In the
    /// environment, `PLEURA_TRUSTED_KEYS` is comma-separated.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Serve models that carry no signature. Their hash is still checked.
    /// Off by default: only for development set-ups without keys.
    #[serde(default)]
    pub allow_unsigned_models: bool,
    /// Private key that `models publish` and `pleura-trainer --publish` sign
    /// with (a mounted secret in Kubernetes). Unset: publish unsigned.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    /// Seconds between a worker's checks of the active version in Redis, so
    /// a missed announcement heals by itself.
    #[serde(default = "default_reconcile_interval_secs")]
    pub reconcile_interval_secs: u64,
    /// Seconds between a worker's heartbeats; each lives three intervals.
    #[serde(default = "default_heartbeat_interval_secs")]
    pub heartbeat_interval_secs: u64,
    /// Largest difference allowed between a golden case's recorded and
    /// computed probabilities when a worker canaries a new model.
    #[serde(default = "default_canary_tolerance")]
    pub canary_tolerance: f32,
    /// Promotion gate: lowest validation AUROC a published model may have.
    #[serde(default = "default_gate_min_auroc")]
    pub gate_min_auroc: f64,
    /// Promotion gate: lowest validation recall at the model's own threshold.
    #[serde(default = "default_gate_min_recall")]
    pub gate_min_recall: f64,
    /// Promotion gate for int8 variants: largest validation AUROC an int8
    /// model may lose against its fp32 parent (recall at the threshold must
    /// not change at all).
    #[serde(default = "default_gate_max_int8_auroc_loss")]
    pub gate_max_int8_auroc_loss: f64,
    /// Inference engine: `tract` (the default) or `onnxruntime` (needs
    /// `libonnxruntime.so`, see `onnxruntime_library`; the engine for int8
    /// models).
    #[serde(default)]
    pub engine: crate::model::EngineKind,
    /// Path of `libonnxruntime.so` for the onnxruntime engine. Unset:
    /// `ORT_DYLIB_PATH`, else the dynamic loader's search path.
    #[serde(default)]
    pub onnxruntime_library: Option<PathBuf>,
    /// Inference threads, each with its own model state; 0 means one per core.
    #[serde(default)]
    pub inference_threads: usize,
    /// Unacknowledged deliveries per inference thread; the broker's prefetch
    /// is this times the thread count, so the pool never starves nor hoards.
    #[serde(default = "default_prefetch_per_thread")]
    pub prefetch_per_thread: u16,
    /// Deliveries of one message before the broker dead-letters it.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// Lifetime of a result key, in seconds.
    #[serde(default = "default_result_ttl_secs")]
    pub result_ttl_secs: u64,
    /// Approximate cap on the length of the results stream.
    #[serde(default = "default_results_stream_maxlen")]
    pub results_stream_maxlen: u64,
    /// Largest accepted scan, in bytes.
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: usize,
    /// Largest accepted scan, in pixels, checked before the full decode.
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
    /// Address of the HTTP endpoints (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default = "default_http_addr")]
    pub http_addr: String,
    /// Seconds a worker may take to finish its jobs after SIGTERM.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Worker id in results, logs and heartbeats; empty means `host-pid`.
    #[serde(default)]
    pub worker_id: String,
    /// Longest wait between two attempts at writing a result to Redis.
    #[serde(default = "default_redis_max_backoff_ms")]
    pub redis_max_backoff_ms: u64,
    /// Where training runs keep their checkpoints (`pleura-trainer serve`):
    /// `file:///dir` or `s3://bucket/prefix`, like `registry_url`. Every
    /// trainer that may resume another's run must reach it.
    #[serde(default = "default_runs_url")]
    pub runs_url: String,
    /// A trainer's local scratch: datasets fetched from `s3://`, the
    /// checkpoints of its current run, exported models before upload.
    #[serde(default = "default_trainer_work_dir")]
    pub trainer_work_dir: PathBuf,
    /// Seconds a trainer's claim on a run lives unless renewed (it renews
    /// every third of it). A run whose trainer died waits this long before
    /// another trainer resumes it.
    #[serde(default = "default_trainer_lease_secs")]
    pub trainer_lease_secs: u64,
    /// Trainers that may take a run in turn before it is failed: a run that
    /// kills its trainer every time (out of memory, say) is not retried forever.
    #[serde(default = "default_trainer_max_attempts")]
    pub trainer_max_attempts: u32,
    /// `human` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax, for example `info` or `pleura=debug`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

fn default_namespace() -> String {
    "pleura".into()
}
fn default_amqp_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/0".into()
}
fn default_registry_url() -> String {
    "file:///var/lib/pleura/registry".into()
}
fn default_reconcile_interval_secs() -> u64 {
    30
}
fn default_heartbeat_interval_secs() -> u64 {
    5
}
fn default_canary_tolerance() -> f32 {
    1e-3
}
fn default_gate_min_auroc() -> f64 {
    0.80
}
fn default_gate_min_recall() -> f64 {
    0.85
}
fn default_gate_max_int8_auroc_loss() -> f64 {
    0.005
}
fn default_prefetch_per_thread() -> u16 {
    2
}
fn default_delivery_limit() -> u32 {
    crate::fleet::DEFAULT_DELIVERY_LIMIT
}
fn default_result_ttl_secs() -> u64 {
    7 * 24 * 3600
}
fn default_results_stream_maxlen() -> u64 {
    100_000
}
fn default_max_image_bytes() -> usize {
    crate::scan::DEFAULT_MAX_BYTES
}
fn default_max_image_pixels() -> u64 {
    crate::scan::DEFAULT_MAX_PIXELS
}
fn default_http_addr() -> String {
    "0.0.0.0:9100".into()
}
fn default_shutdown_grace_secs() -> u64 {
    30
}
fn default_redis_max_backoff_ms() -> u64 {
    5_000
}
fn default_runs_url() -> String {
    "file:///var/lib/pleura/runs".into()
}
fn default_trainer_work_dir() -> PathBuf {
    PathBuf::from("/var/lib/pleura/trainer")
}
fn default_trainer_lease_secs() -> u64 {
    30
}
fn default_trainer_max_attempts() -> u32 {
    3
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for Settings {
    fn default() -> Self {
        // Deserialising an empty document applies every `default_*` function,
        // so the defaults are written down exactly once.
        serde_json::from_str("{}").expect("defaults deserialise")
    }
}

impl Settings {
    /// Loads defaults, then `file` (or `PLEURA_CONFIG` when `file` is `None`),
    /// then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let env: config::Map<String, String> = std::env::vars().collect();
        Self::load_from(file, env)
    }

    /// Like [`Settings::load`] with an explicit environment, for tests.
    pub fn load_from(
        file: Option<&Path>,
        env: config::Map<String, String>,
    ) -> Result<Settings, ConfigError> {
        let file = file.map(Path::to_path_buf).or_else(|| {
            env.get("PLEURA_CONFIG")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        });
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("PLEURA_") && !NON_CONFIG_ENV.contains(&k.as_str()))
            .collect();
        let mut builder = config::Config::builder();
        if let Some(file) = &file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("PLEURA")
                .prefix_separator("_")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("trusted_keys")
                .source(Some(env)),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Replaces each URL whose `*_file` is set by that file's contents.
    /// Errors name the file, never its contents.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        for (key, file, url) in [
            ("amqp_url_file", &self.amqp_url_file, &mut self.amqp_url),
            ("redis_url_file", &self.redis_url_file, &mut self.redis_url),
        ] {
            let Some(path) = file else { continue };
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Invalid(format!("{key} {}: {e}", path.display())))?;
            let value = text.trim();
            if value.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{key} {} is empty",
                    path.display()
                )));
            }
            *url = value.to_string();
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        // TLS files are read now, so a missing or mismatched one stops
        // start-up instead of failing every connection attempt later; and
        // TLS files with a plain URL are a mistake that would send
        // credentials in the clear. Errors show the scheme, never the URL.
        for (service, tls, url, tls_scheme) in [
            ("amqp", self.amqp_tls()?, &self.amqp_url, "amqps"),
            ("redis", self.redis_tls()?, &self.redis_url, "rediss"),
        ] {
            let scheme = crate::tls::scheme(url);
            if tls.is_configured() && scheme != tls_scheme {
                return bad(format!(
                    "{service}_tls_* files are set but {service}_url is {scheme}://, not {tls_scheme}://"
                ));
            }
        }
        if self.namespace.is_empty()
            || !self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "namespace {:?} must be non-empty and use only A-Z a-z 0-9 - _",
                self.namespace
            ));
        }
        if self.prefetch_per_thread == 0 {
            return bad("prefetch_per_thread must be at least 1".into());
        }
        if self.delivery_limit == 0 {
            return bad("delivery_limit must be at least 1".into());
        }
        if self.max_image_bytes == 0 || self.max_image_pixels == 0 {
            return bad("max_image_bytes and max_image_pixels must be positive".into());
        }
        if self.reconcile_interval_secs == 0 || self.heartbeat_interval_secs == 0 {
            return bad(
                "reconcile_interval_secs and heartbeat_interval_secs must be positive".into(),
            );
        }
        if self.canary_tolerance.is_nan() || self.canary_tolerance <= 0.0 {
            return bad("canary_tolerance must be positive".into());
        }
        for (name, v) in [
            ("gate_min_auroc", self.gate_min_auroc),
            ("gate_min_recall", self.gate_min_recall),
            ("gate_max_int8_auroc_loss", self.gate_max_int8_auroc_loss),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} must be within [0, 1]"));
            }
        }
        Ok(())
    }

    /// Inference threads after resolving 0 to the number of cores.
    pub fn resolved_inference_threads(&self) -> usize {
        if self.inference_threads > 0 {
            self.inference_threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    /// The worker id after resolving empty to `host-pid`.
    pub fn resolved_worker_id(&self) -> String {
        if !self.worker_id.is_empty() {
            return self.worker_id.clone();
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        format!("{host}-{}", std::process::id())
    }

    /// Which engine runs models, and where ONNX Runtime lives.
    pub fn engine_options(&self) -> crate::model::EngineOptions {
        crate::model::EngineOptions {
            kind: self.engine,
            onnxruntime_library: self.onnxruntime_library.clone(),
        }
    }

    /// RabbitMQ's TLS material (`amqp_tls_*`), read and checked.
    pub fn amqp_tls(&self) -> Result<crate::tls::ClientTls, ConfigError> {
        Ok(crate::tls::ClientTls::from_files(&crate::tls::PemFiles {
            settings: "amqp_tls",
            ca_file: self.amqp_tls_ca_file.as_deref(),
            cert_file: self.amqp_tls_cert_file.as_deref(),
            key_file: self.amqp_tls_key_file.as_deref(),
        })?)
    }

    /// Redis's TLS material (`redis_tls_*`), read and checked.
    pub fn redis_tls(&self) -> Result<crate::tls::ClientTls, ConfigError> {
        Ok(crate::tls::ClientTls::from_files(&crate::tls::PemFiles {
            settings: "redis_tls",
            ca_file: self.redis_tls_ca_file.as_deref(),
            cert_file: self.redis_tls_cert_file.as_deref(),
            key_file: self.redis_tls_key_file.as_deref(),
        })?)
    }

    /// Size limits for decoding.
    pub fn limits(&self) -> crate::scan::Limits {
        crate::scan::Limits {
            max_bytes: self.max_image_bytes,
            max_pixels: self.max_image_pixels,
        }
    }

    /// The promotion gate's rules.
    pub fn gate_policy(&self) -> crate::registry::GatePolicy {
        crate::registry::GatePolicy {
            min_auroc: self.gate_min_auroc,
            min_recall: self.gate_min_recall,
            max_int8_auroc_loss: self.gate_max_int8_auroc_loss,
        }
    }

    /// The signing keys to trust, parsed.
    pub fn trust(&self) -> Result<crate::registry::Trust, ConfigError> {
        crate::registry::Trust::from_specs(&self.trusted_keys, self.allow_unsigned_models)
            .map_err(|e| ConfigError::Invalid(format!("trusted_keys: {e}")))
    }

    /// Queue and key names of this fleet.
    pub fn names(&self) -> crate::wire::Names {
        crate::wire::Names::new(&self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> config::Map<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_example_config_parses_and_sets_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pleura.example.toml");
        let s = Settings::load_from(Some(&path), env(&[])).expect("example config parses");
        // The example must spell out every key; serialising the settings and
        // comparing key sets catches a key added to the struct but not the file.
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: toml_keys::Keys = toml_keys::keys(&text);
        let json = serde_json::to_value(&s).unwrap();
        for key in json.as_object().unwrap().keys() {
            assert!(
                doc.contains(key),
                "pleura.example.toml does not document `{key}`"
            );
        }
    }

    #[test]
    fn urls_come_from_secret_files_whose_contents_never_reach_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let amqp = dir.path().join("amqp-url");
        let redis = dir.path().join("redis-url");
        std::fs::write(&amqp, "amqp://u:s3cret@mq:5672/%2f\n").unwrap();
        std::fs::write(&redis, "  redis://:s3cret@cache:6379/1 ").unwrap();
        let s = Settings::load_from(
            None,
            env(&[
                ("PLEURA_AMQP_URL", "amqp://ignored"),
                ("PLEURA_AMQP_URL_FILE", amqp.to_str().unwrap()),
                ("PLEURA_REDIS_URL_FILE", redis.to_str().unwrap()),
            ]),
        )
        .unwrap();
        assert_eq!(s.amqp_url, "amqp://u:s3cret@mq:5672/%2f");
        assert_eq!(s.redis_url, "redis://:s3cret@cache:6379/1");

        std::fs::write(&redis, "\n").unwrap();
        let missing = dir.path().join("absent");
        for (key, path) in [
            ("PLEURA_REDIS_URL_FILE", &redis),
            ("PLEURA_AMQP_URL_FILE", &missing),
        ] {
            let err = Settings::load_from(None, env(&[(key, path.to_str().unwrap())]))
                .unwrap_err()
                .to_string();
            let name = key.trim_start_matches("PLEURA_").to_ascii_lowercase();
            assert!(err.contains(&name) && !err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn tls_files_are_read_at_load_and_come_in_pairs() {
        // No TLS settings: TLS URLs trust the system roots.
        let s = Settings::load_from(
            None,
            env(&[
                ("PLEURA_AMQP_URL", "amqps://u:s3cret@mq:5671/%2f"),
                ("PLEURA_REDIS_URL", "rediss://:s3cret@cache:6380/0"),
            ]),
        )
        .unwrap();
        assert!(!s.amqp_tls().unwrap().is_configured());
        assert!(!s.redis_tls().unwrap().is_configured());

        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent.pem");
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "s3cret, not a certificate\n").unwrap();
        for (pairs, expect) in [
            // A certificate without its key, and the other way round.
            (
                vec![("PLEURA_AMQP_TLS_CERT_FILE", &absent)],
                vec!["amqp_tls_cert_file is set but amqp_tls_key_file is not"],
            ),
            (
                vec![("PLEURA_REDIS_TLS_KEY_FILE", &absent)],
                vec!["redis_tls_key_file is set but redis_tls_cert_file is not"],
            ),
            // A file that is not there, or holds no certificate.
            (
                vec![("PLEURA_REDIS_TLS_CA_FILE", &absent)],
                vec!["redis_tls_ca_file", "absent.pem"],
            ),
            (
                vec![("PLEURA_AMQP_TLS_CA_FILE", &not_pem)],
                vec!["amqp_tls_ca_file", "not.pem", "no PEM certificate"],
            ),
        ] {
            let mut vars: Vec<(&str, &str)> = vec![
                ("PLEURA_AMQP_URL", "amqps://u:s3cret@mq:5671/%2f"),
                ("PLEURA_REDIS_URL", "rediss://:s3cret@cache:6380/0"),
            ];
            vars.extend(pairs.iter().map(|(k, p)| (*k, p.to_str().unwrap())));
            let err = Settings::load_from(None, env(&vars)).unwrap_err();
            assert!(matches!(err, ConfigError::Tls(_)), "{err:?}");
            let err = err.to_string();
            for e in expect {
                assert!(err.contains(e), "{err:?} should say {e:?}");
            }
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn environment_overrides_the_file_and_defaults() {
        let s = Settings::load_from(
            None,
            env(&[
                ("PLEURA_AMQP_URL", "amqp://u:p@h:1/%2f"),
                ("PLEURA_INFERENCE_THREADS", "3"),
                ("PLEURA_DATA", "/ignored/not/a/key"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.amqp_url, "amqp://u:p@h:1/%2f");
        assert_eq!(s.inference_threads, 3);
        assert_eq!(s.namespace, "pleura");
        assert_eq!(s.delivery_limit, 5);
        assert_eq!(s.result_ttl_secs, 604_800);
    }

    #[test]
    fn trusted_keys_come_comma_separated_from_the_environment() {
        let s = Settings::load_from(
            None,
            env(&[("PLEURA_TRUSTED_KEYS", "/keys/a.pub,/keys/b.pub")]),
        )
        .unwrap();
        assert_eq!(s.trusted_keys, ["/keys/a.pub", "/keys/b.pub"]);
        assert!(Settings::default().trusted_keys.is_empty());
        assert!(!Settings::default().allow_unsigned_models);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::load_from(None, env(&[("PLEURA_AMQP_ULR", "x")])).unwrap_err();
        assert!(err.to_string().contains("amqp_ulr"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "namespace = \"a\"\nprefetch = 3\n").unwrap();
        assert!(Settings::load_from(Some(&file), env(&[])).is_err());
    }

    #[test]
    fn invalid_values_are_rejected() {
        assert!(Settings::load_from(None, env(&[("PLEURA_NAMESPACE", "a b")])).is_err());
        assert!(Settings::load_from(None, env(&[("PLEURA_DELIVERY_LIMIT", "0")])).is_err());
    }

    /// Top-level keys of a TOML document, including commented-out ones of the
    /// form `# key = value`, which is how optional keys are documented.
    mod toml_keys {
        pub type Keys = std::collections::BTreeSet<String>;
        pub fn keys(text: &str) -> Keys {
            text.lines()
                .map(|l| l.trim().trim_start_matches('#').trim())
                .filter_map(|l| l.split_once('='))
                .map(|(k, _)| k.trim().to_string())
                .filter(|k| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                })
                .collect()
        }
    }
}

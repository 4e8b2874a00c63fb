//! Fixtures for the end-to-end tests: real RabbitMQ, real Redis, real workers.
//!
//! Every test gets its own namespace, so its queues and keys never meet
//! another test's; [`Fleet`]'s `Drop` deletes them again. Service addresses
//! come from `PLEURA_AMQP_URL` / `PLEURA_REDIS_URL` with localhost defaults.
//! Every wait is bounded by a timeout; nothing sleeps a fixed time and hopes.

pub mod poison;
pub mod trainer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::future::BoxFuture;
use pleura::config::Settings;
use pleura::fleet::broker::{self, Publisher, Submission};
use pleura::fleet::{Announcer, ResultStore, WorkerStatus, DEFAULT_DELIVERY_LIMIT};
use pleura::model::{ModelFiles, ResNetSpec};
use pleura::registry::{self, PublishRequest, Published, Registry};
use pleura::wire::{Names, Priority, ScanResult};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// RabbitMQ URL for tests.
pub fn amqp_url() -> String {
    std::env::var("PLEURA_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Redis URL for tests.
pub fn redis_url() -> String {
    std::env::var("PLEURA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// The real-data folder (`PLEURA_DATA`, else `../shared/data`), if present.
/// Tests that need it print a visible SKIP line when it is absent.
pub fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PLEURA_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    dir.join("cxr").is_dir().then_some(dir)
}

/// Prints the standard skip line.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIP {test}: {why}");
}

/// Path of a workspace binary (`pleura`, `pleura-worker`). `make test` builds
/// them before running the tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (make test does)",
        path.display()
    );
    path
}

/// Bounded wait for a condition checked by `probe`, polling every 50 ms.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let waited = tokio::time::timeout(timeout, async {
        while !probe().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// A worker running in this process.
pub struct WorkerHandle {
    /// Address of its HTTP endpoints.
    pub http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<JoinHandle<Result<(), pleura_worker::WorkerError>>>,
}

impl WorkerHandle {
    /// Asks the worker to stop (as SIGTERM would) and waits for it.
    pub async fn stop(mut self) -> Result<(), pleura_worker::WorkerError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let join = self.join.take().expect("joined once");
        tokio::time::timeout(Duration::from_secs(60), join)
            .await
            .expect("worker stops within 60 s")
            .expect("worker task")
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// One isolated fleet: a namespace, a model, and helpers around them.
pub struct Fleet {
    /// The namespace of this fleet's queues and keys.
    pub names: Names,
    /// Directory of the model the workers serve.
    pub model_dir: PathBuf,
    /// The Redis this fleet writes to: the shared one, or a test's own.
    pub redis: String,
    tmp: tempfile::TempDir,
}

/// A signing key pair written to files, as `pleura models keygen` writes it.
pub struct Keys {
    /// The private key file.
    pub private: PathBuf,
    /// The public key file.
    pub public: PathBuf,
}

impl Keys {
    /// Generates a key pair into `dir` as `NAME.key` / `NAME.pub`.
    pub fn generate(dir: &Path, name: &str) -> Keys {
        let key = pleura::registry::signing::generate();
        let (private, public) =
            pleura::registry::signing::write_keypair(&key, dir, name).expect("write key pair");
        Keys { private, public }
    }
}

/// A deterministic untrained 256x256 model of `width`, distinct per seed
/// (its version is `init-<sha12>`).
pub fn model_variant(seed: u64, width: i64) -> ModelFiles {
    let spec = ResNetSpec {
        image_size: 256,
        ..ResNetSpec::with_width(width)
    };
    pleura::model::init_model(&spec, seed).expect("init model")
}

impl Fleet {
    /// A fresh namespace with a deterministic untrained model of `width`.
    pub fn new(tag: &str, width: i64) -> Fleet {
        Fleet::with_redis(tag, width, redis_url())
    }

    /// As [`Fleet::new`], on the Redis at `redis` (a test's own server).
    pub fn with_redis(tag: &str, width: i64, redis: String) -> Fleet {
        let ns = format!(
            "t-{tag}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let model_dir = tmp.path().join("model");
        let spec = ResNetSpec {
            image_size: 256,
            ..ResNetSpec::with_width(width)
        };
        pleura::model::init_model(&spec, 7)
            .expect("init model")
            .write_dir(&model_dir)
            .expect("write model");
        Fleet {
            names: Names::new(ns),
            model_dir,
            redis,
            tmp,
        }
    }

    /// This fleet's scratch directory (removed with the fleet).
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// A `file://` registry in the scratch directory.
    pub fn registry_url(&self) -> String {
        url_for_dir(&self.tmp.path().join("registry"))
    }

    /// Settings of a worker `worker_id` that follows this fleet's registry,
    /// trusting `keys`, with short reconcile and heartbeat intervals.
    pub fn registry_settings(&self, keys: &Keys, worker_id: &str) -> Settings {
        Settings {
            model_dir: None,
            registry_url: self.registry_url(),
            trusted_keys: vec![keys.public.display().to_string()],
            worker_id: worker_id.into(),
            inference_threads: 1,
            reconcile_interval_secs: 2,
            heartbeat_interval_secs: 1,
            ..self.settings()
        }
    }

    /// This fleet's registry.
    pub async fn registry(&self) -> Registry {
        Registry::connect(&self.redis, self.names.clone(), &self.registry_url())
            .await
            .expect("open the registry")
    }

    /// Publishes `files` through the same path as `pleura models publish`
    /// (forced past the gate: test models are untrained), signed with `key`
    /// when given, activated and announced.
    pub async fn publish(
        &self,
        files: &ModelFiles,
        key: Option<&Keys>,
        activate: bool,
    ) -> Published {
        let dir = self
            .tmp
            .path()
            .join("to-publish")
            .join(&files.manifest.version);
        files.write_dir(&dir).expect("write model");
        let request = PublishRequest {
            dir,
            key_file: key.map(|k| k.private.clone()),
            force: true,
            reason: Some("test model".into()),
            activate,
            by: "pleura-tests".into(),
        };
        registry::publish(
            &self.registry().await,
            &self.announcer(),
            &Settings::default().gate_policy(),
            &request,
        )
        .await
        .expect("publish")
        .published
    }

    /// Announces activations to this fleet's workers.
    pub fn announcer(&self) -> Announcer {
        Announcer::new(&amqp_url(), self.names.clone())
    }

    /// Activates `version` and announces it, as `pleura models activate` does.
    pub async fn activate(&self, version: &str) {
        registry::activate(
            &self.registry().await,
            &self.announcer(),
            version,
            "test",
            "pleura-tests",
        )
        .await
        .expect("activate");
    }

    /// The workers' heartbeats, as `pleura fleet status` reads them.
    pub async fn workers(&self) -> Vec<WorkerStatus> {
        let mut conn = self.store().await.connection();
        pleura::fleet::heartbeat::status(&mut conn, &self.names)
            .await
            .expect("fleet status")
    }

    /// Waits until every one of `workers` reports serving `version`, and
    /// returns how long that took.
    pub async fn wait_fleet_on(
        &self,
        workers: &[&str],
        version: &str,
        timeout: Duration,
    ) -> Duration {
        let t0 = std::time::Instant::now();
        wait_until(
            &format!("workers {workers:?} on {version}"),
            timeout,
            || async {
                let status = self.workers().await;
                workers.iter().all(|w| {
                    status.iter().any(|s| {
                        s.worker == *w
                            && s.heartbeat
                                .as_ref()
                                .is_some_and(|h| h.model_version.as_deref() == Some(version))
                    })
                })
            },
        )
        .await;
        t0.elapsed()
    }

    /// Settings for a worker or the CLI of this fleet.
    pub fn settings(&self) -> Settings {
        Settings {
            namespace: self.names.namespace().to_string(),
            amqp_url: amqp_url(),
            redis_url: self.redis.clone(),
            model_dir: Some(self.model_dir.clone()),
            http_addr: "127.0.0.1:0".into(),
            shutdown_grace_secs: 30,
            ..Settings::default()
        }
    }

    /// Environment that points a `pleura` or `pleura-worker` process at this fleet.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "PLEURA_NAMESPACE".into(),
                self.names.namespace().to_string(),
            ),
            ("PLEURA_AMQP_URL".into(), amqp_url()),
            ("PLEURA_REDIS_URL".into(), self.redis.clone()),
            ("PLEURA_HTTP_ADDR".into(), "127.0.0.1:0".into()),
        ]
    }

    /// Starts a worker in this process.
    pub async fn spawn_worker(&self, settings: Settings) -> WorkerHandle {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(pleura_worker::run_with_listener(
            settings,
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        WorkerHandle {
            http,
            stop: Some(tx),
            join: Some(join),
        }
    }

    /// Starts a worker in this process and waits until it reports ready.
    pub async fn spawn_ready_worker(&self, settings: Settings) -> WorkerHandle {
        let w = self.spawn_worker(settings).await;
        wait_ready(w.http).await;
        w
    }

    /// A confirm-mode publisher on this fleet's exchange.
    pub async fn publisher(&self) -> (lapin::Connection, Publisher) {
        let conn = broker::connect(&amqp_url(), "pleura-tests")
            .await
            .expect("connect to RabbitMQ");
        let p = Publisher::new(&conn, self.names.clone(), DEFAULT_DELIVERY_LIMIT)
            .await
            .expect("publisher");
        (conn, p)
    }

    /// Publishes one scan.
    pub async fn submit(&self, p: &Publisher, job_id: &str, body: &[u8], priority: Priority) {
        p.submit(&Submission {
            job_id,
            body,
            priority,
            correlation: &[],
        })
        .await
        .expect("publish confirmed");
    }

    /// The result store of this fleet.
    pub async fn store(&self) -> ResultStore {
        ResultStore::connect(&self.redis, self.names.clone(), 3600, 100_000)
            .await
            .expect("connect to Redis")
    }

    /// Waits for every job's result.
    pub async fn wait_results(&self, ids: &[String], timeout: Duration) -> Vec<ScanResult> {
        let store = self.store().await;
        let got = store.wait_all(ids, timeout, |_| {}).await.expect("redis");
        let missing: Vec<&String> = ids
            .iter()
            .zip(&got)
            .filter(|(_, r)| r.is_none())
            .map(|(i, _)| i)
            .collect();
        assert!(
            missing.is_empty(),
            "no result within {timeout:?} for {} jobs, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        got.into_iter().map(Option::unwrap).collect()
    }

    /// Job ids in the results stream, in order, one per entry.
    pub async fn stream_job_ids(&self) -> Vec<String> {
        let mut conn = self.store().await.connection();
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.names.results_stream())
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("xrange");
        entries
            .ids
            .iter()
            .map(|e| e.get::<String>("job_id").expect("entry has job_id"))
            .collect()
    }

    /// Number of result keys for these jobs.
    pub async fn result_key_count(&self, ids: &[String]) -> usize {
        let mut conn = self.store().await.connection();
        let mut n = 0;
        for id in ids {
            let exists: bool = redis::cmd("EXISTS")
                .arg(self.names.result_key(id))
                .query_async(&mut conn)
                .await
                .expect("exists");
            n += exists as usize;
        }
        n
    }

    /// Messages ready in a queue (not counting unacked ones).
    pub async fn ready_count(&self, queue: &str) -> u32 {
        let conn = broker::connect(&amqp_url(), "pleura-tests")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("queue exists");
        let _ = conn.close(200, "".into()).await;
        q.message_count()
    }

    /// Takes every message from a queue: (message_id, redelivered).
    pub async fn drain(&self, queue: &str) -> Vec<(Option<String>, bool)> {
        let conn = broker::connect(&amqp_url(), "pleura-tests")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
            .await
            .expect("get")
        {
            out.push((
                m.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string()),
                m.delivery.redelivered,
            ));
            m.delivery.ack(Default::default()).await.expect("ack");
        }
        let _ = conn.close(200, "".into()).await;
        out
    }

    fn cleanup(names: Names, redis: String) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let _ = pleura::fleet::teardown::delete_namespace(&amqp_url(), &redis, &names).await;
        })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Drop can't await, and may run inside a runtime: clean up on a thread
        // with a runtime of its own.
        let names = self.names.clone();
        let redis = self.redis.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), Fleet::cleanup(names, redis))
                            .await;
                });
            }
        })
        .join();
    }
}

/// What a `pleura` command printed, and how it exited.
#[derive(Debug)]
pub struct CliRun {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliRun {
    /// Asserts the exit code, showing what the command printed otherwise.
    pub fn expect_code(self, code: i32) -> CliRun {
        assert_eq!(
            self.code,
            Some(code),
            "pleura exited {:?}, not {code}\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts the command succeeded.
    pub fn expect_ok(self) -> CliRun {
        self.expect_code(0)
    }
}

impl Fleet {
    /// Runs the real `pleura` binary against this fleet (its namespace,
    /// broker and Redis), with `env` on top, within ten minutes.
    pub async fn cli<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: impl IntoIterator<Item = S>,
        env: &[(&str, &str)],
    ) -> CliRun {
        let mut cmd = tokio::process::Command::new(bin("pleura"));
        cmd.args(args)
            .envs(self.env())
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
            .await
            .expect("pleura finishes within 10 minutes")
            .expect("pleura runs");
        CliRun {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `file://` URL of a directory.
pub fn url_for_dir(dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("create dir");
    format!(
        "file://{}",
        dir.canonicalize().expect("canonical dir").display()
    )
}

/// Waits (two minutes at most) until the worker serving HTTP on `addr`
/// answers `/readyz` with 200.
pub async fn wait_ready(addr: SocketAddr) {
    wait_until("worker ready", Duration::from_secs(120), || async move {
        http_get(addr, "/readyz")
            .await
            .map(|(s, _)| s == 200)
            .unwrap_or(false)
    })
    .await;
}

/// A minimal HTTP/1.0 GET, enough for /readyz and /metrics.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A Redis server of a test's own, on a free port, with an append-only
/// file synced on every write: stopping it disturbs no other test, and a
/// kill loses nothing it acknowledged. (The shared Redis keeps nothing on
/// disk; restarting it would lose every result by design, which is the
/// limit the guarantees in ARCHITECTURE.md state.)
pub struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    /// Starts one and waits until it answers PING; `None` without a
    /// `redis-server` here.
    pub async fn start() -> Option<OwnRedis> {
        std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .ok()?;
        let mut r = OwnRedis {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        r.up().await;
        Some(r)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// (Re)starts it on the same port and files, and waits for PING.
    pub async fn up(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let url = self.url();
        wait_until("own redis up", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let Ok(client) = redis::Client::open(url) else {
                    return false;
                };
                let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                    return false;
                };
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            }
        })
        .await;
    }

    /// kill -9: no shutdown, no final save.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.start_kill().expect("SIGKILL redis");
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("redis dies")
            .expect("wait");
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A field of `/proc/PID/status` in KiB (`VmRSS` now, `VmHWM` the peak),
/// given with or without its colon.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let field = field.trim_end_matches(':');
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `rabbitmqctl` (it needs the broker's Erlang cookie: root here), for
/// two minutes at most.
pub fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Small synthetic scans (PNG bytes) from the project's phantom generator.
pub fn phantoms(n: usize, size: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let finding = if i % 10 == 0 {
                pleura_phantom::Finding::Effusion
            } else {
                pleura_phantom::Finding::NoFinding
            };
            pleura_phantom::render_png(
                finding,
                &pleura_phantom::PhantomOptions {
                    size,
                    seed: i as u64,
                },
            )
        })
        .collect()
}

/// Spawns a `pleura-worker` process for this fleet, pinned to its model,
/// with extra environment.
pub fn spawn_worker_process(
    fleet: &Fleet,
    extra_env: &[(&str, &str)],
    log: &Path,
) -> tokio::process::Child {
    let mut cmd = worker_command(fleet, extra_env, log);
    cmd.arg("--model").arg(&fleet.model_dir);
    cmd.spawn().expect("spawn pleura-worker")
}

/// Spawns a `pleura-worker` process `worker_id` that follows the registry
/// of `settings` (`registry_url`, `trusted_keys`, intervals).
pub fn spawn_registry_worker_process(
    fleet: &Fleet,
    settings: &Settings,
    extra_env: &[(&str, &str)],
    log: &Path,
) -> tokio::process::Child {
    let trusted = settings.trusted_keys.join(",");
    let reconcile = settings.reconcile_interval_secs.to_string();
    let heartbeat = settings.heartbeat_interval_secs.to_string();
    let threads = settings.inference_threads.to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("PLEURA_REGISTRY_URL", settings.registry_url.as_str()),
        ("PLEURA_TRUSTED_KEYS", trusted.as_str()),
        ("PLEURA_WORKER_ID", settings.worker_id.as_str()),
        ("PLEURA_RECONCILE_INTERVAL_SECS", reconcile.as_str()),
        ("PLEURA_HEARTBEAT_INTERVAL_SECS", heartbeat.as_str()),
        ("PLEURA_INFERENCE_THREADS", threads.as_str()),
    ];
    env.extend_from_slice(extra_env);
    worker_command(fleet, &env, log)
        .spawn()
        .expect("spawn pleura-worker")
}

fn worker_command(
    fleet: &Fleet,
    extra_env: &[(&str, &str)],
    log: &Path,
) -> tokio::process::Command {
    let log = std::fs::File::create(log).expect("log file");
    let mut cmd = tokio::process::Command::new(bin("pleura-worker"));
    for (k, v) in fleet.env() {
        cmd.env(k, v);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    cmd
}

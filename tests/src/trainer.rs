//! Fixtures for the training service: a `pleura-trainer serve` process, a
//! phantom dataset, and a RabbitMQ node of a test's own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pleura::training::RunStore;
use pleura::wire::RunRecord;

use crate::{bin, free_port, http_get, url_for_dir, wait_until, Fleet, Keys};

/// Writes `n` phantoms of side `size` (a share `prevalence` with effusion)
/// in the training layout, with `pleura-trainer synth`.
pub async fn phantom_dataset(dir: &Path, n: usize, size: u32, prevalence: f64) {
    let out = tokio::process::Command::new(bin("pleura-trainer"))
        .args(["synth", "--n", &n.to_string(), "--size", &size.to_string()])
        .args(["--prevalence", &prevalence.to_string(), "--seed", "3"])
        .arg("--out")
        .arg(dir)
        .output()
        .await
        .expect("run pleura-trainer synth");
    assert!(
        out.status.success(),
        "synth: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `pleura-trainer serve`, killed when dropped.
pub struct TrainerProc {
    /// Its id (`worker_id`), as run records name it.
    pub id: String,
    /// Its `/healthz`, `/readyz`, `/metrics`.
    pub http: SocketAddr,
    /// Where its log goes.
    pub log: PathBuf,
    child: Option<tokio::process::Child>,
}

/// How a test's trainers are set up.
pub struct TrainerEnv {
    /// `runs_url`, shared by the test's trainers.
    pub runs_url: String,
    /// `trainer_lease_secs`.
    pub lease_secs: u64,
    /// `trainer_max_attempts`.
    pub max_attempts: u32,
    /// Extra `PLEURA_*` variables.
    pub extra: Vec<(String, String)>,
}

impl TrainerEnv {
    /// Runs in the fleet's scratch directory, a 4 s lease, 3 attempts.
    pub fn new(fleet: &Fleet) -> TrainerEnv {
        TrainerEnv {
            runs_url: url_for_dir(&fleet.tmp().join("runs")),
            lease_secs: 4,
            max_attempts: 3,
            extra: Vec::new(),
        }
    }

    /// The variables a trainer `id` of `fleet` runs with, signing with `keys`.
    pub fn vars(&self, fleet: &Fleet, keys: &Keys, id: &str, port: u16) -> Vec<(String, String)> {
        let work = fleet.tmp().join("trainer-work").join(id);
        let mut v = fleet.env();
        v.retain(|(k, _)| k != "PLEURA_HTTP_ADDR");
        v.extend([
            ("PLEURA_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
            ("PLEURA_WORKER_ID".into(), id.to_string()),
            ("PLEURA_REGISTRY_URL".into(), fleet.registry_url()),
            ("PLEURA_RUNS_URL".into(), self.runs_url.clone()),
            ("PLEURA_TRAINER_WORK_DIR".into(), work.display().to_string()),
            (
                "PLEURA_TRAINER_LEASE_SECS".into(),
                self.lease_secs.to_string(),
            ),
            (
                "PLEURA_TRAINER_MAX_ATTEMPTS".into(),
                self.max_attempts.to_string(),
            ),
            (
                "PLEURA_SIGNING_KEY_FILE".into(),
                keys.private.display().to_string(),
            ),
            ("PLEURA_LOG_FORMAT".into(), "json".into()),
            ("PLEURA_LOG_LEVEL".into(), "info".into()),
        ]);
        v.extend(self.extra.iter().cloned());
        v
    }
}

impl TrainerProc {
    /// Starts trainer `id` and waits until `/readyz` answers 200.
    pub async fn start(fleet: &Fleet, keys: &Keys, env: &TrainerEnv, id: &str) -> TrainerProc {
        let port = free_port();
        let log = fleet.tmp().join(format!("{id}.log"));
        let file = std::fs::File::create(&log).expect("trainer log");
        let child = tokio::process::Command::new(bin("pleura-trainer"))
            .arg("serve")
            .env_remove("RUST_LOG")
            .envs(env.vars(fleet, keys, id, port))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn pleura-trainer serve");
        let t = TrainerProc {
            id: id.to_string(),
            http: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            child: Some(child),
        };
        let http = t.http;
        wait_until(
            &format!("trainer {id} ready"),
            Duration::from_secs(120),
            || async move { http_get(http, "/readyz").await.is_ok_and(|(s, _)| s == 200) },
        )
        .await;
        t
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    /// kill -9.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.start_kill().expect("SIGKILL");
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }

    /// SIGTERM, and the exit status within `within`.
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().expect("pid") as i32;
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(within, child.wait())
            .await
            .expect("trainer exits after SIGTERM")
            .expect("wait")
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The fleet's run store.
pub async fn run_store(fleet: &Fleet) -> RunStore {
    RunStore::connect(&fleet.redis, &Default::default(), fleet.names.clone())
        .await
        .expect("run store")
}

/// Waits until run `run_id` satisfies `pred`, and returns its record.
pub async fn wait_run(
    runs: &RunStore,
    run_id: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&RunRecord) -> bool,
) -> RunRecord {
    let mut last = None;
    let found = tokio::time::timeout(timeout, async {
        loop {
            if let Ok(Some(r)) = runs.get(run_id).await {
                if pred(&r) {
                    return r;
                }
                last = Some(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    match found {
        Ok(r) => r,
        Err(_) => panic!("run {run_id}: {what} not within {timeout:?}; last record: {last:#?}"),
    }
}

/// A RabbitMQ node of a test's own (its own port, files and settings), for
/// broker settings that would disturb other tests, such as a short consumer
/// timeout. Stopped when dropped.
pub struct OwnRabbit {
    /// Its AMQP port.
    pub port: u16,
    node: String,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl OwnRabbit {
    /// Starts a node with `conf` (rabbitmq.conf lines) added; `None` where
    /// `rabbitmq-server` is missing.
    pub async fn start(conf: &str) -> Option<OwnRabbit> {
        let server = which("rabbitmq-server")?;
        let port = free_port();
        let dist = free_port();
        let dir = tempfile::Builder::new()
            .prefix("pleura-rabbit")
            .tempdir()
            .ok()?;
        let node = format!("pleura-{port}@localhost");
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").ok()?;
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.default = {port}\nloopback_users = none\n{conf}\n"),
        )
        .ok()?;
        // The Debian wrapper runs the node as the rabbitmq user.
        let _ = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir.path())
            .status();
        let p = |f: &str| dir.path().join(f).display().to_string();
        let child = std::process::Command::new(server)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", p("rabbitmq"))
            .env("RABBITMQ_PID_FILE", p("pid"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", p("feature_flags"))
            .env("RABBITMQ_QUORUM_DIR", p("quorum"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let r = OwnRabbit {
            port,
            node,
            dir,
            child: Some(child),
        };
        let url = r.url();
        wait_until("own rabbitmq up", Duration::from_secs(90), || {
            let url = url.clone();
            async move {
                match lapin::Connection::connect(&url, Default::default()).await {
                    Ok(c) => {
                        let _ = c.close(200, "probe".into()).await;
                        true
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
        Some(r)
    }

    /// Its AMQP URL.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl` against this node.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = &self.dir;
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

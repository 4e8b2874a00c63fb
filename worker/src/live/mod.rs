//! The worker's own tests against the real RabbitMQ and Redis, and the rig
//! they share: a namespace of their own, a tiny model on a real pool, and
//! real deliveries.
//!
//! `make check` skips them (`--skip live::`), `make test` runs them.
//! Addresses come from `PLEURA_AMQP_URL` and `PLEURA_REDIS_URL`, with
//! localhost defaults.

mod delivery;
mod intake;

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::{Channel, Connection};
use pleura::fleet::broker::{self, Publisher, Submission};
use pleura::fleet::{ResultStore, DEFAULT_DELIVERY_LIMIT};
use pleura::model::{init_model, Engine, InferencePool, ResNetSpec};
use pleura::scan::Limits;
use pleura::wire::{Names, Priority};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::delivery::Handler;
use crate::health::Health;

pub(crate) fn amqp_url() -> String {
    std::env::var("PLEURA_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub(crate) fn redis_url() -> String {
    std::env::var("PLEURA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A phantom chest PNG (every tenth one with an effusion).
pub(crate) fn scan(i: u64) -> Vec<u8> {
    let finding = if i.is_multiple_of(10) {
        pleura_phantom::Finding::Effusion
    } else {
        pleura_phantom::Finding::NoFinding
    };
    pleura_phantom::render_png(
        finding,
        &pleura_phantom::PhantomOptions { size: 96, seed: i },
    )
}

/// A namespace with its topology, a publisher, a result store and a pool
/// serving a tiny model. Dropping it deletes the namespace's queues and keys.
pub(crate) struct Rig {
    pub(crate) names: Names,
    pub(crate) conn: Connection,
    pub(crate) channel: Channel,
    pub(crate) publisher: Publisher,
    pub(crate) results: ResultStore,
    pub(crate) health: Arc<Health>,
    pub(crate) pool: Arc<InferencePool>,
}

impl Rig {
    pub(crate) async fn new(tag: &str) -> Rig {
        let names = Names::new(format!(
            "t-w{tag}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        let conn = broker::connect(&amqp_url(), "pleura-worker-tests")
            .await
            .expect("RabbitMQ is up (make services)");
        let channel = conn.create_channel().await.unwrap();
        broker::declare_topology(&channel, &names, DEFAULT_DELIVERY_LIMIT)
            .await
            .unwrap();
        let publisher = Publisher::new(&conn, names.clone(), DEFAULT_DELIVERY_LIMIT)
            .await
            .unwrap();
        let results = ResultStore::connect(&redis_url(), names.clone(), 600, 1000)
            .await
            .expect("Redis is up (make services)");
        let health = Arc::new(Health::new(true));
        let files = init_model(
            &ResNetSpec {
                image_size: 64,
                ..ResNetSpec::tiny()
            },
            1,
        )
        .unwrap();
        let engine = tokio::task::spawn_blocking(move || Engine::from_files(files))
            .await
            .unwrap()
            .unwrap();
        health.model().store(Some(Arc::new(engine)));
        let pool = Arc::new(InferencePool::new(
            health.model().clone(),
            1,
            Limits::default(),
        ));
        Rig {
            names,
            conn,
            channel,
            publisher,
            results,
            health,
            pool,
        }
    }

    /// A handler writing to `results` (this rig's store unless given another).
    pub(crate) fn handler(&self, results: ResultStore) -> (Arc<Handler>, watch::Receiver<bool>) {
        let (redis_ok, rx) = watch::channel(true);
        let handler = Handler {
            worker_id: "live-test".into(),
            health: self.health.clone(),
            pool: self.pool.clone(),
            results,
            redis_ok,
            max_write_backoff: Duration::from_millis(200),
            hard_stop: CancellationToken::new(),
        };
        (Arc::new(handler), rx)
    }

    /// Publishes one scan with publisher confirms.
    pub(crate) async fn submit(&self, job_id: &str, body: &[u8], priority: Priority) {
        self.publisher
            .submit(&Submission {
                job_id,
                body,
                priority,
                correlation: &[("x-pleura-accession", "ACC-1")],
            })
            .await
            .expect("publish confirmed");
    }

    /// Takes the next message of `queue` as a real delivery (with its acker).
    pub(crate) async fn take(&self, queue: &str) -> lapin::message::Delivery {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = self
                .channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                return m.delivery;
            }
            assert!(tokio::time::Instant::now() < deadline, "nothing on {queue}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Messages ready in `queue`, on a fresh channel so this one's unacked
    /// deliveries do not matter.
    pub(crate) async fn ready(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "".into()).await;
        q.message_count()
    }

    /// Waits (bounded) until `queue` holds `n` ready messages.
    pub(crate) async fn wait_ready(&self, queue: &str, n: u32) {
        let waited = tokio::time::timeout(Duration::from_secs(15), async {
            while self.ready(queue).await != n {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{queue} never held {n} ready messages");
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let names = self.names.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let (amqp, redis) = (amqp_url(), redis_url());
                let teardown = pleura::fleet::teardown::delete_namespace(&amqp, &redis, &names);
                let _ = tokio::time::timeout(Duration::from_secs(10), teardown).await;
            });
        })
        .join();
    }
}

/// A redis-server of the test's own on a free port, to kill and restart.
pub(crate) struct OwnRedis {
    pub(crate) port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    pub(crate) fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = OwnRedis {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        redis
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it: connections drop and the port refuses.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port and waits until it listens.
    pub(crate) fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (make services installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "own redis never came up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

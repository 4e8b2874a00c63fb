//! Faults against the real RabbitMQ and Redis, under load from a bounded
//! generator, each ending in a reconciliation of every submitted job id
//! against the results: exactly one result and one stream entry per job,
//! nothing missing, nothing dead-lettered.
//!
//! The cases take turns (one lock for the file): a broker restart would
//! break whatever else runs beside it. Each prints a `FAULT` line with its
//! figures (submitted, completed, lost, duplicated, time to recover), which
//! the closing notes quote. `PLEURA_FAULT_ROUNDS` (default 3) sets how many
//! times the redelivery and reload cases run, to catch flakiness.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pleura::fleet::broker::{self, Publisher, Submission};
use pleura::fleet::DEFAULT_DELIVERY_LIMIT;
use pleura::wire::{Names, Priority, ScanResult, Status};
use pleura_tests::*;
use tokio::process::Child;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// One case at a time: see the module comment.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn rounds() -> usize {
    std::env::var("PLEURA_FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// What a reconciliation found.
#[derive(Debug, Default)]
struct Tally {
    submitted: usize,
    completed: usize,
    lost: usize,
    duplicated: usize,
    dead: usize,
}

/// Counts every job's results, stream entries and dead letters, prints the
/// `FAULT` line, then asserts exactly-once: one ok result and one stream
/// entry per job, and nothing dead-lettered.
async fn reconcile(fleet: &Fleet, case: &str, ids: &[String], recovery: Option<Duration>) {
    let store = fleet.store().await;
    // Give stragglers (redeliveries after a fault) time to land; a job still
    // missing after this is lost.
    let _ = store.wait_all(ids, Duration::from_secs(240), |_| {}).await;
    let results = store.get_many(ids).await.expect("read results");
    let mut entries: HashMap<String, usize> = HashMap::new();
    for id in fleet.stream_job_ids().await {
        *entries.entry(id).or_default() += 1;
    }
    let dead = fleet.drain(&fleet.names.dead_queue()).await;
    let tally = Tally {
        submitted: ids.len(),
        completed: results.iter().flatten().count(),
        lost: results.iter().filter(|r| r.is_none()).count(),
        duplicated: ids
            .iter()
            .filter(|id| entries.get(*id).copied().unwrap_or(0) > 1)
            .count(),
        dead: dead.len(),
    };
    println!(
        "FAULT {case}: submitted={} completed={} lost={} duplicated={} dead_lettered={} recovery={}",
        tally.submitted,
        tally.completed,
        tally.lost,
        tally.duplicated,
        tally.dead,
        recovery.map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64())),
    );
    assert_eq!(tally.lost, 0, "{case}: jobs without a result");
    assert_eq!(tally.duplicated, 0, "{case}: jobs answered twice");
    assert_eq!(tally.dead, 0, "{case}: nothing dead-lettered: {dead:?}");
    for r in results.iter().flatten() {
        assert_eq!(r.status, Status::Ok, "{case}: {r:?}");
    }
    assert_eq!(fleet.result_key_count(ids).await, ids.len());
    for id in ids {
        assert_eq!(
            entries.get(id),
            Some(&1),
            "{case}: job {id}: one stream entry"
        );
    }
}

fn job_ids(case: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{case}-{i:04}-{}", uuid::Uuid::new_v4().simple()))
        .collect()
}

/// The bounded load generator: publishes `ids` one every `every`, each with
/// publisher confirms. A publish that fails or is not confirmed (the broker
/// went away) is retried on a fresh connection until confirmed, as a real
/// submitter must; a retried publish may land twice, which the workers'
/// write-once results absorb. Returns how many publishes were retried.
fn steady_load(
    names: Names,
    ids: Vec<String>,
    scans: Arc<Vec<Vec<u8>>>,
    every: Duration,
) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut retried = 0;
        let mut current: Option<(lapin::Connection, Publisher)> = None;
        let mut tick = tokio::time::interval(every);
        for (i, id) in ids.iter().enumerate() {
            tick.tick().await;
            let body = &scans[i % scans.len()];
            loop {
                if current.is_none() {
                    current = open_publisher(&names).await;
                }
                if let Some((_, p)) = &current {
                    let sent = tokio::time::timeout(
                        Duration::from_secs(10),
                        p.submit(&Submission {
                            job_id: id,
                            body,
                            priority: Priority::Routine,
                            correlation: &[],
                        }),
                    )
                    .await;
                    if matches!(sent, Ok(Ok(()))) {
                        break;
                    }
                    current = None;
                    retried += 1;
                }
                // Reconnect backoff while the broker is away.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        retried
    })
}

async fn open_publisher(names: &Names) -> Option<(lapin::Connection, Publisher)> {
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        broker::connect(&amqp_url(), "pleura-fault-load"),
    )
    .await
    .ok()?
    .ok()?;
    let p = Publisher::new(&conn, names.clone(), DEFAULT_DELIVERY_LIMIT)
        .await
        .ok()?;
    Some((conn, p))
}

/// How many of `ids` have a result.
async fn answered(fleet: &Fleet, ids: &[String]) -> usize {
    let store = fleet.store().await;
    store
        .get_many(ids)
        .await
        .map(|r| r.iter().flatten().count())
        .unwrap_or(0)
}

/// Waits until at least `n` of `ids` have a result.
async fn wait_answered(fleet: &Fleet, ids: &[String], n: usize) {
    wait_until(
        &format!("{n} results"),
        Duration::from_secs(120),
        || async { answered(fleet, ids).await >= n },
    )
    .await;
}

/// Two workers under steady load (300 scans, one every 20 ms), with 60
/// already answered: the shape of the restart cases.
struct UnderLoad {
    workers: Vec<Proc>,
    ids: Vec<String>,
    load: JoinHandle<usize>,
}

impl UnderLoad {
    async fn start(fleet: &Fleet, case: &str, extra: &[(&str, &str)]) -> UnderLoad {
        let workers = vec![worker(fleet, "a", extra), worker(fleet, "b", extra)];
        for p in &workers {
            wait_ready(p.http).await;
        }
        let ids = job_ids(case, 300);
        let load = steady_load(
            fleet.names.clone(),
            ids.clone(),
            Arc::new(phantoms(6, 512)),
            Duration::from_millis(20),
        );
        wait_answered(fleet, &ids, 60).await;
        UnderLoad { workers, ids, load }
    }

    /// Lets the generator finish, reconciles, and stops every worker with
    /// SIGTERM, each exiting 0. Returns the publishes the generator retried.
    async fn finish(mut self, fleet: &Fleet, case: &str, recovery: Duration) -> usize {
        let retried = tokio::time::timeout(Duration::from_secs(180), self.load)
            .await
            .expect("the generator finishes")
            .expect("generator");
        reconcile(fleet, case, &self.ids, Some(recovery)).await;
        for p in &mut self.workers {
            let (code, _) = terminate(p).await;
            assert_eq!(code, Some(0), "{}", log_tail(&p.log));
        }
        retried
    }
}

/// Time from now until a result appears that was not there: after a fault
/// is over, how long the fleet takes to answer again.
async fn time_to_next_result(fleet: &Fleet, ids: &[String]) -> Duration {
    let t0 = Instant::now();
    let before = answered(fleet, ids).await;
    wait_answered(fleet, ids, before + 1).await;
    t0.elapsed()
}

/// A worker process with a known HTTP port, one inference thread, and
/// second-long heartbeats.
struct Proc {
    child: Child,
    http: std::net::SocketAddr,
    log: PathBuf,
}

fn worker(fleet: &Fleet, id: &str, extra: &[(&str, &str)]) -> Proc {
    let dir = fleet.tmp().join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let log = dir.join(format!("{id}.log"));
    let mut env = vec![
        ("PLEURA_WORKER_ID", id),
        ("PLEURA_INFERENCE_THREADS", "1"),
        ("PLEURA_HEARTBEAT_INTERVAL_SECS", "1"),
        ("PLEURA_SHUTDOWN_GRACE_SECS", "10"),
        ("PLEURA_HTTP_ADDR", addr.as_str()),
        // Debug level: a worker logs each redelivered job.
        ("PLEURA_LOG_LEVEL", "debug"),
    ];
    env.extend_from_slice(extra);
    let child = spawn_worker_process(fleet, &env, &log);
    Proc {
        child,
        http: addr.parse().unwrap(),
        log,
    }
}

fn log_tail(p: &Path) -> String {
    let log = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Sends SIGTERM and returns the exit code and how long the exit took.
async fn terminate(p: &mut Proc) -> (Option<i32>, Duration) {
    let pid = p.child.id().expect("still running");
    let t0 = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(60), p.child.wait())
        .await
        .expect("the worker exits after SIGTERM")
        .expect("wait");
    (status.code(), t0.elapsed())
}

/// [`pleura_tests::rabbitmqctl`], off the async executor.
async fn ctl(args: &[&str]) -> Result<(), String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rabbitmqctl(&args)
    })
    .await
    .expect("rabbitmqctl task")
}

/// Whether this test may stop and start the broker: it must be the local
/// node that `rabbitmqctl` controls, not another host's.
async fn broker_is_ours(test: &str) -> bool {
    let local = amqp_url().contains("@127.0.0.1:") || amqp_url().contains("@localhost:");
    if !local {
        skip(test, "PLEURA_AMQP_URL is not this host's broker");
        return false;
    }
    if let Err(e) = ctl(&["status"]).await {
        skip(test, &format!("rabbitmqctl cannot control the broker: {e}"));
        return false;
    }
    true
}

/// Closes every client connection, stops the broker application and starts
/// it again: what a broker node restart does to its clients. Returns when
/// the node accepts connections again.
async fn restart_broker() {
    ctl(&["close_all_connections", "pleura fault test"])
        .await
        .expect("close connections");
    ctl(&["stop_app"]).await.expect("stop_app");
    start_broker().await;
}

async fn start_broker() {
    ctl(&["start_app"]).await.expect("start_app");
    ctl(&["await_startup"]).await.expect("await_startup");
}

/// Makes sure the broker is running again however a case ends, so that one
/// failure does not take every later test with it.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["start_app"]);
    }
}

/// kill -9 of one of two workers while it holds jobs: the broker hands its
/// unacknowledged deliveries to the other, and every job completes once.
/// Run `PLEURA_FAULT_ROUNDS` times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_hard_with_jobs_in_hand_loses_none() {
    let _serial = SERIAL.lock().await;
    let n = rounds();
    for round in 1..=n {
        kill9_round(round).await;
        println!("ROUND kill9 {round}/{n}: passed");
    }
}

async fn kill9_round(round: usize) {
    let fleet = Fleet::new("kill9", 8);
    let mut victim = worker(&fleet, "victim", &[]);
    let mut survivor = worker(&fleet, "survivor", &[]);
    wait_ready(victim.http).await;
    wait_ready(survivor.http).await;

    let (_conn, publisher) = fleet.publisher().await;
    // Full-size scans, so that the queue is still long when the victim dies.
    let scans = phantoms(4, 1024);
    let ids = job_ids("kill9", 120);
    for (i, id) in ids.iter().enumerate() {
        fleet
            .submit(&publisher, id, &scans[i % scans.len()], Priority::Routine)
            .await;
    }

    // Kill the victim as soon as it has answered a few jobs: with the
    // queue still long, prefetch has handed it more that it holds unacked.
    let store = fleet.store().await;
    wait_until("the victim at work", Duration::from_secs(120), || async {
        let results = store.get_many(&ids).await.expect("results");
        results
            .iter()
            .flatten()
            .filter(|r| r.worker == "victim")
            .count()
            >= 3
    })
    .await;
    let killed = Instant::now();
    victim.child.start_kill().expect("SIGKILL");
    let status = tokio::time::timeout(Duration::from_secs(30), victim.child.wait())
        .await
        .expect("the victim dies")
        .expect("wait");
    assert!(!status.success(), "killed, not exited: {status:?}");

    let all = fleet.wait_results(&ids, Duration::from_secs(240)).await;
    let recovery = killed.elapsed();
    reconcile(&fleet, &format!("kill9#{round}"), &ids, Some(recovery)).await;
    let by_victim = all.iter().filter(|r| r.worker == "victim").count();
    assert!(
        by_victim < ids.len(),
        "the survivor finished the rest ({by_victim} by the victim)"
    );
    let (code, _) = terminate(&mut survivor).await;
    assert_eq!(code, Some(0));
    // What the victim held came back to the broker and went to the survivor.
    let log = std::fs::read_to_string(&survivor.log).unwrap();
    assert!(
        log.contains("redelivered job"),
        "the survivor got the victim's unacknowledged jobs"
    );
}

/// The broker node restarts under load (every connection closed, the
/// application stopped and started): the workers reconnect by themselves,
/// the quorum queues keep their scans, and every job completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_loses_none() {
    let _serial = SERIAL.lock().await;
    const TEST: &str = "a_broker_restart_under_load_loses_none";
    if !broker_is_ours(TEST).await {
        return;
    }
    let _guard = BrokerGuard;
    let fleet = Fleet::new("mqrestart", 8);
    let run = UnderLoad::start(&fleet, "mqrestart", &[]).await;
    let down = Instant::now();
    restart_broker().await;
    let up = Instant::now();
    let resumed = time_to_next_result(&fleet, &run.ids).await;
    println!(
        "broker restart: down for {:.1}s, consuming resumed {:.1}s after it was back",
        (up - down).as_secs_f64(),
        resumed.as_secs_f64()
    );
    let retried = run.finish(&fleet, "broker-restart", resumed).await;
    println!("broker restart: {retried} publishes retried by the generator");
}

/// A body over the scan size limit never reaches a queue: the broker's
/// `max_message_size` (set to `scan::DEFAULT_MAX_BYTES`, as
/// `scripts/ensure-services.sh` and the compose file do) refuses it at
/// publish, and the publisher gets the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_a_scan_over_the_size_limit() {
    let _serial = SERIAL.lock().await;
    const TEST: &str = "the_broker_refuses_a_scan_over_the_size_limit";
    if !broker_is_ours(TEST).await {
        return;
    }
    let limit = pleura::scan::DEFAULT_MAX_BYTES;
    ctl(&[
        "eval",
        &format!("application:set_env(rabbit, max_message_size, {limit})."),
    ])
    .await
    .expect("set max_message_size");
    let fleet = Fleet::new("maxsize", 8);
    let (_conn, publisher) = fleet.publisher().await;
    let body = vec![0u8; limit + 1];
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        publisher.submit(&Submission {
            job_id: "over-the-limit",
            body: &body,
            priority: Priority::Routine,
            correlation: &[],
        }),
    )
    .await
    .expect("the broker answers");
    let err = refused.expect_err("the broker refuses the message");
    println!("over the limit: {err}");
    assert!(
        err.to_string().contains("max size"),
        "refused for its size: {err}"
    );
    assert_eq!(fleet.ready_count(&fleet.names.routine_queue()).await, 0);
}

/// Redis is killed (-9) and restarted under load: results written before
/// come back from its append-only file, jobs in hand during the outage
/// retry until it is back, and nothing is acknowledged that is not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_under_load_loses_none() {
    let _serial = SERIAL.lock().await;
    let Some(mut redis) = OwnRedis::start().await else {
        skip(
            "a_redis_restart_under_load_loses_none",
            "no redis-server here",
        );
        return;
    };
    let fleet = Fleet::with_redis("redisrestart", 8, redis.url());
    let run = UnderLoad::start(
        &fleet,
        "redisrestart",
        &[("PLEURA_REDIS_MAX_BACKOFF_MS", "1000")],
    )
    .await;
    redis.kill().await;
    // The outage lasts until the workers have seen it: both report not
    // ready, holding their jobs and taking no new ones.
    for p in &run.workers {
        wait_until(
            "worker sees Redis gone",
            Duration::from_secs(60),
            || async {
                http_get(p.http, "/readyz")
                    .await
                    .map(|(s, _)| s != 200)
                    .unwrap_or(false)
            },
        )
        .await;
    }
    redis.up().await;
    for p in &run.workers {
        wait_ready(p.http).await;
    }
    let resumed = time_to_next_result(&fleet, &run.ids).await;
    println!(
        "redis restart: results resumed {:.1}s after it was back",
        resumed.as_secs_f64()
    );
    run.finish(&fleet, "redis-restart", resumed).await;
}

/// Scale-in while busy: three workers, stopped one by one with SIGTERM
/// while scans flow. Each finishes what it holds (or hands it back) and
/// exits 0 within its grace; the last one completes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_while_busy_loses_none() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::new("scalein", 8);
    let mut procs: Vec<(String, Proc)> = ["a", "b", "c"]
        .iter()
        .map(|id| (id.to_string(), worker(&fleet, id, &[])))
        .collect();
    for (_, p) in &procs {
        wait_ready(p.http).await;
    }
    let ids = job_ids("scalein", 300);
    let load = steady_load(
        fleet.names.clone(),
        ids.clone(),
        Arc::new(phantoms(6, 512)),
        Duration::from_millis(15),
    );
    let grace = Duration::from_secs(10);
    let mut slowest = Duration::ZERO;
    for (k, threshold) in [(0usize, 60usize), (1, 130)] {
        wait_answered(&fleet, &ids, threshold).await;
        let (name, p) = &mut procs[k];
        let (code, took) = terminate(p).await;
        println!(
            "scale-in: worker {name} exited {code:?} {:.1}s after SIGTERM",
            took.as_secs_f64()
        );
        assert_eq!(code, Some(0), "worker {name}:\n{}", log_tail(&p.log));
        // Within the grace, plus the seconds a clean close takes.
        assert!(
            took < grace + Duration::from_secs(5),
            "{name} took {took:?}"
        );
        slowest = slowest.max(took);
    }
    tokio::time::timeout(Duration::from_secs(180), load)
        .await
        .expect("the generator finishes")
        .expect("generator");
    reconcile(&fleet, "scale-in", &ids, Some(slowest)).await;
    let (name, p) = &mut procs[2];
    let (code, _) = terminate(p).await;
    assert_eq!(code, Some(0), "worker {name}:\n{}", log_tail(&p.log));
}

/// A model is activated while the broker is down, so its announcement
/// cannot go out: the workers still converge on it through the reconcile
/// timer (which reads the registry's state in Redis), and once the broker
/// is back the scans are answered by the new model, every one once.
/// Run `PLEURA_FAULT_ROUNDS` times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_during_a_broker_outage_converges() {
    let _serial = SERIAL.lock().await;
    const TEST: &str = "an_activation_during_a_broker_outage_converges";
    if !broker_is_ours(TEST).await {
        return;
    }
    let _guard = BrokerGuard;
    let n = rounds();
    for round in 1..=n {
        reload_round(round).await;
        println!("ROUND reload-during-outage {round}/{n}: passed");
    }
}

async fn reload_round(round: usize) {
    let fleet = Fleet::new("reloadfault", 8);
    let keys = Keys::generate(fleet.tmp(), "fault");
    let v1 = model_variant(round as u64 * 10 + 1, 8);
    let v2 = model_variant(round as u64 * 10 + 2, 8);
    fleet.publish(&v1, Some(&keys), true).await;
    fleet.publish(&v2, Some(&keys), false).await;
    let (v1, v2) = (v1.manifest.version.clone(), v2.manifest.version.clone());

    let mut procs = Vec::new();
    for id in ["r1", "r2"] {
        let settings = fleet.registry_settings(&keys, id);
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log = fleet.tmp().join(format!("{id}.log"));
        let child = spawn_registry_worker_process(
            &fleet,
            &settings,
            &[
                ("PLEURA_HTTP_ADDR", addr.as_str()),
                ("PLEURA_SHUTDOWN_GRACE_SECS", "10"),
            ],
            &log,
        );
        procs.push(Proc {
            child,
            http: addr.parse().unwrap(),
            log,
        });
    }
    fleet
        .wait_fleet_on(&["r1", "r2"], &v1, Duration::from_secs(120))
        .await;

    let ids = job_ids("reloadfault", 150);
    let load = steady_load(
        fleet.names.clone(),
        ids.clone(),
        Arc::new(phantoms(4, 256)),
        Duration::from_millis(20),
    );
    wait_answered(&fleet, &ids, 30).await;

    ctl(&["close_all_connections", "pleura fault test"])
        .await
        .expect("close connections");
    ctl(&["stop_app"]).await.expect("stop_app");
    let promotion = pleura::registry::activate(
        &fleet.registry().await,
        &fleet.announcer(),
        &v2,
        "activated during a broker outage",
        "pleura-tests",
    )
    .await
    .expect("the activation itself needs only Redis");
    assert!(
        promotion.announced.is_err(),
        "no broker, so no announcement"
    );
    start_broker().await;
    let back = Instant::now();
    let took = fleet
        .wait_fleet_on(&["r1", "r2"], &v2, Duration::from_secs(120))
        .await;
    println!(
        "reload during outage #{round}: fleet on the new model {:.1}s after the broker was back",
        took.as_secs_f64()
    );
    tokio::time::timeout(Duration::from_secs(180), load)
        .await
        .expect("the generator finishes")
        .expect("generator");
    reconcile(
        &fleet,
        &format!("reload-during-outage#{round}"),
        &ids,
        Some(back.elapsed()),
    )
    .await;

    // What is submitted now is answered by the new model.
    let (_conn, publisher) = fleet.publisher().await;
    let after = job_ids("reloadfault-after", 10);
    let scans = phantoms(2, 256);
    for (i, id) in after.iter().enumerate() {
        fleet
            .submit(&publisher, id, &scans[i % 2], Priority::Routine)
            .await;
    }
    let results: Vec<ScanResult> = fleet.wait_results(&after, Duration::from_secs(60)).await;
    for r in &results {
        assert_eq!(r.model_version.as_deref(), Some(v2.as_str()), "{r:?}");
    }
    for p in &mut procs {
        let (code, _) = terminate(p).await;
        assert_eq!(code, Some(0), "{}", log_tail(&p.log));
    }
}

/// A backlog of 5,000 scans on one worker: prefetch keeps what the worker
/// holds, and so its memory, bounded while it works through the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_5000_keeps_memory_bounded() {
    let _serial = SERIAL.lock().await;
    // A narrow model and small scans keep the case quick: what it measures
    // is memory under a deep queue, not speed.
    let fleet = Fleet::new("backlog", 4);
    // The backlog is on the broker before the worker starts.
    let ids = job_ids("backlog", 5000);
    let scans = phantoms(8, 256);
    let backlog_bytes: usize = (0..ids.len()).map(|i| scans[i % scans.len()].len()).sum();
    {
        use futures_util::stream::{self, StreamExt};
        let (_conn, publisher) = fleet.publisher().await;
        let (fleet, publisher, scans) = (&fleet, &publisher, &scans);
        stream::iter(ids.iter().enumerate())
            .for_each_concurrent(64, |(i, id)| async move {
                fleet
                    .submit(publisher, id, &scans[i % scans.len()], Priority::Routine)
                    .await;
            })
            .await;
    }
    let mut p = worker(&fleet, "solo", &[("PLEURA_LOG_LEVEL", "info")]);
    let pid = p.child.id().expect("running");
    let t0 = Instant::now();
    // RSS after the first few hundred, and at the end: a worker that held
    // the backlog (no prefetch) would grow by its size.
    wait_answered(&fleet, &ids, 300).await;
    let early = proc_status_kib(pid, "VmRSS").expect("VmRSS");
    let store = fleet.store().await;
    store
        .wait_all(&ids, Duration::from_secs(600), |_| {})
        .await
        .expect("redis");
    let took = t0.elapsed();
    let late = proc_status_kib(pid, "VmRSS").expect("VmRSS");
    let peak = proc_status_kib(pid, "VmHWM").expect("VmHWM");
    println!(
        "backlog: 5000 scans ({} MB) in {:.1}s; RSS {} MB after 300, {} MB at the end, peak {} MB",
        backlog_bytes / 1_000_000,
        took.as_secs_f64(),
        early / 1024,
        late / 1024,
        peak / 1024
    );
    reconcile(&fleet, "backlog-5000", &ids, None).await;
    assert!(
        peak * 1024 < backlog_bytes as u64 / 2,
        "peak RSS {peak} KiB is not far below the {backlog_bytes}-byte backlog"
    );
    assert!(
        late < early + 64 * 1024,
        "RSS grew from {early} KiB to {late} KiB over the backlog"
    );
    let (code, _) = terminate(&mut p).await;
    assert_eq!(code, Some(0), "{}", log_tail(&p.log));
}

//! The model registry and hot reload, end to end: real RabbitMQ, real Redis,
//! real workers, a `file://` artifact store.
//!
//! Test models are small (width 8) untrained ResNets at 256x256, so a reload
//! takes well under a second and the tests spend their time on the
//! behaviour, not on tract optimising big graphs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pleura::model::manifest::{sha256_hex, ModelFiles};
use pleura::model::{init_weights, write_onnx, ResNetSpec};
use pleura::registry::{GatePolicy, PublishOptions, RegistryError};
use pleura::wire::{GateOutcome, Priority};
use pleura_tests::{http_get, model_variant, phantoms, wait_until, Fleet, Keys, WorkerHandle};

const WIDTH: i64 = 8;
/// The acceptance bound for a fleet to follow an activation.
const SWITCH_BOUND: Duration = Duration::from_secs(5);

async fn start_workers(fleet: &Fleet, keys: &Keys, ids: &[&str]) -> Vec<WorkerHandle> {
    let mut workers = Vec::new();
    for id in ids {
        workers.push(
            fleet
                .spawn_ready_worker(fleet.registry_settings(keys, id))
                .await,
        );
    }
    workers
}

async fn stop_all(workers: Vec<WorkerHandle>) {
    for w in workers {
        w.stop().await.expect("worker stops cleanly");
    }
}

/// Submits `n` scans and returns their results.
async fn classify_some(fleet: &Fleet, tag: &str, n: usize) -> Vec<pleura::wire::ScanResult> {
    let (_conn, publisher) = fleet.publisher().await;
    let scans = phantoms(n, 128);
    let mut ids = Vec::new();
    for (i, scan) in scans.iter().enumerate() {
        let id = format!("{tag}-{i}");
        fleet.submit(&publisher, &id, scan, Priority::Routine).await;
        ids.push(id);
    }
    fleet.wait_results(&ids, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_loses_no_job_and_every_worker_follows_within_5s() {
    let fleet = Fleet::new("reload", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let a = model_variant(1, WIDTH);
    let b = model_variant(2, WIDTH);
    let (va, vb) = (a.manifest.version.clone(), b.manifest.version.clone());
    fleet.publish(&a, Some(&keys), true).await;
    fleet.publish(&b, Some(&keys), false).await;
    let ids = ["w1", "w2"];
    let workers = start_workers(&fleet, &keys, &ids).await;
    fleet
        .wait_fleet_on(&ids, &va, Duration::from_secs(10))
        .await;

    // Continuous load: 2000 scans submitted at a steady pace from another task.
    const N: usize = 2000;
    let scans = phantoms(20, 128);
    let job_ids: Vec<String> = (0..N).map(|i| format!("load-{i}")).collect();
    let submitter = {
        let (conn, publisher) = fleet.publisher().await;
        let job_ids = job_ids.clone();
        tokio::spawn(async move {
            for (i, id) in job_ids.iter().enumerate() {
                publisher
                    .submit(&pleura::fleet::Submission {
                        job_id: id,
                        body: &scans[i % scans.len()],
                        priority: Priority::Routine,
                        correlation: &[],
                    })
                    .await
                    .expect("publish confirmed");
                if i % 20 == 19 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            drop(conn);
        })
    };

    // Ten switches, each once more results have landed since the last one,
    // so every switch happens with jobs in flight.
    let mut conn = fleet.store().await.connection();
    let mut switch_times = Vec::new();
    for i in 0..10 {
        let target = if i % 2 == 0 { &vb } else { &va };
        let done_before: usize = redis::cmd("XLEN")
            .arg(fleet.names.results_stream())
            .query_async(&mut conn)
            .await
            .unwrap();
        wait_until("more results", Duration::from_secs(60), || {
            let mut conn = conn.clone();
            let key = fleet.names.results_stream();
            async move {
                let n: usize = redis::cmd("XLEN")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                n >= done_before + 150
            }
        })
        .await;
        fleet.activate(target).await;
        let took = fleet.wait_fleet_on(&ids, target, SWITCH_BOUND).await;
        switch_times.push(took);
    }
    tokio::time::timeout(Duration::from_secs(120), submitter)
        .await
        .expect("submission finishes")
        .expect("submitter");

    let results = fleet.wait_results(&job_ids, Duration::from_secs(300)).await;
    let mut per_version: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        assert!(r.is_ok(), "job {} failed: {:?}", r.job_id, r.error);
        let v = r
            .model_version
            .clone()
            .expect("ok results name their model");
        assert!(v == va || v == vb, "result from unexpected model {v}");
        *per_version.entry(v).or_default() += 1;
    }
    assert_eq!(
        per_version.len(),
        2,
        "both versions served: {per_version:?}"
    );
    // Exactly one stream entry per job: nothing lost, nothing doubled.
    let streamed = fleet.stream_job_ids().await;
    assert_eq!(streamed.len(), N);
    assert_eq!(streamed.iter().collect::<BTreeSet<_>>().len(), N);
    let slowest = switch_times.iter().max().unwrap();
    eprintln!(
        "reload under load: {N} scans, 10 switches, results per version {per_version:?}, \
         slowest fleet switch {slowest:?}, all: {switch_times:?}"
    );
    stop_all(workers).await;
}

/// Starts two workers on a good signed model; returns them and its version.
async fn fleet_on_good_model(fleet: &Fleet, keys: &Keys) -> (Vec<WorkerHandle>, String) {
    let good = model_variant(1, WIDTH);
    fleet.publish(&good, Some(keys), true).await;
    let workers = start_workers(fleet, keys, &["w1", "w2"]).await;
    fleet
        .wait_fleet_on(
            &["w1", "w2"],
            &good.manifest.version,
            Duration::from_secs(10),
        )
        .await;
    (workers, good.manifest.version)
}

/// After `bad` was activated: every worker refuses it with `code` (and says
/// so in Redis and its heartbeat), keeps serving `good`, and results say so.
async fn assert_refused_everywhere(fleet: &Fleet, bad: &str, good: &str, code: &str) {
    let registry = fleet.registry().await;
    wait_until(
        &format!("both workers refuse {bad}"),
        Duration::from_secs(30),
        || async { registry.refusals(bad).await.unwrap().len() == 2 },
    )
    .await;
    for (worker, refusal) in registry.refusals(bad).await.unwrap() {
        assert_eq!(refusal.code, code, "{worker}: {}", refusal.message);
    }
    for w in fleet.workers().await {
        let hb = w.heartbeat.expect("live heartbeat");
        assert_eq!(hb.model_version.as_deref(), Some(good), "{}", w.worker);
        assert!(hb.ready);
        assert_eq!(
            hb.last_refusal.as_ref().map(|r| r.version.as_str()),
            Some(bad)
        );
    }
    for r in classify_some(fleet, &format!("after-{code}"), 4).await {
        assert!(r.is_ok());
        assert_eq!(r.model_version.as_deref(), Some(good));
    }
}

/// `files` with other ONNX bytes under a new version, hash updated, so only
/// what the graph does is wrong.
fn with_onnx(mut files: ModelFiles, onnx: Vec<u8>, tag: &str) -> ModelFiles {
    let sha = sha256_hex(&onnx);
    files.manifest.version = format!("{tag}-{}", &sha[..8]);
    files.manifest.sha256 = sha;
    files.onnx = onnx;
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_artifact_is_refused_and_the_old_model_keeps_serving() {
    let fleet = Fleet::new("corrupt", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let (workers, good) = fleet_on_good_model(&fleet, &keys).await;
    let bad = model_variant(3, WIDTH);
    let v = bad.manifest.version.clone();
    fleet.publish(&bad, Some(&keys), false).await;
    // Flip one byte of the stored ONNX, as a bad disk or a torn copy would.
    let onnx = fleet.tmp().join("registry").join(&v).join("model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&onnx, bytes).unwrap();
    fleet.activate(&v).await;
    assert_refused_everywhere(&fleet, &v, &good, "hash_mismatch").await;
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_with_the_wrong_output_shape_is_refused() {
    let fleet = Fleet::new("shape-out", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let (workers, good) = fleet_on_good_model(&fleet, &keys).await;
    let three = ResNetSpec {
        image_size: 256,
        num_classes: 3,
        ..ResNetSpec::with_width(WIDTH)
    };
    let onnx = write_onnx(&three, &init_weights(&three, 4)).unwrap();
    let bad = with_onnx(model_variant(4, WIDTH), onnx, "three-classes");
    fleet.publish(&bad, Some(&keys), true).await;
    assert_refused_everywhere(&fleet, &bad.manifest.version, &good, "bad_output").await;
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_with_the_wrong_input_shape_is_refused() {
    let fleet = Fleet::new("shape-in", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let (workers, good) = fleet_on_good_model(&fleet, &keys).await;
    let rgb = ResNetSpec {
        image_size: 256,
        in_channels: 3,
        ..ResNetSpec::with_width(WIDTH)
    };
    let onnx = write_onnx(&rgb, &init_weights(&rgb, 5)).unwrap();
    let bad = with_onnx(model_variant(5, WIDTH), onnx, "rgb-input");
    fleet.publish(&bad, Some(&keys), true).await;
    assert_refused_everywhere(&fleet, &bad.manifest.version, &good, "load").await;
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_that_produces_nan_is_refused() {
    let fleet = Fleet::new("nan", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let (workers, good) = fleet_on_good_model(&fleet, &keys).await;
    let spec = ResNetSpec {
        image_size: 256,
        ..ResNetSpec::with_width(WIDTH)
    };
    // Every weight is finite (the writer refuses NaN outright), but weights
    // at f32::MAX, as a diverged training run can leave, overflow both
    // logits to +inf, and softmax turns inf - inf into NaN.
    let mut weights = init_weights(&spec, 6);
    let fc = weights.get_mut("fc.weight").expect("fc.weight");
    fc.data.iter_mut().for_each(|x| *x = f32::MAX);
    let onnx = write_onnx(&spec, &weights).unwrap();
    let bad = with_onnx(model_variant(6, WIDTH), onnx, "nan");
    fleet.publish(&bad, Some(&keys), true).await;
    assert_refused_everywhere(&fleet, &bad.manifest.version, &good, "bad_output").await;
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unsigned_model_with_a_valid_hash_is_refused() {
    let fleet = Fleet::new("unsigned", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let (workers, good) = fleet_on_good_model(&fleet, &keys).await;
    let bad = model_variant(7, WIDTH);
    fleet.publish(&bad, None, true).await;
    assert_refused_everywhere(&fleet, &bad.manifest.version, &good, "unsigned").await;
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_signed_with_the_wrong_key_is_refused() {
    let fleet = Fleet::new("wrongkey", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let (workers, good) = fleet_on_good_model(&fleet, &keys).await;
    let rogue = Keys::generate(fleet.tmp(), "rogue");
    let bad = model_variant(8, WIDTH);
    fleet.publish(&bad, Some(&rogue), true).await;
    assert_refused_everywhere(&fleet, &bad.manifest.version, &good, "bad_signature").await;
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_with_the_cli_brings_the_fleet_back_within_5s() {
    let fleet = Fleet::new("rollback", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let (workers, previous) = fleet_on_good_model(&fleet, &keys).await;
    let next = model_variant(9, WIDTH);
    fleet.publish(&next, Some(&keys), true).await;
    fleet
        .wait_fleet_on(&["w1", "w2"], &next.manifest.version, SWITCH_BOUND)
        .await;

    let registry_url = fleet.registry_url();
    fleet
        .cli(
            [
                "models",
                "activate",
                &previous,
                "--reason",
                "rollback drill",
            ],
            &[("PLEURA_REGISTRY_URL", &registry_url)],
        )
        .await
        .expect_ok();
    let took = fleet
        .wait_fleet_on(&["w1", "w2"], &previous, SWITCH_BOUND)
        .await;
    eprintln!("rollback: fleet back on {previous} {took:?} after the command returned");

    let history = fleet.registry().await.history(10).await.unwrap();
    assert_eq!(history[0].version, previous);
    assert_eq!(
        history[0].previous.as_deref(),
        Some(next.manifest.version.as_str())
    );
    assert_eq!(history[0].reason, "rollback drill");
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_and_deaf_workers_converge_on_the_active_version() {
    let fleet = Fleet::new("converge", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let (mut workers, _) = fleet_on_good_model(&fleet, &keys).await;
    let b = model_variant(10, WIDTH);
    fleet.publish(&b, Some(&keys), true).await;
    let vb = b.manifest.version.clone();
    fleet.wait_fleet_on(&["w1", "w2"], &vb, SWITCH_BOUND).await;

    // A worker started after the activation serves it from the start.
    workers.push(
        fleet
            .spawn_ready_worker(fleet.registry_settings(&keys, "late"))
            .await,
    );
    fleet
        .wait_fleet_on(&["late"], &vb, Duration::from_secs(10))
        .await;

    // Deaf workers: the announcement exchange is deleted under them (taking
    // every worker's binding with it), then a version is activated and
    // announced to nobody. The reconcile timer (2 s here) still brings every
    // worker over.
    let conn = pleura::fleet::broker::connect(&pleura_tests::amqp_url(), "pleura-tests")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete(
        fleet.names.models_exchange().as_str().into(),
        Default::default(),
    )
    .await
    .unwrap();
    let c = model_variant(11, WIDTH);
    fleet.publish(&c, Some(&keys), true).await;
    let took = fleet
        .wait_fleet_on(
            &["w1", "w2", "late"],
            &c.manifest.version,
            Duration::from_secs(15),
        )
        .await;
    eprintln!("an activation announced to nobody reached every worker in {took:?}");
    let _ = conn.close(200, "".into()).await;
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_without_a_usable_model_is_not_ready_and_takes_no_jobs() {
    let fleet = Fleet::new("nomodel", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let worker = fleet
        .spawn_worker(fleet.registry_settings(&keys, "w1"))
        .await;
    wait_until("a heartbeat", Duration::from_secs(30), || async {
        fleet.workers().await.iter().any(|w| w.heartbeat.is_some())
    })
    .await;
    let hb = fleet.workers().await[0].heartbeat.clone().unwrap();
    assert!(!hb.ready);
    assert_eq!(hb.model_version, None);
    let (status, _) = http_get(worker.http, "/readyz").await.unwrap();
    assert_eq!(status, 503);

    // The job waits on the queue: nobody consumes it.
    let (_conn, publisher) = fleet.publisher().await;
    let scan = &phantoms(1, 128)[0];
    fleet
        .submit(&publisher, "waiting-job", scan, Priority::Routine)
        .await;
    let ch = publisher.channel();
    let q = ch
        .queue_declare(
            fleet.names.routine_queue().as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.consumer_count(), 0);
    assert_eq!(q.message_count(), 1);

    // Once a model is published, the worker becomes ready and does the job.
    let a = model_variant(1, WIDTH);
    fleet.publish(&a, Some(&keys), true).await;
    let r = fleet
        .wait_results(&["waiting-job".to_string()], Duration::from_secs(30))
        .await;
    assert_eq!(
        r[0].model_version.as_deref(),
        Some(a.manifest.version.as_str())
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishing_runs_the_gate_and_versions_are_immutable() {
    let fleet = Fleet::new("gate", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let key = pleura::registry::signing::read_signing_key(&keys.private).unwrap();
    let registry = fleet.registry().await;
    let policy = GatePolicy {
        min_auroc: 0.8,
        min_recall: 0.85,
        max_int8_auroc_loss: 0.005,
    };
    let opts = |force: bool| PublishOptions {
        force,
        reason: force.then(|| "bring-up".to_string()),
        activate: true,
        by: "test".into(),
    };
    let trained = |seed: u64, auroc: f64, recall: f64| {
        let mut f = model_variant(seed, WIDTH);
        f.manifest.trained = true;
        f.manifest.version = format!("trained-{seed}");
        f.manifest.metrics =
            Some(serde_json::json!({"auroc": auroc, "at_chosen": {"recall": recall}}));
        f.manifest.training = Some(serde_json::json!({"data": {"fingerprint": "val-A"}}));
        f
    };

    // An untrained model fails the gate; --force publishes it and says so.
    let init = model_variant(1, WIDTH);
    match registry
        .publish(&init, Some(&key), &policy, &opts(false))
        .await
    {
        Err(RegistryError::GateFailed(f)) => assert!(f.iter().any(|m| m.contains("untrained"))),
        other => panic!("expected the gate to fail, got {other:?}"),
    }
    let p = registry
        .publish(&init, Some(&key), &policy, &opts(true))
        .await
        .unwrap();
    assert!(matches!(p.entry.gate, GateOutcome::Forced { .. }));

    // A good model passes; a worse one on the same validation set does not.
    let good = trained(2, 0.95, 0.92);
    registry
        .publish(&good, Some(&key), &policy, &opts(false))
        .await
        .unwrap();
    assert_eq!(
        registry.active().await.unwrap().as_deref(),
        Some("trained-2")
    );
    let worse = trained(3, 0.93, 0.92);
    match registry
        .publish(&worse, Some(&key), &policy, &opts(false))
        .await
    {
        Err(RegistryError::GateFailed(f)) => assert!(f[0].contains("regresses"), "{f:?}"),
        other => panic!("expected a regression failure, got {other:?}"),
    }
    assert_eq!(
        registry.active().await.unwrap().as_deref(),
        Some("trained-2")
    );

    // Versions are immutable: same files or not, a second publish fails.
    assert!(matches!(
        registry
            .publish(&good, Some(&key), &policy, &opts(true))
            .await,
        Err(RegistryError::VersionExists { same: true, .. })
    ));
    let mut changed = trained(4, 0.99, 0.99);
    changed.manifest.version = "trained-2".into();
    assert!(matches!(
        registry
            .publish(&changed, Some(&key), &policy, &opts(true))
            .await,
        Err(RegistryError::VersionExists { same: false, .. })
    ));
    let versions: Vec<String> = registry
        .entries()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(
        versions,
        [init.manifest.version.clone(), "trained-2".into()]
    );
    // Activating an unknown version is refused and changes nothing.
    assert!(matches!(
        registry.activate("nope", "x", "test").await,
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(
        registry.active().await.unwrap().as_deref(),
        Some("trained-2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_lists_shows_verifies_and_reports_the_fleet() {
    let fleet = Fleet::new("cli", WIDTH);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let (workers, good) = fleet_on_good_model(&fleet, &keys).await;
    let unsigned = model_variant(12, WIDTH);
    fleet.publish(&unsigned, None, false).await;
    let registry_url = fleet.registry_url();
    let public = keys.public.display().to_string();
    let env = [
        ("PLEURA_REGISTRY_URL", registry_url.as_str()),
        ("PLEURA_TRUSTED_KEYS", public.as_str()),
    ];
    let run = |args: Vec<String>| async {
        let run = fleet.cli(args, &env).await;
        (run.code, run.stdout, run.stderr)
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let (code, list, _) = run(s(&["models", "list"])).await;
    assert_eq!(code, Some(0));
    assert!(
        list.lines()
            .any(|l| l.starts_with('*') && l.contains(&good)),
        "{list}"
    );
    assert!(
        list.contains(&unsigned.manifest.version) && list.contains("UNSIGNED"),
        "{list}"
    );

    let (code, show, _) = run(s(&["models", "show", &good])).await;
    assert_eq!(code, Some(0));
    let doc: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(doc["active"], true);
    assert_eq!(doc["entry"]["version"], good.as_str());

    let (code, out, _) = run(s(&["models", "verify", &good])).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("signed by trusted key"));
    let (code, _, err) = run(s(&["models", "verify", &unsigned.manifest.version])).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("unsigned"), "{err}");

    let (code, status, _) = run(s(&["fleet", "status"])).await;
    assert_eq!(code, Some(0));
    assert!(
        status.contains(&format!("active model: {good}")),
        "{status}"
    );
    for w in ["w1", "w2"] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(w) && l.contains("ready") && l.contains(&good)),
            "{status}"
        );
    }
    let (code, history, _) = run(s(&["models", "history"])).await;
    assert_eq!(code, Some(0));
    assert!(history.contains(&good));
    // What `helm test` runs: fine while workers are ready...
    let (code, _, err) = run(s(&["fleet", "status", "--json", "--require-ready"])).await;
    assert_eq!(code, Some(0), "{err}");

    stop_all(workers).await;
    // A worker that stopped cleanly removes its heartbeat.
    assert!(fleet.workers().await.is_empty());
    // ...and a failure once none is.
    let (code, _, err) = run(s(&["fleet", "status", "--json", "--require-ready"])).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no worker is ready"), "{err}");
}

//! The training service end to end: `pleura train` against real
//! `pleura-trainer serve` processes, the real RabbitMQ, Redis and libtorch,
//! on phantom datasets.
//!
//! Every case has its own namespace, registry, runs store and trainers, so
//! the cases run side by side; each trains tiny models (width 8-16, 64-128
//! px) so that a run takes seconds on two cores.

use std::path::Path;
use std::time::Duration;

use pleura::wire::{RunEventKind, RunRecord, RunState};
use pleura_tests::trainer::{phantom_dataset, run_store, wait_run, TrainerEnv, TrainerProc};
use pleura_tests::{http_get, model_variant, url_for_dir, wait_until, Fleet, Keys};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn file_url(dir: &Path) -> String {
    url_for_dir(dir)
}

/// `pleura train submit --data file://DATA` and `flags` (space-separated).
fn submit_args(data: &Path, flags: &str) -> Vec<String> {
    let mut args: Vec<String> = ["train", "submit", "--data"].map(String::from).to_vec();
    args.push(file_url(data));
    args.extend(flags.split_whitespace().map(String::from));
    args
}

/// The run id `pleura train submit` printed (its last stdout line).
fn run_id(stdout: &str) -> String {
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("run-") || l.starts_with("t-"))
        .map(|l| l.split_whitespace().next().unwrap_or(l).to_string())
        .unwrap_or_else(|| panic!("no run id in {stdout:?}"))
}

async fn show(fleet: &Fleet, id: &str) -> RunRecord {
    let out = fleet
        .cli(["train", "show", "--json", id], &[])
        .await
        .expect_ok();
    serde_json::from_str(&out.stdout).expect("show --json prints a run record")
}

/// What acceptance asks for first: `submit --publish --wait` trains on a
/// running service, publishes through the gate (signed), and the running
/// workers hot-reload the new model; the manifest names the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_trains_publishes_and_the_fleet_reloads() {
    let fleet = Fleet::new("train-pub", 8);
    let keys = Keys::generate(fleet.tmp(), "k");
    let data = fleet.tmp().join("data");
    phantom_dataset(&data, 60, 128, 0.3).await;
    // The fleet serves a first model, which the run's model replaces.
    let first = fleet.publish(&model_variant(1, 8), Some(&keys), true).await;
    let worker = fleet
        .spawn_ready_worker(fleet.registry_settings(&keys, "w1"))
        .await;
    fleet
        .wait_fleet_on(&["w1"], &first.entry.version, Duration::from_secs(60))
        .await;
    // Three epochs on phantoms make a weak model (validation AUROC 0.45 to
    // 0.75 on 12 images): the fleet's gate is set to what such a model can
    // pass, and the refusal is the subject of another case.
    let mut env = TrainerEnv::new(&fleet);
    env.extra = vec![
        ("PLEURA_GATE_MIN_AUROC".into(), "0.0".into()),
        ("PLEURA_GATE_MIN_RECALL".into(), "0.5".into()),
    ];
    let trainer = TrainerProc::start(&fleet, &keys, &env, "trainer-a").await;

    let out = fleet
        .cli(
            submit_args(&data, "--epochs 3 --width 16 --image-size 128 --batch-size 8 --device auto --publish --reason acceptance --wait"),
            &[],
        )
        .await
        .expect_ok();
    assert!(
        out.stdout.contains("published and active"),
        "{}",
        out.stdout
    );
    let id = run_id(out.stdout.lines().next().unwrap_or_default());
    let record = show(&fleet, &id).await;
    assert_eq!(record.state, RunState::Succeeded, "{record:#?}");
    assert_eq!(record.activated, Some(true));
    assert!(
        record.gate_refusals.is_empty(),
        "{:?}",
        record.gate_refusals
    );
    assert_eq!(record.epoch, 3);
    assert_eq!(
        record.device.as_deref(),
        Some("cpu"),
        "no GPU here: CPU fallback"
    );
    assert!(record.images_per_second.unwrap_or(0.0) > 0.0);
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].trainer, "trainer-a");
    let version = record.model_version.clone().expect("a model version");

    // Published through the gate, signed, with the run in its manifest.
    let entry = fleet
        .registry()
        .await
        .entry(&version)
        .await
        .expect("registry")
        .expect("the run's model is published");
    assert!(entry.key_id.is_some(), "signed with the trainer's key");
    assert!(
        matches!(entry.gate, pleura::wire::GateOutcome::Passed),
        "{:?}",
        entry.gate
    );
    let training = entry.manifest.training.clone().expect("training section");
    assert_eq!(training["run_id"], id.as_str(), "{training}");
    assert_eq!(
        fleet.registry().await.active().await.unwrap().as_deref(),
        Some(version.as_str())
    );

    // The running worker moves to it without a restart.
    let took = fleet
        .wait_fleet_on(&["w1"], &version, Duration::from_secs(60))
        .await;
    eprintln!("TRAIN-SERVICE published {version}; worker on it {took:?} later");

    // The stream holds the whole story, in order.
    let events = run_store(&fleet)
        .await
        .events(&id, "-", 10_000)
        .await
        .unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|(_, e)| match e.kind {
            RunEventKind::Queued { .. } => "queued",
            RunEventKind::Started { .. } => "started",
            RunEventKind::Device { .. } => "device",
            RunEventKind::Progress { .. } => "progress",
            RunEventKind::Epoch(_) => "epoch",
            RunEventKind::Checkpoint { .. } => "checkpoint",
            RunEventKind::CancelRequested { .. } => "cancel",
            RunEventKind::Interrupted { .. } => "interrupted",
            RunEventKind::Finished { .. } => "finished",
        })
        .collect();
    assert_eq!(kinds.first(), Some(&"queued"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "epoch").count(),
        3,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"progress"), "{kinds:?}");
    // The metrics say what the trainer did.
    let (_, metrics) = http_get(trainer.http, "/metrics").await.unwrap();
    assert!(
        metrics.contains("pleura_trainer_runs_total{outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pleura_trainer_epoch_seconds"),
        "{metrics}"
    );
    worker.stop().await.expect("worker stops");
}

/// Progress is visible while a run trains (`watch`, `show`, `list`, the
/// stream); a cancel mid-run leaves `cancelled`, no model, and a trainer
/// that takes the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_visible_and_a_cancel_stops_the_run_cleanly() {
    let fleet = Fleet::new("train-cancel", 8);
    let keys = Keys::generate(fleet.tmp(), "k");
    let data = fleet.tmp().join("data");
    phantom_dataset(&data, 60, 96, 0.3).await;
    let env = TrainerEnv::new(&fleet);
    let mut trainer = TrainerProc::start(&fleet, &keys, &env, "trainer-c").await;
    let out = fleet
        .cli(
            submit_args(
                &data,
                "--epochs 200 --width 8 --image-size 64 --batch-size 8",
            ),
            &[],
        )
        .await
        .expect_ok();
    let id = run_id(&out.stdout);
    // `watch --json` follows it live, from another process.
    let watch = {
        let mut cmd = tokio::process::Command::new(pleura_tests::bin("pleura"));
        cmd.args(["train", "watch", "--json", &id])
            .envs(fleet.env())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().expect("spawn watch")
    };
    let runs = run_store(&fleet).await;
    let r = wait_run(&runs, &id, "two epochs done", RUN_TIMEOUT, |r| r.epoch >= 2).await;
    assert_eq!(r.state, RunState::Running);
    assert_eq!(r.trainer.as_deref(), Some("trainer-c"));
    assert!(
        r.last_epoch.is_some() && r.checkpoint_epoch.is_some(),
        "{r:#?}"
    );
    let shown = fleet.cli(["train", "show", &id], &[]).await.expect_ok();
    assert!(
        shown.stdout.contains("state      running"),
        "{}",
        shown.stdout
    );
    assert!(shown.stdout.contains("device     cpu"), "{}", shown.stdout);
    let listed = fleet.cli(["train", "list"], &[]).await.expect_ok();
    assert!(
        listed.stdout.contains(&id) && listed.stdout.contains("running"),
        "{}",
        listed.stdout
    );

    let cancelled = fleet.cli(["train", "cancel", &id], &[]).await.expect_ok();
    assert!(
        cancelled.stdout.contains("cancel requested"),
        "{}",
        cancelled.stdout
    );
    let r = wait_run(&runs, &id, "cancelled", RUN_TIMEOUT, |r| {
        r.state.is_terminal()
    })
    .await;
    assert_eq!(r.state, RunState::Cancelled, "{r:#?}");
    assert!(r.epoch < 200);
    let by = r.cancel.as_ref().expect("who cancelled").by.clone();
    assert!(by.contains('@'), "{by}");
    assert_eq!(r.model_version, None);
    assert!(
        fleet.registry().await.entries().await.unwrap().is_empty(),
        "no model may be published"
    );
    // Nothing half-written in the trainer's scratch or the runs store.
    let work = fleet.tmp().join("trainer-work/trainer-c/runs").join(&id);
    wait_until("scratch cleaned", Duration::from_secs(30), || {
        let work = work.clone();
        async move { !work.exists() }
    })
    .await;
    assert!(!fleet.tmp().join("runs").join(&id).join("latest").exists());

    let watched = tokio::time::timeout(Duration::from_secs(60), watch.wait_with_output())
        .await
        .expect("watch ends with the run")
        .expect("watch output");
    assert_eq!(
        watched.status.code(),
        Some(1),
        "a cancelled run is not a success"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    for kind in [
        "queued",
        "started",
        "progress",
        "epoch",
        "checkpoint",
        "cancel_requested",
        "finished",
    ] {
        assert!(
            lines.iter().any(|l| l["event"] == kind),
            "no {kind} event in {lines:#?}"
        );
    }
    assert_eq!(lines.last().unwrap()["state"], "cancelled");

    // The trainer takes the next request.
    let next = fleet
        .cli(
            submit_args(
                &data,
                "--epochs 1 --width 8 --image-size 64 --batch-size 8 --wait",
            ),
            &[],
        )
        .await
        .expect_ok();
    assert!(next.stdout.contains("succeeded"), "{}", next.stdout);
    assert!(trainer.alive());
    let status = trainer.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "SIGTERM exits 0: {status:?}\n{}",
        trainer.log_text()
    );
}

/// kill -9 of the trainer mid-run: once its lease expires a second trainer
/// resumes from the last checkpoint and finishes; the record shows both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_trainers_run_is_resumed_by_another() {
    let fleet = Fleet::new("train-kill", 8);
    let keys = Keys::generate(fleet.tmp(), "k");
    let data = fleet.tmp().join("data");
    phantom_dataset(&data, 60, 96, 0.3).await;
    let env = TrainerEnv::new(&fleet);
    let mut a = TrainerProc::start(&fleet, &keys, &env, "trainer-a").await;
    let out = fleet
        .cli(
            submit_args(&data, "--epochs 6 --width 8 --image-size 64 --batch-size 8"),
            &[],
        )
        .await
        .expect_ok();
    let id = run_id(&out.stdout);
    let runs = run_store(&fleet).await;
    let r = wait_run(&runs, &id, "a checkpoint after epoch 2", RUN_TIMEOUT, |r| {
        r.checkpoint_epoch >= Some(2)
    })
    .await;
    a.kill().await;
    let killed_after = r.checkpoint_epoch.unwrap();
    let b = TrainerProc::start(&fleet, &keys, &env, "trainer-b").await;
    let r = wait_run(&runs, &id, "finished", RUN_TIMEOUT, |r| {
        r.state.is_terminal()
    })
    .await;
    assert_eq!(r.state, RunState::Succeeded, "{r:#?}\n{}", b.log_text());
    let trainers: Vec<&str> = r.attempts.iter().map(|a| a.trainer.as_str()).collect();
    assert_eq!(trainers, ["trainer-a", "trainer-b"], "{r:#?}");
    let resumed = r.attempts[1]
        .resumed_from_epoch
        .expect("resumed from a checkpoint");
    assert!(
        resumed >= killed_after,
        "resumed after {resumed}, checkpointed {killed_after}"
    );
    assert_eq!(
        r.attempts[0].ended, None,
        "a killed trainer records nothing"
    );
    assert_eq!(r.epoch, 6);
    // The same kind of model as an uninterrupted run, naming its resume.
    let entry = fleet
        .registry()
        .await
        .entry(r.model_version.as_deref().unwrap())
        .await
        .unwrap()
        .expect("the model is in the registry");
    assert_eq!(entry.manifest.spec.image_size, 64);
    let training = entry.manifest.training.clone().unwrap();
    assert_eq!(training["run_id"], id.as_str());
    assert_eq!(training["resumed_from_epoch"], resumed, "{training}");
    // Not published: uploaded, not active.
    assert_eq!(r.activated, Some(false));
    assert_eq!(fleet.registry().await.active().await.unwrap(), None);
    let events = runs.events(&id, "-", 10_000).await.unwrap();
    assert!(events.iter().any(|(_, e)| matches!(
        e.kind,
        RunEventKind::Started {
            attempt: 2,
            resumed_from_epoch: Some(_),
            ..
        }
    )));
    eprintln!("TRAIN-SERVICE kill -9 after checkpoint {killed_after}; trainer-b resumed after epoch {resumed}");
}

/// Two requests submitted together on one trainer run one after the other.
/// Both ask to publish, and the gate (set out of reach) refuses both: each
/// model is recorded in the registry and the run, and neither is active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_requests_run_one_after_the_other_and_the_gate_refuses_both() {
    let fleet = Fleet::new("train-two", 8);
    let keys = Keys::generate(fleet.tmp(), "k");
    let data = fleet.tmp().join("data");
    phantom_dataset(&data, 40, 64, 0.3).await;
    let mut env = TrainerEnv::new(&fleet);
    env.extra = vec![("PLEURA_GATE_MIN_AUROC".into(), "0.9999".into())];
    let _t = TrainerProc::start(&fleet, &keys, &env, "trainer-1").await;
    // Different seeds: two identical requests make the same weights, hence
    // the same version, and a version is published once.
    let (fleet_ref, data_ref) = (&fleet, &data);
    let submit = |seed: &'static str| async move {
        let out = fleet_ref
            .cli(
                submit_args(
                    data_ref,
                    &format!("--epochs 2 --width 8 --image-size 64 --batch-size 8 --publish --seed {seed}"),
                ),
                &[],
            )
            .await
            .expect_ok();
        run_id(&out.stdout)
    };
    let (x, y) = tokio::join!(submit("1"), submit("2"));
    let runs = run_store(&fleet).await;
    let rx = wait_run(&runs, &x, "done", RUN_TIMEOUT, |r| r.state.is_terminal()).await;
    let ry = wait_run(&runs, &y, "done", RUN_TIMEOUT, |r| r.state.is_terminal()).await;
    assert_eq!(
        (rx.state, ry.state),
        (RunState::Succeeded, RunState::Succeeded)
    );
    // Times are to the second and a run here can take less: a tie on the start
    // goes to the run that finished first.
    let (first, second) = if (&rx.started_at, &rx.finished_at) <= (&ry.started_at, &ry.finished_at)
    {
        (&rx, &ry)
    } else {
        (&ry, &rx)
    };
    assert!(
        second.started_at.as_deref() >= first.finished_at.as_deref(),
        "one trainer runs one at a time: {first:#?} {second:#?}"
    );
    assert_ne!(rx.model_version, ry.model_version);
    let registry = fleet.registry().await;
    for r in [&rx, &ry] {
        assert_eq!(r.activated, Some(false), "{r:#?}");
        assert!(
            r.gate_refusals.iter().any(|g| g.contains("AUROC")),
            "{r:#?}"
        );
        let entry = registry
            .entry(r.model_version.as_deref().unwrap())
            .await
            .unwrap()
            .expect("a refused model is kept for inspection");
        assert!(
            matches!(entry.gate, pleura::wire::GateOutcome::Forced { .. }),
            "{:?}",
            entry.gate
        );
    }
    assert_eq!(
        registry.active().await.unwrap(),
        None,
        "a refused model is never active"
    );
    let watched = fleet
        .cli(["train", "watch", &rx.request.run_id], &[])
        .await
        .expect_code(1);
    assert!(
        watched.stdout.contains("promotion gate refused"),
        "{}",
        watched.stdout
    );
}

/// Bad requests fail clearly, at submission where they can be seen, or as
/// a failed run with the reason; none of them harms the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_fail_clearly_and_the_service_carries_on() {
    let fleet = Fleet::new("train-bad", 8);
    let keys = Keys::generate(fleet.tmp(), "k");
    let env = TrainerEnv::new(&fleet);
    let mut trainer = TrainerProc::start(&fleet, &keys, &env, "trainer-x").await;
    let good = fleet.tmp().join("good");
    phantom_dataset(&good, 30, 64, 0.3).await;
    let tiny = [
        "--epochs",
        "1",
        "--width",
        "8",
        "--image-size",
        "64",
        "--batch-size",
        "8",
    ];
    let submit = |data: String, extra: Vec<&'static str>| {
        let fleet = &fleet;
        async move {
            let mut args = vec!["train".to_string(), "submit".into(), "--data".into(), data];
            args.extend(tiny.iter().map(|s| s.to_string()));
            args.extend(extra.iter().map(|s| s.to_string()));
            fleet.cli(args, &[]).await
        }
    };

    // At submission: nothing is queued.
    let missing = submit(
        file_url(&fleet.tmp().join("none")).replace("/none", "/absent"),
        vec![],
    )
    .await;
    let missing = missing.expect_code(2);
    assert!(
        missing.stderr.contains("no such directory"),
        "{}",
        missing.stderr
    );
    let unknown = submit(file_url(&good), vec!["--epochz", "3"])
        .await
        .expect_code(2);
    assert!(unknown.stderr.contains("--epochz"), "{}", unknown.stderr);
    let impossible = submit(file_url(&good), vec!["--val-fraction", "1.5"])
        .await
        .expect_code(2);
    assert!(
        impossible.stderr.contains("--val-fraction 1.5"),
        "{}",
        impossible.stderr
    );
    let one_class = fleet.tmp().join("one-class");
    std::fs::create_dir_all(one_class.join("nofinding")).unwrap();
    std::fs::create_dir_all(one_class.join("effusion")).unwrap();
    for f in std::fs::read_dir(good.join("effusion")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), one_class.join("effusion").join(f.file_name())).unwrap();
    }
    let empty = submit(file_url(&one_class), vec![]).await.expect_code(2);
    assert!(
        empty.stderr.contains("no images") && empty.stderr.contains("nofinding/"),
        "{}",
        empty.stderr
    );
    assert!(
        run_store(&fleet).await.list(10).await.unwrap().is_empty(),
        "nothing was queued"
    );
    assert_eq!(fleet.ready_count(&fleet.names.train_queue()).await, 0);

    // A corrupt image inside: a failed run that names it.
    let corrupt = fleet.tmp().join("corrupt");
    std::fs::create_dir_all(corrupt.join("effusion")).unwrap();
    std::fs::create_dir_all(corrupt.join("nofinding")).unwrap();
    for class in ["effusion", "nofinding"] {
        for f in std::fs::read_dir(good.join(class)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), corrupt.join(class).join(f.file_name())).unwrap();
        }
    }
    std::fs::write(
        corrupt.join("nofinding/broken.png"),
        b"\x89PNG\r\n\x1a\n not really",
    )
    .unwrap();
    let out = submit(file_url(&corrupt), vec!["--wait"])
        .await
        .expect_code(1);
    assert!(
        out.stdout.contains("failed") && out.stdout.contains("broken.png"),
        "{}",
        out.stdout
    );

    // A request no trainer can read: dead-lettered, the service unharmed.
    let (_conn, publisher) = fleet.publisher().await;
    publisher
        .channel()
        .basic_publish(
            "".into(),
            fleet.names.train_queue().as_str().into(),
            Default::default(),
            b"{not json",
            lapin::BasicProperties::default().with_message_id("garbage".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_until(
        "the unreadable request dead-lettered",
        Duration::from_secs(30),
        || async { fleet.ready_count(&fleet.names.dead_queue()).await == 1 },
    )
    .await;

    // Still ready, and the next good request succeeds.
    assert!(trainer.alive(), "{}", trainer.log_text());
    let (status, _) = http_get(trainer.http, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    let ok = submit(file_url(&good), vec!["--wait"]).await.expect_ok();
    assert!(ok.stdout.contains("succeeded"), "{}", ok.stdout);
}

/// A run longer than the broker's consumer timeout is neither lost nor run
/// twice: the trainer holds no message while it trains (it claims the run
/// in Redis and acks). Shown on a broker of the test's own with a 2 s
/// consumer timeout, checked every second, which is first shown to bite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_longer_than_the_consumer_timeout_runs_once() {
    use futures_util::StreamExt;
    let Some(rabbit) = pleura_tests::trainer::OwnRabbit::start("consumer_timeout = 2000").await
    else {
        pleura_tests::skip("consumer timeout", "no rabbitmq-server here");
        return;
    };
    // Channels read the tick when they open: set it before any opens.
    rabbit
        .ctl(&[
            "eval",
            "application:set_env(rabbit, channel_tick_interval, 500).",
        ])
        .expect("set the channel tick");

    // The timeout is live: a consumer sitting on a delivery loses its channel.
    let conn = lapin::Connection::connect(&rabbit.url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("probe".into(), Default::default(), Default::default())
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        "probe".into(),
        Default::default(),
        b"x",
        Default::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "probe".into(),
            "held".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let held = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
    assert!(
        matches!(held, Ok(Some(Ok(_)))),
        "the probe gets its delivery"
    );
    let t0 = std::time::Instant::now();
    wait_until(
        "the broker closes the channel of a consumer past its timeout",
        Duration::from_secs(60),
        || {
            let closed = !ch.status().connected();
            async move { closed }
        },
    )
    .await;
    let bite = t0.elapsed();

    let fleet = Fleet::new("train-timeout", 8);
    let keys = Keys::generate(fleet.tmp(), "k");
    let data = fleet.tmp().join("data");
    phantom_dataset(&data, 60, 64, 0.3).await;
    let mut env = TrainerEnv::new(&fleet);
    env.extra = vec![("PLEURA_AMQP_URL".into(), rabbit.url())];
    let trainer = TrainerProc::start(&fleet, &keys, &env, "trainer-t").await;
    let amqp = [("PLEURA_AMQP_URL", rabbit.url())];
    let amqp: Vec<(&str, &str)> = amqp.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = fleet
        .cli(
            submit_args(
                &data,
                "--epochs 100 --width 8 --image-size 64 --batch-size 8 --wait",
            ),
            &amqp,
        )
        .await
        .expect_ok();
    let id = run_id(out.stdout.lines().next().unwrap_or_default());
    let runs = run_store(&fleet).await;
    let r = runs.get(&id).await.unwrap().unwrap();
    let events = runs.events(&id, "-", 10_000).await.unwrap();
    let started = events
        .iter()
        .find(|(_, e)| matches!(e.kind, RunEventKind::Started { .. }));
    let ran_ms = events.last().unwrap().1.at_ms - started.expect("a start").1.at_ms;
    assert!(
        Duration::from_millis(ran_ms) > bite * 3,
        "the run ({ran_ms} ms) must outlast the consumer timeout ({bite:?}) several times"
    );
    assert_eq!(r.state, RunState::Succeeded);
    assert_eq!(r.attempts.len(), 1, "run once: {r:#?}");
    let starts = events
        .iter()
        .filter(|(_, e)| matches!(e.kind, RunEventKind::Started { .. }))
        .count();
    assert_eq!(starts, 1);
    let queues = rabbit
        .ctl(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .unwrap();
    let train_q = fleet.names.train_queue();
    let line = queues
        .lines()
        .find(|l| l.starts_with(&train_q))
        .expect("the train queue");
    assert_eq!(
        line.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["0", "0"],
        "{queues}"
    );
    let log = trainer.log_text();
    assert!(
        !log.contains("PRECONDITION_FAILED") && !log.contains("reconnecting"),
        "{log}"
    );
    eprintln!(
        "TRAIN-SERVICE consumer timeout bit after {bite:?}; the run took {ran_ms} ms and ran once"
    );
}

/// SIGTERM (scale-in, eviction) mid-run: the trainer exits 0 at the next
/// batch and releases the run, which another trainer resumes at once,
/// without waiting for a lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_run_to_another_trainer() {
    let fleet = Fleet::new("train-term", 8);
    let keys = Keys::generate(fleet.tmp(), "k");
    let data = fleet.tmp().join("data");
    phantom_dataset(&data, 60, 64, 0.3).await;
    let mut env = TrainerEnv::new(&fleet);
    // Long enough that a resume which waited for expiry would be seen,
    // even on a loaded machine.
    env.lease_secs = 300;
    let mut a = TrainerProc::start(&fleet, &keys, &env, "trainer-a").await;
    let out = fleet
        .cli(
            submit_args(
                &data,
                "--epochs 30 --width 8 --image-size 64 --batch-size 8",
            ),
            &[],
        )
        .await
        .expect_ok();
    let id = run_id(&out.stdout);
    let runs = run_store(&fleet).await;
    wait_run(&runs, &id, "a checkpoint", RUN_TIMEOUT, |r| {
        r.checkpoint_epoch >= Some(1)
    })
    .await;
    let status = a.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}\n{}", a.log_text());
    let r = runs.get(&id).await.unwrap().unwrap();
    assert_eq!(r.state, RunState::Queued, "released: {r:#?}");
    assert_eq!(
        r.attempts[0].ended.as_deref(),
        Some("interrupted: trainer shut down")
    );
    let t0 = std::time::Instant::now();
    let _b = TrainerProc::start(&fleet, &keys, &env, "trainer-b").await;
    let r = wait_run(&runs, &id, "resumed", Duration::from_secs(200), |r| {
        r.attempts.len() == 2
    })
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(200),
        "no wait for the 300 s lease"
    );
    assert!(r.attempts[1].resumed_from_epoch >= Some(1), "{r:#?}");
    let r = wait_run(&runs, &id, "finished", RUN_TIMEOUT, |r| {
        r.state.is_terminal()
    })
    .await;
    assert_eq!(r.state, RunState::Succeeded, "{r:#?}");
    let events = runs.events(&id, "-", 10_000).await.unwrap();
    assert!(events
        .iter()
        .any(|(_, e)| matches!(&e.kind, RunEventKind::Interrupted { trainer, .. } if trainer == "trainer-a")));
}

/// A run that keeps killing its trainers is failed with the reason after
/// `trainer_max_attempts`, not retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_keeps_dying_is_failed_after_max_attempts() {
    let fleet = Fleet::new("train-cap", 8);
    let keys = Keys::generate(fleet.tmp(), "k");
    let data = fleet.tmp().join("data");
    phantom_dataset(&data, 60, 64, 0.3).await;
    let mut env = TrainerEnv::new(&fleet);
    env.lease_secs = 3;
    env.max_attempts = 2;
    let out = fleet
        .cli(
            submit_args(
                &data,
                "--epochs 300 --width 8 --image-size 64 --batch-size 8",
            ),
            &[],
        )
        .await
        .expect_ok();
    let id = run_id(&out.stdout);
    let runs = run_store(&fleet).await;
    for (n, name) in [(1, "trainer-1"), (2, "trainer-2")] {
        let mut t = TrainerProc::start(&fleet, &keys, &env, name).await;
        wait_run(&runs, &id, "training", RUN_TIMEOUT, |r| {
            r.attempts.len() == n && r.state == RunState::Running && r.last_epoch.is_some()
        })
        .await;
        t.kill().await;
    }
    let _t = TrainerProc::start(&fleet, &keys, &env, "trainer-3").await;
    let r = wait_run(&runs, &id, "given up", RUN_TIMEOUT, |r| {
        r.state.is_terminal()
    })
    .await;
    assert_eq!(r.state, RunState::Failed, "{r:#?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(error.contains("gave up after 2 attempts"), "{error}");
    let trainers: Vec<&str> = r.attempts.iter().map(|a| a.trainer.as_str()).collect();
    assert_eq!(trainers, ["trainer-1", "trainer-2", "trainer-3"]);
    assert_eq!(r.model_version, None);
    let shown = fleet.cli(["train", "show", &id], &[]).await.expect_ok();
    assert!(
        shown.stdout.contains("gave up after 2 attempts"),
        "{}",
        shown.stdout
    );
}

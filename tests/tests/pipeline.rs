//! The scan pipeline end to end, against the real RabbitMQ and Redis.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pleura::wire::{Priority, Status};
use pleura_tests::*;

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_flow_through_and_redelivery_is_harmless() {
    let fleet = Fleet::new("flow", 8);
    let worker = fleet.spawn_ready_worker(fleet.settings()).await;
    let (_conn, publisher) = fleet.publisher().await;

    let scans = phantoms(6, 256);
    let mut ids = Vec::new();
    for (i, body) in scans.iter().enumerate() {
        let id = new_id("flow");
        fleet.submit(&publisher, &id, body, Priority::Routine).await;
        // The same job published twice is what a redelivery looks like to
        // the worker; it must still give one key and one stream entry.
        if i % 2 == 0 {
            fleet.submit(&publisher, &id, body, Priority::Routine).await;
        }
        ids.push(id);
    }
    let results = fleet.wait_results(&ids, Duration::from_secs(120)).await;
    for r in &results {
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert_eq!(r.schema, 1);
        let p = r.p_effusion.unwrap();
        assert!((0.0..=1.0).contains(&p));
        assert!(r.model_version.as_deref().unwrap().starts_with("init-"));
        assert!(r.timings_ms.queue.is_some() && r.timings_ms.total > 0.0);
    }
    // Wait until the duplicates are consumed too (the queue drains to zero).
    let names = fleet.names.clone();
    wait_until("queues drained", Duration::from_secs(60), || {
        let q = names.routine_queue();
        let f = &fleet;
        async move { f.ready_count(&q).await == 0 }
    })
    .await;
    worker.stop().await.expect("clean stop");

    let stream = fleet.stream_job_ids().await;
    let counts: HashMap<&String, usize> = stream.iter().fold(HashMap::new(), |mut m, id| {
        *m.entry(id).or_default() += 1;
        m
    });
    for id in &ids {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "job {id} must have exactly one stream entry"
        );
    }
    assert_eq!(stream.len(), ids.len());
    assert_eq!(fleet.result_key_count(&ids).await, ids.len());
    assert_eq!(
        fleet.ready_count(&fleet.names.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_and_the_worker_keeps_serving() {
    let fleet = Fleet::new("poison", 8);
    let worker = fleet.spawn_ready_worker(fleet.settings()).await;
    let (_conn, publisher) = fleet.publisher().await;

    // A 100-megapixel PNG bomb: tiny on the wire, 100 MB if decoded.
    let bomb = {
        let img = image::GrayImage::new(10_000, 10_000);
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    assert!(bomb.len() < 2_000_000, "the bomb is small on the wire");
    let mut truncated = phantoms(1, 256).remove(0);
    truncated.truncate(truncated.len() / 2);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupt", truncated, "corrupt_image"),
        ("empty", Vec::new(), "empty_body"),
        ("bomb", bomb, "too_large"),
        (
            "text",
            b"%PDF-1.4 definitely not a radiograph".to_vec(),
            "unsupported_format",
        ),
    ];
    let mut ids = Vec::new();
    for (name, body, _) in &cases {
        let id = new_id(name);
        fleet.submit(&publisher, &id, body, Priority::Routine).await;
        ids.push(id);
    }
    // No message_id at all: nobody can be told, so it is only dead-lettered.
    publisher
        .channel()
        .basic_publish(
            fleet.names.scans_exchange().into(),
            "".into(),
            Default::default(),
            &phantoms(1, 256)[0],
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // ...and the worker still serves a good scan afterwards.
    let good = new_id("good");
    fleet
        .submit(&publisher, &good, &phantoms(1, 256)[0], Priority::Routine)
        .await;

    let results = fleet.wait_results(&ids, Duration::from_secs(120)).await;
    for ((name, _, code), r) in cases.iter().zip(&results) {
        assert_eq!(r.status, Status::Error, "{name}: {r:?}");
        assert_eq!(r.error.as_ref().unwrap().code, *code, "{name}");
        assert!(r.p_effusion.is_none() && r.label.is_none());
    }
    let ok = fleet
        .wait_results(std::slice::from_ref(&good), Duration::from_secs(60))
        .await;
    assert_eq!(ok[0].status, Status::Ok);

    let dead_q = fleet.names.dead_queue();
    wait_until("5 dead letters", Duration::from_secs(30), || {
        let (f, q) = (&fleet, dead_q.clone());
        async move { f.ready_count(&q).await >= 5 }
    })
    .await;
    worker.stop().await.expect("clean stop");
    let dead = fleet.drain(&dead_q).await;
    assert_eq!(dead.len(), 5, "{dead:?}");
    let dead_ids: HashSet<Option<String>> = dead.into_iter().map(|(id, _)| id).collect();
    for id in &ids {
        assert!(dead_ids.contains(&Some(id.clone())), "{id} dead-lettered");
    }
    assert!(
        dead_ids.contains(&None),
        "the message without id is dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_overtakes_a_routine_backlog() {
    let fleet = Fleet::new("stat", 8);
    let (_conn, publisher) = fleet.publisher().await;
    let scans = phantoms(8, 256);
    let mut routine = Vec::new();
    for i in 0..200 {
        let id = new_id("routine");
        fleet
            .submit(&publisher, &id, &scans[i % scans.len()], Priority::Routine)
            .await;
        routine.push(id);
    }
    let stat = new_id("stat");
    fleet
        .submit(&publisher, &stat, &scans[0], Priority::Stat)
        .await;
    assert_eq!(
        fleet.ready_count(&fleet.names.stat_queue()).await,
        1,
        "the STAT scan is routed to the STAT queue"
    );

    let worker = fleet.spawn_ready_worker(fleet.settings()).await;
    let mut all = routine.clone();
    all.push(stat.clone());
    let results = fleet.wait_results(&all, Duration::from_secs(300)).await;
    worker.stop().await.expect("clean stop");
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(results.last().unwrap().priority, Priority::Stat);

    // The stream records completion order.
    let order = fleet.stream_job_ids().await;
    let before = order
        .iter()
        .position(|id| *id == stat)
        .expect("stat in stream");
    eprintln!("STAT completed after {before} of 200 routine scans");
    assert!(
        before <= 20,
        "STAT finished after {before} of 200 routine scans; must beat at least 90%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics_report_the_worker() {
    let fleet = Fleet::new("http", 8);
    let worker = fleet.spawn_ready_worker(fleet.settings()).await;
    let (status, body) = http_get(worker.http, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("broker: connected") && body.contains("model: init-"),
        "{body}"
    );
    assert_eq!(http_get(worker.http, "/healthz").await.unwrap().0, 200);

    let (_conn, publisher) = fleet.publisher().await;
    let id = new_id("m");
    fleet
        .submit(&publisher, &id, &phantoms(1, 256)[0], Priority::Routine)
        .await;
    fleet
        .wait_results(std::slice::from_ref(&id), Duration::from_secs(60))
        .await;
    let (status, metrics) = http_get(worker.http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for needle in [
        "pleura_jobs_total{outcome=\"ok\"}",
        "pleura_stage_seconds_bucket{stage=\"infer\"",
        "pleura_jobs_in_flight",
        "pleura_model_info{version=\"init-",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
    let addr = worker.http;
    worker.stop().await.expect("clean stop");
    assert!(
        http_get(addr, "/readyz").await.is_err(),
        "endpoints go away with the worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_could_never_serve_refuses_to_start() {
    let fleet = Fleet::new("nomodel", 8);
    // No pinned model and no key to trust: every published model would be
    // refused, so the worker says so at start instead of idling forever.
    let settings = pleura::config::Settings {
        model_dir: None,
        registry_url: fleet.registry_url(),
        ..fleet.settings()
    };
    let worker = fleet.spawn_worker(settings).await;
    let err = worker
        .stop()
        .await
        .expect_err("no usable model source is an error");
    assert!(err.to_string().contains("trusted_keys"), "{err}");

    // A tampered model is refused, never served.
    let onnx = fleet.model_dir.join("model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&onnx, bytes).unwrap();
    let err = fleet
        .spawn_worker(fleet.settings())
        .await
        .stop()
        .await
        .expect_err("tampered model refused");
    assert!(err.to_string().to_lowercase().contains("sha"), "{err}");
}

//! Faults against the real RabbitMQ and Redis, each ending in a
//! reconciliation of every submitted job id against the results: exactly one
//! result and one stream entry per job, nothing missing, nothing
//! dead-lettered.

use std::collections::HashMap;
use std::time::Duration;

use pleura::wire::{Priority, Status};
use pleura_tests::*;

/// Every job has exactly one result key and one stream entry, and none went
/// to the dead-letter queue.
async fn reconcile(fleet: &Fleet, ids: &[String]) {
    let results = fleet.wait_results(ids, Duration::from_secs(300)).await;
    assert_eq!(results.len(), ids.len(), "every job has a result");
    for r in &results {
        assert_eq!(r.status, Status::Ok, "{r:?}");
    }
    assert_eq!(fleet.result_key_count(ids).await, ids.len());
    let mut entries: HashMap<String, usize> = HashMap::new();
    for id in fleet.stream_job_ids().await {
        *entries.entry(id).or_default() += 1;
    }
    for id in ids {
        assert_eq!(entries.get(id), Some(&1), "job {id}: one stream entry");
    }
    let dead = fleet.drain(&fleet.names.dead_queue()).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
}

/// kill -9 of one of two workers while it holds jobs: the broker hands its
/// unacknowledged deliveries to the other, and every job completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_hard_with_jobs_in_hand_loses_none() {
    let fleet = Fleet::new("kill9", 8);
    let dir = fleet.tmp().join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let spawn = |id: &str| {
        spawn_worker_process(
            &fleet,
            &[
                ("PLEURA_WORKER_ID", id),
                ("PLEURA_INFERENCE_THREADS", "1"),
                ("PLEURA_HEARTBEAT_INTERVAL_SECS", "1"),
                // Debug level: the survivor logs each redelivered job.
                ("PLEURA_LOG_LEVEL", "debug"),
            ],
            &dir.join(format!("{id}.log")),
        )
    };
    let mut victim = spawn("victim");
    let mut survivor = spawn("survivor");
    wait_until("both workers ready", Duration::from_secs(120), || async {
        let status = fleet.workers().await;
        status
            .iter()
            .filter(|s| s.heartbeat.as_ref().is_some_and(|h| h.ready))
            .count()
            == 2
    })
    .await;

    let (_conn, publisher) = fleet.publisher().await;
    // Full-size scans, so that the queue is still long when the victim dies.
    let scans = phantoms(4, 1024);
    let ids: Vec<String> = (0..200)
        .map(|i| format!("kill9-{i:03}-{}", uuid::Uuid::new_v4().simple()))
        .collect();
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
    victim.start_kill().expect("SIGKILL");
    let status = tokio::time::timeout(Duration::from_secs(30), victim.wait())
        .await
        .expect("the victim dies")
        .expect("wait");
    assert!(!status.success(), "killed, not exited: {status:?}");

    reconcile(&fleet, &ids).await;
    let results = fleet.wait_results(&ids, Duration::from_secs(10)).await;
    let by_victim = results.iter().filter(|r| r.worker == "victim").count();
    assert!(
        by_victim < ids.len(),
        "the survivor finished the rest ({by_victim} by the victim)"
    );
    survivor.start_kill().ok();
    let _ = tokio::time::timeout(Duration::from_secs(30), survivor.wait()).await;
    // What the victim held came back to the broker and went to the survivor.
    let log = std::fs::read_to_string(dir.join("survivor.log")).unwrap();
    assert!(
        log.contains("redelivered job"),
        "the survivor got the victim's unacknowledged jobs"
    );
}

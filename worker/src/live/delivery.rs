//! Handling one delivery ([`crate::delivery::Handler`]) against the real
//! RabbitMQ and Redis: ok, poison, no job id, a Redis outage, the end of
//! the grace period.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use pleura::fleet::ResultStore;
use pleura::wire::Priority;
use tokio::sync::watch;

use super::{scan, OwnRedis, Rig};
use crate::delivery::Handler;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_readable_scan_is_acked_only_with_its_result_stored() {
    let rig = Rig::new("ok").await;
    rig.submit("ok-1", &scan(1), Priority::Stat).await;
    let (handler, _) = rig.handler(rig.results.clone());
    let delivery = rig.take(&rig.names.stat_queue()).await;
    tokio::time::timeout(WAIT, handler.handle(delivery))
        .await
        .unwrap();
    let r = rig
        .results
        .get("ok-1")
        .await
        .unwrap()
        .expect("result stored");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.priority, Priority::Stat);
    assert_eq!(r.worker, "live-test");
    assert_eq!(r.correlation["x-pleura-accession"], "ACC-1");
    assert!(r.timings_ms.total >= r.timings_ms.infer);
    // Acked: closing the channel that took it hands nothing back.
    rig.channel.close(200, "done".into()).await.unwrap();
    assert_eq!(rig.ready(&rig.names.stat_queue()).await, 0);
    assert_eq!(rig.ready(&rig.names.dead_queue()).await, 0);
    assert_eq!(handler.health.stats.totals().ok, 1);
    assert_eq!(handler.health.stats.in_flight(), 0);
}

#[tokio::test]
async fn an_unreadable_scan_gets_an_error_result_then_the_dead_letter_queue() {
    let rig = Rig::new("poison").await;
    rig.submit("bad-1", b"%PDF-1.7 not a radiograph", Priority::Routine)
        .await;
    let (handler, _) = rig.handler(rig.results.clone());
    handler
        .handle(rig.take(&rig.names.routine_queue()).await)
        .await;
    let r = rig
        .results
        .get("bad-1")
        .await
        .unwrap()
        .expect("error result");
    assert!(!r.is_ok());
    assert_eq!(r.error.as_ref().unwrap().code, "unsupported_format");
    assert_eq!(r.label, None);
    rig.wait_ready(&rig.names.dead_queue(), 1).await;
    assert_eq!(rig.ready(&rig.names.routine_queue()).await, 0);
    assert_eq!(handler.health.stats.totals().error, 1);
}

#[tokio::test]
async fn a_message_without_a_job_id_is_only_dead_lettered() {
    let rig = Rig::new("noid").await;
    rig.channel
        .basic_publish(
            rig.names.scans_exchange().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &scan(2),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let (handler, _) = rig.handler(rig.results.clone());
    handler
        .handle(rig.take(&rig.names.routine_queue()).await)
        .await;
    rig.wait_ready(&rig.names.dead_queue(), 1).await;
    assert_eq!(handler.health.stats.totals().error, 1);
}

/// A job whose result write is failing: its scan taken, its Redis (a private
/// one) killed, and its handler holding it. Returns once the failed write
/// has told intake to pause.
struct HeldJob {
    redis: OwnRedis,
    store: ResultStore,
    handler: Arc<Handler>,
    redis_ok: watch::Receiver<bool>,
    job: tokio::task::JoinHandle<()>,
}

async fn held_job(rig: &Rig, job_id: &str) -> HeldJob {
    let mut redis = OwnRedis::start();
    let store = ResultStore::connect(&redis.url(), rig.names.clone(), 600, 100)
        .await
        .unwrap();
    let (handler, mut redis_ok) = rig.handler(store.clone());
    rig.submit(job_id, &scan(3), Priority::Routine).await;
    let delivery = rig.take(&rig.names.routine_queue()).await;
    redis.kill();
    let job = tokio::spawn({
        let handler = handler.clone();
        async move { handler.handle(delivery).await }
    });
    tokio::time::timeout(WAIT, redis_ok.wait_for(|ok| !ok))
        .await
        .expect("the failed write is reported")
        .unwrap();
    assert_eq!(handler.health.stats.in_flight(), 1, "the job is held");
    HeldJob {
        redis,
        store,
        handler,
        redis_ok,
        job,
    }
}

#[tokio::test]
async fn a_redis_outage_holds_the_job_until_the_write_lands() {
    let rig = Rig::new("outage").await;
    let mut held = held_job(&rig, "held-1").await;
    held.redis.restart();
    tokio::time::timeout(WAIT, held.job).await.unwrap().unwrap();
    assert!(*held.redis_ok.borrow(), "intake may take jobs again");
    let r = held
        .store
        .get("held-1")
        .await
        .unwrap()
        .expect("written after the outage");
    assert!(r.is_ok());
    rig.channel.close(200, "done".into()).await.unwrap();
    assert_eq!(rig.ready(&rig.names.routine_queue()).await, 0, "acked");
}

#[tokio::test]
async fn a_job_still_held_when_the_grace_period_ends_goes_back_to_the_queue() {
    let rig = Rig::new("grace").await;
    let held = held_job(&rig, "requeued-1").await;
    let (handler, job) = (held.handler, held.job);
    handler.hard_stop.cancel();
    tokio::time::timeout(WAIT, job).await.unwrap().unwrap();
    // Handed back at once, not on channel close.
    rig.wait_ready(&rig.names.routine_queue(), 1).await;
    assert_eq!(handler.health.stats.totals().retried, 1);
    assert_eq!(handler.health.stats.in_flight(), 0);
}

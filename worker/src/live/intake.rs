//! Intake ([`crate::intake::Intake`]) against the real RabbitMQ and Redis:
//! STAT first, the pause while Redis refuses writes, the drain.

use std::sync::Arc;
use std::time::Duration;

use pleura::fleet::broker;
use pleura::wire::Priority;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{amqp_url, scan, Rig};
use crate::delivery::Handler;
use crate::error::WorkerError;
use crate::intake::Intake;

const WAIT: Duration = Duration::from_secs(60);

/// An intake of the rig's namespace over a connection of its own, with a
/// handler on the rig's pool, a stop and a readiness signal to watch.
struct Subject {
    intake: Intake,
    handler: Arc<Handler>,
    conn: lapin::Connection,
    stop: CancellationToken,
    ready: Notify,
}

impl Subject {
    async fn new(rig: &Rig) -> (Subject, watch::Receiver<bool>) {
        let (handler, redis_ok) = rig.handler(rig.results.clone());
        let subject = Subject {
            intake: Intake {
                names: rig.names.clone(),
                delivery_limit: pleura::fleet::DEFAULT_DELIVERY_LIMIT,
                prefetch: 2,
                tag: "live-intake".into(),
                grace: Duration::from_secs(30),
            },
            handler,
            conn: broker::connect(&amqp_url(), "live-intake").await.unwrap(),
            stop: CancellationToken::new(),
            ready: Notify::new(),
        };
        (subject, redis_ok)
    }

    /// Runs intake alongside `check`, which ends by cancelling `self.stop`.
    async fn run_with<T>(
        &self,
        redis_ok: watch::Receiver<bool>,
        check: impl std::future::Future<Output = T>,
    ) -> (Result<(), WorkerError>, T) {
        let run = self.intake.run(
            &self.conn,
            self.handler.clone(),
            redis_ok,
            &self.ready,
            &self.stop,
        );
        tokio::join!(run, check)
    }
}

/// Job ids in the results stream, in the order they were written.
async fn written(rig: &Rig) -> Vec<String> {
    let mut conn = rig.results.connection();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(rig.names.results_stream())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    entries
        .ids
        .iter()
        .map(|e| e.get::<String>("job_id").unwrap())
        .collect()
}

async fn wait_written(rig: &Rig, n: usize) -> Vec<String> {
    tokio::time::timeout(WAIT, async {
        loop {
            let ids = written(rig).await;
            if ids.len() >= n {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} results never came"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_goes_first_and_every_scan_is_answered_once() {
    let rig = Rig::new("order").await;
    for i in 0..10 {
        rig.submit(&format!("r-{i}"), &scan(i), Priority::Routine)
            .await;
    }
    rig.submit("stat-1", &scan(99), Priority::Stat).await;
    let (s, redis_ok) = Subject::new(&rig).await;
    let (outcome, ids) = s
        .run_with(redis_ok, async {
            let ids = wait_written(&rig, 11).await;
            s.stop.cancel();
            ids
        })
        .await;
    outcome.unwrap();
    let stat_at = ids.iter().position(|id| id == "stat-1").unwrap();
    // Prefetch 2: at most the two routine scans already delivered go first.
    assert!(stat_at <= 2, "STAT was answered {stat_at}th: {ids:?}");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 11, "{ids:?}");
    assert!(s.handler.health.stopping(), "a stopped intake says so");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_taken_while_redis_refuses_writes() {
    let rig = Rig::new("pause").await;
    let (s, redis_ok) = Subject::new(&rig).await;
    let handler = &s.handler;
    // As if a job had just failed to write its result.
    handler.redis_ok.send_replace(false);
    rig.submit("paused-1", &scan(5), Priority::Routine).await;
    let (outcome, ()) = s
        .run_with(redis_ok, async {
            s.ready.notified().await;
            // Paused: the delivery waits in the consumer, no job starts.
            let early = tokio::time::timeout(Duration::from_secs(1), wait_written(&rig, 1)).await;
            assert!(early.is_err(), "a job ran while Redis was refusing writes");
            assert_eq!(handler.health.stats.in_flight(), 0);
            handler.redis_ok.send_replace(true);
            wait_written(&rig, 1).await;
            s.stop.cancel();
        })
        .await;
    outcome.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_finishes_the_jobs_in_flight_and_hands_back_the_rest() {
    let rig = Rig::new("drain").await;
    let n = 24;
    for i in 0..n {
        rig.submit(&format!("d-{i}"), &scan(i), Priority::Routine)
            .await;
    }
    let (s, redis_ok) = Subject::new(&rig).await;
    let drained = s.run_with(redis_ok, async {
        wait_written(&rig, 1).await;
        s.stop.cancel();
    });
    let (outcome, ()) = tokio::time::timeout(WAIT, drained)
        .await
        .expect("the drain ends within its grace");
    outcome.unwrap();
    assert_eq!(
        s.handler.health.stats.in_flight(),
        0,
        "every started job settled"
    );
    // Closing the connection returns the prefetched, unstarted deliveries.
    s.conn.close(200, "done".into()).await.unwrap();
    // Nothing lost, nothing twice: every scan is answered or back on the queue.
    let answered = written(&rig).await.len() as u32;
    eprintln!("drain: {answered} of {n} answered before the stop, the rest handed back");
    assert!(answered >= 1);
    rig.wait_ready(&rig.names.routine_queue(), n as u32 - answered)
        .await;
    assert_eq!(rig.ready(&rig.names.dead_queue()).await, 0);
}

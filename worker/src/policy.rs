//! Every retry and give-up decision the worker makes, in one place.
//!
//! | situation | decision | where it is applied |
//! |---|---|---|
//! | Redis or RabbitMQ not up at start-up | retry with [`CONNECT_BACKOFF`] until stopped | `service` |
//! | a message without a usable job id | dead-letter, no result ([`for_unidentified`]) | `delivery` |
//! | a scan that can never be read | error result, then dead-letter ([`for_analysis`]) | `delivery` |
//! | any other failure to analyse | requeue; the broker's delivery limit dead-letters a scan that keeps failing | `delivery` |
//! | a result write that fails | hold the job, retry with [`result_write_backoff`] until written or the grace period ends | `delivery` |
//! | the grace period ends with jobs held | requeue them ([`REQUEUE_WAIT`]) | `intake` |
//! | a model version that cannot be fetched | retry at the next reconcile ([`for_reload`]) | `reload` |
//! | a model version that is corrupt, unsigned or broken | refuse it for good, keep serving ([`for_reload`]) | `reload` |
//!
//! The delivery limit itself is the queues' `x-delivery-limit`: the
//! `delivery_limit` setting, default [`pleura::fleet::DEFAULT_DELIVERY_LIMIT`].

use std::time::Duration;

use pleura::model::AnalyseError;
use pleura::scan::ScanError;

use crate::ack::Settlement;
use crate::error::ReloadError;
use crate::retry::Backoff;

/// Connecting to Redis or RabbitMQ: from 200 ms, doubling, at most 5 s
/// apart, for as long as it takes, so a worker started before its services
/// simply waits for them.
pub const CONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(5));

/// First pause before retrying a failed result write.
pub const RESULT_WRITE_FIRST_RETRY: Duration = Duration::from_millis(50);

/// Retrying a result write: from [`RESULT_WRITE_FIRST_RETRY`], doubling, at
/// most `max` apart (`redis_max_backoff_ms`). It never gives up by itself: a
/// result that is never written would be a scan silently dropped.
pub fn result_write_backoff(max: Duration) -> Backoff {
    Backoff::new(RESULT_WRITE_FIRST_RETRY, max)
}

/// The start-up connection schedule, [`CONNECT_BACKOFF`].
pub fn connect_backoff() -> Backoff {
    Backoff::new(CONNECT_BACKOFF.0, CONNECT_BACKOFF.1)
}

/// After the grace period, how long held jobs get to hand their deliveries
/// back before the connection closes (which hands back the rest anyway).
pub const REQUEUE_WAIT: Duration = Duration::from_secs(5);

/// What becomes of a delivery whose scan was not analysed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition<'a> {
    /// The scan itself is unusable: store an error result (with this
    /// error's code), then dead-letter.
    Poison(&'a ScanError),
    /// Something that may pass (no model yet, the pool stopping, a model
    /// failure): hand it back; the delivery limit stops endless retries.
    Requeue,
}

/// Decides the fate of a scan that could not be analysed.
pub fn for_analysis(error: &AnalyseError) -> Disposition<'_> {
    match error {
        AnalyseError::Scan(scan) => Disposition::Poison(scan),
        AnalyseError::NoModel | AnalyseError::Model(_) | AnalyseError::PoolClosed => {
            Disposition::Requeue
        }
    }
}

/// A message without a usable job id cannot get a result anyone could find,
/// so it is only dead-lettered.
pub fn for_unidentified() -> Settlement {
    Settlement::DeadLetter
}

/// What a reload failure means for the version that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadDisposition {
    /// The store or Redis was down: try the same version at the next tick.
    RetryLater,
    /// The version is what it is (versions are immutable): refuse it for
    /// good, record why, and keep serving the current model.
    Refuse,
}

/// Decides what a failed reload means.
pub fn for_reload(error: &ReloadError) -> ReloadDisposition {
    match error {
        ReloadError::Fetch(_) => ReloadDisposition::RetryLater,
        ReloadError::Verify(_) | ReloadError::Model(_) => ReloadDisposition::Refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pleura::model::EngineError;

    #[test]
    fn only_unreadable_scans_are_poison() {
        assert_eq!(
            for_analysis(&AnalyseError::Scan(ScanError::Empty)),
            Disposition::Poison(&ScanError::Empty)
        );
        for transient in [
            AnalyseError::NoModel,
            AnalyseError::PoolClosed,
            AnalyseError::Model(EngineError::BadOutput("nan".into())),
        ] {
            assert_eq!(
                for_analysis(&transient),
                Disposition::Requeue,
                "{transient}"
            );
        }
        assert_eq!(for_unidentified(), Settlement::DeadLetter);
    }

    #[test]
    fn only_fetch_failures_are_retried() {
        let fetch = ReloadError::Fetch(pleura::registry::RegistryError::NotFound("v".into()));
        assert_eq!(for_reload(&fetch), ReloadDisposition::RetryLater);
        let broken = ReloadError::Model(EngineError::Canary("off".into()));
        assert_eq!(for_reload(&broken), ReloadDisposition::Refuse);
    }

    #[test]
    fn schedules_start_where_documented() {
        let mut write = result_write_backoff(Duration::from_secs(5));
        assert_eq!(write.next_delay(), RESULT_WRITE_FIRST_RETRY);
        let mut connect = connect_backoff();
        assert_eq!(connect.next_delay(), CONNECT_BACKOFF.0);
        for _ in 0..10 {
            connect.next_delay();
        }
        assert_eq!(connect.next_delay(), CONNECT_BACKOFF.1);
    }
}

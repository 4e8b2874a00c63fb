//! Retrying a write that must not be lost.
//!
//! When Redis is down the worker holds the job and keeps trying, with
//! exponential backoff capped at a ceiling, until the write lands or the
//! worker is told to stop. It never gives up on its own: a result that is
//! never written would mean a scan silently dropped.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff: `start`, doubling, never above `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// A schedule starting at `start` and capped at `max`.
    pub fn new(start: Duration, max: Duration) -> Backoff {
        Backoff {
            next: start.min(max),
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// The operation was abandoned because the worker is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

/// Runs `op` until it succeeds, sleeping per `backoff` between failures and
/// calling `on_error` with each failure and attempt number. Returns
/// [`Cancelled`] as soon as `cancel` fires.
pub async fn retry<T, E, F, Fut>(
    mut op: F,
    mut backoff: Backoff,
    cancel: &CancellationToken,
    mut on_error: impl FnMut(&E, u32),
) -> Result<T, Cancelled>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(Cancelled),
            r = op() => r,
        };
        match outcome {
            Ok(v) => return Ok(v),
            Err(e) => on_error(&e, attempt),
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(Cancelled),
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_backoff_until_success() {
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let cancel = CancellationToken::new();
        let mut seen = Vec::new();
        let v = retry(
            || async {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n < 5 {
                    Err(n)
                } else {
                    Ok(n)
                }
            },
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            &cancel,
            |e, attempt| seen.push((*e, attempt)),
        )
        .await
        .unwrap();
        assert_eq!(v, 5);
        assert_eq!(seen, [(1, 1), (2, 2), (3, 3), (4, 4)]);
        // 100 + 200 + 400 + 800 ms of virtual time, no more.
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_minute_long_outage_is_waited_out() {
        let start = Instant::now();
        let cancel = CancellationToken::new();
        let v = retry(
            || async {
                if start.elapsed() < Duration::from_secs(60) {
                    Err(())
                } else {
                    Ok(())
                }
            },
            Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            &cancel,
            |_, _| {},
        )
        .await;
        assert_eq!(v, Ok(()));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited <= Duration::from_secs(65),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_the_retries() {
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            c2.cancel();
        });
        let r: Result<(), Cancelled> = retry(
            || async { Err::<(), ()>(()) },
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            &cancel,
            |_, _| {},
        )
        .await;
        assert_eq!(r, Err(Cancelled));
    }
}

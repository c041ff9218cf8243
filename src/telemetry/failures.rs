//! A step retried on a schedule that keeps failing (following the revocation stream,
//! writing usage) is logged at its first failure and then at most once every
//! `FAILURE_LOG_EVERY`, with the count of those not logged: an outage is one line in
//! half a minute, not one per retry.

use std::time::Duration;

/// How often a step that keeps failing is logged again: retried twice a second, a stream
/// that cannot be reached would otherwise be a warning twice a second (inside Envoy too).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

/// One step's failures in a row: the first is logged, then at most one every
/// `FAILURE_LOG_EVERY`, with how many were not.
#[derive(Debug, Default)]
pub(crate) struct Failures {
    /// Failures since the last success.
    total: u64,
    /// Failures since the last one logged.
    unlogged: u64,
    logged_at: Option<tokio::time::Instant>,
}

impl Failures {
    /// Counts a failure: `Some(failures not logged since the last one logged)` if this
    /// one is to be logged.
    pub(crate) fn failed(&mut self) -> Option<u64> {
        self.total += 1;
        let due = self
            .logged_at
            .is_none_or(|at| at.elapsed() >= FAILURE_LOG_EVERY);
        if !due {
            self.unlogged += 1;
            return None;
        }
        self.logged_at = Some(tokio::time::Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }

    /// A success: `Some(failures before it)` if there were any. The next failure is
    /// logged at once.
    pub(crate) fn recovered(&mut self) -> Option<u64> {
        let failed = std::mem::take(self);
        (failed.total > 0).then_some(failed.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failure_retried_twice_a_second_is_logged_at_once_then_once_every_30_s_with_the_count(
    ) {
        let retry = Duration::from_millis(500);
        let mut failures = Failures::default();
        assert_eq!(failures.failed(), Some(0), "the first failure is logged");
        for n in 1..60 {
            tokio::time::advance(retry).await;
            assert_eq!(
                failures.failed(),
                None,
                "failure {n}, {:?} after the first",
                retry * n
            );
        }
        tokio::time::advance(retry).await;
        assert_eq!(
            failures.failed(),
            Some(59),
            "30 s after the first, with the 59 between"
        );
        tokio::time::advance(retry).await;
        assert_eq!(failures.failed(), None);
        assert_eq!(
            failures.recovered(),
            Some(62),
            "a success counts every failure before it"
        );
        assert_eq!(failures.recovered(), None, "and only once");
        assert_eq!(
            failures.failed(),
            Some(0),
            "after a success, the next failure is logged at once"
        );
    }
}

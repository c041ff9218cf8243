//! How much each key is used: requests allowed and denied, and when it was last used,
//! counted in memory on the hot path and flushed to the store in batches
//! (`api_keys.usage_flush_interval`, and once more on a graceful shutdown). So no request costs a
//! store write, and what `keys get` shows is accurate to the flush interval across
//! replicas. The store writes a batch in parts (per partition, bounded in size) and says
//! which parts failed: only their counts are kept for the next flush. Counted are requests whose key was authenticated: allowed, or denied after
//! (scope, tenant, rate limit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::{now_ms, StoreError, UsageDelta, UsageNotWritten, UsageSink};
use crate::telemetry::{ErrorChain, Failures};

/// A flush that left some counts unwritten: they are kept for the next one.
#[derive(Debug, thiserror::Error)]
// Not repeating its source: `ErrorChain` prints it.
#[error("usage of {kept} key(s) was not written ({written} were)")]
pub struct FlushFailed {
    pub written: usize,
    pub kept: usize,
    #[source]
    pub error: StoreError,
}

#[derive(Default, Clone, Copy)]
struct Tally {
    allowed: u64,
    denied: u64,
    last_used_at_ms: u64,
}

/// Counts live in shards, each worker thread counting in its own (threads are given
/// shards in turn), so requests on different threads never wait for one another's lock;
/// a flush takes every shard and merges them.
pub struct UsageCounter {
    store: Arc<dyn UsageSink>,
    shards: Box<[Mutex<Counts>]>,
}

/// One shard's counts, by key id.
type Counts = HashMap<Box<str>, Tally>;

/// Shards per counter: more than the worker threads of any machine keygate runs on, so
/// each thread's shard is its own (threads beyond that share, still correctly).
const SHARDS: usize = 64;

/// This thread's shard, the same for every counter.
fn shard_index() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A tally left half-changed by a panic is still a count.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tally {
    fn add(&mut self, other: Tally) {
        // Saturating: a count reported from outside (`add`) is not trusted not to overflow.
        self.allowed = self.allowed.saturating_add(other.allowed);
        self.denied = self.denied.saturating_add(other.denied);
        self.last_used_at_ms = self.last_used_at_ms.max(other.last_used_at_ms);
    }
}

impl UsageCounter {
    pub fn new(store: Arc<dyn UsageSink>) -> Self {
        UsageCounter {
            store,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// Counts one request of `key_id`.
    pub fn record(&self, key_id: &str, allowed: bool) {
        self.count(
            key_id,
            Tally {
                allowed: u64::from(allowed),
                denied: u64::from(!allowed),
                last_used_at_ms: now_ms(),
            },
        );
    }

    /// Counts usage another process counted (`Revocations/ReportUsage`: keygate's module
    /// inside Envoy), written with this replica's own at its next flush.
    pub fn add(&self, delta: &UsageDelta) {
        self.count(
            &delta.key_id,
            Tally {
                allowed: delta.allowed,
                denied: delta.denied,
                last_used_at_ms: delta.last_used_at_ms,
            },
        );
    }

    fn count(&self, key_id: &str, tally: Tally) {
        let mut shard = lock(&self.shards[shard_index()]);
        match shard.get_mut(key_id) {
            Some(t) => t.add(tally),
            None => {
                shard.insert(key_id.into(), tally);
            }
        }
    }

    /// Writes what was counted since the last flush, in one store call, and returns how
    /// many keys' counts were written. Counts the store reports not written are kept for
    /// the next flush; those it wrote are not, so no count is written twice because
    /// another part of the batch failed.
    pub async fn flush(&self) -> Result<usize, FlushFailed> {
        let mut taken: HashMap<Box<str>, Tally> = HashMap::new();
        for shard in self.shards.iter() {
            let counted = std::mem::take(&mut *lock(shard));
            if taken.is_empty() {
                taken = counted;
                continue;
            }
            for (k, t) in counted {
                taken.entry(k).or_default().add(t);
            }
        }
        if taken.is_empty() {
            return Ok(0);
        }
        let batch: Vec<UsageDelta> = taken
            .into_iter()
            .map(|(k, t)| UsageDelta {
                key_id: k.into(),
                allowed: t.allowed,
                denied: t.denied,
                last_used_at_ms: t.last_used_at_ms,
            })
            .collect();
        match self.store.add_usage(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(UsageNotWritten { unwritten, error }) => {
                for d in &unwritten {
                    self.add(d);
                }
                Err(FlushFailed {
                    written: batch.len().saturating_sub(unwritten.len()),
                    kept: unwritten.len(),
                    error,
                })
            }
        }
    }

    /// Flushes every `interval` until `stop`, then once more.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        // An outage is logged at its first failed flush and then every 30 s, not at every
        // flush (inside Envoy, the module's reports to an unreachable keygate too).
        let mut failures = Failures::default();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(interval) => {}
            }
            match self.flush().await {
                Ok(_) => {
                    if let Some(failed) = failures.recovered() {
                        tracing::info!(
                            event = "usage.written_again",
                            failed_flushes = failed,
                            "key usage is written again; nothing counted meanwhile was lost"
                        );
                    }
                }
                Err(e) => {
                    if let Some(not_logged) = failures.failed() {
                        tracing::warn!(event = "usage.write_failed", written = e.written, kept = e.kept, failures_not_logged = not_logged, error = %ErrorChain(&e.error), "cannot write some key usage; kept for the next flush");
                    }
                }
            }
        }
        if let Err(e) = self.flush().await {
            tracing::warn!(event = "usage.lost_at_shutdown", written = e.written, lost = e.kept, error = %ErrorChain(&e.error), "cannot write some key usage at shutdown; it is lost");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Refuses every batch while `down`, else adds it to `allowed`.
    #[derive(Default)]
    struct Sink {
        down: AtomicBool,
        allowed: AtomicU64,
    }

    #[async_trait::async_trait]
    impl UsageSink for Sink {
        async fn add_usage(&self, batch: &[UsageDelta]) -> Result<(), UsageNotWritten> {
            if self.down.load(Ordering::SeqCst) {
                return Err(UsageNotWritten {
                    unwritten: batch.to_vec(),
                    error: StoreError::Corrupt("the test's sink is down".into()),
                });
            }
            let n: u64 = batch.iter().map(|d| d.allowed).sum();
            self.allowed.fetch_add(n, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn with(&self, event: &str) -> Vec<String> {
            String::from_utf8_lossy(&lock(&self.0))
                .lines()
                .filter(|l| l.contains(&format!("event=\"{event}\"")))
                .map(str::to_owned)
                .collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_of_the_usage_store_is_logged_once_then_every_30_s_and_its_end_once() {
        let lines = Lines::default();
        let writer = lines.clone();
        let _logs = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish(),
        );
        let sink = Arc::new(Sink::default());
        sink.down.store(true, Ordering::SeqCst);
        let usage = Arc::new(UsageCounter::new(sink.clone()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let interval = Duration::from_secs(1);
        let run = tokio::spawn(usage.clone().run(interval, stopped));
        // Half a second off the flushes, so that each step below sees a known number.
        tokio::time::sleep(interval / 2).await;
        // 70 flushes fail, one a second, each with a new count to write.
        for _ in 0..70 {
            usage.record("k1", true);
            tokio::time::sleep(interval).await;
        }
        let failed = lines.with("usage.write_failed");
        assert_eq!(
            failed.len(),
            3,
            "at the first failed flush, then 30 s and 60 s later: {failed:#?}"
        );
        assert!(failed[0].contains("failures_not_logged=0"), "{}", failed[0]);
        assert!(
            failed[1].contains("failures_not_logged=29"),
            "{}",
            failed[1]
        );
        assert!(lines.with("usage.written_again").is_empty());

        sink.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(interval * 3).await;
        let again = lines.with("usage.written_again");
        assert_eq!(again.len(), 1, "{again:#?}");
        assert!(again[0].contains("failed_flushes=70"), "{}", again[0]);
        assert_eq!(
            sink.allowed.load(Ordering::SeqCst),
            70,
            "what the failed flushes kept is written"
        );
        stop.send(true).unwrap();
        run.await.unwrap();
    }
}

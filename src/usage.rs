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

use crate::store::{now_ms, KeyStore, StoreError, UsageDelta, UsageNotWritten};

/// A flush that left some counts unwritten: they are kept for the next one.
#[derive(Debug, thiserror::Error)]
#[error("usage of {kept} key(s) was not written ({written} were): {error}")]
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

pub struct UsageCounter {
    store: Arc<dyn KeyStore>,
    pending: Mutex<HashMap<String, Tally>>,
}

impl UsageCounter {
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        UsageCounter {
            store,
            pending: Mutex::default(),
        }
    }

    /// Counts one request of `key_id`.
    pub fn record(&self, key_id: &str, allowed: bool) {
        let now = now_ms();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let tally = match pending.get_mut(key_id) {
            Some(t) => t,
            None => pending.entry(key_id.to_owned()).or_default(),
        };
        if allowed {
            tally.allowed += 1;
        } else {
            tally.denied += 1;
        }
        tally.last_used_at_ms = tally.last_used_at_ms.max(now);
    }

    /// Writes what was counted since the last flush, in one store call, and returns how
    /// many keys' counts were written. Counts the store reports not written are kept for
    /// the next flush; those it wrote are not, so no count is written twice because
    /// another part of the batch failed.
    pub async fn flush(&self) -> Result<usize, FlushFailed> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if taken.is_empty() {
            return Ok(0);
        }
        let batch: Vec<UsageDelta> = taken
            .into_iter()
            .map(|(k, t)| UsageDelta {
                key_id: k,
                allowed: t.allowed,
                denied: t.denied,
                last_used_at_ms: t.last_used_at_ms,
            })
            .collect();
        match self.store.add_usage(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(UsageNotWritten { unwritten, error }) => {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for d in &unwritten {
                    let p = pending.entry(d.key_id.clone()).or_default();
                    p.allowed += d.allowed;
                    p.denied += d.denied;
                    p.last_used_at_ms = p.last_used_at_ms.max(d.last_used_at_ms);
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
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.flush().await {
                tracing::warn!(written = e.written, kept = e.kept, error = %e.error, "cannot write some key usage; kept for the next flush");
            }
        }
        if let Err(e) = self.flush().await {
            tracing::warn!(written = e.written, lost = e.kept, error = %e.error, "cannot write some key usage at shutdown; it is lost");
        }
    }
}

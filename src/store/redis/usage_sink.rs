//! Usage counters: `impl UsageSink`, a flush's batch written in short script calls per
//! partition, a few at a time, reporting the parts that failed. It does not try them
//! again: the caller does.

use async_trait::async_trait;

use super::records::RecordFormat;
use super::{RedisStore, USAGE_KEYS_PER_CALL};
use crate::store::{StoreError, UsageDelta, UsageNotWritten, UsageSink};

/// Usage script calls sent at once by one flush.
const USAGE_CALLS_IN_FLIGHT: usize = 4;

#[async_trait]
impl UsageSink for RedisStore {
    async fn add_usage(&self, batch: &[UsageDelta]) -> Result<(), UsageNotWritten> {
        use futures::StreamExt;
        if batch.is_empty() {
            return Ok(());
        }
        let conn = match self.conn().await {
            Ok(conn) => conn,
            Err(error) => {
                return Err(UsageNotWritten {
                    unwritten: batch.to_vec(),
                    error,
                })
            }
        };
        // One script call per part: a script's keys stay in one slot (one partition), and
        // a part of at most USAGE_KEYS_PER_CALL keys holds Redis only briefly. Each part
        // succeeds or fails alone, and only the failed ones are reported.
        let mut by_partition: std::collections::BTreeMap<usize, Vec<&UsageDelta>> =
            std::collections::BTreeMap::new();
        for d in batch {
            by_partition
                .entry(self.partition_of(&d.key_id))
                .or_default()
                .push(d);
        }
        let mut calls = Vec::new();
        for part in by_partition
            .values()
            .flat_map(|group| group.chunks(USAGE_KEYS_PER_CALL))
        {
            let mut conn = conn.clone();
            let mut invocation = match self.format() {
                RecordFormat::Hash => self.usage.prepare_invoke(),
                RecordFormat::Packed => {
                    let mut invocation = self.record.prepare_invoke();
                    invocation.arg("usage");
                    invocation
                }
            };
            for d in part {
                if self.format() == RecordFormat::Packed {
                    invocation.arg(&d.key_id);
                }
                invocation
                    .key(self.key_key(&d.key_id))
                    .arg(d.allowed)
                    .arg(d.denied)
                    .arg(d.last_used_at_ms);
            }
            calls.push(async move {
                let written: Result<i64, _> = self
                    .run("adding key usage", invocation.invoke_async(&mut conn))
                    .await;
                (part, written.map(drop))
            });
        }
        // A few calls at a time: each waits only for those ahead of it, never for a whole
        // large batch, within the store's timeout.
        let outcomes: Vec<(&[&UsageDelta], Result<(), StoreError>)> = futures::stream::iter(calls)
            .buffer_unordered(USAGE_CALLS_IN_FLIGHT)
            .collect()
            .await;
        let mut failed: Option<UsageNotWritten> = None;
        for (part, outcome) in outcomes {
            if let Err(error) = outcome {
                let f = failed.get_or_insert(UsageNotWritten {
                    unwritten: Vec::new(),
                    error,
                });
                f.unwritten.extend(part.iter().map(|d| (*d).clone()));
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

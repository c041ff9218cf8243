//! The audit trail: `impl AuditLog` on one Redis stream outside the partitions. What an
//! entry holds and how a query filters is `crate::store::audit`'s.

use async_trait::async_trait;
use redis::AsyncCommands;

use super::{RedisStore, STREAM_MAX_LEN};
use crate::store::{audit, AuditLog, StoreError};

#[async_trait]
impl AuditLog for RedisStore {
    async fn append_audit(&self, entry: &audit::AuditEntry) -> Result<(), StoreError> {
        let json = serde_json::to_string(entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut conn = self.conn().await?;
        let _: String = self
            .run(
                "appending to the audit trail",
                redis::cmd("XADD")
                    .arg(self.audit_key())
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_MAX_LEN)
                    .arg("*")
                    .arg("entry")
                    .arg(json)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    async fn audit(&self, q: &audit::AuditQuery) -> Result<Vec<audit::AuditEntry>, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.audit_key();
        let mut out = Vec::new();
        let mut start = format!("{}-0", q.since_ms);
        // Pages of the stream, filtered here: the trail is bounded, the filters are few.
        loop {
            let reply: redis::streams::StreamRangeReply = self
                .run(
                    "reading the audit trail",
                    conn.xrange_count(&key, &start, "+", 500),
                )
                .await?;
            let Some(last) = reply.ids.last().map(|e| e.id.clone()) else {
                break;
            };
            for e in &reply.ids {
                let Some(json) = e.get::<String>("entry") else {
                    continue;
                };
                let mut entry: audit::AuditEntry = serde_json::from_str(&json)
                    .map_err(|err| StoreError::Corrupt(err.to_string()))?;
                entry.id = e.id.clone();
                if q.matches(&entry) {
                    out.push(entry);
                    if out.len() >= q.limit {
                        return Ok(out);
                    }
                }
            }
            if reply.ids.len() < 500 {
                break;
            }
            start = format!("({last}");
        }
        Ok(out)
    }
}

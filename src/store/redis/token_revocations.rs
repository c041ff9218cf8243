//! JWT revocations: `impl TokenRevocations`, one rule per `rule_key` in its partition's
//! hash, merged with the stored one and appended to the partition's stream.

use async_trait::async_trait;
use redis::AsyncCommands;

use super::failure::outage;
use super::writes::Change;
use super::{RedisStore, STREAM_MAX_LEN};
use crate::store::{StoreError, TokenRevocation, TokenRevocations, TOKENS_REVOKED};

#[async_trait]
impl TokenRevocations for RedisStore {
    async fn revoke_tokens(
        &self,
        revocation: &TokenRevocation,
    ) -> Result<TokenRevocation, StoreError> {
        let key = revocation.rule_key();
        let p = self.layout.partition_of(&key);
        let corrupt = |e: serde_json::Error| StoreError::Corrupt(e.to_string());
        // Read, merge, and write only if the rule is still what was read (as `update`).
        for _ in 0..8 {
            let mut conn = self.conn().await?;
            let current: Option<String> = self
                .run(
                    "reading a token revocation",
                    conn.hget(self.tokens_key(p), &key),
                )
                .await?;
            let old = match &current {
                Some(json) => Some(serde_json::from_str::<TokenRevocation>(json).map_err(corrupt)?),
                None => None,
            };
            let stored = match old.filter(|o| !o.expired(revocation.at_ms)) {
                None => revocation.clone(),
                Some(old) => match old.merged_with(revocation) {
                    Some(merged) => merged,
                    None => return Ok(old),
                },
            };
            let json = serde_json::to_string(&stored).map_err(corrupt)?;
            let written: i64 = self
                .write(
                    "revoking tokens",
                    p,
                    Change::Script(
                        self.revoke_tokens
                            .key(self.tokens_key(p))
                            .key(self.tokens_expiry_key(p))
                            .key(self.events_key(p))
                            .arg(&key)
                            .arg(current.as_deref().unwrap_or(""))
                            .arg(json)
                            .arg(stored.expires_at_ms)
                            .arg(revocation.at_ms)
                            .arg(STREAM_MAX_LEN)
                            .arg(TOKENS_REVOKED),
                    ),
                )
                .await?;
            if written == 1 {
                return Ok(stored);
            }
        }
        Err(outage(
            "revoking tokens",
            format!(
                "token revocation {} kept changing while being written",
                revocation.issuer
            ),
        ))
    }

    async fn token_revocations(&self, now_ms: u64) -> Result<Vec<TokenRevocation>, StoreError> {
        let conn = self.conn().await?;
        let all = futures::future::try_join_all((0..self.layout.partitions()).map(|p| {
            let mut conn = conn.clone();
            let key = self.tokens_key(p);
            async move {
                self.run(
                    "reading token revocations",
                    conn.hvals::<_, Vec<String>>(key),
                )
                .await
            }
        }))
        .await?;
        let all: Vec<String> = all.into_iter().flatten().collect();
        let mut live = Vec::with_capacity(all.len());
        for json in all {
            let r: TokenRevocation =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if !r.expired(now_ms) {
                live.push(r);
            }
        }
        Ok(live)
    }
}

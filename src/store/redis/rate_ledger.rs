//! Rate limits and leases: `impl RateLedger`, under a hash tag of each key's own id (not
//! a partition's). The limiting itself is `reserve.lua`'s and `lease.lua`'s; this file
//! passes them their arguments and waits for replicas when a grant must survive a failover.

use async_trait::async_trait;

use super::layout::slot_of_tag;
use super::writes::Acks;
use super::RedisStore;
use crate::store::{LeaseOp, LeaseResult, RateGrant, RateRequest, RateRule, StoreError};

#[async_trait]
impl crate::store::RateLedger for RedisStore {
    async fn reserve(&self, key_id: &str, req: &RateRequest) -> Result<RateGrant, StoreError> {
        let key = |name: &str| format!("{}:{{{key_id}}}:{name}", self.layout.ns);
        let (rule, a, b) = match req.rule {
            RateRule::Gcra { interval_ms, burst } => ("gcra", interval_ms, u64::from(burst)),
            RateRule::Window { limit, window_ms } => ("window", u64::from(limit), window_ms),
        };
        let mut invocation = self.reserve.prepare_invoke();
        invocation
            .key(key("rate"))
            .key(key("reservations"))
            .key(key("window"))
            .arg(rule)
            .arg(a)
            .arg(b)
            .arg(&req.id)
            .arg(req.want)
            .arg(req.spend_ms)
            .arg(crate::store::RESERVATION_RECORD_MS)
            .arg(req.give_back.len());
        for g in &req.give_back {
            invocation.arg(&g.id).arg(g.unspent.map_or(-1, i64::from));
        }
        // A grant is spent only once `replica_acks` replicas have it, strictly: a
        // failover that rolled it back would grant the same admissions again, and a
        // replica merely disconnected for a moment can still be promoted. With none to
        // wait for, the request path's connection; else one of the reservations' own.
        let mut conn = if self.replica_acks == 0 {
            self.conn().await?
        } else {
            self.waiting_conn(&self.reservations).await?
        };
        let (granted, remaining, retry_after_ms, full_in_ms): (u32, u32, u64, u64) = self
            .run("reserving admissions", invocation.invoke_async(&mut conn))
            .await?;
        if granted > 0 {
            self.await_replicas(&mut conn, slot_of_tag(key_id), Acks::Strict)
                .await?;
        }
        Ok(RateGrant {
            granted,
            remaining,
            retry_after_ms,
            full_in_ms,
        })
    }

    async fn lease(
        &self,
        key_id: &str,
        lease_id: &str,
        op: LeaseOp,
    ) -> Result<LeaseResult, StoreError> {
        let (name, ttl_ms, limit) = match op {
            LeaseOp::Acquire { ttl_ms, limit } => ("acquire", ttl_ms, limit),
            LeaseOp::Renew { ttl_ms } => ("renew", ttl_ms, 0),
            LeaseOp::Release => ("release", 0, 0),
        };
        let mut conn = self.conn().await?;
        let (done, held): (i64, u32) = self
            .run(
                "changing a lease",
                self.lease
                    .key(format!("{}:{{{key_id}}}:leases", self.layout.ns))
                    .arg(name)
                    .arg(lease_id)
                    .arg(ttl_ms)
                    .arg(limit)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(LeaseResult {
            done: done == 1,
            held,
        })
    }
}

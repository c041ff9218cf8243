//! Partner delegations: `impl DelegationRecords` (granting, withdrawing, listing) and
//! `impl DelegationSource` (the request path's check), on the two sets each delegation
//! keeps in its partner's partition. Key names are `layout.rs`'s.

use async_trait::async_trait;
use redis::AsyncCommands;

use super::writes::Change;
use super::{RedisStore, STREAM_MAX_LEN};
use crate::store::{
    Delegation, DelegationRecords, DelegationSource, DelegationsOf, StoreError, DELEGATED,
    UNDELEGATED,
};

#[async_trait]
impl DelegationSource for RedisStore {
    async fn is_delegated(&self, partner_id: &str, tenant_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.delegation_key(
            self.layout.partition_of(partner_id),
            &DelegationsOf::Partner(partner_id.to_owned()),
        );
        self.run("reading a delegation", conn.sismember(key, tenant_id))
            .await
    }
}

#[async_trait]
impl DelegationRecords for RedisStore {
    async fn set_delegation(
        &self,
        d: &Delegation,
        granted: bool,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        let p = self.layout.partition_of(&d.partner_id);
        let changed: i64 = self
            .write(
                "changing a delegation",
                p,
                Change::Script(
                    self.delegation
                        .key(self.delegation_key(p, &DelegationsOf::Partner(d.partner_id.clone())))
                        .key(self.delegation_key(p, &DelegationsOf::Tenant(d.tenant_id.clone())))
                        .key(self.events_key(p))
                        .arg(&d.partner_id)
                        .arg(&d.tenant_id)
                        .arg(if granted { "1" } else { "0" })
                        .arg(at_ms)
                        .arg(STREAM_MAX_LEN)
                        .arg(if granted { DELEGATED } else { UNDELEGATED }),
                ),
            )
            .await?;
        Ok(changed == 1)
    }

    async fn delegations(&self, of: &DelegationsOf) -> Result<Vec<Delegation>, StoreError> {
        let conn = self.conn().await?;
        // A partner's tenants are in its partition; a tenant's partners in each of theirs.
        let partitions = match of {
            DelegationsOf::Partner(p) => vec![self.layout.partition_of(p)],
            DelegationsOf::Tenant(_) => (0..self.layout.partitions()).collect(),
        };
        let sets = futures::future::try_join_all(partitions.into_iter().map(|p| {
            let mut conn = conn.clone();
            let key = self.delegation_key(p, of);
            async move {
                self.run("listing delegations", conn.smembers::<_, Vec<String>>(key))
                    .await
            }
        }))
        .await?;
        let mut others: Vec<String> = sets.into_iter().flatten().collect();
        others.sort();
        others.dedup();
        Ok(others.into_iter().map(|other| of.with(other)).collect())
    }
}

//! The store of record: key records, owner indexes (tenant, partner, service), partner
//! delegations, JWT revocations and the revocation stream.
//!
//! One trait, two backends: Redis for production and an in-process store for
//! `keygate serve --dev` and single-node use. Both pass the same conformance suite
//! (`tests/store_conformance/`, a module per trait). A backend failure is a `StoreError`, never a missing
//! record: callers must not be able to mistake "Redis is down" for "no such key".
//!
//! Rate-limit state is storage-side too: the embedded store's per-key ledger and its
//! GCRA arithmetic are `ledger.rs` and `gcra.rs` (Redis: `lua/reserve.lua`). The store
//! knows no module above it: not the limiter, not the cache, not configuration.

pub mod audit;
mod delegation;
mod error;
mod events;
pub mod gcra;
pub mod ledger;
pub mod memory;
pub mod packed;
mod rate;
mod record;
pub mod redis;

pub use crate::clock::now_ms;
use async_trait::async_trait;
pub use delegation::*;
pub use error::{Outage, StoreError};
pub use events::*;
pub use rate::*;
pub use record::*;

/// Whether a partner may act for a tenant now: all the delegation cache (`tenant.rs`)
/// reads, so it can be given (and tested with) nothing more.
#[async_trait]
pub trait DelegationSource: Send + Sync + 'static {
    async fn is_delegated(&self, partner_id: &str, tenant_id: &str) -> Result<bool, StoreError>;
}

/// Plans' shared state: all the limiter (`ratelimit`) asks of a store.
#[async_trait]
pub trait RateLedger: Send + Sync + 'static {
    /// Reserves admissions from `key_id`'s rate-limit state, atomically, on the store's own
    /// clock (one clock for every replica).
    async fn reserve(&self, key_id: &str, req: &RateRequest) -> Result<RateGrant, StoreError>;

    /// Acquires, renews or releases one of `key_id`'s concurrent-session leases,
    /// atomically; expired leases are dropped first.
    async fn lease(
        &self,
        key_id: &str,
        lease_id: &str,
        op: LeaseOp,
    ) -> Result<LeaseResult, StoreError>;
}

/// Key records: what authentication reads (`authn`) and the admin API changes. Each
/// change to a record appends its event to the revocation stream in the same atomic step.
#[async_trait]
pub trait KeyRecords: Send + Sync + 'static {
    /// Stores a new key and adds it to its owner's index. Fails on an existing id.
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError>;

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// The key's record and the verifier a replica left beside it after verifying its
    /// token (`apikey::SecretHasher::verifier`), in one read: what a verification needs.
    async fn get_verifiable(
        &self,
        key_id: &str,
    ) -> Result<Option<(KeyRecord, Option<String>)>, StoreError>;

    /// Leaves `verifier` beside the key's record, if the record is there and not revoked.
    /// Revoking or deleting the key removes it with the record's change. Returns whether
    /// it was written.
    async fn set_verifier(&self, key_id: &str, verifier: &str) -> Result<bool, StoreError>;

    /// An owner's keys in key-id order, starting after `after`.
    async fn list(
        &self,
        owner: &Owner,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError>;

    /// Marks the key revoked at `at_ms` and appends a revocation event, in one atomic
    /// step. Returns the record as it now is; an already revoked key is returned
    /// unchanged and no event is appended. `None` if there is no such key.
    async fn revoke(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError>;

    /// Applies `change` to the key's record (not its hash, tenant or revocation) and
    /// appends an `updated` event, atomically. Returns the new record.
    async fn update(
        &self,
        key_id: &str,
        change: &KeyChange,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError>;

    /// Removes the key and its index entry and appends a deletion event, atomically.
    /// Returns the removed record.
    async fn delete(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError>;
}

/// Partners' delegations as the admin API manages them; what the request path reads of
/// them is `DelegationSource`.
#[async_trait]
pub trait DelegationRecords: DelegationSource {
    /// Grants (`granted`) or withdraws a partner's right to act for a tenant, and appends
    /// the change to the stream, atomically. Returns whether anything changed; nothing is
    /// appended when it did not.
    async fn set_delegation(
        &self,
        delegation: &Delegation,
        granted: bool,
        at_ms: u64,
    ) -> Result<bool, StoreError>;

    /// A partner's tenants, or a tenant's partners, in order.
    async fn delegations(&self, of: &DelegationsOf) -> Result<Vec<Delegation>, StoreError>;
}

/// The bounded audit stream (`audit`).
#[async_trait]
pub trait AuditLog: Send + Sync + 'static {
    /// Appends an entry to the bounded audit stream.
    async fn append_audit(&self, entry: &audit::AuditEntry) -> Result<(), StoreError>;

    /// Audit entries matching `q`, oldest first, at most `q.limit`.
    async fn audit(&self, q: &audit::AuditQuery) -> Result<Vec<audit::AuditEntry>, StoreError>;
}

/// Where batched usage counts are written (`usage`).
#[async_trait]
pub trait UsageSink: Send + Sync + 'static {
    /// Adds usage counts to their keys' records (a deleted key's are dropped). A batch may
    /// be written in parts (Redis: one script call per partition and at most
    /// `redis::USAGE_KEYS_PER_CALL` keys), each written whole or not at all; the error
    /// names the deltas of the parts that were not, so that only those are tried again. A
    /// part whose answer was lost (a timeout) is reported as not written, though it may
    /// have been: tried again, it is counted twice rather than lost.
    async fn add_usage(&self, batch: &[UsageDelta]) -> Result<(), UsageNotWritten>;
}

/// JWT revocations (by `jti`, or a subject's tokens issued before a time).
#[async_trait]
pub trait TokenRevocations: Send + Sync + 'static {
    /// Records a JWT revocation (merged into an earlier one of the same `rule_key`) and
    /// appends it to the stream, atomically. Returns the revocation as it now stands; when
    /// it adds nothing to what is stored, nothing is appended. Expired revocations are
    /// dropped along the way.
    async fn revoke_tokens(
        &self,
        revocation: &TokenRevocation,
    ) -> Result<TokenRevocation, StoreError>;

    /// Every JWT revocation not expired at `now_ms`.
    async fn token_revocations(&self, now_ms: u64) -> Result<Vec<TokenRevocation>, StoreError>;
}

/// The revocation stream, read: what the follower (`revocation`) and `Watch` need.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// How many partitions the revocation stream has (fixed for the life of the store).
    /// Each is ordered on its own; together they carry every event. Partitions are
    /// numbered from 0.
    fn partitions(&self) -> usize {
        1
    }

    /// The partition `key_id`'s events are appended to.
    fn key_partition(&self, _key_id: &str) -> usize {
        0
    }

    /// The id of the newest event in `partition`, or `START` if there is none.
    async fn latest_event_id(&self, partition: usize) -> Result<EventId, StoreError>;

    /// Up to `count` events of `partition` after `after`, oldest first. With `block`,
    /// waits up to that long for at least one (on a connection of that partition's own, so
    /// other calls are not held).
    async fn read_events(
        &self,
        partition: usize,
        after: EventId,
        count: usize,
        block: Option<std::time::Duration>,
    ) -> Result<Vec<StreamEntry>, StoreError>;

    /// Whether events of `partition` after `after` may have been lost: trimmed from the
    /// bounded stream, or the stream itself was reset (a Redis restart without
    /// persistence). A reader resuming from `after` must then flush everything it cached.
    async fn events_lost_after(&self, partition: usize, after: EventId)
        -> Result<bool, StoreError>;
}

/// A whole backend (memory, Redis, Redis Cluster): every part above, which the server
/// hands out one part at a time, each to the module that needs it.
#[async_trait]
pub trait KeyStore:
    KeyRecords + DelegationRecords + AuditLog + UsageSink + TokenRevocations + EventLog + RateLedger
{
    /// Whether the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

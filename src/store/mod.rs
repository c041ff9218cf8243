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
pub mod gcra;
pub mod ledger;
pub mod memory;
pub mod packed;
pub mod redis;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::principal::{Environment, KeyKind};

pub use crate::clock::now_ms;

/// A key as stored. Holds the argon2id hash of the secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    /// The tenant a tenant key belongs to; empty for partner and runtime keys.
    #[serde(default)]
    pub tenant_id: String,
    /// The partner a partner key belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner_id: Option<String>,
    /// The internal service a runtime key belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub name: String,
    pub kind: KeyKind,
    pub environment: Environment,
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The token's public head, `<prefix>_<env>_<key_id>`.
    pub token_prefix: String,
    /// argon2id PHC string of the secret (peppered).
    pub hash: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// The key this one replaced (`keys rotate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
    /// Kept beside the record, not in it (`add_usage`); never written by `create`.
    #[serde(skip)]
    pub usage: KeyUsage,
}

/// A key's use, as flushed by the replicas (accurate to their flush interval).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub allowed: u64,
    pub denied: u64,
    pub last_used_at_ms: Option<u64>,
}

/// Usage of one key since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub key_id: String,
    pub allowed: u64,
    pub denied: u64,
    pub last_used_at_ms: u64,
}

/// Usage a store could not write: the deltas of the parts that failed, and the first
/// failure. Every other part of the batch was written.
#[derive(Debug, thiserror::Error)]
#[error("usage of {} key(s) was not written: {error}", .unwritten.len())]
pub struct UsageNotWritten {
    pub unwritten: Vec<UsageDelta>,
    #[source]
    pub error: StoreError,
}

/// `expires_at_ms` of a key that never expires.
pub const NEVER: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

/// Whose keys: the index a key is listed under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Tenant(String),
    Partner(String),
    Service(String),
}

impl Owner {
    /// The index's name in the store (`tenant:<id>`, `partner:<id>`, `service:<name>`).
    pub fn index_name(&self) -> String {
        match self {
            Owner::Tenant(t) => format!("tenant:{t}"),
            Owner::Partner(p) => format!("partner:{p}"),
            Owner::Service(s) => format!("service:{s}"),
        }
    }
}

impl KeyRecord {
    pub fn owner(&self) -> Owner {
        match (&self.partner_id, &self.service) {
            (Some(p), _) => Owner::Partner(p.clone()),
            (None, Some(s)) => Owner::Service(s.clone()),
            (None, None) => Owner::Tenant(self.tenant_id.clone()),
        }
    }

    pub fn status(&self, now_ms: u64) -> KeyStatus {
        if self.revoked_at_ms.is_some() {
            KeyStatus::Revoked
        } else if crate::principal::expired(self.expires_at_ms, now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

/// What happened to a key, as carried on the revocation stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Revoked,
    Deleted,
    /// Scopes, expiry or other fields changed: cached principals are stale.
    Updated,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [EventKind::Revoked, EventKind::Deleted, EventKind::Updated];

    /// The name on the stream (and in logs). The one mapping: the stores write it, and
    /// read it back with `parse`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Revoked => "revoked",
            EventKind::Deleted => "deleted",
            EventKind::Updated => "updated",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// One entry of the revocation stream. `id` orders events (Redis stream ids, `ms-seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationEvent {
    pub id: String,
    pub key_id: String,
    pub kind: EventKind,
    pub at_ms: u64,
}

impl RevocationEvent {
    /// The id as (milliseconds, sequence), for ordering.
    pub fn position(&self) -> EventId {
        EventId::parse(&self.id).unwrap_or_default()
    }
}

/// Which JWTs a revocation matches, all from one issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum TokenTarget {
    /// The token whose `jti` claim is this.
    Jti { jti: String },
    /// Every token of this subject issued before `before_ms`, compared in whole seconds as
    /// `iat` is: a token whose `iat` is in the second of `before_ms` or later passes. A
    /// token without `iat` cannot show it is newer and is matched.
    Subject { subject: String, before_ms: u64 },
}

/// A revocation of JWTs: stored, carried on the stream, held by every replica until
/// `expires_at_ms`, when no token it matches can still be valid (the issuer's
/// `max_token_lifetime` and `leeway` bound that).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevocation {
    /// The issuer's configured name (`jwt.issuers[].name`).
    pub issuer: String,
    #[serde(flatten)]
    pub target: TokenTarget,
    pub at_ms: u64,
    pub expires_at_ms: u64,
}

impl TokenRevocation {
    /// The one name of what this revocation is about: a later revocation of the same
    /// subject (or the same `jti`) replaces it, merged by `merged_with`.
    pub fn rule_key(&self) -> String {
        match &self.target {
            TokenTarget::Jti { jti } => format!("jti\u{1f}{}\u{1f}{jti}", self.issuer),
            TokenTarget::Subject { subject, .. } => {
                format!("sub\u{1f}{}\u{1f}{subject}", self.issuer)
            }
        }
    }

    /// This revocation with `newer` folded in (same `rule_key`): the later cut-off and
    /// the later expiry win, so revoking never un-revokes. `None` if `newer` adds nothing.
    pub fn merged_with(&self, newer: &TokenRevocation) -> Option<TokenRevocation> {
        let mut merged = self.clone();
        let mut changed = false;
        if let (
            TokenTarget::Subject { before_ms, .. },
            TokenTarget::Subject {
                before_ms: newer_before,
                ..
            },
        ) = (&mut merged.target, &newer.target)
        {
            if newer_before > before_ms {
                *before_ms = *newer_before;
                merged.at_ms = newer.at_ms;
                changed = true;
            }
        }
        if newer.expires_at_ms > merged.expires_at_ms {
            merged.expires_at_ms = newer.expires_at_ms;
            changed = true;
        }
        changed.then_some(merged)
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        crate::principal::expired(self.expires_at_ms, now_ms)
    }
}

/// A partner's right to act for a tenant, granted or withdrawn, as read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationEvent {
    pub id: EventId,
    pub partner_id: String,
    pub tenant_id: String,
    pub granted: bool,
    pub at_ms: u64,
}

/// The stream's names for delegation changes.
pub const DELEGATED: &str = "delegated";
pub const UNDELEGATED: &str = "undelegated";

/// One delegation: `partner_id` may act for `tenant_id`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Delegation {
    pub partner_id: String,
    pub tenant_id: String,
}

/// Which delegations to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DelegationsOf {
    Partner(String),
    Tenant(String),
}

impl DelegationsOf {
    /// The delegation between the one listed and `other` (a tenant of the partner, or a
    /// partner of the tenant).
    pub fn with(&self, other: String) -> Delegation {
        match self {
            DelegationsOf::Partner(p) => Delegation {
                partner_id: p.clone(),
                tenant_id: other,
            },
            DelegationsOf::Tenant(t) => Delegation {
                partner_id: other,
                tenant_id: t.clone(),
            },
        }
    }
}

/// How a key's admissions are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateRule {
    /// GCRA: one admission per `interval_ms` sustained, up to `burst` at once.
    Gcra { interval_ms: u64, burst: u32 },
    /// At most `limit` admissions in any `window_ms` (a log of admissions, each counted
    /// from the end of the time it may be spent in).
    Window { limit: u32, window_ms: u64 },
}

/// A reservation asked of a key's rate-limit state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateRequest {
    pub rule: RateRule,
    /// This reservation's id (`RESERVATION_ID_LEN` of base62). A reservation is made at
    /// most once: asked again (a retry whose first answer was lost), the store answers
    /// what it granted the first time, and grants nothing more.
    pub id: String,
    pub want: u32,
    /// How long after the store's clock says "now" the caller may spend what is granted
    /// (a rolling window counts each admission from the end of that time).
    pub spend_ms: u64,
    /// Earlier reservations whose unspent admissions are returned, first. Each is
    /// returned at most once, however often it is named; one the store does not know
    /// (already returned, lost in a failover, or older than `RESERVATION_RECORD_MS`)
    /// returns nothing.
    pub give_back: Vec<GiveBack>,
}

/// Unspent admissions of an earlier reservation, returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiveBack {
    pub id: String,
    /// How many were not spent; `None`: all it granted (its answer never arrived, so
    /// none was spent).
    pub unspent: Option<u32>,
}

/// How long the store remembers a reservation: what it granted, so that a retry gets
/// the same answer and its unspent admissions can be returned once. Past this, a retry
/// or a give-back finds nothing (the store only ever under-admits for it).
pub const RESERVATION_RECORD_MS: u64 = 120_000;

/// The length of a reservation id.
pub const RESERVATION_ID_LEN: usize = 12;

/// The most give-backs one reservation carries.
pub const MAX_GIVE_BACKS: usize = 8;

/// What a reservation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateGrant {
    pub granted: u32,
    /// Admissions that would still fit now, after this grant.
    pub remaining: u32,
    /// With nothing granted: when one would fit again.
    pub retry_after_ms: u64,
    /// When the whole burst would fit again.
    pub full_in_ms: u64,
}

/// The outcome of a lease operation: whether it was done, and how many the key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseResult {
    pub done: bool,
    pub held: u32,
}

/// What to do with a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    /// Take a new lease for `ttl` if fewer than `limit` are held.
    Acquire {
        ttl_ms: u64,
        limit: u32,
    },
    /// Extend a held lease to `ttl` from now.
    Renew {
        ttl_ms: u64,
    },
    Release,
}

/// A token revocation as read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRevocationEvent {
    pub id: EventId,
    pub revocation: TokenRevocation,
}

/// The stream's name for token revocations (beside `EventKind`'s, which name a key).
pub const TOKENS_REVOKED: &str = "tokens_revoked";

/// One entry of the revocation stream, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEntry {
    Event(RevocationEvent),
    Tokens(TokenRevocationEvent),
    Delegation(DelegationEvent),
    /// An entry this version cannot read: a kind from a newer keygate (during a rolling
    /// upgrade), or a corrupt entry. Readers must take the safe side — drop `key_id`, or
    /// everything when no key id can be read — and move past it, never stop at it.
    Unreadable {
        id: EventId,
        key_id: Option<String>,
        /// What was wrong, for the log (no secret is ever written to the stream).
        detail: String,
    },
}

impl StreamEntry {
    /// The event, if this entry could be read as one.
    pub fn event(&self) -> Option<&RevocationEvent> {
        match self {
            StreamEntry::Event(e) => Some(e),
            StreamEntry::Tokens(_)
            | StreamEntry::Delegation(_)
            | StreamEntry::Unreadable { .. } => None,
        }
    }

    pub fn position(&self) -> EventId {
        match self {
            StreamEntry::Event(e) => e.position(),
            StreamEntry::Tokens(t) => t.id,
            StreamEntry::Delegation(d) => d.id,
            StreamEntry::Unreadable { id, .. } => *id,
        }
    }
}

/// A position in the revocation stream: Redis stream id `ms-seq`. `0-0` is the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    pub const START: EventId = EventId { ms: 0, seq: 0 };

    /// Parses `ms-seq` (or a bare `ms`, meaning `ms-0`). Nothing else.
    pub fn parse(s: &str) -> Option<EventId> {
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (s, "0"),
        };
        let digits =
            |x: &str| !x.is_empty() && x.len() <= 20 && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(EventId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A position in every partition of the revocation stream, one `EventId` each, in
/// partition order. Written `ms-seq,ms-seq,…`; with one partition it is just that
/// partition's id, so a single-stream position reads as a cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Cursor(pub Vec<EventId>);

impl Cursor {
    /// The start of `partitions` partitions.
    pub fn start(partitions: usize) -> Cursor {
        Cursor(vec![EventId::START; partitions])
    }

    /// Parses `ms-seq[,ms-seq…]`, whatever the number of partitions.
    pub fn parse(s: &str) -> Option<Cursor> {
        s.split(',')
            .map(|part| EventId::parse(part.trim()))
            .collect::<Option<Vec<_>>>()
            .map(Cursor)
    }

    pub fn partitions(&self) -> usize {
        self.0.len()
    }

    /// The position in `partition`; the start when there is no such partition.
    pub fn at(&self, partition: usize) -> EventId {
        self.0.get(partition).copied().unwrap_or_default()
    }

    /// This cursor moved to `id` in `partition`.
    pub fn with(&self, partition: usize, id: EventId) -> Cursor {
        let mut next = self.clone();
        if let Some(slot) = next.0.get_mut(partition) {
            *slot = id;
        }
        next
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

/// Where every partition of `store`'s stream is now: its newest event ids.
pub async fn latest_cursor(store: &dyn EventLog) -> Result<Cursor, StoreError> {
    let ids =
        futures::future::try_join_all((0..store.partitions()).map(|p| store.latest_event_id(p)))
            .await?;
    Ok(Cursor(ids))
}

/// The fields an update may change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyChange {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// `Some(None)` clears the plan.
    pub plan: Option<Option<String>>,
    pub expires_at_ms: Option<u64>,
}

impl KeyChange {
    pub fn apply(&self, record: &mut KeyRecord) {
        if let Some(n) = &self.name {
            record.name = n.clone();
        }
        if let Some(s) = &self.scopes {
            record.scopes = s.clone();
        }
        if let Some(p) = &self.plan {
            record.plan = p.clone();
        }
        if let Some(e) = self.expires_at_ms {
            record.expires_at_ms = e;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    pub keys: Vec<KeyRecord>,
    /// The last key id of this page when more may follow.
    pub next_after: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not answer: connection refused, timeout, I/O. Retryable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("key id {0} already exists")]
    Conflict(String),
    /// The backend answered with something keygate cannot read. Not retryable.
    #[error("store returned corrupt data: {0}")]
    Corrupt(String),
}

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

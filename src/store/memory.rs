//! The embedded store: everything in one process, for `--dev` and single-node use.
//! Same semantics as the Redis store, including the revocation events.
//!
//! One file over 500 lines because it implements every store trait over one mutex-held
//! state, so that each operation is atomic as the Redis scripts are.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, RwLock};

use super::{
    AuditLog, Delegation, DelegationEvent, DelegationRecords, DelegationSource, DelegationsOf,
    EventId, EventKind, EventLog, KeyChange, KeyPage, KeyRecord, KeyRecords, KeyStore, LeaseOp,
    LeaseResult, Owner, RateGrant, RateRequest, RevocationEvent, StoreError, StreamEntry,
    TokenRevocation, TokenRevocationEvent, TokenRevocations, UsageDelta, UsageNotWritten,
    UsageSink,
};

/// How many revocation events are kept, like the Redis stream's MAXLEN.
const MAX_EVENTS: usize = 100_000;

pub struct MemoryStore {
    state: RwLock<State>,
    appended: Notify,
    max_events: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_max_events(MAX_EVENTS)
    }
}

/// A key's record and the verifier a replica left beside it (`KeyStore::set_verifier`),
/// in one entry: a second map keyed by key id would cost each verified key another
/// ~150 bytes (BENCHMARKS.md, memory).
struct Stored {
    record: KeyRecord,
    verifier: Option<Box<str>>,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Stored>,
    by_owner: BTreeMap<Owner, BTreeSet<String>>,
    /// (partner, tenant), and the same pairs as (tenant, partner).
    delegations: BTreeSet<(String, String)>,
    delegated_tenants: BTreeSet<(String, String)>,
    events: VecDeque<StreamEntry>,
    /// The audit trail, oldest first, bounded like the event log.
    audit: VecDeque<super::audit::AuditEntry>,
    audit_seq: u64,
    /// Each key's rate-limit state.
    rates: HashMap<String, super::ledger::KeyRate>,
    /// The clock rate limits are counted on.
    rate_clock: super::ledger::Clock,
    /// Each key's leases: id → expiry (unix ms).
    leases: HashMap<String, HashMap<String, u64>>,
    /// JWT revocations by `rule_key`.
    token_rules: HashMap<String, TokenRevocation>,
    last_event: EventId,
    /// The newest id trimmed away, like Redis's `max-deleted-entry-id`.
    max_deleted: EventId,
}

impl State {
    fn append_event(&mut self, key_id: &str, kind: EventKind, at_ms: u64, max: usize) {
        let id = self.next_id(at_ms);
        self.push(
            StreamEntry::Event(RevocationEvent {
                id: id.to_string(),
                key_id: key_id.to_owned(),
                kind,
                at_ms,
            }),
            max,
        );
    }

    /// Stream-style ids: milliseconds, then a sequence within the millisecond.
    fn next_id(&mut self, at_ms: u64) -> EventId {
        let last = self.last_event;
        let id = if at_ms > last.ms {
            EventId { ms: at_ms, seq: 0 }
        } else {
            EventId {
                ms: last.ms,
                seq: last.seq + 1,
            }
        };
        self.last_event = id;
        id
    }

    fn push(&mut self, entry: StreamEntry, max: usize) {
        self.events.push_back(entry);
        while self.events.len() > max {
            if let Some(old) = self.events.pop_front() {
                self.max_deleted = old.position();
            }
        }
    }

    fn events_after(&self, after: EventId, count: usize) -> Vec<StreamEntry> {
        // Ids are increasing: binary search for the first one past `after`.
        let start = self.events.partition_point(|e| e.position() <= after);
        self.events
            .iter()
            .skip(start)
            .take(count)
            .cloned()
            .collect()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// A store whose event log keeps only `max_events` (to test trimming).
    pub fn with_max_events(max_events: usize) -> Self {
        MemoryStore {
            state: RwLock::default(),
            appended: Notify::new(),
            max_events: max_events.max(1),
        }
    }

    /// Every retained key event, oldest first.
    pub async fn events(&self) -> Vec<RevocationEvent> {
        let s = self.state.read().await;
        s.events.iter().filter_map(|e| e.event().cloned()).collect()
    }
}

#[async_trait]
impl DelegationSource for MemoryStore {
    async fn is_delegated(&self, partner_id: &str, tenant_id: &str) -> Result<bool, StoreError> {
        let s = self.state.read().await;
        Ok(s.delegations
            .contains(&(partner_id.to_owned(), tenant_id.to_owned())))
    }
}

#[async_trait]
impl super::RateLedger for MemoryStore {
    async fn reserve(&self, key_id: &str, req: &RateRequest) -> Result<RateGrant, StoreError> {
        let mut s = self.state.write().await;
        let now = s.rate_clock.now_ms();
        let rate = s.rates.entry(key_id.to_owned()).or_default();
        let grant = rate.reserve(now, req);
        if rate.is_idle() {
            s.rates.remove(key_id);
        }
        Ok(grant)
    }

    async fn lease(
        &self,
        key_id: &str,
        lease_id: &str,
        op: LeaseOp,
    ) -> Result<LeaseResult, StoreError> {
        let mut s = self.state.write().await;
        let now = super::now_ms();
        let leases = s.leases.entry(key_id.to_owned()).or_default();
        leases.retain(|_, expiry| *expiry > now);
        let done = match op {
            LeaseOp::Acquire { ttl_ms, limit } => {
                let room = leases.len() < limit as usize && !leases.contains_key(lease_id);
                if room {
                    leases.insert(lease_id.to_owned(), now + ttl_ms);
                }
                room
            }
            LeaseOp::Renew { ttl_ms } => match leases.get_mut(lease_id) {
                Some(expiry) => {
                    *expiry = now + ttl_ms;
                    true
                }
                None => false,
            },
            LeaseOp::Release => leases.remove(lease_id).is_some(),
        };
        let held = leases.len() as u32;
        if held == 0 {
            s.leases.remove(key_id);
        }
        Ok(LeaseResult { done, held })
    }
}

#[async_trait]
impl KeyRecords for MemoryStore {
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut s = self.state.write().await;
        if s.keys.contains_key(&record.key_id) {
            return Err(StoreError::Conflict(record.key_id.clone()));
        }
        s.by_owner
            .entry(record.owner())
            .or_default()
            .insert(record.key_id.clone());
        s.keys.insert(
            record.key_id.clone(),
            Stored {
                record: record.clone(),
                verifier: None,
            },
        );
        Ok(())
    }

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self
            .state
            .read()
            .await
            .keys
            .get(key_id)
            .map(|k| k.record.clone()))
    }

    async fn get_verifiable(
        &self,
        key_id: &str,
    ) -> Result<Option<(KeyRecord, Option<String>)>, StoreError> {
        let s = self.state.read().await;
        Ok(s.keys
            .get(key_id)
            .map(|k| (k.record.clone(), k.verifier.as_deref().map(str::to_owned))))
    }

    async fn set_verifier(&self, key_id: &str, verifier: &str) -> Result<bool, StoreError> {
        let mut s = self.state.write().await;
        match s.keys.get_mut(key_id) {
            Some(k) if k.record.revoked_at_ms.is_none() => {
                k.verifier = Some(verifier.into());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list(
        &self,
        owner: &Owner,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        let s = self.state.read().await;
        let Some(ids) = s.by_owner.get(owner) else {
            return Ok(KeyPage {
                keys: Vec::new(),
                next_after: None,
            });
        };
        let range = match after {
            Some(a) => {
                ids.range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
            }
            None => ids.range::<str, _>(..),
        };
        let mut keys: Vec<KeyRecord> = range
            .take(limit + 1)
            .filter_map(|id| s.keys.get(id).map(|k| k.record.clone()))
            .collect();
        let next_after = if keys.len() > limit {
            keys.truncate(limit);
            keys.last().map(|k| k.key_id.clone())
        } else {
            None
        };
        Ok(KeyPage { keys, next_after })
    }

    async fn revoke(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        let mut s = self.state.write().await;
        let Some(k) = s.keys.get_mut(key_id) else {
            return Ok(None);
        };
        if k.record.revoked_at_ms.is_some() {
            return Ok(Some(k.record.clone()));
        }
        k.record.revoked_at_ms = Some(at_ms);
        k.verifier = None;
        let rec = k.record.clone();
        s.append_event(key_id, EventKind::Revoked, at_ms, self.max_events);
        self.appended.notify_waiters();
        Ok(Some(rec))
    }

    async fn update(
        &self,
        key_id: &str,
        change: &KeyChange,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut s = self.state.write().await;
        let Some(k) = s.keys.get_mut(key_id) else {
            return Ok(None);
        };
        change.apply(&mut k.record);
        let rec = k.record.clone();
        s.append_event(key_id, EventKind::Updated, at_ms, self.max_events);
        self.appended.notify_waiters();
        Ok(Some(rec))
    }

    async fn delete(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        let mut s = self.state.write().await;
        let Some(Stored { record: rec, .. }) = s.keys.remove(key_id) else {
            return Ok(None);
        };
        let owner = rec.owner();
        if let Some(ids) = s.by_owner.get_mut(&owner) {
            ids.remove(key_id);
            if ids.is_empty() {
                s.by_owner.remove(&owner);
            }
        }
        s.append_event(key_id, EventKind::Deleted, at_ms, self.max_events);
        self.appended.notify_waiters();
        Ok(Some(rec))
    }
}

#[async_trait]
impl DelegationRecords for MemoryStore {
    async fn set_delegation(
        &self,
        d: &Delegation,
        granted: bool,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut s = self.state.write().await;
        let pair = (d.partner_id.clone(), d.tenant_id.clone());
        let reverse = (d.tenant_id.clone(), d.partner_id.clone());
        let changed = if granted {
            s.delegated_tenants.insert(reverse);
            s.delegations.insert(pair)
        } else {
            s.delegated_tenants.remove(&reverse);
            s.delegations.remove(&pair)
        };
        if changed {
            let id = s.next_id(at_ms);
            s.push(
                StreamEntry::Delegation(DelegationEvent {
                    id,
                    partner_id: d.partner_id.clone(),
                    tenant_id: d.tenant_id.clone(),
                    granted,
                    at_ms,
                }),
                self.max_events,
            );
            self.appended.notify_waiters();
        }
        Ok(changed)
    }

    async fn delegations(&self, of: &DelegationsOf) -> Result<Vec<Delegation>, StoreError> {
        let s = self.state.read().await;
        let (set, first) = match of {
            DelegationsOf::Partner(p) => (&s.delegations, p),
            DelegationsOf::Tenant(t) => (&s.delegated_tenants, t),
        };
        Ok(set
            .range((first.clone(), String::new())..)
            .take_while(|(a, _)| a == first)
            .map(|(_, other)| of.with(other.clone()))
            .collect())
    }
}

#[async_trait]
impl AuditLog for MemoryStore {
    async fn append_audit(&self, entry: &super::audit::AuditEntry) -> Result<(), StoreError> {
        let mut s = self.state.write().await;
        s.audit_seq += 1;
        let mut e = entry.clone();
        e.id = format!("{}-{}", e.at_ms, s.audit_seq);
        s.audit.push_back(e);
        while s.audit.len() > self.max_events {
            s.audit.pop_front();
        }
        Ok(())
    }

    async fn audit(
        &self,
        q: &super::audit::AuditQuery,
    ) -> Result<Vec<super::audit::AuditEntry>, StoreError> {
        let s = self.state.read().await;
        Ok(s.audit
            .iter()
            .filter(|e| q.matches(e))
            .take(q.limit)
            .cloned()
            .collect())
    }
}

#[async_trait]
impl UsageSink for MemoryStore {
    async fn add_usage(&self, batch: &[UsageDelta]) -> Result<(), UsageNotWritten> {
        let mut s = self.state.write().await;
        for d in batch {
            if let Some(Stored { record: rec, .. }) = s.keys.get_mut(&d.key_id) {
                rec.usage.allowed += d.allowed;
                rec.usage.denied += d.denied;
                rec.usage.last_used_at_ms = rec.usage.last_used_at_ms.max(Some(d.last_used_at_ms));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl TokenRevocations for MemoryStore {
    async fn revoke_tokens(
        &self,
        revocation: &TokenRevocation,
    ) -> Result<TokenRevocation, StoreError> {
        let mut s = self.state.write().await;
        let now = revocation.at_ms;
        s.token_rules.retain(|_, r| !r.expired(now));
        let key = revocation.rule_key();
        let stored = match s.token_rules.get(&key) {
            None => revocation.clone(),
            Some(old) => match old.merged_with(revocation) {
                Some(merged) => merged,
                None => return Ok(old.clone()),
            },
        };
        s.token_rules.insert(key, stored.clone());
        let id = s.next_id(revocation.at_ms);
        s.push(
            StreamEntry::Tokens(TokenRevocationEvent {
                id,
                revocation: stored.clone(),
            }),
            self.max_events,
        );
        self.appended.notify_waiters();
        Ok(stored)
    }

    async fn token_revocations(&self, now_ms: u64) -> Result<Vec<TokenRevocation>, StoreError> {
        let s = self.state.read().await;
        Ok(s.token_rules
            .values()
            .filter(|r| !r.expired(now_ms))
            .cloned()
            .collect())
    }
}

#[async_trait]
impl EventLog for MemoryStore {
    async fn latest_event_id(&self, _partition: usize) -> Result<EventId, StoreError> {
        Ok(self.state.read().await.last_event)
    }

    async fn read_events(
        &self,
        _partition: usize,
        after: EventId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let deadline = block.map(|b| tokio::time::Instant::now() + b);
        loop {
            // Register for the wake-up before looking, so an append in between is seen.
            let appended = self.appended.notified();
            let events = self.state.read().await.events_after(after, count);
            let Some(deadline) = deadline else {
                return Ok(events);
            };
            if !events.is_empty() {
                return Ok(events);
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn events_lost_after(
        &self,
        _partition: usize,
        after: EventId,
    ) -> Result<bool, StoreError> {
        let s = self.state.read().await;
        Ok(s.max_deleted > after || s.last_event < after)
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

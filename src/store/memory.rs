//! The embedded store: everything in one process, for `--dev` and single-node use.
//! Same semantics as the Redis store, including the revocation events.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use async_trait::async_trait;
use tokio::sync::RwLock;

use super::{EventKind, KeyPage, KeyRecord, KeyStore, RevocationEvent, StoreError};

/// How many revocation events are kept, like the Redis stream's MAXLEN.
const MAX_EVENTS: usize = 100_000;

#[derive(Default)]
pub struct MemoryStore {
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, KeyRecord>,
    by_tenant: BTreeMap<String, BTreeSet<String>>,
    events: VecDeque<RevocationEvent>,
    last_event: (u64, u64),
}

impl State {
    fn append_event(&mut self, key_id: &str, kind: EventKind, at_ms: u64) {
        // Stream-style ids: milliseconds, then a sequence within the millisecond.
        let (last_ms, last_seq) = self.last_event;
        let id = if at_ms > last_ms {
            (at_ms, 0)
        } else {
            (last_ms, last_seq + 1)
        };
        self.last_event = id;
        self.events.push_back(RevocationEvent {
            id: format!("{}-{}", id.0, id.1),
            key_id: key_id.to_owned(),
            kind,
            at_ms,
        });
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// Every retained event, oldest first.
    pub async fn events(&self) -> Vec<RevocationEvent> {
        self.state.read().await.events.iter().cloned().collect()
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut s = self.state.write().await;
        if s.keys.contains_key(&record.key_id) {
            return Err(StoreError::Conflict(record.key_id.clone()));
        }
        s.by_tenant
            .entry(record.tenant_id.clone())
            .or_default()
            .insert(record.key_id.clone());
        s.keys.insert(record.key_id.clone(), record.clone());
        Ok(())
    }

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.state.read().await.keys.get(key_id).cloned())
    }

    async fn list(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        let s = self.state.read().await;
        let Some(ids) = s.by_tenant.get(tenant_id) else {
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
            .filter_map(|id| s.keys.get(id).cloned())
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
        let Some(rec) = s.keys.get_mut(key_id) else {
            return Ok(None);
        };
        if rec.revoked_at_ms.is_some() {
            return Ok(Some(rec.clone()));
        }
        rec.revoked_at_ms = Some(at_ms);
        let rec = rec.clone();
        s.append_event(key_id, EventKind::Revoked, at_ms);
        Ok(Some(rec))
    }

    async fn delete(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        let mut s = self.state.write().await;
        let Some(rec) = s.keys.remove(key_id) else {
            return Ok(None);
        };
        if let Some(ids) = s.by_tenant.get_mut(&rec.tenant_id) {
            ids.remove(key_id);
            if ids.is_empty() {
                s.by_tenant.remove(&rec.tenant_id);
            }
        }
        s.append_event(key_id, EventKind::Deleted, at_ms);
        Ok(Some(rec))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

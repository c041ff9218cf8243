//! A store the tests can watch and slow down: `CountingStore` (a `MemoryStore` that
//! counts reads and writes and can hold answers back) and `SwitchableFeed` (a revocation
//! feed the test cuts off).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate::store::memory::MemoryStore;
use keygate::store::{
    AuditLog, DelegationRecords, EventId, EventLog, KeyPage, KeyRecord, KeyRecords, KeyStore,
    StoreError, StreamEntry, TokenRevocations, UsageSink,
};
use tokio::sync::{Notify, Semaphore};

use crate::PATIENCE;

/// A `MemoryStore` that counts its calls, and can hold `get` answers back: it reads the
/// record, then waits until `resume` before answering with what it read (a slow store
/// racing a revocation).
#[derive(Default)]
pub struct CountingStore {
    inner: MemoryStore,
    gets: AtomicUsize,
    writes: AtomicUsize,
    gate: Mutex<Option<Arc<Semaphore>>>,
    held: Notify,
    hash: Mutex<Option<String>>,
    positions: Mutex<Option<Arc<Semaphore>>>,
}

impl CountingStore {
    pub fn new() -> Arc<CountingStore> {
        Arc::new(CountingStore::default())
    }

    /// `get` calls so far.
    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// Write calls so far (`create`, `revoke`, `update`, `delete`, `add_usage`, …).
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// From now on, `get` answers only after `resume`.
    pub fn hold_gets(&self) {
        *self.gate.lock().unwrap() = Some(Arc::new(Semaphore::new(0)));
    }

    /// Returns once a `get` has read its record and is being held.
    pub async fn a_get_is_held(&self) {
        tokio::time::timeout(PATIENCE, self.held.notified())
            .await
            .expect("a held get within the patience");
    }

    /// From now on, `get` answers with this stored hash instead of the record's own (as
    /// after the secret was hashed again).
    pub fn replace_hash(&self, phc: String) {
        *self.hash.lock().unwrap() = Some(phc);
    }

    /// Lets one held `get` answer, and goes on holding the others and new ones.
    pub fn release_one(&self) {
        if let Some(gate) = self.gate.lock().unwrap().as_ref() {
            gate.add_permits(1);
        }
    }

    /// From now on, `latest_event_id` (where a revocation follower starts) does not
    /// answer until `answer_positions`.
    pub fn hold_positions(&self) {
        *self.positions.lock().unwrap() = Some(Arc::new(Semaphore::new(0)));
    }

    pub fn answer_positions(&self) {
        if let Some(gate) = self.positions.lock().unwrap().take() {
            gate.add_permits(Semaphore::MAX_PERMITS / 2);
        }
    }

    /// Lets held `get`s answer, and stops holding new ones.
    pub fn resume(&self) {
        if let Some(gate) = self.gate.lock().unwrap().take() {
            gate.add_permits(Semaphore::MAX_PERMITS / 2);
        }
    }
}

#[async_trait::async_trait]
impl keygate::store::DelegationSource for CountingStore {
    async fn is_delegated(&self, partner_id: &str, tenant_id: &str) -> Result<bool, StoreError> {
        self.inner.is_delegated(partner_id, tenant_id).await
    }
}

#[async_trait::async_trait]
impl keygate::store::RateLedger for CountingStore {
    async fn reserve(
        &self,
        key_id: &str,
        req: &keygate::store::RateRequest,
    ) -> Result<keygate::store::RateGrant, StoreError> {
        self.inner.reserve(key_id, req).await
    }

    async fn lease(
        &self,
        key_id: &str,
        lease_id: &str,
        op: keygate::store::LeaseOp,
    ) -> Result<keygate::store::LeaseResult, StoreError> {
        self.inner.lease(key_id, lease_id, op).await
    }
}

#[async_trait::async_trait]
impl KeyRecords for CountingStore {
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.create(record).await
    }

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let mut answer = self.inner.get(key_id).await;
        if let (Ok(Some(record)), Some(phc)) = (&mut answer, self.hash.lock().unwrap().as_ref()) {
            record.hash = phc.clone();
        }
        let gate = self.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            self.held.notify_one();
            // Each permit lets exactly one held `get` answer (`release_one`).
            gate.acquire()
                .await
                .expect("the gate is never closed")
                .forget();
        }
        answer
    }

    /// Counted and held as `get`; while the hash is replaced, no verifier (it vouches for
    /// the secret of the record as stored).
    async fn get_verifiable(
        &self,
        key_id: &str,
    ) -> Result<Option<(KeyRecord, Option<String>)>, StoreError> {
        let replaced = self.hash.lock().unwrap().is_some();
        let verifier = match replaced {
            true => None,
            false => self
                .inner
                .get_verifiable(key_id)
                .await?
                .and_then(|(_, v)| v),
        };
        Ok(self.get(key_id).await?.map(|record| (record, verifier)))
    }

    /// Not counted in `writes`: those are the record writes the tests count.
    async fn set_verifier(&self, key_id: &str, verifier: &str) -> Result<bool, StoreError> {
        self.inner.set_verifier(key_id, verifier).await
    }

    async fn list(
        &self,
        owner: &keygate::store::Owner,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        self.inner.list(owner, after, limit).await
    }

    async fn revoke(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.revoke(key_id, at_ms).await
    }

    async fn update(
        &self,
        key_id: &str,
        change: &keygate::store::KeyChange,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.update(key_id, change, at_ms).await
    }

    async fn delete(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.delete(key_id, at_ms).await
    }
}

#[async_trait::async_trait]
impl DelegationRecords for CountingStore {
    async fn set_delegation(
        &self,
        d: &keygate::store::Delegation,
        granted: bool,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.set_delegation(d, granted, at_ms).await
    }

    async fn delegations(
        &self,
        of: &keygate::store::DelegationsOf,
    ) -> Result<Vec<keygate::store::Delegation>, StoreError> {
        self.inner.delegations(of).await
    }
}

#[async_trait::async_trait]
impl AuditLog for CountingStore {
    async fn append_audit(&self, entry: &keygate::audit::AuditEntry) -> Result<(), StoreError> {
        // The audit trail is not a write these tests count.
        self.inner.append_audit(entry).await
    }

    async fn audit(
        &self,
        q: &keygate::audit::AuditQuery,
    ) -> Result<Vec<keygate::audit::AuditEntry>, StoreError> {
        self.inner.audit(q).await
    }
}

#[async_trait::async_trait]
impl UsageSink for CountingStore {
    async fn add_usage(
        &self,
        batch: &[keygate::store::UsageDelta],
    ) -> Result<(), keygate::store::UsageNotWritten> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.add_usage(batch).await
    }
}

#[async_trait::async_trait]
impl TokenRevocations for CountingStore {
    async fn revoke_tokens(
        &self,
        revocation: &keygate::store::TokenRevocation,
    ) -> Result<keygate::store::TokenRevocation, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.revoke_tokens(revocation).await
    }

    async fn token_revocations(
        &self,
        now_ms: u64,
    ) -> Result<Vec<keygate::store::TokenRevocation>, StoreError> {
        self.inner.token_revocations(now_ms).await
    }
}

#[async_trait::async_trait]
impl EventLog for CountingStore {
    fn partitions(&self) -> usize {
        self.inner.partitions()
    }

    fn key_partition(&self, key_id: &str) -> usize {
        self.inner.key_partition(key_id)
    }

    async fn latest_event_id(&self, partition: usize) -> Result<EventId, StoreError> {
        let gate = self.positions.lock().unwrap().clone();
        if let Some(gate) = gate {
            let _permit = gate.acquire().await.expect("the gate is never closed");
        }
        self.inner.latest_event_id(partition).await
    }

    async fn read_events(
        &self,
        partition: usize,
        after: EventId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        self.inner.read_events(partition, after, count, block).await
    }

    async fn events_lost_after(
        &self,
        partition: usize,
        after: EventId,
    ) -> Result<bool, StoreError> {
        self.inner.events_lost_after(partition, after).await
    }
}

#[async_trait::async_trait]
impl KeyStore for CountingStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

/// A feed that can be cut off on demand, to make "while disconnected" deterministic.
pub struct SwitchableFeed {
    inner: keygate::revocation::StoreFeed,
    pub down: Arc<std::sync::atomic::AtomicBool>,
    /// Only the loading of JWT revocations fails.
    pub revocations_down: Arc<std::sync::atomic::AtomicBool>,
}

impl SwitchableFeed {
    pub fn new(inner: keygate::revocation::StoreFeed) -> SwitchableFeed {
        SwitchableFeed {
            inner,
            down: Arc::default(),
            revocations_down: Arc::default(),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("switched off by the test".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl keygate::revocation::EventFeed for SwitchableFeed {
    async fn start_position(&self) -> Result<keygate::store::Cursor, StoreError> {
        self.inner.start_position().await
    }

    async fn read(
        &self,
        after: &keygate::store::Cursor,
        resync: bool,
    ) -> Result<Vec<keygate::revocation::FeedEntry>, StoreError> {
        if let Err(e) = self.check() {
            // As a real feed would, take a moment to fail.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(e);
        }
        self.inner.read(after, resync).await
    }

    async fn token_revocations(&self) -> Result<Vec<keygate::store::TokenRevocation>, StoreError> {
        self.check()?;
        if self.revocations_down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("switched off by the test".into()));
        }
        self.inner.token_revocations().await
    }
}

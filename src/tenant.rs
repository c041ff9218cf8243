//! The effective tenant of a request: which tenant the caller acts for, given its
//! credential and the `X-Tenant-Id` header, and the partner delegations that decide it
//! for partner keys.
//!
//! - A tenant key (or a JWT) acts only in its own tenant.
//! - A partner key acts for the tenant it names, if that tenant is delegated to it, or
//!   (where the route does not require a tenant) as itself, for no tenant.
//! - A runtime key, accepted only on internal routes, acts for the tenant it names, or
//!   none: the internal service that holds it is trusted to say.
//!
//! Delegations are asked of the store and remembered (`cache.ttl`), per (partner,
//! tenant) pair. A change of a delegation, from this replica's admin API or from the
//! revocation stream, forgets that pair's answer only (events lost: every answer), and
//! an answer of that pair read while the change happened is read again, so no replica
//! lets a partner into a tenant after the withdrawal reached it. Concurrent checks of a
//! pair not remembered share one store read (single flight, as in `cache.rs`), so a
//! change sends one read per pair and replica to the store, not one per request.
//!
//! A route's tenant requirement (`TenantRule`) is defined here, where it is applied; the
//! policy's settings name it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use crate::decision::DenyReason;
use crate::principal::{KeyKind, Principal};
use crate::store::{DelegationSource, StoreError};

/// Whether a route needs the tenant header (`policy.routes[].tenant`, or the policy's
/// `require_tenant_header`): a setting the policy holds and this module applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantRule {
    Required,
    Optional,
}

/// Why no tenant could be settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantFailure {
    Deny(DenyReason),
    /// The delegation could not be read.
    Unavailable,
}

impl From<DenyReason> for TenantFailure {
    fn from(r: DenyReason) -> Self {
        TenantFailure::Deny(r)
    }
}

/// The tenant the request acts for (`None`: a partner or runtime key acting as itself),
/// or why it may not.
pub async fn resolve(
    principal: &Principal,
    rule: TenantRule,
    header: Option<&str>,
    delegations: &Delegations,
) -> Result<Option<String>, TenantFailure> {
    let requested = match header.map(str::trim) {
        None | Some("") => {
            if rule == TenantRule::Required {
                return Err(DenyReason::TenantRequired.into());
            }
            None
        }
        Some(raw) => Some(parse_tenant(raw).ok_or(DenyReason::InvalidTenant)?),
    };
    match (principal.kind, requested) {
        (KeyKind::Partner, None) | (KeyKind::Runtime, None) => Ok(None),
        (KeyKind::Runtime, Some(t)) => Ok(Some(t)),
        (KeyKind::Partner, Some(t)) => {
            let partner = principal.partner_id.as_deref().unwrap_or("");
            match delegations.allows(partner, &t).await {
                Ok(true) => Ok(Some(t)),
                Ok(false) => Err(DenyReason::TenantForbidden.into()),
                Err(e) => {
                    tracing::warn!(partner, error = %e, "cannot read a delegation: store unavailable");
                    Err(TenantFailure::Unavailable)
                }
            }
        }
        (KeyKind::Tenant, Some(t)) if *t != *principal.tenant_id => {
            Err(DenyReason::TenantForbidden.into())
        }
        (KeyKind::Tenant, _) => Ok(Some(principal.tenant_id.to_string())),
    }
}

/// What this replica remembers of partners' delegations.
pub struct Delegations {
    store: Arc<dyn DelegationSource>,
    /// `partner \x1f tenant` → delegated.
    known: moka::sync::Cache<String, bool>,
    /// Store reads in flight, one per pair: concurrent misses of a pair wait for it.
    /// Changes and the caching of an answer take this lock.
    flights: Mutex<HashMap<String, InFlight>>,
    next_flight: AtomicU64,
}

struct InFlight {
    id: u64,
    answer: watch::Receiver<Shared>,
    /// The pair changed (or everything was forgotten) while it was read: what was read
    /// may predate the change, and is read again.
    stale: bool,
}

/// An answer shared between the reader of a pair and its waiters.
type Shared = Option<Result<bool, Arc<StoreError>>>;

/// Ends a flight however its reader stops: its waiters see the answer, or (a cancelled
/// reader) the sender dropped, and one of them reads instead.
struct Flight<'a> {
    delegations: &'a Delegations,
    pair: &'a str,
    id: u64,
    answer: watch::Sender<Shared>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = lock(&self.delegations.flights);
        // The answer's caching may have ended this flight already, and a newer one for
        // the pair begun: that one is not ours to end.
        if flights.get(self.pair).is_some_and(|f| f.id == self.id) {
            flights.remove(self.pair);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under this lock can be left half-changed by a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn pair(partner: &str, tenant: &str) -> String {
    format!("{partner}\u{1f}{tenant}")
}

impl Delegations {
    pub fn new(store: Arc<dyn DelegationSource>, ttl: Duration) -> Self {
        Delegations {
            store,
            known: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            flights: Mutex::default(),
            next_flight: AtomicU64::new(0),
        }
    }

    /// Whether `partner` may act for `tenant` now. Concurrent first checks of one pair
    /// share one store read.
    pub async fn allows(&self, partner: &str, tenant: &str) -> Result<bool, StoreError> {
        let pair = pair(partner, tenant);
        if let Some(known) = self.known.get(&pair) {
            return Ok(known);
        }
        loop {
            let joined = {
                let mut flights = lock(&self.flights);
                match flights.get(&pair) {
                    Some(f) => Err(f.answer.clone()),
                    None => {
                        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
                        let (tx, rx) = watch::channel(None);
                        let flight = InFlight {
                            id,
                            answer: rx,
                            stale: false,
                        };
                        flights.insert(pair.clone(), flight);
                        Ok(Flight {
                            delegations: self,
                            pair: &pair,
                            id,
                            answer: tx,
                        })
                    }
                }
            };
            match joined {
                Ok(flight) => {
                    // A flight that ended between our miss and taking the lead has cached
                    // its answer already.
                    let value = match self.known.get(&pair) {
                        Some(known) => Ok(known),
                        None => self.read(&flight, partner, tenant).await,
                    };
                    flight.answer.send_replace(Some(value.clone()));
                    return value.map_err(|e| owned(&e));
                }
                Err(mut rx) => {
                    if let Ok(answer) = rx.wait_for(Option::is_some).await {
                        let value = answer.clone().expect("waited for an answer");
                        return value.map_err(|e| owned(&e));
                    }
                    // The reader was cancelled before it answered: read (or join) anew.
                }
            }
        }
    }

    /// Reads the pair until no change of it overtook the read, then caches the answer
    /// and ends the flight, under the lock that changes take: a check that starts after
    /// a change never joins a read that started before it.
    async fn read(
        &self,
        flight: &Flight<'_>,
        partner: &str,
        tenant: &str,
    ) -> Result<bool, Arc<StoreError>> {
        loop {
            let delegated = self
                .store
                .is_delegated(partner, tenant)
                .await
                .map_err(Arc::new)?;
            let mut flights = lock(&self.flights);
            let ours = flights
                .get_mut(flight.pair)
                .filter(|f| f.id == flight.id)
                .expect("a flight stays registered until it ends");
            if std::mem::take(&mut ours.stale) {
                // A change of the pair happened while this was read.
                continue;
            }
            flights.remove(flight.pair);
            self.known.insert(flight.pair.to_owned(), delegated);
            return Ok(delegated);
        }
    }

    /// `partner`'s delegation for `tenant` changed: forget that pair's answer, here and
    /// in any read of it in flight. Every other pair's answer stays.
    pub fn changed(&self, partner: &str, tenant: &str) {
        let pair = pair(partner, tenant);
        let mut flights = lock(&self.flights);
        if let Some(f) = flights.get_mut(&pair) {
            f.stale = true;
        }
        self.known.invalidate(&pair);
    }

    /// Changes may have been missed (events were lost): forget every answer.
    pub fn forget_all(&self) {
        let mut flights = lock(&self.flights);
        for f in flights.values_mut() {
            f.stale = true;
        }
        self.known.invalidate_all();
    }
}

/// A shared store error, for each caller that waited for it.
fn owned(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
    }
}

/// A tenant id in canonical form (lower-case hyphenated UUID), or `None`.
pub fn parse_tenant(raw: &str) -> Option<String> {
    let id = uuid::Uuid::try_parse(raw).ok()?;
    Some(id.hyphenated().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::Environment;
    use crate::store::memory::MemoryStore;
    use crate::store::{Delegation, DelegationRecords};
    use std::sync::atomic::AtomicUsize;

    const T: &str = "9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11";
    const OTHER: &str = "0b3f6a2e-8c11-4c1e-9d55-9f1c7d4e2b7a";

    fn key(kind: KeyKind) -> Principal {
        let mut p = Principal::new(T.into(), "key:x".into(), kind, Environment::Live, vec![]);
        if kind != KeyKind::Tenant {
            p.tenant_id = Box::default();
        }
        if kind == KeyKind::Partner {
            p.partner_id = Some("acme-partner".into());
        }
        p
    }

    fn delegations() -> (Arc<MemoryStore>, Delegations) {
        let store = Arc::new(MemoryStore::new());
        let d = Delegations::new(store.clone(), Duration::from_secs(60));
        (store, d)
    }

    fn own(t: &str) -> Result<Option<String>, TenantFailure> {
        Ok(Some(t.to_owned()))
    }

    fn denied(r: DenyReason) -> Result<Option<String>, TenantFailure> {
        Err(TenantFailure::Deny(r))
    }

    #[tokio::test]
    async fn tenant_key_acts_only_in_its_own_tenant() {
        let (_, d) = delegations();
        let p = key(KeyKind::Tenant);
        let opt = TenantRule::Optional;
        assert_eq!(resolve(&p, opt, None, &d).await, own(T));
        assert_eq!(resolve(&p, opt, Some(T), &d).await, own(T));
        let upper = T.to_uppercase();
        assert_eq!(resolve(&p, opt, Some(&upper), &d).await, own(T));
        assert_eq!(
            resolve(&p, opt, Some(OTHER), &d).await,
            denied(DenyReason::TenantForbidden)
        );
    }

    #[tokio::test]
    async fn header_rules() {
        let (_, d) = delegations();
        let p = key(KeyKind::Tenant);
        let (req, opt) = (TenantRule::Required, TenantRule::Optional);
        assert_eq!(
            resolve(&p, req, None, &d).await,
            denied(DenyReason::TenantRequired)
        );
        assert_eq!(
            resolve(&p, req, Some(" "), &d).await,
            denied(DenyReason::TenantRequired)
        );
        assert_eq!(
            resolve(&p, opt, Some("acme"), &d).await,
            denied(DenyReason::InvalidTenant)
        );
        assert_eq!(
            resolve(&p, req, Some(&format!("{T},{T}")), &d).await,
            denied(DenyReason::InvalidTenant)
        );
        assert_eq!(resolve(&p, req, Some(T), &d).await, own(T));
    }

    #[tokio::test]
    async fn a_partner_acts_for_delegated_tenants_only_or_as_itself() {
        let (store, d) = delegations();
        let p = key(KeyKind::Partner);
        let opt = TenantRule::Optional;
        assert_eq!(
            resolve(&p, opt, Some(T), &d).await,
            denied(DenyReason::TenantForbidden)
        );
        let grant = Delegation {
            partner_id: "acme-partner".into(),
            tenant_id: T.into(),
        };
        store.set_delegation(&grant, true, 1).await.unwrap();
        // "Not delegated" was remembered: a change must make it forgotten.
        d.changed("acme-partner", T);
        assert_eq!(resolve(&p, opt, Some(T), &d).await, own(T));
        assert_eq!(
            resolve(&p, opt, Some(OTHER), &d).await,
            denied(DenyReason::TenantForbidden)
        );
        assert_eq!(resolve(&p, opt, None, &d).await, Ok(None));
        assert_eq!(
            resolve(&p, TenantRule::Required, None, &d).await,
            denied(DenyReason::TenantRequired)
        );
        store.set_delegation(&grant, false, 2).await.unwrap();
        d.changed("acme-partner", T);
        assert_eq!(
            resolve(&p, opt, Some(T), &d).await,
            denied(DenyReason::TenantForbidden)
        );
    }

    /// A `MemoryStore` that counts delegation reads, and can hold their answers back: a
    /// read looks the delegation up, then waits for a permit before answering what it
    /// found (a slow store racing a change).
    #[derive(Default)]
    struct SlowDelegations {
        inner: MemoryStore,
        reads: AtomicUsize,
        gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    }

    impl SlowDelegations {
        fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }

        fn hold(&self) {
            *lock(&self.gate) = Some(Arc::new(tokio::sync::Semaphore::new(0)));
        }

        /// Lets every held read answer, and holds no more.
        fn release(&self) {
            if let Some(gate) = lock(&self.gate).take() {
                gate.close();
            }
        }

        async fn grant(&self, partner: &str, tenant: &str, granted: bool) {
            let d = Delegation {
                partner_id: partner.into(),
                tenant_id: tenant.into(),
            };
            self.inner.set_delegation(&d, granted, 1).await.unwrap();
        }
    }

    #[async_trait::async_trait]
    impl DelegationSource for SlowDelegations {
        async fn is_delegated(&self, partner: &str, tenant: &str) -> Result<bool, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let answer = self.inner.is_delegated(partner, tenant).await;
            let gate = lock(&self.gate).clone();
            if let Some(gate) = gate {
                // Closed by `release`: never granted a permit, only an end to waiting.
                let _ = gate.acquire().await;
            }
            answer
        }
    }

    const P: &str = "acme-partner";

    fn slow() -> (Arc<SlowDelegations>, Delegations) {
        let store = Arc::new(SlowDelegations::default());
        let d = Delegations::new(store.clone(), Duration::from_secs(60));
        (store, d)
    }

    #[tokio::test]
    async fn withdrawing_one_tenant_keeps_the_partners_other_answers_without_a_store_read() {
        let (store, d) = slow();
        store.grant(P, T, true).await;
        store.grant(P, OTHER, true).await;
        assert!(d.allows(P, T).await.unwrap());
        assert!(d.allows(P, OTHER).await.unwrap());
        assert!(!d.allows("other-partner", T).await.unwrap());
        assert_eq!(store.reads(), 3);

        store.grant(P, T, false).await;
        d.changed(P, T);
        assert!(d.allows(P, OTHER).await.unwrap());
        assert!(!d.allows("other-partner", T).await.unwrap());
        assert_eq!(
            store.reads(),
            3,
            "the other pairs' answers are still remembered"
        );
        assert!(!d.allows(P, T).await.unwrap(), "the withdrawn pair");
        assert_eq!(store.reads(), 4);

        // Changes may have been missed: nothing is remembered.
        d.forget_all();
        assert!(d.allows(P, OTHER).await.unwrap());
        assert_eq!(store.reads(), 5);
    }

    #[tokio::test]
    async fn concurrent_first_checks_of_a_pair_make_one_store_read() {
        let (store, d) = slow();
        store.grant(P, T, true).await;
        store.hold();
        let mut checks = std::pin::pin!(futures::future::join_all((0..16).map(|_| d.allows(P, T))));
        // One poll starts all sixteen: the first reads (and is held), the others wait.
        assert!(futures::poll!(checks.as_mut()).is_pending());
        assert_eq!(store.reads(), 1);
        store.release();
        let answers = checks.await;
        assert!(answers.iter().all(|a| matches!(a, Ok(true))), "{answers:?}");
        assert_eq!(store.reads(), 1);
        assert!(d.allows(P, T).await.unwrap());
        assert_eq!(store.reads(), 1, "remembered");
    }

    #[tokio::test]
    async fn a_withdrawal_during_a_read_of_its_pair_makes_the_read_read_again() {
        let (store, d) = slow();
        store.grant(P, T, true).await;
        store.grant(P, OTHER, true).await;
        store.hold();
        let mut check = std::pin::pin!(d.allows(P, T));
        assert!(futures::poll!(check.as_mut()).is_pending());
        // The held read found the delegation; it is withdrawn before the read answers.
        store.grant(P, T, false).await;
        d.changed(P, T);
        // A change of another pair does not concern this read.
        d.changed(P, OTHER);
        let mut late = std::pin::pin!(d.allows(P, T));
        assert!(futures::poll!(late.as_mut()).is_pending());
        store.release();
        assert!(!check.await.unwrap());
        assert!(!late.await.unwrap());
        assert_eq!(store.reads(), 2, "read once more, and once only");
        assert!(!d.allows(P, T).await.unwrap());
        assert_eq!(store.reads(), 2, "the second answer is remembered");
    }

    #[tokio::test]
    async fn a_check_waiting_for_a_cancelled_read_reads_itself() {
        let (store, d) = slow();
        store.grant(P, T, true).await;
        store.hold();
        let mut first = Box::pin(d.allows(P, T));
        assert!(futures::poll!(first.as_mut()).is_pending());
        let mut second = std::pin::pin!(d.allows(P, T));
        assert!(futures::poll!(second.as_mut()).is_pending());
        assert_eq!(store.reads(), 1, "the second waits for the first");
        drop(first); // its request timed out
        assert!(futures::poll!(second.as_mut()).is_pending());
        assert_eq!(store.reads(), 2, "the second reads");
        store.release();
        assert!(second.await.unwrap());
    }

    #[tokio::test]
    async fn a_runtime_key_acts_for_the_tenant_it_names_or_none() {
        let (_, d) = delegations();
        let p = key(KeyKind::Runtime);
        assert_eq!(
            resolve(&p, TenantRule::Optional, Some(OTHER), &d).await,
            own(OTHER)
        );
        assert_eq!(resolve(&p, TenantRule::Optional, None, &d).await, Ok(None));
    }
}

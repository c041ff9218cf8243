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

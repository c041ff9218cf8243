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
//! Delegations are asked of the store and remembered (`cache.ttl`); a change to any
//! delegation, from this replica's admin API or from the revocation stream, forgets
//! everything remembered, and an answer read while such a change happened is read again,
//! so no replica lets a partner into a tenant after the withdrawal reached it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::TenantRule;
use crate::decision::DenyReason;
use crate::principal::{KeyKind, Principal};
use crate::store::{KeyStore, StoreError};

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
        (KeyKind::Tenant, Some(t)) if t != principal.tenant_id => {
            Err(DenyReason::TenantForbidden.into())
        }
        (KeyKind::Tenant, _) => Ok(Some(principal.tenant_id.clone())),
    }
}

/// What this replica remembers of partners' delegations.
pub struct Delegations {
    store: Arc<dyn KeyStore>,
    /// `partner \x1f tenant` → delegated.
    known: moka::sync::Cache<String, bool>,
    /// Bumped by every change (under `changing`); an answer read across one is not kept.
    epoch: AtomicU64,
    changing: Mutex<()>,
}

impl Delegations {
    pub fn new(store: Arc<dyn KeyStore>, ttl: Duration) -> Self {
        Delegations {
            store,
            known: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            epoch: AtomicU64::new(0),
            changing: Mutex::new(()),
        }
    }

    /// Whether `partner` may act for `tenant` now.
    pub async fn allows(&self, partner: &str, tenant: &str) -> Result<bool, StoreError> {
        let key = format!("{partner}\u{1f}{tenant}");
        if let Some(known) = self.known.get(&key) {
            return Ok(known);
        }
        loop {
            let started = self.epoch.load(Ordering::Acquire);
            let delegated = self.store.is_delegated(partner, tenant).await?;
            let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
            if self.epoch.load(Ordering::Acquire) == started {
                self.known.insert(key, delegated);
                return Ok(delegated);
            }
            // A delegation changed while this was read: what was read may predate it.
        }
    }

    /// Some delegation changed (or events were lost): forget every answer.
    pub fn changed(&self) {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.known.invalidate_all();
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
    use crate::store::Delegation;

    const T: &str = "9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11";
    const OTHER: &str = "0b3f6a2e-8c11-4c1e-9d55-9f1c7d4e2b7a";

    fn key(kind: KeyKind) -> Principal {
        let mut p = Principal::new(T.into(), "key:x".into(), kind, Environment::Live, vec![]);
        if kind != KeyKind::Tenant {
            p.tenant_id = String::new();
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
        d.changed();
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
        d.changed();
        assert_eq!(
            resolve(&p, opt, Some(T), &d).await,
            denied(DenyReason::TenantForbidden)
        );
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

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

use crate::decision::{Decision, DenyReason, Unavailable};
use crate::principal::{KeyKind, Principal};
use crate::store::{DelegationSource, StoreError};
use crate::telemetry::ErrorChain;

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

/// A request whose tenant cannot be settled is denied, or undecided when the store could
/// not be asked: never allowed, and an outage never denied.
impl From<TenantFailure> for Decision {
    fn from(f: TenantFailure) -> Decision {
        match f {
            TenantFailure::Deny(reason) => Decision::deny(reason),
            TenantFailure::Unavailable => Decision::Unavailable(Unavailable::STORE),
        }
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
    match settle(principal, rule, header)? {
        Settled::Tenant(t) => Ok(t),
        Settled::IfDelegated { partner, tenant } => {
            if delegations.delegated(partner, &tenant).await? {
                Ok(Some(tenant))
            } else {
                Err(DenyReason::TenantForbidden.into())
            }
        }
    }
}

/// `resolve` on what is known now, without the store: `None` where it would have to
/// read a delegation this replica does not remember (the module inside Envoy, which
/// then hands the request to the service).
pub fn resolve_known(
    principal: &Principal,
    rule: TenantRule,
    header: Option<&str>,
    delegations: &Delegations,
) -> Option<Result<Option<String>, TenantFailure>> {
    Some(match settle(principal, rule, header) {
        Err(reason) => Err(reason.into()),
        Ok(Settled::Tenant(t)) => Ok(t),
        Ok(Settled::IfDelegated { partner, tenant }) => {
            if delegations.known(partner, &tenant)? {
                Ok(Some(tenant))
            } else {
                Err(DenyReason::TenantForbidden.into())
            }
        }
    })
}

/// A tenant settled from the request alone, or the delegation that settles it.
enum Settled<'p> {
    Tenant(Option<String>),
    IfDelegated { partner: &'p str, tenant: String },
}

fn settle<'p>(
    principal: &'p Principal,
    rule: TenantRule,
    header: Option<&str>,
) -> Result<Settled<'p>, DenyReason> {
    let requested = match header.map(str::trim) {
        None | Some("") => {
            if rule == TenantRule::Required {
                return Err(DenyReason::TenantRequired);
            }
            None
        }
        Some(raw) => Some(parse_tenant(raw).ok_or(DenyReason::InvalidTenant)?),
    };
    match (principal.kind, requested) {
        (KeyKind::Partner, None) | (KeyKind::Runtime, None) => Ok(Settled::Tenant(None)),
        (KeyKind::Runtime, Some(t)) => Ok(Settled::Tenant(Some(t))),
        (KeyKind::Partner, Some(tenant)) => Ok(Settled::IfDelegated {
            partner: principal.partner_id.as_deref().unwrap_or(""),
            tenant,
        }),
        (KeyKind::Tenant, Some(t)) if *t != *principal.tenant_id => {
            Err(DenyReason::TenantForbidden)
        }
        (KeyKind::Tenant, _) => Ok(Settled::Tenant(Some(principal.tenant_id.to_string()))),
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
    /// Changes applied so far (any pair, and flushes), counted under `flights`: what an
    /// answer learned from elsewhere is checked against (`learn`).
    changes: AtomicU64,
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
            changes: AtomicU64::new(0),
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
                    return value.map_err(|e| StoreError::clone(&e));
                }
                Err(mut rx) => {
                    if let Ok(answer) = rx.wait_for(Option::is_some).await {
                        let value = answer.clone().expect("waited for an answer");
                        return value.map_err(|e| StoreError::clone(&e));
                    }
                    // The reader was cancelled before it answered: read (or join) anew.
                }
            }
        }
    }

    /// `allows`, as a request's stage asks it: a store failure is logged with its cause
    /// and answered `TenantFailure::Unavailable`.
    pub async fn delegated(&self, partner: &str, tenant: &str) -> Result<bool, TenantFailure> {
        self.allows(partner, tenant).await.map_err(|e| {
            tracing::warn!(event = "tenant.delegation_unavailable", partner, error = %ErrorChain(&e), "cannot read a delegation: store unavailable");
            TenantFailure::Unavailable
        })
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
        self.changes.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = flights.get_mut(&pair) {
            f.stale = true;
        }
        self.known.invalidate(&pair);
    }

    /// Changes may have been missed (events were lost): forget every answer.
    pub fn forget_all(&self) {
        let mut flights = lock(&self.flights);
        self.changes.fetch_add(1, Ordering::Relaxed);
        for f in flights.values_mut() {
            f.stale = true;
        }
        self.known.invalidate_all();
    }

    /// What this replica remembers of the pair, without asking the store.
    pub fn known(&self, partner: &str, tenant: &str) -> Option<bool> {
        self.known.get(&pair(partner, tenant))
    }

    /// The count of changes applied so far: taken before asking someone else about a
    /// pair (`learn`).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Remembers that `partner` may act for `tenant`, as another replica answered a
    /// request asked when `changes()` was `since` — unless any change was applied here
    /// since then (it may be a withdrawal the answer predates). Whether it was kept.
    pub fn learn(&self, partner: &str, tenant: &str, since: u64) -> bool {
        let _flights = lock(&self.flights);
        if self.changes.load(Ordering::Relaxed) != since {
            return false;
        }
        self.known.insert(pair(partner, tenant), true);
        true
    }
}

/// A tenant id in canonical form (lower-case hyphenated UUID), or `None`.
pub fn parse_tenant(raw: &str) -> Option<String> {
    let id = uuid::Uuid::try_parse(raw).ok()?;
    Some(id.hyphenated().to_string())
}

#[cfg(test)]
mod tests;

//! Plans enforced: each key's rate limit, exact across replicas, and its concurrent-session
//! leases.
//!
//! The rate limit is GCRA, its state in the store (Redis: under the key's own hash tag,
//! on Redis's clock). A replica does not ask the store per request: it reserves a budget
//! of admissions in one atomic call and spends it locally, for at most
//! `rate_limits.reservation_ttl`. The budget shrinks as the key nears its limit — an
//! eighth of what still fits, at most `rate_limits.max_reservation` — down to one per
//! request at the edge; what was not spent when it lapses goes back with the next
//! reservation. So replicas together never admit more than the store granted, and a key
//! far from its limit costs one store call per budget, not per request. A refusal is
//! remembered until the store said one would fit again, so a key far over its limit
//! costs one store call per interval and replica, not per request either. Under-admission
//! is bounded by what replicas hold unspent (an eighth of what fits, each), for at most
//! the reservation's life and then only until GCRA's own refill covers it.
//!
//! It must not guess: a store that cannot be asked is `rate_limits.on_store_error`
//! (UNAVAILABLE by default, or an allow that is counted and logged).

pub mod gcra;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{OnStoreError, PlanConfig, PolicyConfig, RateLimitConfig};
use crate::decision::RateInfo;
use crate::principal::{CredentialKind, Environment, Principal};
use crate::store::{KeyStore, LeaseOp, RateRequest, StoreError};
use crate::telemetry::metrics;

/// A plan, compiled.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: Arc<str>,
    pub per_minute: u32,
    pub burst: u32,
    pub interval_ms: u64,
    pub concurrent_sessions: Option<u32>,
    /// This plan's `keygate_rate_limit_decisions_total` series, looked up once.
    admitted: prometheus::IntCounter,
    limited: prometheus::IntCounter,
}

impl Plan {
    fn new(name: &str, c: &PlanConfig) -> Plan {
        let decisions = &metrics().rate_limit_decisions;
        Plan {
            admitted: decisions.with_label_values(&[name, "admitted"]),
            limited: decisions.with_label_values(&[name, "limited"]),
            name: Arc::from(name),
            per_minute: c.requests_per_minute,
            burst: c.burst.unwrap_or(c.requests_per_minute),
            // Whole milliseconds: rounding up never admits more than the plan.
            interval_ms: 60_000u64.div_ceil(u64::from(c.requests_per_minute)),
            concurrent_sessions: c.concurrent_sessions,
        }
    }
}

/// What the limiter says of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No plan applies (a JWT, or a key without a plan and no default).
    Unlimited,
    Admitted(RateInfo),
    Limited(RateInfo),
    /// The store could not be asked and `on_store_error` is `unavailable`.
    Unavailable,
}

/// Why a route's per-request lease was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLeaseRefused {
    /// Every concurrent session of the plan is in use.
    Full,
    /// The store could not be asked and `on_store_error` is `unavailable`.
    Unavailable,
}

/// A key's budget on this replica.
#[derive(Default)]
struct Budget {
    left: u32,
    until: Option<Instant>,
    /// What still fitted in the store after the last reservation.
    remaining: u32,
    full_in_ms: u64,
    /// After a refusal: nothing fits before this, so nothing is asked before it either
    /// (a key far over its plan would otherwise cost a store call per request).
    refused_until: Option<Instant>,
}

pub struct Limiter {
    store: Arc<dyn KeyStore>,
    plans: HashMap<String, Plan>,
    default_live: Option<Plan>,
    default_test: Option<Plan>,
    cfg: RateLimitConfig,
    budgets: moka::sync::Cache<String, Arc<tokio::sync::Mutex<Budget>>>,
}

/// Why a lease call did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("the key's plan has no concurrent sessions")]
    NoSessions,
    #[error("all {limit} concurrent sessions of plan {plan} are in use")]
    Full { plan: Arc<str>, limit: u32 },
    #[error("no such lease (released, or expired)")]
    Unknown,
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl Limiter {
    pub fn new(store: Arc<dyn KeyStore>, policy: &PolicyConfig, cfg: &RateLimitConfig) -> Self {
        let plans: HashMap<String, Plan> = policy
            .plans
            .iter()
            .map(|(name, c)| (name.clone(), Plan::new(name, c)))
            .collect();
        let default = |name: &Option<String>| name.as_ref().and_then(|n| plans.get(n)).cloned();
        Limiter {
            default_live: default(&policy.default_plans.live),
            default_test: default(&policy.default_plans.test),
            plans,
            store,
            cfg: cfg.clone(),
            budgets: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(60))
                .build(),
        }
    }

    /// The lease a route with `lease_ttl` takes for one request of `p`: `Ok(Some(id))`,
    /// `Ok(None)` when there is nothing to count (the plan has no concurrent sessions, or
    /// the store is down and `on_store_error` allows), `Err(Verdict::Limited)` when every
    /// session is in use, `Err(Verdict::Unavailable)`.
    pub async fn route_lease(
        &self,
        p: &Principal,
        ttl: Duration,
    ) -> Result<Option<String>, RouteLeaseRefused> {
        match self.acquire(p, ttl).await {
            Ok(id) => Ok(Some(id)),
            Err(LeaseError::NoSessions) => Ok(None),
            Err(LeaseError::Full { .. } | LeaseError::Unknown) => Err(RouteLeaseRefused::Full),
            Err(LeaseError::Unavailable(e)) => {
                metrics().rate_limit_store_errors.inc();
                tracing::warn!(error = %e, "cannot take the route's lease: store unavailable");
                match self.cfg.on_store_error {
                    OnStoreError::Allow => Ok(None),
                    OnStoreError::Unavailable => Err(RouteLeaseRefused::Unavailable),
                }
            }
        }
    }

    /// The plan that applies to `p`: its own, else its environment's default. A session
    /// token spends its parent key's; JWTs have none in this version.
    pub fn plan_of(&self, p: &Principal) -> Option<&Plan> {
        if p.credential == CredentialKind::Jwt {
            return None;
        }
        match p.plan.as_deref().and_then(|n| self.plans.get(n)) {
            Some(plan) => Some(plan),
            None => match p.environment {
                Environment::Live => self.default_live.as_ref(),
                Environment::Test => self.default_test.as_ref(),
            },
        }
    }

    /// Admits one request of `p`, or says why not; counted by plan.
    pub async fn check(&self, p: &Principal) -> Verdict {
        let (Some(plan), Some(key_id)) = (self.plan_of(p), p.key_id.as_deref()) else {
            return Verdict::Unlimited;
        };
        let verdict = self.spend(plan, key_id).await;
        match &verdict {
            Verdict::Admitted(_) => plan.admitted.inc(),
            Verdict::Limited(_) => plan.limited.inc(),
            Verdict::Unlimited | Verdict::Unavailable => {}
        }
        verdict
    }

    /// One admission from the key's budget on this replica, reserving anew when it is
    /// spent or lapsed.
    async fn spend(&self, plan: &Plan, key_id: &str) -> Verdict {
        let m = metrics();
        let budget = self.budgets.get_with_by_ref(key_id, Arc::default);
        let mut b = budget.lock().await;
        let now = Instant::now();
        if let Some(until) = b.refused_until.filter(|u| now < *u) {
            return limited(plan, (until - now).as_millis() as u64, b.full_in_ms);
        }
        let fresh = b.until.is_some_and(|until| now < until);
        if fresh && b.left > 0 {
            b.left -= 1;
            return Verdict::Admitted(info(plan, b.remaining + b.left, b.full_in_ms));
        }
        // Spend what fits in an eighth of what is left, down to one at the edge.
        let want = (b.remaining / 8).clamp(1, self.cfg.max_reservation);
        let give_back = b.left;
        let req = RateRequest {
            interval_ms: plan.interval_ms,
            burst: plan.burst,
            want,
            give_back,
        };
        let grant = match self.store.reserve(key_id, &req).await {
            Ok(g) => g,
            Err(e) => return self.store_failed(plan, key_id, &e),
        };
        m.rate_limit_reservations.inc();
        if give_back > 0 {
            m.rate_limit_returned.inc_by(u64::from(give_back));
        }
        b.remaining = grant.remaining;
        b.full_in_ms = grant.full_in_ms;
        if grant.granted == 0 {
            b.left = 0;
            b.until = None;
            b.refused_until = Some(now + Duration::from_millis(grant.retry_after_ms));
            return limited(plan, grant.retry_after_ms, grant.full_in_ms);
        }
        b.left = grant.granted - 1;
        b.until = Some(now + self.cfg.reservation_ttl);
        b.refused_until = None;
        Verdict::Admitted(info(plan, b.remaining + b.left, b.full_in_ms))
    }

    fn store_failed(&self, plan: &Plan, key_id: &str, e: &StoreError) -> Verdict {
        metrics().rate_limit_store_errors.inc();
        match self.cfg.on_store_error {
            OnStoreError::Unavailable => {
                tracing::warn!(key_id, plan = %plan.name, error = %e, "cannot check the rate limit: store unavailable");
                Verdict::Unavailable
            }
            OnStoreError::Allow => {
                tracing::warn!(key_id, plan = %plan.name, error = %e, "rate limit not checked (store unavailable); allowed as rate_limits.on_store_error says");
                Verdict::Unlimited
            }
        }
    }

    /// Takes one of `p`'s concurrent sessions for `ttl`; the lease id names the key.
    pub async fn acquire(&self, p: &Principal, ttl: Duration) -> Result<String, LeaseError> {
        let key_id = p.key_id.as_deref().ok_or(LeaseError::NoSessions)?;
        let plan = self.plan_of(p).ok_or(LeaseError::NoSessions)?;
        let limit = plan.concurrent_sessions.ok_or(LeaseError::NoSessions)?;
        let lease_id = format!("{key_id}.{}", crate::apikey::token::random_base62(22));
        let op = LeaseOp::Acquire {
            ttl_ms: ttl.as_millis() as u64,
            limit,
        };
        let r = self
            .store
            .lease(key_id, &lease_id, op)
            .await
            .map_err(|e| LeaseError::Unavailable(e.to_string()))?;
        if r.done {
            metrics()
                .lease_operations
                .with_label_values(&["acquired"])
                .inc();
            Ok(lease_id)
        } else {
            metrics()
                .lease_operations
                .with_label_values(&["refused"])
                .inc();
            Err(LeaseError::Full {
                plan: plan.name.clone(),
                limit,
            })
        }
    }

    /// Renews (`Some(ttl)`) or releases (`None`) a lease by its id.
    pub async fn renew_or_release(
        &self,
        lease_id: &str,
        ttl: Option<Duration>,
    ) -> Result<(), LeaseError> {
        let Some((key_id, _)) = lease_id
            .split_once('.')
            .filter(|(k, _)| crate::apikey::token::valid_key_id(k))
        else {
            return Err(LeaseError::Unknown);
        };
        let op = match ttl {
            Some(t) => LeaseOp::Renew {
                ttl_ms: t.as_millis() as u64,
            },
            None => LeaseOp::Release,
        };
        let r = self
            .store
            .lease(key_id, lease_id, op)
            .await
            .map_err(|e| LeaseError::Unavailable(e.to_string()))?;
        let what = if ttl.is_some() { "renewed" } else { "released" };
        if r.done {
            metrics().lease_operations.with_label_values(&[what]).inc();
            Ok(())
        } else {
            Err(LeaseError::Unknown)
        }
    }
}

/// A refusal: nothing fits for `retry_ms`.
fn limited(plan: &Plan, retry_ms: u64, full_in_ms: u64) -> Verdict {
    let mut i = info(plan, 0, full_in_ms);
    i.retry_after = Some(retry_ms.div_ceil(1000).max(1));
    Verdict::Limited(i)
}

fn info(plan: &Plan, remaining: u32, full_in_ms: u64) -> RateInfo {
    RateInfo {
        limit: plan.per_minute,
        remaining: remaining.min(plan.burst),
        reset: full_in_ms.div_ceil(1000),
        retry_after: None,
    }
}

//! Plans enforced: each key's rate limit, exact across replicas, and its concurrent-session
//! leases.
//!
//! A plan counts by GCRA (a rate with a burst) or a rolling window (at most N in any 60 s),
//! its state in the store (Redis: under the key's own hash tag, on Redis's clock; see
//! `store/ledger.rs` and `reserve.lua`). A replica does not ask the store per request: it
//! reserves a budget of admissions in one atomic call and spends it locally, for at most
//! `rate_limits.reservation_ttl`. The budget shrinks as the key nears its limit — an
//! eighth of what still fits, at most `rate_limits.max_reservation` — down to one per
//! request at the edge; what was not spent when it lapses goes back with the next
//! reservation. So replicas together never admit more than the store granted, and a key
//! far from its limit costs one store call per budget, not per request. Nor does a busy
//! key's request wait for that call: far from its limit (an eighth of what fits is more
//! than `max_reservation`), the next budget is asked for in the background once half of
//! the current one is spent, so a replica then holds at most two. A refusal is
//! remembered until the store said one would fit again, so a key far over its limit
//! costs one store call per interval and replica, not per request either. Under-admission
//! is bounded by what replicas hold unspent (an eighth of what fits, each), for at most
//! the reservation's life and then only until GCRA's own refill covers it.
//!
//! Every reservation has an id, and a give-back names the reservation it returns: the
//! store applies each once, so a reply lost to a timeout or a call sent twice never
//! returns budget twice. A call that failed is not spent, and its reservation is returned
//! whole with the next call (if it was made at all).
//!
//! It must not guess: a store that cannot be asked is `rate_limits.on_store_error`
//! (UNAVAILABLE by default, or an allow that is counted and logged).
//!
//! Its setting (`rate_limits`) is `config.rs`; the plans it enforces are the policy's
//! (`policy::PlanConfig`).

mod budget;
mod config;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

// tokio's clock: a test can pause and advance it.
use tokio::time::Instant;

use crate::decision::{Decision, Denial, DenyReason, RateInfo, Unavailable};
use crate::policy::{PlanAlgorithm, PlanConfig, PolicyConfig};
use crate::principal::{CredentialKind, Environment, Principal};
use crate::store::{
    GiveBack, LeaseOp, RateLedger, RateRequest, RateRule, StoreError, RESERVATION_ID_LEN,
};
use crate::telemetry::{metrics, ErrorChain};

use budget::{Held, KeyBudget, Spent};
pub use config::{OnStoreError, RateLimitConfig};

/// A plan, compiled.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: Arc<str>,
    pub per_minute: u32,
    pub burst: u32,
    pub rule: RateRule,
    pub concurrent_sessions: Option<u32>,
    /// This plan's `keygate_rate_limit_decisions_total` series, looked up once.
    admitted: prometheus::IntCounter,
    limited: prometheus::IntCounter,
}

impl Plan {
    fn new(name: &str, c: &PlanConfig) -> Plan {
        let decisions = &metrics().rate_limit_decisions;
        let burst = c.burst.unwrap_or(c.requests_per_minute);
        let rule = match c.algorithm {
            PlanAlgorithm::Gcra => RateRule::Gcra {
                // Whole milliseconds: rounding up never admits more than the plan.
                interval_ms: 60_000u64.div_ceil(u64::from(c.requests_per_minute)),
                burst,
            },
            PlanAlgorithm::RollingWindow => RateRule::Window {
                limit: c.requests_per_minute,
                window_ms: 60_000,
            },
        };
        Plan {
            admitted: decisions.with_label_values(&[name, "admitted"]),
            limited: decisions.with_label_values(&[name, "limited"]),
            name: Arc::from(name),
            per_minute: c.requests_per_minute,
            burst,
            rule,
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

impl Verdict {
    /// What an admitted request's answer carries of its plan (`None`: unlimited), or why
    /// it was not admitted.
    pub fn admission(self) -> Result<Option<RateInfo>, NotAdmitted> {
        match self {
            Verdict::Unlimited => Ok(None),
            Verdict::Admitted(info) => Ok(Some(info)),
            Verdict::Limited(info) => Err(NotAdmitted::Limited(info)),
            Verdict::Unavailable => Err(NotAdmitted::Unavailable),
        }
    }
}

/// Why the limiter did not admit a request (`Verdict::admission`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAdmitted {
    Limited(RateInfo),
    /// The store could not be asked and `on_store_error` is `unavailable`.
    Unavailable,
}

impl From<NotAdmitted> for Decision {
    fn from(refused: NotAdmitted) -> Decision {
        match refused {
            NotAdmitted::Limited(info) => Decision::Deny(Denial::rate_limited(info)),
            NotAdmitted::Unavailable => Decision::Unavailable(Unavailable::STORE),
        }
    }
}

/// Why a route's per-request lease was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLeaseRefused {
    /// Every concurrent session of the plan is in use.
    Full,
    /// The store could not be asked and `on_store_error` is `unavailable`.
    Unavailable,
}

impl From<RouteLeaseRefused> for Decision {
    fn from(refused: RouteLeaseRefused) -> Decision {
        match refused {
            RouteLeaseRefused::Full => Decision::deny(DenyReason::RateLimited),
            RouteLeaseRefused::Unavailable => Decision::Unavailable(Unavailable::STORE),
        }
    }
}

pub struct Limiter {
    store: Arc<dyn RateLedger>,
    plans: HashMap<String, Plan>,
    default_live: Option<Plan>,
    default_test: Option<Plan>,
    cfg: RateLimitConfig,
    budgets: moka::sync::Cache<String, Arc<KeyBudget>>,
}

/// Why a lease call did not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    #[error("the key's plan has no concurrent sessions")]
    NoSessions,
    #[error("all {limit} concurrent sessions of plan {plan} are in use")]
    Full { plan: Arc<str>, limit: u32 },
    #[error("no such lease (released, or expired)")]
    Unknown,
    /// The store could not be asked (its error says what failed, and why).
    #[error(transparent)]
    Unavailable(#[from] StoreError),
}

impl Limiter {
    pub fn new(store: Arc<dyn RateLedger>, policy: &PolicyConfig, cfg: &RateLimitConfig) -> Self {
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
                tracing::warn!(event = "ratelimit.lease_unavailable", error = %ErrorChain(&e), "cannot take the route's lease: store unavailable");
                match self.cfg.on_store_error {
                    OnStoreError::Allow => Ok(None),
                    OnStoreError::Unavailable => Err(RouteLeaseRefused::Unavailable),
                }
            }
        }
    }

    /// The plan that applies to `p`: its own, else its environment's default. A session
    /// token spends its parent key's; JWTs have none in this version.
    /// The plan `p` spends and the key it is counted under; `None`: unlimited, and
    /// `check` needs no store.
    pub fn limited<'p>(&self, p: &'p Principal) -> Option<(&Plan, &'p str)> {
        Some((self.plan_of(p)?, p.key_id.as_deref()?))
    }

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
        let Some((plan, key_id)) = self.limited(p) else {
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
        let budget = self.budgets.get_with_by_ref(key_id, Arc::default);
        if let Some(verdict) = self.spend_held(&budget, plan, key_id) {
            return verdict;
        }
        // Nothing held: one store call at a time for this key. Whoever waited for it may
        // find the budget it brought.
        let _refill = budget.refill.lock().await;
        if let Some(verdict) = self.spend_held(&budget, plan, key_id) {
            return verdict;
        }
        match reserve(
            &*self.store,
            &budget,
            key_id,
            plan,
            &self.cfg,
            Instant::now(),
            false,
        )
        .await
        {
            Ok(verdict) => verdict,
            Err(e) => self.store_failed(plan, key_id, &e),
        }
    }

    /// One admission from what this replica holds for the key, if it decides the request.
    fn spend_held(&self, budget: &Arc<KeyBudget>, plan: &Plan, key_id: &str) -> Option<Verdict> {
        let spent = budget.state().spend(plan, Instant::now(), &self.cfg);
        if let Spent::Admitted {
            reserve_ahead: true,
            ..
        } = spent
        {
            self.reserve_ahead(budget, plan, key_id);
        }
        spent.verdict(plan)
    }

    /// Asks for the key's next budget in the background. Skipped if a store call for the
    /// key is under way already (that one brings a budget); a failure is left to the next
    /// request that finds nothing to spend, which asks again and answers for it.
    fn reserve_ahead(&self, budget: &Arc<KeyBudget>, plan: &Plan, key_id: &str) {
        let (store, budget, cfg) = (self.store.clone(), budget.clone(), self.cfg.clone());
        let (plan, key_id) = (plan.clone(), key_id.to_owned());
        tokio::spawn(async move {
            if let Ok(_refill) = budget.refill.try_lock() {
                let now = Instant::now();
                if let Err(e) = reserve(&*store, &budget, &key_id, &plan, &cfg, now, true).await {
                    tracing::debug!(event = "ratelimit.reservation_failed", key_id, error = %ErrorChain(&e), "could not reserve a budget ahead; the next request that needs one asks again");
                }
            }
            budget.state().reserving_ahead = false;
        });
    }

    fn store_failed(&self, plan: &Plan, key_id: &str, e: &StoreError) -> Verdict {
        metrics().rate_limit_store_errors.inc();
        match self.cfg.on_store_error {
            OnStoreError::Unavailable => {
                tracing::warn!(event = "ratelimit.unavailable", key_id, plan = %plan.name, error = %ErrorChain(&e), "cannot check the rate limit: store unavailable");
                Verdict::Unavailable
            }
            OnStoreError::Allow => {
                tracing::warn!(event = "ratelimit.allowed_unchecked", key_id, plan = %plan.name, error = %ErrorChain(&e), "rate limit not checked (store unavailable); allowed as rate_limits.on_store_error says");
                Verdict::Unlimited
            }
        }
    }

    /// Takes one of `p`'s concurrent sessions for `ttl`; the lease id names the key.
    pub async fn acquire(&self, p: &Principal, ttl: Duration) -> Result<String, LeaseError> {
        let key_id = p.key_id.as_deref().ok_or(LeaseError::NoSessions)?;
        let plan = self.plan_of(p).ok_or(LeaseError::NoSessions)?;
        let limit = plan.concurrent_sessions.ok_or(LeaseError::NoSessions)?;
        let lease_id = format!("{key_id}.{}", crate::secret::random_base62(22));
        let op = LeaseOp::Acquire {
            ttl_ms: ttl.as_millis() as u64,
            limit,
        };
        let r = self.store.lease(key_id, &lease_id, op).await?;
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
        let r = self.store.lease(key_id, lease_id, op).await?;
        let what = if ttl.is_some() { "renewed" } else { "released" };
        if r.done {
            metrics().lease_operations.with_label_values(&[what]).inc();
            Ok(())
        } else {
            Err(LeaseError::Unknown)
        }
    }
}

/// Asks the store for a key's next budget (the caller holds `budget.refill`): an eighth
/// of what still fits, at least 1 and at most `max_reservation`, with what this replica
/// gives back. What is granted becomes the current budget, one admission spent from it
/// at once (for the request that asked); or, `ahead`, the next budget, none spent.
/// `now`: taken before the call, so the budget lapses no later than the spending time
/// the store counted.
async fn reserve(
    store: &dyn RateLedger,
    budget: &KeyBudget,
    key_id: &str,
    plan: &Plan,
    cfg: &RateLimitConfig,
    now: Instant,
    ahead: bool,
) -> Result<Verdict, StoreError> {
    let id = crate::secret::random_base62(RESERVATION_ID_LEN);
    let req = {
        let b = budget.state();
        RateRequest {
            rule: plan.rule,
            id: id.clone(),
            want: (b.remaining / 8).clamp(1, cfg.max_reservation),
            spend_ms: cfg.reservation_ttl.as_millis() as u64,
            give_back: b.returns.clone(),
        }
    };
    let answer = store.reserve(key_id, &req).await;
    let mut b = budget.state();
    let grant = match answer {
        Ok(g) => g,
        Err(e) => {
            // Made or not, it is not spent: returned whole with the next call.
            b.give_back(GiveBack { id, unspent: None });
            return Err(e);
        }
    };
    let m = metrics();
    m.rate_limit_reservations.inc();
    let returned: u32 = req.give_back.iter().filter_map(|g| g.unspent).sum();
    if returned > 0 {
        m.rate_limit_returned.inc_by(u64::from(returned));
    }
    // Only what this call carried: others may have been retired while it was under way.
    b.returns
        .retain(|r| !req.give_back.iter().any(|g| g.id == r.id));
    b.remaining = grant.remaining;
    b.full_in_ms = grant.full_in_ms;
    if grant.granted == 0 {
        b.refused_until = Some(now + Duration::from_millis(grant.retry_after_ms));
        return Ok(limited(plan, grant.retry_after_ms, grant.full_in_ms));
    }
    b.refused_until = None;
    let taken = u32::from(!ahead);
    let held = Held {
        id,
        granted: grant.granted,
        left: grant.granted - taken,
        until: now + cfg.reservation_ttl,
    };
    let slot = if ahead { &mut b.next } else { &mut b.current };
    if let Some(replaced) = slot.replace(held) {
        b.retire(replaced);
    }
    Ok(Verdict::Admitted(info(
        plan,
        b.remaining + b.held(),
        b.full_in_ms,
    )))
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

#[cfg(test)]
mod tests;

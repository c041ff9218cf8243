//! Plans enforced: each key's rate limit, exact across replicas, and its concurrent-session
//! leases.
//!
//! A plan counts by GCRA (a rate with a burst) or a rolling window (at most N in any 60 s),
//! its state in the store (Redis: under the key's own hash tag, on Redis's clock; see
//! `ledger.rs` and `reserve.lua`). A replica does not ask the store per request: it
//! reserves a budget of admissions in one atomic call and spends it locally, for at most
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
//! Every reservation has an id, and a give-back names the reservation it returns: the
//! store applies each once, so a reply lost to a timeout or a call sent twice never
//! returns budget twice. A call that failed is not spent, and its reservation is returned
//! whole with the next call (if it was made at all).
//!
//! It must not guess: a store that cannot be asked is `rate_limits.on_store_error`
//! (UNAVAILABLE by default, or an allow that is counted and logged).

pub mod gcra;
pub mod ledger;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

// tokio's clock: a test can pause and advance it.
use tokio::time::Instant;

use crate::config::{OnStoreError, PlanAlgorithm, PlanConfig, PolicyConfig, RateLimitConfig};
use crate::decision::RateInfo;
use crate::principal::{CredentialKind, Environment, Principal};
use crate::store::{
    GiveBack, KeyStore, LeaseOp, RateRequest, RateRule, StoreError, MAX_GIVE_BACKS,
    RESERVATION_ID_LEN,
};
use crate::telemetry::metrics;

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
    /// The reservation being spent.
    current: Option<Held>,
    /// Reservations to return with the next store call, each by its id (the store applies
    /// each once): the unspent rest of spent ones, and all of those whose answer never
    /// arrived or never reached enough replicas. Kept until a call that carried them
    /// succeeds; at most `MAX_GIVE_BACKS` (dropping one only under-admits).
    returns: Vec<GiveBack>,
    /// What still fitted in the store after the last reservation.
    remaining: u32,
    full_in_ms: u64,
    /// After a refusal: nothing fits before this, so nothing is asked before it either
    /// (a key far over its plan would otherwise cost a store call per request).
    refused_until: Option<Instant>,
}

/// A reservation a replica spends.
struct Held {
    id: String,
    left: u32,
    /// Measured from before the store was asked: never later than the end of the spending
    /// time the store counted (`RateRequest::spend_ms` after its own now).
    until: Instant,
}

impl Budget {
    fn give_back(&mut self, g: GiveBack) {
        if self.returns.len() >= MAX_GIVE_BACKS {
            self.returns.remove(0);
        }
        self.returns.push(g);
    }
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
        if let Some(held) = b.current.as_mut().filter(|h| now < h.until && h.left > 0) {
            held.left -= 1;
            let left = held.left;
            return Verdict::Admitted(info(plan, b.remaining + left, b.full_in_ms));
        }
        // Spend what fits in an eighth of what is left, down to one at the edge.
        let want = (b.remaining / 8).clamp(1, self.cfg.max_reservation);
        if let Some(spent) = b.current.take() {
            // Even with nothing left: the store forgets the reservation.
            b.give_back(GiveBack {
                id: spent.id,
                unspent: Some(spent.left),
            });
        }
        let id = crate::apikey::token::random_base62(RESERVATION_ID_LEN);
        let req = RateRequest {
            rule: plan.rule,
            id: id.clone(),
            want,
            spend_ms: self.cfg.reservation_ttl.as_millis() as u64,
            give_back: b.returns.clone(),
        };
        let grant = match self.store.reserve(key_id, &req).await {
            Ok(g) => g,
            Err(e) => {
                // Made or not, it is not spent: returned whole with the next call.
                b.give_back(GiveBack { id, unspent: None });
                return self.store_failed(plan, key_id, &e);
            }
        };
        m.rate_limit_reservations.inc();
        let returned: u32 = b.returns.iter().filter_map(|g| g.unspent).sum();
        if returned > 0 {
            m.rate_limit_returned.inc_by(u64::from(returned));
        }
        b.returns.clear();
        b.remaining = grant.remaining;
        b.full_in_ms = grant.full_in_ms;
        if grant.granted == 0 {
            b.refused_until = Some(now + Duration::from_millis(grant.retry_after_ms));
            return limited(plan, grant.retry_after_ms, grant.full_in_ms);
        }
        b.current = Some(Held {
            id,
            left: grant.granted - 1,
            until: now + self.cfg.reservation_ttl,
        });
        b.refused_until = None;
        Verdict::Admitted(info(plan, b.remaining + grant.granted - 1, b.full_in_ms))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PlanConfig;
    use crate::principal::KeyKind;
    use crate::store::memory::MemoryStore;

    /// Replicas `n` of one deployment: limiters over one embedded store, on tokio's clock
    /// (paused by the test: the store counts on it too).
    fn replicas(n: usize, plan: PlanConfig) -> Vec<Limiter> {
        let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
        let policy = PolicyConfig {
            plans: [("p".to_owned(), plan)].into(),
            ..PolicyConfig::default()
        };
        (0..n)
            .map(|_| Limiter::new(store.clone(), &policy, &RateLimitConfig::default()))
            .collect()
    }

    fn key() -> Principal {
        let mut p = Principal::new(
            "t".into(),
            "key:k".into(),
            KeyKind::Tenant,
            Environment::Live,
            vec![],
        );
        p.key_id = Some("kkkkkkkkkkkkkkkk".into());
        p.plan = Some("p".into());
        p
    }

    /// Loads to run: (seed, most ms between bursts of requests, most requests in one).
    /// Some spend a reservation over several moments, some in one; each is one fixed run.
    const LOADS: [(u64, u64, u64); 4] = [
        (0x2545_f491_4f6c_dd1d, 40, 2),
        (0x9e37_79b9_7f4a_7c15, 10, 2),
        (0x0123_4567_89ab_cdef, 120, 6),
        (0x5851_f42d_4c95_7f2d, 700, 4),
    ];

    /// Requests of one key spread over `limiters`, a few at a time at uneven moments for
    /// five minutes of tokio's (paused) clock; the ms at which each was admitted.
    async fn admissions(limiters: &[Limiter], (seed, step_ms, burst): (u64, u64, u64)) -> Vec<u64> {
        let start = Instant::now();
        let p = key();
        let mut admitted = Vec::new();
        // A fixed pseudo-random sequence (xorshift): the same run every time.
        let mut seed = seed;
        let mut next = |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(300) {
            tokio::time::advance(Duration::from_millis(next(step_ms))).await;
            for _ in 0..next(burst + 1) {
                i += 1;
                match limiters[i % limiters.len()].check(&p).await {
                    Verdict::Admitted(_) => admitted.push(start.elapsed().as_millis() as u64),
                    Verdict::Limited(_) => {}
                    other => panic!("{other:?}"),
                }
            }
        }
        admitted
    }

    /// The most admissions within any `window_ms` (half-open) of `times` (sorted).
    fn most_in_any_window(times: &[u64], window_ms: u64) -> usize {
        (0..times.len())
            .map(|i| times[i..].partition_point(|t| *t < times[i] + window_ms))
            .max()
            .unwrap_or(0)
    }

    /// A plan of `requests_per_minute`, no burst, no sessions.
    fn per_minute(requests_per_minute: u32, algorithm: PlanAlgorithm) -> PlanConfig {
        PlanConfig {
            requests_per_minute,
            algorithm,
            burst: None,
            concurrent_sessions: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_together_admit_at_most_a_rolling_windows_limit_in_any_minute() {
        for load in LOADS {
            let limiters = replicas(3, per_minute(20, PlanAlgorithm::RollingWindow));
            let times = admissions(&limiters, load).await;
            assert_eq!(
                most_in_any_window(&times, 60_000),
                20,
                "{load:?}: {times:?}"
            );
            // And no fewer: the limit again each time the window has passed (and the
            // spending time of what it counted, 250 ms), under load all the time.
            assert!(
                times.len() >= 20 * 4,
                "{load:?}: {} in five minutes",
                times.len()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_gcra_plan_admits_up_to_its_burst_and_its_rate_in_any_minute() {
        for load in LOADS {
            let limiters = replicas(3, per_minute(20, PlanAlgorithm::Gcra));
            let times = admissions(&limiters, load).await;
            // The burst (20) and one every 3 s: what `docs/configuration.md` says a GCRA
            // plan allows in any minute, the reservations' 250 ms of spending included.
            let most = most_in_any_window(&times, 60_000);
            assert!(most <= 20 + (60_000 + 250) / 3_000, "{load:?}: {most}");
            assert!(
                most > 20,
                "{load:?}: {most}, more than the per-minute number"
            );
        }
    }
}

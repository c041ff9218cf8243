use std::future::Future;

use super::*;
use crate::policy::PlanConfig;
use crate::principal::KeyKind;
use crate::store::memory::MemoryStore;

/// Replicas `n` of one deployment: limiters over one embedded store, on tokio's clock
/// (paused by the test: the store counts on it too).
fn replicas(n: usize, plan: PlanConfig) -> Vec<Limiter> {
    let store: Arc<dyn RateLedger> = Arc::new(MemoryStore::new());
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

/// A ledger whose reservations each wait for the test to let them through.
struct GatedLedger {
    inner: MemoryStore,
    calls: std::sync::atomic::AtomicUsize,
    gate: tokio::sync::Semaphore,
}

impl GatedLedger {
    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl RateLedger for GatedLedger {
    async fn reserve(
        &self,
        key_id: &str,
        req: &RateRequest,
    ) -> Result<crate::store::RateGrant, StoreError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.gate.acquire().await.expect("never closed").forget();
        self.inner.reserve(key_id, req).await
    }

    async fn lease(
        &self,
        key_id: &str,
        lease_id: &str,
        op: LeaseOp,
    ) -> Result<crate::store::LeaseResult, StoreError> {
        self.inner.lease(key_id, lease_id, op).await
    }
}

fn gated(plan: PlanConfig) -> (Arc<GatedLedger>, Limiter) {
    let ledger = Arc::new(GatedLedger {
        inner: MemoryStore::new(),
        calls: Default::default(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let policy = PolicyConfig {
        plans: [("p".to_owned(), plan)].into(),
        ..PolicyConfig::default()
    };
    let limiter = Limiter::new(ledger.clone(), &policy, &RateLimitConfig::default());
    (ledger, limiter)
}

/// The check's verdict if it is decided without waiting for anything (the store).
fn at_once(limiter: &Limiter, p: &Principal) -> Option<Verdict> {
    let mut check = std::pin::pin!(limiter.check(p));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match check.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Lets one reservation through and returns once the budget it brought is held.
async fn let_one_through(ledger: &GatedLedger, limiter: &Limiter) {
    ledger.gate.add_permits(1);
    let budget = limiter
        .budgets
        .get(key().key_id.as_deref().unwrap())
        .unwrap();
    drop(budget.refill.lock().await);
}

#[tokio::test(start_paused = true)]
async fn a_busy_key_far_from_its_limit_never_waits_for_the_store() {
    let (ledger, limiter) = gated(per_minute(10_000_000, PlanAlgorithm::Gcra));
    let max = RateLimitConfig::default().max_reservation;
    let p = key();
    // The first request learns what fits (it asks for one), the second takes a whole
    // budget: both wait for the store.
    ledger.gate.add_permits(2);
    for _ in 0..2 {
        assert!(matches!(limiter.check(&p).await, Verdict::Admitted(_)));
    }
    assert_eq!(ledger.calls(), 2);
    // Past half of the budget, a request asks for the next one in the background.
    let mut spent = 0;
    while ledger.calls() == 2 {
        let verdict = at_once(&limiter, &p).expect("decided without the store");
        assert!(matches!(verdict, Verdict::Admitted(_)), "{verdict:?}");
        spent += 1;
        assert!(
            spent < max,
            "no reservation ahead while spending the budget"
        );
        tokio::task::yield_now().await;
    }
    let_one_through(&ledger, &limiter).await;
    // The rest of the budget and all of the next one: no request waits.
    let budget = limiter.budgets.get(p.key_id.as_deref().unwrap()).unwrap();
    let held = budget.state().held();
    assert!(held > max, "{held} held: the next budget is a whole one");
    for _ in 0..held {
        let verdict = at_once(&limiter, &p).expect("decided without the store");
        assert!(matches!(verdict, Verdict::Admitted(_)), "{verdict:?}");
        tokio::task::yield_now().await;
    }
    // All spent, and the reservation asked for ahead of this one is still held by the
    // store: now a request waits.
    assert_eq!(ledger.calls(), 4);
    assert_eq!(at_once(&limiter, &p), None);
    let_one_through(&ledger, &limiter).await;
    assert!(at_once(&limiter, &p).is_some_and(|v| matches!(v, Verdict::Admitted(_))));
}

#[tokio::test(start_paused = true)]
async fn near_its_limit_a_key_reserves_only_when_it_needs_to() {
    // 240 fit: an eighth of them (29) is less than the most a replica reserves (512).
    let (ledger, limiter) = gated(per_minute(240, PlanAlgorithm::Gcra));
    let p = key();
    ledger.gate.add_permits(2);
    for _ in 0..2 {
        assert!(matches!(limiter.check(&p).await, Verdict::Admitted(_)));
    }
    let budget = limiter.budgets.get(p.key_id.as_deref().unwrap()).unwrap();
    let held = budget.state().held();
    assert_eq!(held, 239 / 8 - 1);
    for _ in 0..held {
        assert!(at_once(&limiter, &p).is_some_and(|v| matches!(v, Verdict::Admitted(_))));
        tokio::task::yield_now().await;
    }
    // Nothing asked ahead: the replica held no more than an eighth of what fits.
    assert_eq!(ledger.calls(), 2);
    assert_eq!(at_once(&limiter, &p), None);
}

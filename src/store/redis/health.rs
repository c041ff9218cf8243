//! Failing fast while one Redis refuses connections: `Health` marks the store down,
//! probes until Redis answers again, brings the connections back, and keeps its metrics.
//! It decides whether calls may go out; it never sends store commands itself (only the
//! probe's PING). The probe's doubling wait is two lines; backon's `ExponentialBuilder`
//! would not make them fewer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::conn::Client;
use super::failure::{outage, RedisFailure};
use crate::store::StoreError;

/// The first wait between two probes of a Redis marked down; it doubles up to
/// `PROBE_MAX_WAIT`.
const PROBE_FIRST_WAIT: Duration = Duration::from_millis(50);
const PROBE_MAX_WAIT: Duration = Duration::from_secs(1);

/// Fails fast while one Redis is known to refuse connections.
///
/// Without this a killed Redis costs every call a full `store.timeout`: the connection
/// manager waits out its reconnection backoff before it gives up, and the check behind the
/// call outlives Envoy's own timeout (so `rate_limits.on_store_error: allow` never gets to
/// allow). A refused connection marks the store down (a reset one, once a new connection
/// is refused too: `Health::check`); while it is down every call
/// fails at once (UNAVAILABLE, counted in `keygate_store_fast_failures_total`, and in
/// `keygate_store_errors_total` as every failed call is), and one background probe
/// connects anew, at once and then on a bounded backoff (`PROBE_FIRST_WAIT` doubling to
/// `PROBE_MAX_WAIT`). When it gets a PONG, the connections opened before are brought back
/// (each reconnected) and then the store is marked up: the first call after that goes
/// through as usual. A Redis that accepts and does not answer is not refusing: each call
/// still waits `store.timeout` for it.
///
/// A Redis Cluster is never marked down as a whole: a refused node is one master of
/// several, whose slots fail over, and the cluster client routes around it itself.
pub(super) struct Health {
    /// What the probe connects with; `None` on a Cluster (never marked down).
    probe: Option<redis::Client>,
    timeout: Duration,
    /// Read on every call; changed only under `state`.
    pub(super) down: AtomicBool,
    epoch: AtomicU64,
    state: Mutex<HealthState>,
    /// Calls failed at once while down (this store's share of the metric).
    pub(super) refused: AtomicU64,
    /// Probes that did not reach Redis.
    pub(super) probes_failed: AtomicU64,
}

#[derive(Default)]
struct HealthState {
    down: bool,
    probing: bool,
    /// A dropped connection's check is under way (`Health::check`).
    checking: bool,
    /// The single Redis's connection managers opened so far (those still in use), which
    /// the probe reconnects before marking the store up: a manager whose last reconnection
    /// failed would otherwise fail its next call before it tries again.
    managers: Vec<Weak<ConnectionManager>>,
}

impl Health {
    pub(super) fn new(client: &Client, timeout: Duration) -> Health {
        // In /metrics (at 0) from the start, not from the first outage on.
        health_metrics();
        Health {
            probe: match client {
                Client::Single(c) => Some(c.clone()),
                Client::Cluster(_) => None,
            },
            timeout,
            down: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            state: Mutex::new(HealthState::default()),
            refused: AtomicU64::new(0),
            probes_failed: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Before a call (`what`): the epoch it runs in (for `failed`), or the error at once
    /// when the store is marked down.
    pub(super) fn admit(&self, what: &'static str) -> Result<u64, StoreError> {
        if !self.down.load(Ordering::Acquire) {
            return Ok(self.epoch.load(Ordering::Acquire));
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        health_metrics().fast_failures.inc();
        Err(outage(what, RedisFailure::MarkedDown))
    }

    pub(super) fn opened(&self, manager: &Arc<ConnectionManager>) {
        let mut state = self.state();
        state.managers.retain(|m| m.strong_count() > 0);
        state.managers.push(Arc::downgrade(manager));
    }

    /// A call (`what`) begun in `epoch` failed with `e`: a refused connection marks the
    /// store down (unless it was marked up since the call began: that call was on a
    /// connection of the outage). A dropped one marks it down only if a new connection is
    /// refused too: one connection closed (by Redis's idle `timeout`, `CLIENT KILL`, a
    /// proxy) is not an outage, and must not fail every other call. The error returned
    /// is told by its kind only (`failure.rs`), as is the one logged when marking down.
    pub(super) fn failed(
        self: &Arc<Self>,
        what: &'static str,
        e: redis::RedisError,
        epoch: u64,
    ) -> StoreError {
        let failure = RedisFailure::from(&e);
        if self.probe.is_some() {
            if e.is_connection_refusal() {
                self.mark_down(epoch, &failure);
            } else if e.is_connection_dropped() {
                self.check(epoch);
            }
        }
        outage(what, failure)
    }

    /// After a dropped connection: one new connection decides whether Redis is down.
    fn check(self: &Arc<Self>, epoch: u64) {
        {
            let mut state = self.state();
            if state.down || state.probing || state.checking {
                return;
            }
            state.checking = true;
        }
        let health = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(h) = health.upgrade() else {
                return;
            };
            let reaches = h.reaches_redis().await;
            h.state().checking = false;
            if !reaches {
                h.mark_down(epoch, &"a connection was dropped and a new one is refused");
            }
        });
    }

    fn mark_down(self: &Arc<Self>, epoch: u64, why: &dyn std::fmt::Display) {
        let mut state = self.state();
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if !state.down {
            state.down = true;
            self.down.store(true, Ordering::Release);
            health_metrics().marked_down.inc();
            tracing::warn!(event = "store.down", error = %why, "Redis is down: store calls fail at once until a probe reaches it again");
        }
        if !state.probing {
            state.probing = true;
            tokio::spawn(probe(Arc::downgrade(self)));
        }
    }

    /// A new connection to Redis answers PING.
    async fn reaches_redis(&self) -> bool {
        let Some(client) = &self.probe else {
            return true;
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let ping = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        matches!(
            tokio::time::timeout(self.timeout * 2, ping).await,
            Ok(Ok(_))
        )
    }

    /// Redis answers again: every manager reconnects (its first call after a failed
    /// reconnection only starts a new one), then the store is marked up.
    async fn bring_back(&self) {
        let managers: Vec<Arc<ConnectionManager>> = self
            .state()
            .managers
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for manager in managers {
            for _ in 0..2 {
                let mut m = ConnectionManager::clone(&manager);
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(&mut m);
                if let Ok(Ok(_)) = tokio::time::timeout(self.timeout, ping).await {
                    break;
                }
            }
        }
        let mut state = self.state();
        state.down = false;
        state.probing = false;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.down.store(false, Ordering::Release);
        health_metrics().marked_down.dec();
        tracing::info!(event = "store.up", "Redis answers again: store marked up");
    }
}

/// Probes a Redis marked down until it answers (or the store is dropped).
async fn probe(health: Weak<Health>) {
    let mut wait = PROBE_FIRST_WAIT;
    loop {
        let Some(h) = health.upgrade() else {
            return;
        };
        if h.reaches_redis().await {
            h.bring_back().await;
            return;
        }
        h.probes_failed.fetch_add(1, Ordering::Relaxed);
        drop(h);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(PROBE_MAX_WAIT);
    }
}

struct HealthMetrics {
    marked_down: prometheus::IntGauge,
    fast_failures: prometheus::IntCounter,
}

/// The store's health metrics, in keygate's registry from the first Redis store on.
fn health_metrics() -> &'static HealthMetrics {
    static METRICS: OnceLock<HealthMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let marked_down = prometheus::IntGauge::new(
            "store_marked_down",
            "1 while Redis is marked down (it refused a connection): store calls fail at once until a probe reaches it again.",
        )
        .expect("valid metric");
        let fast_failures = prometheus::IntCounter::new(
            "store_fast_failures_total",
            "Store calls failed at once, without asking Redis, because it was marked down.",
        )
        .expect("valid metric");
        let registry = &crate::telemetry::metrics().registry;
        for c in [
            Box::new(marked_down.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(fast_failures.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        HealthMetrics {
            marked_down,
            fast_failures,
        }
    })
}

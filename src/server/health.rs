//! Health as probes and load balancers see it: whether this replica can serve
//! (`/readyz`, `grpc.health.v1`), and what degrades its service meanwhile. Liveness never
//! depends on the store.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::watch;

use crate::api::authorizer::AuthorizerService;
use crate::api::envoy::EnvoyAuthorization;
use crate::api::envoy_wire::AuthorizationServer;
use crate::api::proto::{
    authorizer_server::AuthorizerServer, revocations_server::RevocationsServer,
};
use crate::api::revocations::RevocationsService;
use crate::revocation::RevocationBus;
use crate::store::KeyStore;

/// Keeps `grpc.health.v1` in step with `/readyz`: each served service (and the server as
/// a whole, `""`) is SERVING only while `/readyz` would answer 200, so native gRPC probes
/// mean what the HTTP one does; everything is NOT_SERVING from the start of a drain.
/// (`LIVENESS` is set SERVING once, at start, and stays so.)
pub(super) async fn report_health(
    health: tonic_health::server::HealthReporter,
    bus: Arc<RevocationBus>,
    mut draining: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        // Registered before readiness is read, so a change meanwhile is not missed.
        let changed = bus.changed();
        if *draining.borrow_and_update() {
            break;
        }
        let ready = ready(&bus, false).is_ok();
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in HEALTH_SERVICES {
                health.set_service_status(name, status).await;
            }
            last = Some(ready);
        }
        tokio::select! {
            r = draining.changed() => if r.is_err() { break },
            _ = changed => {}
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
    for name in HEALTH_SERVICES {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
}

/// The gRPC health service a liveness probe asks: it never depends on the store.
pub const LIVENESS: &str = "liveness";

/// The services `grpc.health.v1` reports on: the server as a whole (`""`) and each one
/// the main port serves.
pub(super) const HEALTH_SERVICES: [&str; 4] = [
    "",
    <AuthorizationServer<EnvoyAuthorization> as tonic::server::NamedService>::NAME,
    <AuthorizerServer<AuthorizerService> as tonic::server::NamedService>::NAME,
    <RevocationsServer<RevocationsService> as tonic::server::NamedService>::NAME,
];

/// How often the gRPC health status is brought in step with readiness.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// Whether this replica can serve: it knows its position in the revocation stream (so
/// it cannot miss a revocation) and is not draining. A store outage after that does not
/// count: warm keys are still answered, cold ones get UNAVAILABLE, and taking every
/// replica out of the Service at once would turn a blip into an outage. The stream's
/// health is a metric (`keygate_revocation_stream_connected`), not readiness.
fn ready(bus: &RevocationBus, draining: bool) -> Result<(), &'static str> {
    if draining {
        Err("draining")
    } else if !bus.has_position() {
        Err("starting: the revocation stream's position is not known yet")
    } else {
        Ok(())
    }
}

/// `/readyz`: `ready`, with what degrades service meanwhile in the body.
pub(super) async fn readiness(
    store: &dyn KeyStore,
    bus: &RevocationBus,
    draining: bool,
) -> (StatusCode, String) {
    if let Err(why) = ready(bus, draining) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        );
    }
    let store = match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
        Err(_) => Some("store timed out".to_owned()),
        Ok(Err(e)) => Some(crate::telemetry::ErrorChain(&e).to_string()),
        Ok(Ok(())) => None,
    };
    let mut body = "ready\n".to_owned();
    if let Some(e) = store {
        body.push_str(&format!(
            "degraded: store unreachable ({e}); cold keys answer UNAVAILABLE\n"
        ));
    }
    if !bus.is_connected() {
        body.push_str(
            "degraded: not following the revocation stream (cache.ttl bounds staleness)\n",
        );
    }
    (StatusCode::OK, body)
}

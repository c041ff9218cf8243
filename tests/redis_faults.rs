//! keygate against a Redis that dies and comes back (SIGKILL, then a restart on the same
//! port). What must hold (docs/operations.md): a backend failure is never a denial and
//! never an allow. Keys verified before the outage keep working from the cache; a key
//! that needs the store gets UNAVAILABLE, so Envoy's own failure policy decides; and once
//! Redis is back, keygate answers again without a restart of its own.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::keys::AdminError;
use keygate::server::{self, App};
use support::{Backend, Outcome, RedisOptions, RedisServer, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The store's own timeout is 300 ms (see `support::config`): an answer about an outage
/// must come well within this, not after some TCP timeout.
const PROMPT: Duration = Duration::from_secs(3);

/// A Redis that keeps its data across a SIGKILL, like a production Redis with persistence:
/// otherwise the restarted Redis would (rightly) not know the cold key at all.
async fn durable_redis() -> RedisServer {
    RedisServer::start_with(RedisOptions {
        append_only: true,
        ..RedisOptions::default()
    })
    .await
}

async fn decide(app: &App, token: &str) -> Outcome {
    let started = Instant::now();
    let result = tokio::time::timeout(
        PROMPT,
        app.envoy_service().decide(support::read_with(token)),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer within {PROMPT:?}"));
    assert!(started.elapsed() < PROMPT);
    support::outcome(&result)
}

#[tokio::test]
async fn warm_key_survives_redis_outage_and_cold_key_is_unavailable() {
    let mut redis = durable_redis().await;
    let app = App::build(support::config(Backend::Redis(&redis)), support::secrets()).unwrap();
    let warm = app.admin.create(support::reader_key()).await.unwrap();
    let cold = app.admin.create(support::reader_key()).await.unwrap();
    assert_eq!(decide(&app, &warm.token).await, Outcome::Allowed);

    redis.kill();

    for _ in 0..3 {
        assert_eq!(
            decide(&app, &warm.token).await,
            Outcome::Allowed,
            "a verified key is served from the cache while Redis is down"
        );
        assert_eq!(
            decide(&app, &cold.token).await,
            Outcome::Error(tonic::Code::Unavailable),
            "a key that needs the store is neither allowed nor denied while Redis is down"
        );
    }
    // A well-formed token for an unknown key id also needs the store to be answered.
    let unknown = support::forge_token(
        "sk",
        "live",
        &support::base62(7, 16),
        &support::base62(8, 28),
    );
    assert_eq!(
        decide(&app, &unknown).await,
        Outcome::Error(tonic::Code::Unavailable)
    );
    // Malformed tokens need no store: still a clean denial.
    assert_eq!(
        decide(&app, "sk_live_garbage").await,
        Outcome::denied("invalid_api_key", 401)
    );

    redis.restart().await;

    // The outage left nothing behind in the cache: the cold key is verified once Redis
    // answers, and never denied on the way.
    eventually_allowed(&app, &cold.token).await;
    assert_eq!(decide(&app, &warm.token).await, Outcome::Allowed);
    assert_eq!(
        decide(&app, &unknown).await,
        Outcome::denied("invalid_api_key", 401)
    );
}

/// Polls until `token` is allowed. UNAVAILABLE is fine while keygate reconnects; a denial
/// is not: it would mean an outage was turned into a "no".
async fn eventually_allowed(app: &App, token: &str) {
    support::eventually(PATIENCE, "key allowed after Redis came back", || async {
        match decide(app, token).await {
            Outcome::Allowed => Some(()),
            Outcome::Error(tonic::Code::Unavailable) => None,
            other => panic!("while Redis comes back: {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn admin_calls_while_redis_is_down_are_unavailable() {
    let mut redis = durable_redis().await;
    let app = App::build(support::config(Backend::Redis(&redis)), support::secrets()).unwrap();
    let existing = app.admin.create(support::reader_key()).await.unwrap();

    redis.kill();

    let started = Instant::now();
    match app.admin.create(support::reader_key()).await {
        Err(AdminError::Unavailable(_)) => {}
        Err(other) => panic!("create while Redis is down: {other:?}"),
        Ok(created) => panic!("created {} while Redis is down", created.record.key_id),
    }
    assert!(matches!(
        app.admin.revoke(&existing.record.key_id).await,
        Err(AdminError::Unavailable(_))
    ));
    assert!(matches!(
        app.admin.get(&existing.record.key_id).await,
        Err(AdminError::Unavailable(_))
    ));
    assert!(matches!(
        app.admin
            .list(
                &keygate::keys::KeyOwner {
                    tenant_id: support::TENANT.into(),
                    ..Default::default()
                },
                10,
                None
            )
            .await,
        Err(AdminError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < 4 * PROMPT,
        "took {:?}",
        started.elapsed()
    );

    redis.restart().await;

    let created = support::eventually(PATIENCE, "create after Redis came back", || async {
        match app.admin.create(support::reader_key()).await {
            Ok(c) => Some(c),
            Err(AdminError::Unavailable(_)) => None,
            Err(other) => panic!("create after restart: {other:?}"),
        }
    })
    .await;
    assert_eq!(decide(&app, &created.token).await, Outcome::Allowed);
    // The failed revoke did not happen halfway.
    assert_eq!(decide(&app, &existing.token).await, Outcome::Allowed);
}

/// keygate connects lazily; a Redis that is down before the first request is an outage
/// like any other, not an unknown key.
#[tokio::test]
async fn redis_down_before_first_use_is_unavailable_not_a_denial() {
    let mut redis = durable_redis().await;
    let seeded = {
        let app = App::build(support::config(Backend::Redis(&redis)), support::secrets()).unwrap();
        app.admin.create(support::reader_key()).await.unwrap()
    };
    redis.kill();

    let secrets = support::secrets();
    let app = App::build(support::config(Backend::Redis(&redis)), secrets).unwrap();
    assert_eq!(
        decide(&app, &seeded.token).await,
        Outcome::Error(tonic::Code::Unavailable)
    );
    assert_eq!(
        decide(&app, &seeded.token).await,
        Outcome::Error(tonic::Code::Unavailable),
        "an outage is not cached"
    );
    redis.restart().await;
    // A different pepper: the key is found but its secret does not verify. That is an
    // answer from the store, so now (and only now) it is a denial.
    let answer = support::eventually(PATIENCE, "an answer after Redis came back", || async {
        match decide(&app, &seeded.token).await {
            Outcome::Error(tonic::Code::Unavailable) => None,
            other => Some(other),
        }
    })
    .await;
    assert_eq!(answer, Outcome::denied("invalid_api_key", 401));
}

/// The same over the wire: Envoy's Check gets a gRPC UNAVAILABLE status for a cold key
/// (not an OK response with a denial) while warm keys keep passing, and the replica stays
/// ready: a Redis blip must not take every replica out of the Service at once. /readyz
/// says what is degraded.
#[tokio::test]
async fn over_grpc_an_outage_is_unavailable_for_cold_keys_and_the_replica_stays_ready() {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;

    let mut redis = durable_redis().await;
    let app = App::build(support::config(Backend::Redis(&redis)), support::secrets()).unwrap();
    let warm = app.admin.create(support::reader_key()).await.unwrap();
    let cold = app.admin.create(support::reader_key()).await.unwrap();
    let app = Arc::new(app);
    let running = server::start(app.clone()).await.unwrap();
    support::positioned(&app).await;
    let client = AuthorizationClient::connect(format!("http://{}", running.grpc))
        .await
        .unwrap();
    let check = |token: String| {
        let mut client = client.clone();
        async move {
            let r = tokio::time::timeout(PROMPT, client.check(support::read_with(&token)))
                .await
                .expect("Check answers in time");
            support::outcome(&r.map(tonic::Response::into_inner))
        }
    };
    assert_eq!(check(warm.token.clone()).await, Outcome::Allowed);
    assert_eq!(http_status(running.http, "/readyz").await, 200);

    redis.kill();
    assert_eq!(check(warm.token.clone()).await, Outcome::Allowed);
    assert_eq!(
        check(cold.token.clone()).await,
        Outcome::Error(tonic::Code::Unavailable)
    );
    let (status, body) = http_get(running.http, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("degraded: store unreachable"), "{body}");
    assert_eq!(http_status(running.http, "/healthz").await, 200);

    redis.restart().await;
    support::eventually(PATIENCE, "/readyz no longer degraded", || async {
        let (status, body) = http_get(running.http, "/readyz").await;
        (status == 200 && !body.contains("degraded: store")).then_some(())
    })
    .await;
    support::eventually(PATIENCE, "cold key allowed over gRPC", || async {
        match check(cold.token.clone()).await {
            Outcome::Allowed => Some(()),
            Outcome::Error(tonic::Code::Unavailable) => None,
            other => panic!("while Redis comes back: {other:?}"),
        }
    })
    .await;
    drop(client);
    tokio::time::timeout(PATIENCE, running.shutdown())
        .await
        .expect("shutdown in time")
        .unwrap();
}

/// The status code of a plain HTTP/1.1 GET (keygate's HTTP listener).
async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    http_get(addr, path).await.0
}

/// The status code and body of a plain HTTP/1.1 GET.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: keygate\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {text}"));
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    };
    tokio::time::timeout(PROMPT, exchange)
        .await
        .expect("HTTP answer in time")
}

/// Native gRPC probes mean what `/readyz` means, per service: NOT_SERVING while the
/// replica has never reached its store (it cannot know the revocations), SERVING once it
/// has, and still SERVING through a Redis outage after that; NOT_SERVING from the first
/// moment of a drain, while the listener still answers. `liveness` is SERVING throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_is_not_serving_only_while_the_replica_cannot_serve() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let mut redis = durable_redis().await;
    redis.kill();
    let mut config = support::config(Backend::Redis(&redis));
    config.listen.drain_delay = Duration::from_secs(3600);
    let app = Arc::new(App::build(config, support::secrets()).unwrap());
    let running = server::start(app.clone()).await.unwrap();
    let health = HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", running.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let status_of = |service: &'static str| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health answers")
                .into_inner()
                .status
        }
    };
    let services = [
        "",
        "envoy.service.auth.v3.Authorization",
        "keygate.v1.Authorizer",
    ];
    let all_are = |want: ServingStatus| async move {
        for service in services {
            if status_of(service).await != want as i32 {
                return None;
            }
        }
        Some(())
    };
    // Never reached its store.
    support::eventually(PATIENCE, "every service not serving", || {
        all_are(ServingStatus::NotServing)
    })
    .await;
    assert_eq!(
        status_of(server::LIVENESS).await,
        ServingStatus::Serving as i32
    );
    assert_eq!(http_status(running.http, "/readyz").await, 503);

    redis.restart().await;
    support::eventually(PATIENCE, "every service serving", || {
        all_are(ServingStatus::Serving)
    })
    .await;
    assert_eq!(http_status(running.http, "/readyz").await, 200);

    // A blip after start: the follower notices, the probes do not fail.
    redis.kill();
    support::eventually(PATIENCE, "the follower notices the outage", || async {
        (!app.bus.is_connected()).then_some(())
    })
    .await;
    assert_eq!(all_are(ServingStatus::Serving).await, Some(()));
    assert_eq!(http_status(running.http, "/readyz").await, 200);
    assert_eq!(
        status_of(server::LIVENESS).await,
        ServingStatus::Serving as i32
    );

    // Draining: NOT_SERVING at once, while the listener still answers.
    let drain = tokio::spawn(running.drainer().drain());
    support::eventually(PATIENCE, "every service not serving while draining", || {
        all_are(ServingStatus::NotServing)
    })
    .await;
    assert_eq!(http_status(running.http, "/readyz").await, 503);
    assert_eq!(
        status_of(server::LIVENESS).await,
        ServingStatus::Serving as i32
    );
    drain.abort();
    running.shutdown().await.unwrap();
}

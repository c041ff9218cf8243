//! keygate against a Redis that dies and comes back (SIGKILL, then a restart on the same
//! port). What must hold (docs/operations.md): a backend failure is never a denial and
//! never an allow. Keys verified before the outage keep working from the cache; a key
//! that needs the store gets UNAVAILABLE, so Envoy's own failure policy decides; and once
//! Redis is back, keygate answers again without a restart of its own. A Redis that
//! refuses connections costs no wait: the store is marked down at the first refusal, fails
//! every call at once meanwhile, and a probe of its own marks it up again.

use std::sync::Arc;
use std::time::Duration;

use keygate::keys::AdminError;
use keygate::server::{self, App};
use keygate::store::redis::RedisStore;
use keygate::store::{KeyRecords, KeyStore, StoreError};
use keygate_test_support as support;
use keygate_test_support::{Backend, Outcome, RedisOptions, RedisServer, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A bound on one answer, against a hang (the store's own timeout is 300 ms, see
/// `support::config`). How fast an outage is answered is asserted by counting the calls
/// the store failed at once (`RedisStore::failed_at_once`), never by the clock.
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
    let result = tokio::time::timeout(
        PROMPT,
        app.envoy_service().decide(support::read_with(token)),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer within {PROMPT:?}"));
    support::outcome(&result)
}

/// The Redis store of `support::config`, and an app on it: the test keeps the store to
/// read what it counts.
fn app_on(redis: &RedisServer) -> (App, Arc<RedisStore>) {
    let store = Arc::new(
        RedisStore::new(&redis.url(), None, "kgtest", Duration::from_millis(300)).unwrap(),
    );
    let app = App::with_store(
        support::config(Backend::Redis(redis)),
        support::secrets(),
        store.clone(),
    )
    .unwrap();
    (app, store)
}

/// Waits until the store is marked down (a dropped connection is checked by a new one,
/// beside the call that found it dropped).
async fn until_marked_down(store: &RedisStore) {
    support::eventually(support::PATIENCE, "the store is marked down", || async {
        store.is_marked_down().then_some(())
    })
    .await;
}

/// After a kill, the first call finds the connection gone and marks the store down.
async fn marked_down(store: &RedisStore) {
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    // The connection the call was on is gone: a new one is refused, so the store is
    // marked down (that check runs beside the call).
    until_marked_down(store).await;
}

#[tokio::test]
async fn warm_key_survives_redis_outage_and_cold_key_is_unavailable() {
    let mut redis = durable_redis().await;
    let (app, store) = app_on(&redis);
    let warm = app.admin.create(support::reader_key()).await.unwrap();
    let cold = app.admin.create(support::reader_key()).await.unwrap();
    assert_eq!(decide(&app, &warm.token).await, Outcome::Allowed);

    redis.kill();
    marked_down(&store).await;

    for _ in 0..3 {
        assert_eq!(
            decide(&app, &warm.token).await,
            Outcome::Allowed,
            "a verified key is served from the cache while Redis is down"
        );
        let before = store.failed_at_once();
        assert_eq!(
            decide(&app, &cold.token).await,
            Outcome::Error(tonic::Code::Unavailable),
            "a key that needs the store is neither allowed nor denied while Redis is down"
        );
        assert!(
            store.failed_at_once() > before,
            "the cold key's UNAVAILABLE came at once from the store marked down, not after waiting for Redis"
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
    let (app, store) = app_on(&redis);
    let existing = app.admin.create(support::reader_key()).await.unwrap();

    redis.kill();

    match app.admin.create(support::reader_key()).await {
        Err(AdminError::Unavailable(_)) => {}
        Err(other) => panic!("create while Redis is down: {other:?}"),
        Ok(created) => panic!("created {} while Redis is down", created.record.key_id),
    }
    until_marked_down(&store).await;
    let failed_at_once = store.failed_at_once();
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
        store.failed_at_once() >= failed_at_once + 3,
        "revoke, get and list each failed at once, without waiting for Redis: {} then {}",
        failed_at_once,
        store.failed_at_once()
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
    let health = HealthClient::new(support::channel_to(running.grpc).await);
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

/// A store call, bounded against a hang.
async fn bounded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PROMPT, call)
        .await
        .expect("a store call while Redis is down answers, and does not hang")
}

/// The store alone: killed, it answers UNAVAILABLE at once, call after call, without asking
/// Redis; restarted, its probe finds Redis again and the first call after that goes
/// through (the connections of the outage were brought back first). The store's timeout
/// is long, so that any call that did wait for Redis would be a hang, not a pass.
#[tokio::test]
async fn a_killed_redis_fails_calls_at_once_and_the_probe_finds_it_back() {
    let mut redis = RedisServer::start().await;
    let store = RedisStore::new(
        &redis.url(),
        None,
        &support::fresh_namespace(),
        Duration::from_secs(60),
    )
    .unwrap();
    store.ping().await.unwrap();
    assert_eq!(store.get("k0a1b2c3d4e5f6g7").await.unwrap(), None);
    assert!(!store.is_marked_down());
    assert_eq!(store.failed_at_once(), 0);

    redis.kill();
    assert!(matches!(
        bounded(store.get("k0a1b2c3d4e5f6g7")).await,
        Err(StoreError::Unavailable(_))
    ));
    until_marked_down(&store).await;
    for n in 1..=5 {
        assert!(matches!(
            bounded(store.get("k0a1b2c3d4e5f6g7")).await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(store.failed_at_once(), n, "call {n} failed at once");
    }
    // An outage longer than the connection manager's own retries (it gives up after about
    // 1.5 s): its last reconnection failed, and it would fail its next call before trying
    // again, unless the store brings it back before marking itself up. Seven failed probes
    // have waited 50 + 100 + 200 + 400 + 800 + 1000 ms.
    support::eventually(PATIENCE, "seven failed probes", || async {
        (store.failed_probes() >= 7).then_some(())
    })
    .await;

    redis.restart().await;
    // Polled until it answers: while the probe has not reached Redis yet, every call fails
    // at once; none may fail having asked Redis (a connection left broken by the outage).
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(
            attempts <= 500,
            "the store did not come back after Redis did"
        );
        let before = store.failed_at_once();
        match bounded(store.ping()).await {
            Ok(()) => break,
            Err(e) => assert_eq!(
                store.failed_at_once(),
                before + 1,
                "after the restart, a call that asked Redis failed: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!store.is_marked_down());
    let failed = store.failed_at_once();
    assert_eq!(store.get("k0a1b2c3d4e5f6g7").await.unwrap(), None);
    assert_eq!(store.failed_at_once(), failed);
}

/// An outage is logged with its cause: the operation that failed and why, in words an
/// operator can act on. keygate started while Redis was down: the first check for a cold
/// key cannot connect, and its log line says so: refused, at once, with the store's
/// timeout as the tests set it (a retry inside the connection manager used to outlast
/// it, and the cause read "timed out").
#[tokio::test]
async fn an_outage_is_logged_with_its_cause() {
    support::logs::capture_logs();
    let mut redis = RedisServer::start().await;
    let cold = {
        let app = App::build(support::config(Backend::Redis(&redis)), support::secrets()).unwrap();
        app.admin.create(support::reader_key()).await.unwrap()
    };
    redis.kill();

    let app = App::build(support::config(Backend::Redis(&redis)), support::secrets()).unwrap();
    assert_eq!(
        decide(&app, &cold.token).await,
        Outcome::Error(tonic::Code::Unavailable)
    );
    let logs = support::logs::logs();
    let line = logs
        .lines()
        .find(|l| l.contains("cannot verify API key") && l.contains(&cold.record.key_id))
        .unwrap_or_else(|| panic!("the outage is logged:\n{logs}"));
    assert!(
        line.contains("error=store unavailable: connecting to Redis: connection refused"),
        "{line}"
    );
}

/// A Redis that accepts connections and never answers: the outage names the wait that
/// ran out, as a cause under the store error (`telemetry::ErrorChain` prints it).
#[tokio::test]
async fn a_redis_that_does_not_answer_is_an_outage_that_timed_out() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        // Accepted and kept open, never answered.
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let store = RedisStore::new(
        &format!("redis://{addr}"),
        None,
        &support::fresh_namespace(),
        Duration::from_millis(300),
    )
    .unwrap();
    let errors_before = keygate::telemetry::metrics().store_errors.get();

    let e = bounded(store.ping()).await.expect_err("no answer");
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    let told = keygate::telemetry::ErrorChain(&e).to_string();
    assert!(
        told.starts_with("store unavailable: connecting to Redis: "),
        "{told}"
    );
    assert!(told.contains("timed out"), "{told}");
    assert!(
        keygate::telemetry::metrics().store_errors.get() > errors_before,
        "a timeout is counted in keygate_store_errors_total"
    );
    held.abort();
}

//! Plans: rate limits exact across replicas on one Redis, the answers that say so, the
//! plans of test and live keys, concurrent-session leases, and what a limit check does
//! when Redis is gone.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use keygate::api::authorizer::AuthorizerService;
use keygate::api::proto::{self, authorizer_server::Authorizer as _};
use keygate::config::{Config, OnStoreError, PlanConfig};
use keygate::keys::{AdminError, KeyUpdate, NewKey};
use keygate::server::App;
use keygate_test_support as support;
use keygate_test_support::{config, outcome, read_with, secrets, Backend, Outcome, RedisServer};

/// Plans: `tiny` (20 a minute, one per 3 s), `small` (10 a minute, 2 sessions), `test`
/// (3 a minute), and `big`; test keys default to `test`.
fn plan_config(backend: Backend<'_>) -> Config {
    let mut cfg = config(backend);
    let plan = |rpm, sessions| PlanConfig {
        requests_per_minute: rpm,
        algorithm: Default::default(),
        burst: None,
        concurrent_sessions: sessions,
    };
    cfg.policy.plans = [
        ("tiny".to_owned(), plan(20, None)),
        ("small".to_owned(), plan(10, Some(2))),
        ("test".to_owned(), plan(3, None)),
        ("big".to_owned(), plan(1_000_000, None)),
    ]
    .into();
    cfg.policy.default_plans.test = Some("test".into());
    cfg
}

fn key_on(plan: &str) -> NewKey {
    NewKey {
        plan: plan.into(),
        ..support::reader_key()
    }
}

/// The token of a reader key on `plan`, created on `app`.
async fn token_on(app: &App, plan: &str) -> String {
    let created = app.admin.create(key_on(plan)).await;
    created.expect("the key is created").token
}

/// Replicas (apps, not serving) of one deployment on `redis`, `plans` added to
/// `plan_config`'s.
fn replicas_on(redis: &RedisServer, plans: &[(&str, PlanConfig)]) -> Vec<Arc<App>> {
    let secrets = secrets();
    let app = || {
        let mut cfg = plan_config(Backend::Redis(redis));
        for (name, plan) in plans {
            cfg.policy.plans.insert((*name).into(), plan.clone());
        }
        Arc::new(App::build(cfg, secrets.clone()).expect("the app builds"))
    };
    (0..3).map(|_| app()).collect()
}

/// The x-ratelimit-* and retry-after headers of an answer (allow or deny), by name.
fn rate_headers(resp: &CheckResponse) -> Vec<(String, String)> {
    let headers = match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => &ok.response_headers_to_add,
        Some(HttpResponse::DeniedResponse(d)) => &d.headers,
        _ => return vec![],
    };
    let mut out = support::header_pairs(headers);
    out.retain(|(name, _)| name.starts_with("x-ratelimit-") || name == "retry-after");
    out.sort();
    out
}

fn header(headers: &[(String, String)], name: &str) -> Option<u64> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.parse().expect("a number"))
}

/// Sends `n` reads with each token, spread over `replicas` round-robin, all at once;
/// counts each token's admissions and checks every denial is a well-formed 429.
async fn flood(replicas: &[Arc<App>], tokens: &[(&str, u64)], n: usize) -> Vec<usize> {
    let mut calls = Vec::new();
    for i in 0..n {
        for (t, (token, interval_ms)) in tokens.iter().enumerate() {
            let app = replicas[(i + t) % replicas.len()].clone();
            let token = token.to_string();
            let interval_ms = *interval_ms;
            calls.push(tokio::spawn(async move {
                let result = app.envoy_service().decide(read_with(&token)).await;
                let verdict = outcome(&result);
                let headers = result.as_ref().map(rate_headers).unwrap_or_default();
                if verdict != Outcome::Allowed {
                    assert_eq!(verdict, Outcome::denied("rate_limited", 429));
                    let retry = header(&headers, "retry-after").expect("retry-after on a 429");
                    // One more fits within one interval of the GCRA state.
                    assert!(
                        (1..=interval_ms.div_ceil(1000)).contains(&retry),
                        "retry-after {retry}"
                    );
                    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some(0));
                }
                (t, verdict == Outcome::Allowed)
            }));
        }
    }
    let mut admitted = vec![0; tokens.len()];
    for c in calls {
        let (t, ok) = c.await.unwrap();
        admitted[t] += usize::from(ok);
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_together_admit_exactly_the_plan_for_each_key() {
    let redis = RedisServer::start().await;
    let replicas = replicas_on(&redis, &[]);
    let tiny = token_on(&replicas[0], "tiny").await;
    let small = token_on(&replicas[1], "small").await;
    // Warm the credential cache on every replica first: the flood measures the limiter.
    let warm_big = token_on(&replicas[0], "big").await;
    for r in &replicas {
        assert_eq!(
            outcome(&r.envoy_service().decide(read_with(&warm_big)).await),
            Outcome::Allowed
        );
    }
    let started = Instant::now();
    // 3×N for each key, on two plans at once.
    let admitted = flood(&replicas, &[(&tiny, 3000), (&small, 6000)], 60).await;
    let elapsed = started.elapsed().as_millis() as usize;
    // Exactly the burst, plus what the sustained rate added while the flood ran (nothing,
    // on any machine that sends 180 checks in under 3 s).
    assert_eq!(admitted[0], 20 + elapsed / 3000, "tiny, over {elapsed} ms");
    assert_eq!(admitted[1], 10 + elapsed / 6000, "small, over {elapsed} ms");
}

#[tokio::test]
async fn allows_and_429s_carry_the_rate_limit_headers() {
    let redis = RedisServer::start().await;
    let app = App::build(plan_config(Backend::Redis(&redis)), secrets()).unwrap();
    let token = token_on(&app, "test").await;
    let envoy = app.envoy_service();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let resp = envoy.decide(read_with(&token)).await;
        seen.push((outcome(&resp), rate_headers(&resp.unwrap())));
    }
    for (i, (verdict, headers)) in seen.iter().take(3).enumerate() {
        assert_eq!(*verdict, Outcome::Allowed, "request {i}");
        assert_eq!(header(headers, "x-ratelimit-limit"), Some(3));
        assert_eq!(header(headers, "retry-after"), None);
        assert!(header(headers, "x-ratelimit-reset").is_some());
    }
    assert_eq!(header(&seen[2].1, "x-ratelimit-remaining"), Some(0));
    let (verdict, headers) = &seen[3];
    assert_eq!(*verdict, Outcome::denied("rate_limited", 429));
    assert_eq!(header(headers, "x-ratelimit-limit"), Some(3));
    assert_eq!(header(headers, "retry-after"), Some(20), "one every 20 s");
}

/// keygate.v1 Check over the app's own authorizer.
fn v1(app: &App) -> AuthorizerService {
    app.authorizer_service()
}

#[tokio::test]
async fn keygate_v1_check_returns_the_limit_as_fields() {
    let redis = RedisServer::start().await;
    let app = App::build(plan_config(Backend::Redis(&redis)), secrets()).unwrap();
    let token = token_on(&app, "test").await;
    let check = || support::read_through_keygate_v1(&token);
    let mut last = None;
    for _ in 0..4 {
        last = Some(
            v1(&app)
                .check(tonic::Request::new(check()))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let denied = last.unwrap();
    assert!(!denied.allowed);
    assert_eq!(denied.denial.unwrap().code, "rate_limited");
    let rate = denied.rate_limit.expect("the limit on a 429");
    assert_eq!(
        (rate.limit, rate.remaining, rate.retry_after_seconds),
        (3, 0, 20)
    );
}

#[tokio::test]
async fn a_test_key_is_on_the_test_plan_and_a_live_key_on_its_own() {
    let redis = RedisServer::start().await;
    let app = App::build(plan_config(Backend::Redis(&redis)), secrets()).unwrap();
    let test = app
        .admin
        .create(NewKey {
            environment: "test".into(),
            ..support::reader_key()
        })
        .await
        .unwrap()
        .token;
    let live = token_on(&app, "tiny").await;
    let unplanned = app.admin.create(support::reader_key()).await.unwrap().token;
    let limit_of = |token: String| {
        let envoy = app.envoy_service();
        async move {
            let resp = envoy.decide(read_with(&token)).await.unwrap();
            header(&rate_headers(&resp), "x-ratelimit-limit")
        }
    };
    assert_eq!(limit_of(test).await, Some(3));
    assert_eq!(limit_of(live).await, Some(20));
    assert_eq!(
        limit_of(unplanned).await,
        None,
        "no live default: unlimited"
    );
}

#[tokio::test]
async fn an_unknown_plan_is_refused_naming_plan() {
    let app = App::build(plan_config(Backend::Memory), secrets()).unwrap();
    let refused = app.admin.create(key_on("platinum")).await;
    assert!(matches!(
        refused,
        Err(AdminError::InvalidArgument { field: "plan", .. })
    ));
    let key = app.admin.create(key_on("tiny")).await.unwrap();
    let update = app
        .admin
        .update(
            &key.record.key_id,
            KeyUpdate {
                plan: Some("platinum".into()),
                ..KeyUpdate::default()
            },
        )
        .await;
    assert!(matches!(
        update,
        Err(AdminError::InvalidArgument { field: "plan", .. })
    ));
    assert_eq!(
        app.admin
            .get(&key.record.key_id)
            .await
            .unwrap()
            .plan
            .as_deref(),
        Some("tiny")
    );
}

async fn acquire(app: &App, token: &str, ttl: u32) -> proto::AcquireLeaseResponse {
    v1(app)
        .acquire_lease(tonic::Request::new(proto::AcquireLeaseRequest {
            credential: token.into(),
            ttl_seconds: ttl,
        }))
        .await
        .expect("the call succeeds")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_limited_across_replicas_and_expire_when_not_renewed() {
    let redis = RedisServer::start().await;
    let secrets = secrets();
    let a = App::build(plan_config(Backend::Redis(&redis)), secrets.clone()).unwrap();
    let b = App::build(plan_config(Backend::Redis(&redis)), secrets.clone()).unwrap();
    let token = token_on(&a, "small").await;

    let first = acquire(&a, &token, 3600).await;
    let second = acquire(&b, &token, 1).await;
    assert!(!first.lease_id.is_empty() && !second.lease_id.is_empty());
    assert!(!first.lease_id.contains(support::secret_of(&token)));
    let third = acquire(&a, &token, 3600).await;
    let denial = third.denial.expect("both sessions are in use");
    assert_eq!(denial.code, "rate_limited");
    assert!(denial.message.contains('2'), "{}", denial.message);

    // Released: the session is free again, on either replica.
    v1(&b)
        .release_lease(tonic::Request::new(proto::ReleaseLeaseRequest {
            lease_id: first.lease_id.clone(),
        }))
        .await
        .unwrap();
    let again = acquire(&b, &token, 3600).await;
    assert!(again.denial.is_none(), "{again:?}");
    let renewed = v1(&a)
        .renew_lease(tonic::Request::new(proto::RenewLeaseRequest {
            lease_id: first.lease_id.clone(),
            ttl_seconds: 60,
        }))
        .await
        .unwrap_err();
    assert_eq!(renewed.code(), tonic::Code::NotFound, "released is gone");

    // The one-second lease is not renewed: it lapses, and its session is free again.
    let freed = support::eventually(
        support::PATIENCE,
        "the lapsed lease frees its session",
        || async {
            let r = acquire(&a, &token, 3600).await;
            r.denial.is_none().then_some(r)
        },
    )
    .await;
    assert!(!freed.lease_id.is_empty());
    let renew_lapsed = v1(&b)
        .renew_lease(tonic::Request::new(proto::RenewLeaseRequest {
            lease_id: second.lease_id,
            ttl_seconds: 60,
        }))
        .await
        .unwrap_err();
    assert_eq!(renew_lapsed.code(), tonic::Code::NotFound);
    // Renewing a held one works.
    v1(&a)
        .renew_lease(tonic::Request::new(proto::RenewLeaseRequest {
            lease_id: again.lease_id,
            ttl_seconds: 60,
        }))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_check_without_redis_is_unavailable_or_allowed_as_configured() {
    for mode in [OnStoreError::Unavailable, OnStoreError::Allow] {
        let mut redis = RedisServer::start().await;
        let mut cfg = plan_config(Backend::Redis(&redis));
        cfg.rate_limits.on_store_error = mode;
        // Every admission asked of Redis, so the next one needs it.
        cfg.rate_limits.max_reservation = 1;
        let app = App::build(cfg, secrets()).unwrap();
        let token = token_on(&app, "big").await;
        let envoy = app.envoy_service();
        assert_eq!(
            outcome(&envoy.decide(read_with(&token)).await),
            Outcome::Allowed
        );
        redis.kill();
        let errors_before = keygate::telemetry::metrics().rate_limit_store_errors.get();
        let verdict = outcome(&envoy.decide(read_with(&token)).await);
        match mode {
            OnStoreError::Unavailable => {
                assert_eq!(verdict, Outcome::Error(tonic::Code::Unavailable))
            }
            OnStoreError::Allow => assert_eq!(verdict, Outcome::Allowed),
        }
        assert!(keygate::telemetry::metrics().rate_limit_store_errors.get() > errors_before);
    }
}

#[tokio::test]
async fn a_route_that_takes_a_lease_admits_only_the_plans_sessions() {
    let redis = RedisServer::start().await;
    let mut cfg = plan_config(Backend::Redis(&redis));
    cfg.policy.routes.insert(
        0,
        keygate::config::RouteConfig {
            name: "session-create".into(),
            methods: vec!["POST".into()],
            path: "/v1/sessions".into(),
            scope: Some("contacts:read".into()),
            public: false,
            tenant: None,
            credentials: None,
            internal: false,
            environments: None,
            lease_ttl: Some(std::time::Duration::from_secs(3600)),
            ..Default::default()
        },
    );
    let app = App::build(cfg, secrets()).unwrap();
    // `small`: two sessions.
    let token = token_on(&app, "small").await;
    let envoy = app.envoy_service();
    let create = || {
        support::check_request(
            "POST",
            "/v1/sessions",
            &[("authorization", &support::bearer(&token))],
        )
    };
    let lease_of = |resp: &CheckResponse| match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == "x-keygate-lease-id")
            .map(|h| h.value.clone()),
        _ => None,
    };
    let mut leases = Vec::new();
    for _ in 0..2 {
        let resp = envoy.decide(create()).await;
        assert_eq!(outcome(&resp), Outcome::Allowed);
        leases.push(lease_of(&resp.unwrap()).expect("the lease id goes upstream"));
    }
    assert_ne!(leases[0], leases[1]);
    assert_eq!(
        outcome(&envoy.decide(create()).await),
        Outcome::denied("rate_limited", 429),
        "both sessions are in use"
    );
    // Other routes do not take one.
    let read = envoy.decide(read_with(&token)).await;
    assert_eq!(outcome(&read), Outcome::Allowed);
    assert_eq!(lease_of(&read.unwrap()), None);
    v1(&app)
        .release_lease(tonic::Request::new(proto::ReleaseLeaseRequest {
            lease_id: leases[0].clone(),
        }))
        .await
        .unwrap();
    assert_eq!(outcome(&envoy.decide(create()).await), Outcome::Allowed);
}

/// A `rolling_window` plan: three replicas flooding one key admit exactly its number in
/// its minute, all at once, and refuse the rest until the first admission leaves the
/// window (a minute on Redis's clock, and the quarter second it could be spent in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_together_admit_a_rolling_windows_number_once_in_its_minute() {
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let store_ms = |(s, us): (u64, u64)| s * 1000 + us / 1000;
    let window = PlanConfig {
        requests_per_minute: 20,
        algorithm: keygate::config::PlanAlgorithm::RollingWindow,
        burst: None,
        concurrent_sessions: None,
    };
    let replicas = replicas_on(&redis, &[("window", window)]);
    let token = token_on(&replicas[0], "window").await;
    let started = store_ms(::redis::cmd("TIME").query_async(&mut conn).await.unwrap());
    // Retry-after: when the first admission leaves the window, at most 60.25 s away.
    let admitted = flood(&replicas, &[(&token, 61_000)], 60).await;
    let elapsed = store_ms(::redis::cmd("TIME").query_async(&mut conn).await.unwrap()) - started;
    if elapsed < 60_000 {
        assert_eq!(admitted[0], 20, "over {elapsed} ms of Redis's clock");
    }
    assert!(
        admitted[0] <= 20 * (1 + elapsed as usize / 60_000),
        "{admitted:?}"
    );
}

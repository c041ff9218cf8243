//! docs/security.md: no secret — token, key secret, pepper, admin credential,
//! Redis password — ever appears in a log line or span, at any level. Every test here
//! logs at TRACE (keygate and every library under it) into one buffer, in both the text
//! and the JSON format, runs keys through their whole life, and searches the buffer.

use std::sync::Arc;

use keygate::api::proto::{self, authorizer_client::AuthorizerClient, keys_client::KeysClient};
use keygate::config::Secrets;
use keygate::secret::Secret;
use keygate::server::{self, App};
use keygate_test_support as support;
use keygate_test_support::logs::{capture_logs, logs};
use keygate_test_support::{with_admin, Backend, Outcome, RedisOptions, RedisServer};

/// Everything that must never be logged, by name (for the failure message).
struct Forbidden(Vec<(String, String)>);

impl Forbidden {
    fn new(secrets: &Secrets) -> Forbidden {
        let mut f = Forbidden(Vec::new());
        f.add("pepper", secrets.pepper.expose());
        f.add("admin token", secrets.admin_token.expose());
        if let Some(p) = &secrets.redis_password {
            f.add("redis password", p.expose());
        }
        if let Some(w) = &secrets.watch_token {
            f.add("watch token", w.expose());
        }
        f
    }

    fn add(&mut self, what: &str, value: &str) {
        assert!(value.len() >= 16, "{what} is long enough to search for");
        self.0.push((what.to_owned(), value.to_owned()));
    }

    /// A token: the whole of it, and its secret part on its own.
    fn token(&mut self, what: &str, token: &str) {
        self.add(what, token);
        self.add(&format!("secret of {what}"), support::secret_of(token));
    }

    /// Fails with the leaked thing and the line it leaked in.
    fn assert_absent_from(&self, logs: &str) {
        for (what, value) in &self.0 {
            if let Some(line) = logs.lines().find(|l| l.contains(value.as_str())) {
                panic!("the {what} appears in the logs:\n{line}");
            }
        }
    }
}

/// The core, without listeners: create, allow, wrong secret (twice), a typo, revoke,
/// delete.
#[tokio::test]
async fn the_core_logs_key_ids_but_no_secret() {
    capture_logs();
    let secrets = support::secrets();
    let app = App::build(support::config(Backend::Memory), secrets.clone()).unwrap();
    let envoy = app.envoy_service();
    let mut forbidden = Forbidden::new(&secrets);

    let key = app.admin.create(support::reader_key()).await.unwrap();
    forbidden.token("token", &key.token);
    let guess = support::wrong_secret_for(&key.token);
    forbidden.token("wrong-secret guess", &guess);
    let mut typo = key.token.clone();
    typo.pop();
    typo.push('!');
    forbidden.token("token with a typo", &typo);

    let check = |t: &str| support::outcome_of(&envoy, support::read_with(t));
    assert_eq!(check(&key.token).await, Outcome::Allowed);
    assert_eq!(check(&guess).await, Outcome::denied("invalid_api_key", 401));
    assert_eq!(check(&guess).await, Outcome::denied("invalid_api_key", 401));
    assert_eq!(check(&typo).await, Outcome::denied("invalid_api_key", 401));
    app.admin.revoke(&key.record.key_id).await.unwrap();
    assert_eq!(check(&key.token).await, Outcome::revoked_key());
    app.admin.delete(&key.record.key_id).await.unwrap();
    assert!(matches!(check(&key.token).await, Outcome::Denied { .. }));

    let logs = logs();
    assert!(
        logs.contains(&key.record.key_id),
        "the logs name the key by its id (else this test proves nothing)"
    );
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"));
    forbidden.assert_absent_from(&logs);
}

/// Session tokens: the signing key, the API key a token is minted from, and the token
/// itself (minted over keygate.v1 and on a `mint_session` route, used, revoked with its
/// key) stay out of the logs, and out of the answers' `Debug`.
#[tokio::test]
async fn session_tokens_and_their_signing_key_stay_out_of_the_logs() {
    use keygate::api::proto::authorizer_server::Authorizer as _;

    capture_logs();
    let pem = support::ed25519_pem();
    let mut secrets = support::secrets();
    secrets
        .named
        .insert("KEYGATE_TEST_SESSION_KEY".into(), Secret::new(pem.as_str()));
    let mut config = support::config(Backend::Memory);
    config
        .sessions
        .signing_keys
        .push(keygate::config::SigningKeyConfig {
            kid: "k1".into(),
            key_env: "KEYGATE_TEST_SESSION_KEY".into(),
        });
    config.policy.routes.push(keygate::config::RouteConfig {
        name: "sessions-create".into(),
        methods: vec!["POST".into()],
        path: "/v1/sessions".into(),
        scope: Some("contacts:read".into()),
        credentials: Some(vec![keygate::principal::CredentialKind::ApiKey]),
        mint_session: true,
        ..Default::default()
    });
    // The reads take session tokens too.
    for r in &mut config.policy.routes {
        if r.name == "contacts-read" {
            r.credentials = Some(vec![
                keygate::principal::CredentialKind::ApiKey,
                keygate::principal::CredentialKind::Session,
            ]);
        }
    }
    let app = App::build(config, secrets.clone()).unwrap();
    let envoy = app.envoy_service();
    let mut forbidden = Forbidden::new(&secrets);
    let seed = pem.lines().nth(1).expect("the PEM's base64 line");
    forbidden.add("session signing key", seed);
    let key = app.admin.create(support::reader_key()).await.unwrap();
    forbidden.token("token", &key.token);

    let minted = app
        .authorizer_service()
        .mint_session_token(tonic::Request::new(proto::MintSessionTokenRequest {
            credential: key.token.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let session = minted.token;
    forbidden.add("session token", &session);
    forbidden.add(
        "session token signature",
        session.rsplit('.').next().unwrap(),
    );
    let route = envoy
        .decide_view(keygate::api::envoy_wire::CheckRequestView::from(
            &support::check_request(
                "POST",
                "/v1/sessions",
                &[("authorization", &support::bearer(&key.token))],
            ),
        ))
        .await
        .unwrap();
    let shown = format!("{route:?}");
    let keygate::api::envoy_answer::CheckAnswer::Allow(answer) = route else {
        panic!("the create-session route allows: {shown}");
    };
    let (routed, _) = answer
        .identity
        .as_ref()
        .and_then(|i| i.session.clone())
        .expect("the route minted a token");
    forbidden.add("session token of the route", routed.expose());
    assert!(
        !shown.contains(routed.expose()),
        "Debug of the answer: {shown}"
    );

    let check = |t: &str| support::outcome_of(&envoy, support::read_with(t));
    assert_eq!(check(&session).await, Outcome::Allowed);
    assert_eq!(check(routed.expose()).await, Outcome::Allowed);
    app.admin.revoke(&key.record.key_id).await.unwrap();
    assert_eq!(check(&session).await, Outcome::denied("invalid_token", 401));

    let logs = logs();
    assert!(
        logs.contains("session token minted"),
        "minting is logged (by key id)"
    );
    forbidden.assert_absent_from(&logs);
}

/// The same over the wire: the admin API (with the admin credential in metadata), Envoy's
/// Check and keygate.v1 Check, and an admin call with a wrong credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_logs_key_ids_but_no_secret() {
    capture_logs();
    let secrets = support::secrets();
    let app = Arc::new(App::build(support::config(Backend::Memory), secrets.clone()).unwrap());
    let running = server::start(app.clone()).await.unwrap();
    support::positioned(&app).await;
    let mut forbidden = Forbidden::new(&secrets);

    let mut admin = KeysClient::connect(format!("http://{}", running.admin))
        .await
        .unwrap();
    let created = admin
        .create_key(with_admin(
            &secrets,
            proto::CreateKeyRequest {
                tenant_id: support::TENANT.into(),
                name: "over the wire".into(),
                scopes: vec!["contacts:read".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let key_id = created.key.as_ref().unwrap().key_id.clone();
    forbidden.token("token", &created.token);
    let guess = support::wrong_secret_for(&created.token);
    forbidden.token("wrong-secret guess", &guess);

    let mut envoy = support::envoy_client(running.grpc).await;
    for (token, expected) in [
        (&created.token, Outcome::Allowed),
        (&guess, Outcome::denied("invalid_api_key", 401)),
    ] {
        let answer = envoy
            .check(support::read_with(token))
            .await
            .map(tonic::Response::into_inner);
        assert_eq!(support::outcome(&answer), expected);
    }

    let mut authorizer = AuthorizerClient::connect(format!("http://{}", running.grpc))
        .await
        .unwrap();
    for (token, allowed) in [(&created.token, true), (&guess, false)] {
        let answer = authorizer
            .check(support::read_through_keygate_v1(token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.allowed, allowed);
    }

    let listed = admin
        .list_keys(with_admin(
            &secrets,
            proto::ListKeysRequest {
                tenant_id: support::TENANT.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
    // A wrong admin credential is refused without being echoed.
    let wrong_admin = Secret::random(32);
    forbidden.add("wrong admin token", wrong_admin.expose());
    let refused = admin
        .get_key(with_admin(
            &Secrets {
                admin_token: wrong_admin,
                ..secrets.clone()
            },
            proto::GetKeyRequest {
                key_id: key_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    admin
        .revoke_key(with_admin(
            &secrets,
            proto::RevokeKeyRequest {
                key_id: key_id.clone(),
            },
        ))
        .await
        .unwrap();
    drop((admin, envoy, authorizer));
    running.shutdown().await.unwrap();

    let logs = logs();
    assert!(logs.contains(&key_id), "the logs name the key by its id");
    forbidden.assert_absent_from(&logs);
}

/// With Redis behind a password, the password does not leak either: not when connecting,
/// not in the errors of an outage.
#[tokio::test]
async fn the_redis_password_stays_out_of_the_logs_even_in_an_outage() {
    capture_logs();
    let password = Secret::random(32);
    let mut redis = RedisServer::start_with(RedisOptions {
        password: Some(password.expose().to_owned()),
        ..RedisOptions::default()
    })
    .await;
    let secrets = Secrets {
        redis_password: Some(password),
        ..support::secrets()
    };
    let app = App::build(support::config(Backend::Redis(&redis)), secrets.clone()).unwrap();
    let envoy = app.envoy_service();
    let mut forbidden = Forbidden::new(&secrets);
    let warm = app.admin.create(support::reader_key()).await.unwrap();
    let cold = app.admin.create(support::reader_key()).await.unwrap();
    forbidden.token("warm token", &warm.token);
    forbidden.token("cold token", &cold.token);

    let check = |t: &str| support::outcome_of(&envoy, support::read_with(t));
    assert_eq!(check(&warm.token).await, Outcome::Allowed);
    redis.kill();
    assert_eq!(
        check(&cold.token).await,
        Outcome::Error(tonic::Code::Unavailable)
    );
    assert!(app.admin.create(support::reader_key()).await.is_err());

    let logs = logs();
    assert!(
        logs.contains(&cold.record.key_id),
        "the outage is logged with the key id"
    );
    forbidden.assert_absent_from(&logs);
}

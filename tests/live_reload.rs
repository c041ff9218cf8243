//! A live reload (`server::Live::apply`) as the core sees it: new requests are decided by
//! the new rules; a JWT decided under an issuer that the reload removed is not allowed
//! from the cache; an API key's cached verification survives a policy change; a file
//! that changes a restart-only setting, or says what is already running, changes nothing.

use std::collections::HashMap;
use std::sync::Arc;

use keygate::config::{Config, Secrets};
use keygate::decision::{Decision, DenyReason};
use keygate::file_watch::FileWatch;
use keygate::request::AuthRequest;
use keygate::secret::Secret;
use keygate::server::{follow_file, App, Hangup, ReloadError, Reloaded, FILE_CHECK};
use keygate::store::memory::MemoryStore;

const SECRET_VAR: &str = "KEYGATE_TEST_RELOAD_HS256";
const SECRET: &str = "a shared secret of at least thirty-two bytes";
const TENANT: &str = "3f0c9a52-6a0f-4c55-9a43-9b6d2b1d9e10";

fn yaml(scope: &str, with_issuer: bool) -> String {
    let issuer = if with_issuer {
        format!(
            "jwt:\n  issuers:\n    - {{ name: shared, issuer: 'https://shared.example.com/', \
             audiences: [api], algorithms: [HS256], secret_env: {SECRET_VAR} }}\n"
        )
    } else {
        String::new()
    };
    format!(
        "listen: {{ grpc: '127.0.0.1:0', admin: '127.0.0.1:0', http: '127.0.0.1:0' }}\n\
         store: {{ backend: memory }}\n\
         api_keys: {{ prefix: sk, argon2: {{ memory_kib: 64, iterations: 1, parallelism: 1 }} }}\n\
         policy:\n  credential_headers: [{{ header: authorization, scheme: Bearer }}]\n  \
         routes:\n    - {{ name: contacts, methods: [GET], path: '/v1/contacts/**', scope: '{scope}' }}\n\
         {issuer}"
    )
}

fn load(text: &str) -> Config {
    Config::load(Some(text), Vec::new()).expect("the test configuration is valid")
}

fn app() -> App {
    App::with_store(
        load(&yaml("contacts:read", true)),
        secrets(),
        Arc::new(MemoryStore::new()),
    )
    .expect("the app builds")
}

fn secrets() -> Secrets {
    let mut named = HashMap::new();
    named.insert(SECRET_VAR.to_owned(), Secret::new(SECRET));
    Secrets {
        pepper: Secret::random(43),
        admin_token: Secret::random(32),
        redis_password: None,
        watch_token: None,
        named,
    }
}

fn jwt() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://shared.example.com/", "aud": "api", "sub": "svc-1",
        "tenant_id": TENANT, "scope": "contacts:read", "iat": now, "exp": now + 600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn check(app: &App, token: &str) -> Decision {
    let req = AuthRequest {
        method: "GET".into(),
        path: "/v1/contacts/7".into(),
        headers: [("authorization".to_owned(), format!("Bearer {token}"))].into(),
        peer: None,
        credential: None,
    };
    app.live.current().authorizer.check(&req).await
}

/// A key with `contacts:read`, allowed by the running rules: its token.
async fn reader(app: &App) -> String {
    let created = app
        .admin
        .create(keygate::keys::NewKey {
            tenant_id: TENANT.into(),
            scopes: vec!["contacts:read".into()],
            ..Default::default()
        })
        .await
        .expect("key created");
    assert!(matches!(
        check(app, &created.token).await,
        Decision::Allow(_)
    ));
    created.token
}

fn denied(d: &Decision) -> Option<DenyReason> {
    match d {
        Decision::Deny(denial) => Some(denial.reason),
        _ => None,
    }
}

fn stop() -> tokio::sync::watch::Receiver<bool> {
    tokio::sync::watch::channel(false).1
}

#[tokio::test]
async fn a_jwt_of_a_removed_issuer_is_refused_even_when_it_was_cached() {
    let app = app();
    let token = jwt();
    assert!(matches!(check(&app, &token).await, Decision::Allow(_)));
    // Allowed again, now from the cache.
    assert!(matches!(check(&app, &token).await, Decision::Allow(_)));
    let applied = app.live.apply(load(&yaml("contacts:read", false)), &stop());
    assert_eq!(applied.unwrap(), Reloaded::Applied);
    assert_eq!(
        denied(&check(&app, &token).await),
        Some(DenyReason::InvalidToken)
    );
}

#[tokio::test]
async fn a_cached_api_key_meets_the_routes_new_scope_without_being_verified_again() {
    let app = app();
    let token = reader(&app).await;
    app.cache.sync().await;
    let cached = app.cache.entry_count();
    assert!(cached >= 1, "the key's verification is cached");
    let applied = app.live.apply(load(&yaml("contacts:list", true)), &stop());
    assert_eq!(applied.unwrap(), Reloaded::Applied);
    assert_eq!(
        denied(&check(&app, &token).await),
        Some(DenyReason::InsufficientPermissions)
    );
    app.cache.sync().await;
    assert_eq!(app.cache.entry_count(), cached, "the key's entry was kept");
}

#[tokio::test]
async fn a_restart_only_change_or_the_same_file_changes_nothing() {
    let app = app();
    let token = jwt();
    let same = app.live.apply(load(&yaml("contacts:read", true)), &stop());
    assert_eq!(same.unwrap(), Reloaded::Unchanged);
    let moved = yaml("contacts:list", true).replace("http: '127.0.0.1:0'", "http: '127.0.0.1:1'");
    match app.live.apply(load(&moved), &stop()) {
        Err(ReloadError::NeedsRestart(settings)) => assert_eq!(settings, ["listen"]),
        other => panic!("a listener change was not refused: {other:?}"),
    }
    // The route kept its scope: the refused file's scope change was not taken.
    assert!(matches!(check(&app, &token).await, Decision::Allow(_)));
}

/// A change made to the file while the server was starting (after its first read, before
/// it followed the file: a ConfigMap updated as the pod starts) is reloaded, not left
/// until the next change: the file's watch is made before that read, as `serve` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_the_server_was_starting_is_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.yaml");
    std::fs::write(&path, yaml("contacts:read", false)).unwrap();
    let changes = FileWatch::new([path.clone()], FILE_CHECK);
    let first_read = std::fs::read_to_string(&path).unwrap();
    let app = App::with_store(load(&first_read), secrets(), Arc::new(MemoryStore::new()))
        .expect("the app builds");
    let token = reader(&app).await;
    // Another length too: a rewrite within the file system's timestamp granularity is
    // still a change.
    std::fs::write(&path, yaml("billing:read", false)).unwrap();
    app.live.reload_from(path, changes, std::env::vars());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let following = tokio::spawn(follow_file(app.live.clone(), stopped, Hangup::Reloads));
    keygate_test_support::eventually(
        keygate_test_support::PATIENCE,
        "the change made while starting is reloaded",
        || async {
            (denied(&check(&app, &token).await) == Some(DenyReason::InsufficientPermissions))
                .then_some(())
        },
    )
    .await;
    stop.send_replace(true);
    following.await.unwrap();
}

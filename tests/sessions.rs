//! keygate's own session tokens: minted from an API key (`keygate.v1.Authorizer/
//! MintSessionToken`, or a `mint_session` route), accepted as the issuer `session` only on
//! the routes that name it, published at `/.well-known/jwks.json`, and judged on their key's
//! current state on the replica that checks them: dead there once it has applied the key's
//! revocation, deletion or expiry, held to the key's current scopes and plan. Signing keys
//! rotate with overlap.

use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keygate::api::proto::{self, authorizer_server::Authorizer as _};
use keygate::config::{Config, Secrets};
use keygate::keys::{CreatedKey, NewKey};
use keygate::revocation::{EventFeed, FeedItem};
use keygate::secret::Secret;
use keygate::server::App;
use keygate::store::Cursor;
use keygate_test_support as support;
use keygate_test_support::{
    bearer, check_request, ed25519_pem, outcome_of, Backend, Deployment, Outcome, Replica, TENANT,
};

const STREAM_PATH: &str = "/v1/stream/calls/7";

const SESSION_ROUTES: &str = r#"
    - { name: sessions-create, methods: [POST], path: /v1/sessions, scope: "contacts:read", credentials: [api_key], mint_session: true }
    - { name: stream, methods: [GET], path: "/v1/stream/**", scope: "contacts:read", credentials: [session] }
    - { name: stream-write, methods: [POST], path: "/v1/stream/**", scope: "contacts:write", credentials: [session, api_key], tenant: required }
"#;

/// Where a session token needs `contacts:write`.
const STREAM_WRITE_PATH: &str = "/v1/stream/calls/7/hangup";

/// Listeners on ephemeral ports, cheap argon2, the usual routes, and — with signing keys
/// (`kid`s, first signs, each read from `KEYGATE_TEST_SESSION_KEY_<KID>`) — the session
/// routes, without leeway.
fn session_config(backend: Backend<'_>, kids: &[&str]) -> Config {
    let store = support::store_yaml(backend);
    let mut yaml = format!(
        "listen: {{ grpc: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", http: \"127.0.0.1:0\" }}\n\
         store: {store}\n\
         api_keys: {{ prefix: sk, argon2: {{ memory_kib: 64, iterations: 1, parallelism: 1 }} }}\n\
         policy:\n  credential_headers:\n    - {{ header: authorization, scheme: Bearer }}\n  \
         partner_scopes: [\"billing:partner:*\"]\n  unmatched: deny\n  routes:\n{ROUTES}"
    );
    if !kids.is_empty() {
        yaml.push_str(SESSION_ROUTES);
        yaml.push_str("sessions:\n  leeway: 0s\n  signing_keys:\n");
        for kid in kids {
            yaml.push_str(&format!(
                "    - {{ kid: {kid}, key_env: KEYGATE_TEST_SESSION_KEY_{} }}\n",
                kid.to_uppercase()
            ));
        }
    }
    Config::load(Some(&yaml), Vec::new()).expect("the session test configuration is valid")
}

const ROUTES: &str = r#"    - { name: public, methods: [GET], path: "/public/**", public: true }
    - { name: contacts-read, methods: [GET, HEAD], path: "/v1/contacts/**", scope: "contacts:read" }
    - { name: contacts-write, methods: [POST, PUT, PATCH, DELETE], path: "/v1/contacts/**", scope: "contacts:write", tenant: required }
"#;

/// Test secrets holding one PEM per kid.
fn session_secrets(keys: &[(&str, &str)]) -> Secrets {
    let mut s = support::secrets();
    for (kid, pem) in keys {
        s.named.insert(
            format!("KEYGATE_TEST_SESSION_KEY_{}", kid.to_uppercase()),
            Secret::new(*pem),
        );
    }
    s
}

async fn mint(
    app: &App,
    key: &str,
    scopes: &[&str],
    ttl_seconds: u32,
) -> proto::MintSessionTokenResponse {
    mint_as(app, key, scopes, ttl_seconds, "")
        .await
        .expect("the call is answered")
}

async fn mint_as(
    app: &App,
    key: &str,
    scopes: &[&str],
    ttl_seconds: u32,
    tenant: &str,
) -> Result<proto::MintSessionTokenResponse, tonic::Status> {
    app.authorizer_service()
        .mint_session_token(tonic::Request::new(proto::MintSessionTokenRequest {
            credential: key.to_owned(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl_seconds,
            tenant_id: tenant.to_owned(),
        }))
        .await
        .map(tonic::Response::into_inner)
}

/// A minted token (the test fails on a denial).
async fn minted(app: &App, key: &str) -> String {
    let r = mint(app, key, &[], 0).await;
    assert!(r.denial.is_none(), "minted: {:?}", r.denial);
    assert!(!r.token.is_empty());
    r.token
}

async fn stream_on(app: &App, token: &str) -> Outcome {
    outcome_of(
        &app.envoy_service(),
        check_request("GET", STREAM_PATH, &[("authorization", &bearer(token))]),
    )
    .await
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The headers an allow sets upstream, and the ones it adds to the client's response.
async fn allow_headers(
    app: &App,
    method: &str,
    path: &str,
    token: &str,
) -> (Vec<(String, String)>, Vec<(String, String)>) {
    let resp = app
        .envoy_service()
        .decide(check_request(
            method,
            path,
            &[("authorization", &bearer(token))],
        ))
        .await
        .unwrap();
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!("expected an allow: {resp:?}");
    };
    (
        support::header_pairs(&ok.headers),
        support::header_pairs(&ok.response_headers_to_add),
    )
}

fn now_s() -> i64 {
    (keygate::store::now_ms() / 1000) as i64
}

fn memory_app(kids: &[&str], keys: &[(&str, &str)]) -> App {
    App::build(session_config(Backend::Memory, kids), session_secrets(keys)).unwrap()
}

/// `key`, created on `app`.
async fn created(app: &App, key: NewKey) -> CreatedKey {
    app.admin.create(key).await.expect("the key is created")
}

/// A `reader_key` created on `app`, and a session token minted from it.
async fn reader_and_session(app: &App) -> (CreatedKey, String) {
    let key = created(app, support::reader_key()).await;
    let session = minted(app, &key.token).await;
    (key, session)
}

/// Replicas of one deployment on their own Redis, signing sessions with `k1`.
async fn deployment() -> Deployment {
    let secrets = session_secrets(&[("k1", &ed25519_pem())]);
    Deployment::with_secrets(|backend| session_config(backend, &["k1"]), secrets).await
}

#[tokio::test]
async fn a_session_token_acts_for_its_key_on_the_routes_that_take_it() {
    let pem = ed25519_pem();
    let app = memory_app(&["k1"], &[("k1", &pem)]);
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let r = mint(&app, &key.token, &[], 0).await;
    assert!(r.denial.is_none(), "{:?}", r.denial);
    assert_eq!(r.tenant_id, TENANT);
    assert_eq!(r.scopes, vec!["contacts:read".to_string()]);
    // One hour by default.
    let expires = r.expires_at.unwrap().seconds;
    assert!((expires - now_s() - 3600).abs() <= 2, "expires {expires}");

    assert_eq!(stream_on(&app, &r.token).await, Outcome::Allowed);
    let (upstream, _) = allow_headers(&app, "GET", STREAM_PATH, &r.token).await;
    assert_eq!(header(&upstream, "x-keygate-kind"), Some("session"));
    assert_eq!(
        header(&upstream, "x-keygate-key-id"),
        Some(key.record.key_id.as_str())
    );
    assert_eq!(header(&upstream, "x-tenant-id"), Some(TENANT));
    assert_eq!(header(&upstream, "x-keygate-scopes"), Some("contacts:read"));
    // A route that does not name `session` refuses it, although its key could read there:
    // a token handed to a browser is not the key.
    assert_eq!(
        outcome_of(&app.envoy_service(), support::read_with(&r.token)).await,
        Outcome::denied("insufficient_permissions", 403)
    );
    assert_eq!(
        outcome_of(&app.envoy_service(), support::read_with(&key.token)).await,
        Outcome::Allowed
    );
    // A sessions-only route refuses the API key itself.
    assert_eq!(
        stream_on(&app, &key.token).await,
        Outcome::denied("insufficient_permissions", 403)
    );
}

#[tokio::test]
async fn a_session_token_holds_no_more_than_its_key_and_lives_no_longer() {
    let pem = ed25519_pem();
    let app = memory_app(&["k1"], &[("k1", &pem)]);
    let key = app.admin.create(support::reader_key()).await.unwrap();

    let wider = mint(&app, &key.token, &["contacts:write"], 0).await;
    assert_eq!(
        wider.denial.map(|d| (d.code, d.http_status)),
        Some(("insufficient_permissions".to_owned(), 403))
    );
    assert!(wider.token.is_empty());
    let bad = mint_as(&app, &key.token, &["not a scope"], 0, "")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("scopes:"), "{}", bad.message());
    let long = mint_as(&app, &key.token, &[], 25 * 3600, "")
        .await
        .unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
    assert!(
        long.message().starts_with("ttl_seconds:"),
        "{}",
        long.message()
    );

    // A key that expires in ten minutes mints tokens that expire with it.
    let short_key = app
        .admin
        .create(NewKey {
            expires_in: Some(Duration::from_secs(600)),
            ..support::reader_key()
        })
        .await
        .unwrap();
    let r = mint(&app, &short_key.token, &[], 0).await;
    assert_eq!(
        r.expires_at.unwrap().seconds,
        (short_key.record.expires_at_ms / 1000) as i64
    );

    // A token with fewer scopes than its key is held to them.
    let writer = app
        .admin
        .create(NewKey {
            scopes: vec!["contacts:read".into(), "contacts:write".into()],
            ..support::reader_key()
        })
        .await
        .unwrap();
    let r = mint(&app, &writer.token, &["contacts:read"], 60).await;
    assert_eq!(r.scopes, vec!["contacts:read".to_string()]);
    assert_eq!(
        write_on(&app, &r.token).await,
        Outcome::denied("insufficient_permissions", 403)
    );
    let full = mint(&app, &writer.token, &[], 60).await;
    assert_eq!(write_on(&app, &full.token).await, Outcome::Allowed);
}

async fn write_on(app: &App, token: &str) -> Outcome {
    outcome_of(
        &app.envoy_service(),
        check_request(
            "POST",
            STREAM_WRITE_PATH,
            &[("authorization", &bearer(token)), ("x-tenant-id", TENANT)],
        ),
    )
    .await
}

#[tokio::test]
async fn only_an_api_key_mints_and_a_bad_one_gets_its_denial() {
    let pem = ed25519_pem();
    let app = memory_app(&["k1"], &[("k1", &pem)]);
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let session = minted(&app, &key.token).await;
    let again = mint_as(&app, &session, &[], 0, "").await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::InvalidArgument);
    assert!(
        again.message().starts_with("credential:"),
        "{}",
        again.message()
    );

    let wrong = mint(&app, &support::wrong_secret_for(&key.token), &[], 0).await;
    assert_eq!(wrong.denial.unwrap().code, "invalid_api_key");
    app.admin.revoke(&key.record.key_id).await.unwrap();
    let revoked = mint(&app, &key.token, &[], 0).await;
    assert_eq!(revoked.denial.unwrap().code, "revoked_api_key");

    // A partner key mints for a delegated tenant only; a runtime key not at all.
    let partner = app.admin.create(partner_key("acme")).await.unwrap();
    let no_tenant = mint(&app, &partner.token, &[], 0).await;
    assert_eq!(no_tenant.denial.unwrap().code, "tenant_required");
    let not_delegated = mint_as(&app, &partner.token, &[], 0, TENANT).await.unwrap();
    assert_eq!(not_delegated.denial.unwrap().code, "tenant_forbidden");
    app.partners.set("acme", TENANT, true).await.unwrap();
    let delegated = mint_as(&app, &partner.token, &[], 0, TENANT).await.unwrap();
    assert!(delegated.denial.is_none(), "{:?}", delegated.denial);
    assert_eq!(delegated.tenant_id, TENANT);
    assert_eq!(stream_on(&app, &delegated.token).await, Outcome::Allowed);

    let runtime = app
        .admin
        .create(NewKey {
            tenant_id: String::new(),
            kind: "runtime".into(),
            service: "billing-worker".into(),
            ..support::reader_key()
        })
        .await
        .unwrap();
    let r = mint(&app, &runtime.token, &[], 0).await;
    assert_eq!(r.denial.unwrap().code, "insufficient_permissions");
}

#[tokio::test]
async fn an_expired_or_foreign_session_token_is_invalid() {
    let pem = ed25519_pem();
    let app = memory_app(&["k1"], &[("k1", &pem)]);
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let parent = keygate::authn::principal_of(&key.record);
    let now = keygate::store::now_ms();
    // The key's own claims, signed by `by` (an app's session keys), alive over `life`.
    let signed = |by: &App, life: std::ops::Range<u64>| {
        let keys = by.sessions.as_ref().expect("sessions are configured");
        let scopes = ["contacts:read".into()];
        keys.sign(&parent, TENANT, &scopes, life.start, life.end)
            .token
            .expose()
            .to_owned()
    };
    let expired = signed(&app, now - 120_000..now - 1000);
    // The same claims signed by a key this deployment does not have.
    let other = memory_app(&["k1"], &[("k1", &ed25519_pem())]);
    let foreign = signed(&other, now..now + 60_000);
    for token in [&expired, &foreign] {
        assert_eq!(
            stream_on(&app, token).await,
            Outcome::denied("invalid_token", 401)
        );
    }
    let fresh = signed(&app, now..now + 60_000);
    assert_eq!(stream_on(&app, &fresh).await, Outcome::Allowed);
}

/// An Ed25519 key in PKCS#8 PEM as some tools write it: version 2, with its public half
/// (`public`, normally the secret's own).
fn pem_with_public_half(public: impl FnOnce(&mut [u8])) -> String {
    use base64::Engine;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    let mut der = key.to_pkcs8_der().unwrap().as_bytes().to_vec();
    let at = der.len() - 32;
    public(&mut der[at..]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

#[tokio::test]
async fn a_signing_key_written_with_its_public_half_signs_and_a_mismatched_one_is_refused() {
    let app = memory_app(&["k1"], &[("k1", &pem_with_public_half(|_| {}))]);
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let token = minted(&app, &key.token).await;
    assert_eq!(stream_on(&app, &token).await, Outcome::Allowed);

    let mismatched = pem_with_public_half(|public| public[0] ^= 1);
    let secrets = session_secrets(&[("k1", &mismatched)]);
    let err = App::build(session_config(Backend::Memory, &["k1"]), secrets)
        .err()
        .expect("refused");
    let err = err.downcast::<keygate::config::ConfigError>().unwrap();
    assert_eq!(err.field, "sessions.signing_keys[0].key_env", "{err}");
}

#[tokio::test]
async fn a_create_session_route_hands_the_token_upstream_and_to_the_client() {
    let pem = ed25519_pem();
    let app = memory_app(&["k1"], &[("k1", &pem)]);
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let (upstream, client) = allow_headers(&app, "POST", "/v1/sessions", &key.token).await;
    let token = header(&upstream, "x-keygate-session-token").expect("the token goes upstream");
    assert_eq!(header(&client, "x-keygate-session-token"), Some(token));
    let expires = header(&upstream, "x-keygate-session-expires-at").unwrap();
    assert_eq!(
        header(&client, "x-keygate-session-expires-at"),
        Some(expires)
    );
    let at = humantime::parse_rfc3339(expires).unwrap();
    let in_s = at
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    assert!((3590..=3600).contains(&in_s), "expires in {in_s}s");
    assert_eq!(stream_on(&app, token).await, Outcome::Allowed);
    // Anywhere else, a client-sent session header does not pass.
    let (upstream, client) = allow_headers(&app, "GET", "/v1/contacts/1", &key.token).await;
    assert_eq!(header(&upstream, "x-keygate-session-token"), None);
    assert_eq!(header(&client, "x-keygate-session-token"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_rotating_or_deleting_the_key_denies_its_session_tokens_on_another_replica() {
    let deployment = deployment().await;
    let first = deployment.serving().await;
    let second = deployment.serving().await;
    for change in ["revoke", "rotate", "delete", "narrow", "shorten"] {
        let (key, session) = reader_and_session(&first.app).await;
        let (_, bystander) = reader_and_session(&first.app).await;
        for token in [&session, &bystander] {
            assert_eq!(
                stream_on(&second.app, token).await,
                Outcome::Allowed,
                "{change}: before"
            );
        }
        let mut events = second.app.bus.subscribe();
        let id = &key.record.key_id;
        let update = |u: keygate::keys::KeyUpdate| first.app.admin.update(id, u);
        let expected = match change {
            "revoke" => {
                first.app.admin.revoke(id).await.unwrap();
                Outcome::denied("invalid_token", 401)
            }
            // Rotated without grace: the old key ends now, and its tokens with it.
            "rotate" => {
                first.app.admin.rotate(id, Duration::ZERO).await.unwrap();
                Outcome::denied("invalid_token", 401)
            }
            "delete" => {
                first.app.admin.delete(id).await.unwrap();
                Outcome::denied("invalid_token", 401)
            }
            // The key loses the scope its session tokens hold: they keep what is left.
            "narrow" => {
                update(keygate::keys::KeyUpdate {
                    scopes: Some(vec!["contacts:write".into()]),
                    ..Default::default()
                })
                .await
                .unwrap();
                Outcome::denied("insufficient_permissions", 403)
            }
            // …or the key expires before they do (checked here once it has).
            _ => {
                update(keygate::keys::KeyUpdate {
                    expires_in: Some(Duration::from_millis(1)),
                    ..Default::default()
                })
                .await
                .unwrap();
                Outcome::denied("invalid_token", 401)
            }
        };
        support::arrives(
            &mut events,
            &format!("{change}: the key's event at the second replica"),
            |item| matches!(item, FeedItem::Event(e) if e.key_id == *id).then_some(()),
        )
        .await;
        assert_eq!(
            stream_on(&second.app, &session).await,
            expected,
            "{change}: the session token of the changed key"
        );
        assert_eq!(
            stream_on(&second.app, &bystander).await,
            Outcome::Allowed,
            "{change}: another key's session token"
        );
    }
    // Renaming or widening the key leaves its session tokens be; a rotation with grace
    // leaves them for the grace, as it leaves the key.
    let (key, session) = reader_and_session(&first.app).await;
    let wider = keygate::keys::KeyUpdate {
        name: Some("renamed".into()),
        scopes: Some(
            key.record
                .scopes
                .iter()
                .cloned()
                .chain(["contacts:write".to_owned()])
                .collect(),
        ),
        ..Default::default()
    };
    first
        .app
        .admin
        .update(&key.record.key_id, wider)
        .await
        .unwrap();
    first
        .app
        .admin
        .rotate(&key.record.key_id, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        stream_on(&second.app, &session).await,
        Outcome::Allowed,
        "a wider key, rotated with grace, keeps its session tokens"
    );
    // A replica started afterwards judges on the key as the store has it.
    let (key, session) = reader_and_session(&first.app).await;
    first.app.admin.revoke(&key.record.key_id).await.unwrap();
    let late = deployment.serving().await;
    assert_eq!(
        stream_on(&late.app, &session).await,
        Outcome::denied("invalid_token", 401)
    );
    support::shut_down([first, second, late]).await;
}

/// A feed that passes nothing on while held: a replica whose revocation follower is
/// behind (its stream read in flight, its connection in backoff).
struct HeldFeed {
    inner: std::sync::Arc<dyn EventFeed>,
    open: tokio::sync::watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl EventFeed for HeldFeed {
    async fn start_position(&self) -> Result<Cursor, keygate::store::StoreError> {
        self.inner.start_position().await
    }
    async fn read(
        &self,
        after: &Cursor,
        resync: bool,
    ) -> Result<Vec<keygate::revocation::FeedEntry>, keygate::store::StoreError> {
        // What a read brings is passed on only while open (a read may be in flight when
        // the feed is held).
        let read = self.inner.read(after, resync).await;
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        read
    }
    async fn token_revocations(
        &self,
    ) -> Result<Vec<keygate::store::TokenRevocation>, keygate::store::StoreError> {
        self.inner.token_revocations().await
    }
}

/// The defect this pins: a replica that still held a revoked key as valid minted session
/// tokens after the revocation's cut-off, and those lived for their whole lifetime on
/// every replica. Now a session token is judged on its key's state where it is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_minted_by_a_replica_behind_on_a_revocation_dies_once_it_catches_up() {
    let deployment = deployment().await;
    let first = deployment.serving().await;
    // The second replica follows its stream through a feed the test holds back.
    let behind = App::build(deployment.config(), deployment.secrets.clone()).unwrap();
    let behind = std::sync::Arc::new(behind);
    let (open, held) = tokio::sync::watch::channel(true);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let feed = std::sync::Arc::new(HeldFeed {
        inner: behind.revocation_feed(),
        open: held,
    });
    let follower = tokio::spawn(behind.bus.clone().follow(feed, stopped));
    support::eventually(support::PATIENCE, "the second replica follows", || async {
        behind.bus.has_position().then_some(())
    })
    .await;

    let (key, before) = reader_and_session(&first.app).await;
    assert_eq!(stream_on(&behind, &before).await, Outcome::Allowed);
    // The second replica knows the key (it verified it).
    assert_eq!(
        outcome_of(&behind.envoy_service(), support::read_with(&key.token)).await,
        Outcome::Allowed
    );

    open.send_replace(false);
    let mut events = behind.bus.subscribe();
    first.app.admin.revoke(&key.record.key_id).await.unwrap();
    // Past the second the revocation was made in: a cut-off by time would miss a token
    // issued from here on.
    // (The clock is the event here: one wait to the next whole second.)
    let now = keygate::store::now_ms();
    tokio::time::sleep(Duration::from_millis(1000 - now % 1000 + 1)).await;
    let during = minted(&behind, &key.token).await;
    // The replica that made the change denies both at once…
    for token in [&before, &during] {
        assert_eq!(
            stream_on(&first.app, token).await,
            Outcome::denied("invalid_token", 401),
            "at the replica that revoked"
        );
    }
    // …the one behind cannot know yet: it still holds the key as active.
    assert_eq!(stream_on(&behind, &during).await, Outcome::Allowed);

    open.send_replace(true);
    support::arrives(
        &mut events,
        "the revocation at the replica behind",
        |item| matches!(item, FeedItem::Event(e) if e.key_id == key.record.key_id).then_some(()),
    )
    .await;
    for token in [&before, &during] {
        assert_eq!(
            stream_on(&behind, token).await,
            Outcome::denied("invalid_token", 401),
            "once it has applied the revocation"
        );
    }
    let late = mint(&behind, &key.token, &[], 0).await;
    assert_eq!(late.denial.unwrap().code, "revoked_api_key");
    stop.send_replace(true);
    follower.await.unwrap();
    first.running.shutdown().await.unwrap();
}

/// Narrowing a key mints at once tokens that work (no cut-off of the second to wait out),
/// and tokens minted before keep what the key still grants, and no more.
#[tokio::test]
async fn a_session_holds_what_its_key_holds_now() {
    let pem = ed25519_pem();
    let app = memory_app(&["k1"], &[("k1", &pem)]);
    let both = || {
        Some(vec![
            "contacts:read".to_owned(),
            "contacts:write".to_owned(),
        ])
    };
    let key = app
        .admin
        .create(NewKey {
            scopes: both().unwrap(),
            ..support::reader_key()
        })
        .await
        .unwrap();
    let id = &key.record.key_id;
    let old = minted(&app, &key.token).await;
    assert_eq!(write_on(&app, &old).await, Outcome::Allowed);
    let set = |scopes| keygate::keys::KeyUpdate {
        scopes,
        ..Default::default()
    };
    app.admin
        .update(id, set(Some(vec!["contacts:read".into()])))
        .await
        .unwrap();
    // Minted in the same second as the change: alive, with what the key holds now.
    let fresh = mint(&app, &key.token, &[], 0).await;
    assert!(fresh.denial.is_none(), "{:?}", fresh.denial);
    assert_eq!(fresh.scopes, vec!["contacts:read".to_string()]);
    for token in [&old, &fresh.token] {
        assert_eq!(stream_on(&app, token).await, Outcome::Allowed);
        assert_eq!(
            write_on(&app, token).await,
            Outcome::denied("insufficient_permissions", 403)
        );
    }
    let (upstream, _) = allow_headers(&app, "GET", STREAM_PATH, &old).await;
    assert_eq!(header(&upstream, "x-keygate-scopes"), Some("contacts:read"));
    // Given back to the key, the scope is the old token's again (never the fresh one's:
    // it was not minted with it).
    app.admin.update(id, set(both())).await.unwrap();
    assert_eq!(write_on(&app, &old).await, Outcome::Allowed);
    assert_eq!(
        write_on(&app, &fresh.token).await,
        Outcome::denied("insufficient_permissions", 403)
    );
    // A wildcard token under a narrowed key holds what the key names.
    app.admin
        .update(id, set(Some(vec!["contacts:*".into()])))
        .await
        .unwrap();
    let wild = minted(&app, &key.token).await;
    app.admin
        .update(id, set(Some(vec!["contacts:read".into()])))
        .await
        .unwrap();
    assert_eq!(stream_on(&app, &wild).await, Outcome::Allowed);
    assert_eq!(
        write_on(&app, &wild).await,
        Outcome::denied("insufficient_permissions", 403)
    );
}

/// Plans as YAML, beside the session routes: `roomy` (1,000 a minute), `tight` (2 a minute,
/// one session), and a route that mints a session and takes a lease.
fn plan_session_config() -> Config {
    let mut yaml = String::new();
    yaml.push_str(
        "listen: { grpc: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", http: \"127.0.0.1:0\" }\n\
         store: { backend: memory }\n\
         api_keys: { prefix: sk, argon2: { memory_kib: 64, iterations: 1, parallelism: 1 } }\n\
         sessions: { leeway: 0s, signing_keys: [{ kid: k1, key_env: KEYGATE_TEST_SESSION_KEY_K1 }] }\n\
         policy:\n  credential_headers: [{ header: authorization, scheme: Bearer }]\n  \
         unmatched: deny\n  plans:\n    \
         roomy: { requests_per_minute: 1000 }\n    \
         tight: { requests_per_minute: 2, concurrent_sessions: 1 }\n  routes:\n",
    );
    yaml.push_str(SESSION_ROUTES.trim_start_matches('\n'));
    yaml.push_str(
        "    - { name: calls-create, methods: [POST], path: /v1/calls, scope: \"contacts:read\", credentials: [api_key], mint_session: true, lease_ttl: 1h }\n",
    );
    Config::load(Some(&yaml), Vec::new()).expect("the plan session configuration is valid")
}

/// An app on `plan_session_config`, signing with `k1`.
fn plan_session_app() -> App {
    App::build(
        plan_session_config(),
        session_secrets(&[("k1", &ed25519_pem())]),
    )
    .unwrap()
}

/// `key` on `plan`.
fn on_plan(plan: &str, key: NewKey) -> NewKey {
    NewKey {
        plan: plan.into(),
        ..key
    }
}

/// The plan a session spends is its key's plan now, not the one it was minted under.
#[tokio::test]
async fn a_session_spends_its_keys_current_plan() {
    let app = plan_session_app();
    let key = created(&app, on_plan("roomy", support::reader_key())).await;
    let session = minted(&app, &key.token).await;
    let (_, client) = allow_headers(&app, "GET", STREAM_PATH, &session).await;
    assert_eq!(header(&client, "x-ratelimit-limit"), Some("1000"));
    app.admin
        .update(
            &key.record.key_id,
            keygate::keys::KeyUpdate {
                plan: Some("tight".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (_, client) = allow_headers(&app, "GET", STREAM_PATH, &session).await;
    assert_eq!(header(&client, "x-ratelimit-limit"), Some("2"));
}

/// A request that is denied after its admission takes no lease with it: the next one that
/// may pass still finds the plan's one session free.
#[tokio::test]
async fn a_denied_session_request_holds_no_lease() {
    let app = plan_session_app();
    let partner = created(&app, on_plan("tight", partner_key("acme"))).await;
    app.partners.set("acme", TENANT, true).await.unwrap();
    let create = |tenant: Option<&str>| {
        let mut headers = vec![("authorization".to_owned(), bearer(&partner.token))];
        headers.extend(tenant.map(|t| ("x-tenant-id".to_owned(), t.to_owned())));
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        check_request("POST", "/v1/calls", &headers)
    };
    // A partner key names no tenant: no session can be minted, so nothing is spent.
    assert_eq!(
        outcome_of(&app.envoy_service(), create(None)).await,
        Outcome::denied("tenant_required", 400)
    );
    assert_eq!(
        outcome_of(&app.envoy_service(), create(Some(TENANT))).await,
        Outcome::Allowed,
        "the plan's one session is still free"
    );
}

/// A partner's session token acts under its tenant's delegation as it stands: withdrawing
/// that delegation denies it on every replica; the partner's tokens for other tenants and
/// other keys' tokens are left be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_a_delegation_denies_the_partners_session_tokens_on_another_replica() {
    let deployment = deployment().await;
    let first = deployment.serving().await;
    let second = deployment.serving().await;
    let partner = created(&first.app, partner_key("acme")).await;
    let other_tenant = "1d3c5b7a-9e8f-4a6b-8c2d-0e1f2a3b4c5d";
    first.app.partners.set("acme", TENANT, true).await.unwrap();
    first
        .app
        .partners
        .set("acme", other_tenant, true)
        .await
        .unwrap();
    let session = mint_as(&first.app, &partner.token, &[], 0, TENANT)
        .await
        .unwrap()
        .token;
    let elsewhere = mint_as(&first.app, &partner.token, &[], 0, other_tenant)
        .await
        .unwrap()
        .token;
    let (_, bystander) = reader_and_session(&first.app).await;
    for token in [&session, &elsewhere, &bystander] {
        assert_eq!(stream_on(&second.app, token).await, Outcome::Allowed);
    }
    let mut events = second.app.bus.subscribe();
    first.app.partners.set("acme", TENANT, false).await.unwrap();
    support::arrives(
        &mut events,
        "the withdrawal at the second replica",
        |item| matches!(item, FeedItem::Delegation(_)).then_some(()),
    )
    .await;
    assert_eq!(
        stream_on(&second.app, &session).await,
        Outcome::denied("invalid_token", 401),
        "the partner's session token for the tenant it may no longer act for"
    );
    assert_eq!(stream_on(&second.app, &elsewhere).await, Outcome::Allowed);
    assert_eq!(stream_on(&second.app, &bystander).await, Outcome::Allowed);
    let again = mint_as(&first.app, &partner.token, &[], 0, TENANT)
        .await
        .unwrap();
    assert_eq!(again.denial.unwrap().code, "tenant_forbidden");
    // Granted again, the token acts again: it was never revoked, only not delegated.
    first.app.partners.set("acme", TENANT, true).await.unwrap();
    assert_eq!(stream_on(&first.app, &session).await, Outcome::Allowed);
    support::shut_down([first, second]).await;
}

/// A reader key of `partner`, for the tenants delegated to it.
fn partner_key(partner: &str) -> NewKey {
    NewKey {
        tenant_id: String::new(),
        kind: "partner".into(),
        partner_id: partner.into(),
        ..support::reader_key()
    }
}

async fn jwks_of(replica: &Replica) -> (u16, serde_json::Value) {
    let resp = reqwest::get(format!(
        "http://{}/.well-known/jwks.json",
        replica.running.http
    ))
    .await
    .unwrap();
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn kids(jwks: &serde_json::Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .expect("a JWKS has keys")
        .iter()
        .map(|k| {
            assert_eq!(k["kty"], "OKP");
            assert_eq!(k["crv"], "Ed25519");
            assert!(k.get("d").is_none(), "a private part in the JWKS: {k}");
            k["kid"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_rotates_with_overlap() {
    let (old_pem, new_pem) = (ed25519_pem(), ed25519_pem());
    let secrets = session_secrets(&[("old", &old_pem), ("new", &new_pem)]);
    let before = Replica::serving(session_config(Backend::Memory, &["old"]), &secrets).await;
    let (status, jwks) = jwks_of(&before).await;
    assert_eq!(status, 200);
    assert_eq!(kids(&jwks), vec!["old"]);
    let (key, old_token) = reader_and_session(&before.app).await;
    assert_eq!(kid_of(&old_token), "old");

    // The overlap: the new key signs, the old one still verifies; both are published.
    let store = before.app.store.clone();
    let overlap = App::with_store(
        session_config(Backend::Memory, &["new", "old"]),
        secrets.clone(),
        store.clone(),
    )
    .unwrap();
    let new_token = minted(&overlap, &key.token).await;
    assert_eq!(kid_of(&new_token), "new");
    assert_eq!(stream_on(&overlap, &old_token).await, Outcome::Allowed);
    assert_eq!(stream_on(&overlap, &new_token).await, Outcome::Allowed);
    let overlap_replica =
        Replica::serving(session_config(Backend::Memory, &["new", "old"]), &secrets).await;
    assert_eq!(kids(&jwks_of(&overlap_replica).await.1), vec!["new", "old"]);

    // Once the old key is gone, its tokens are too.
    let after = App::with_store(session_config(Backend::Memory, &["new"]), secrets, store).unwrap();
    assert_eq!(
        stream_on(&after, &old_token).await,
        Outcome::denied("invalid_token", 401)
    );
    assert_eq!(stream_on(&after, &new_token).await, Outcome::Allowed);
    support::shut_down([before, overlap_replica]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sessions_minting_is_refused_and_no_jwks_is_served() {
    let replica = Replica::serving(session_config(Backend::Memory, &[]), &support::secrets()).await;
    let key = created(&replica.app, support::reader_key()).await;
    let refused = mint_as(&replica.app, &key.token, &[], 0, "")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(jwks_of(&replica).await.0, 404);
    replica.running.shutdown().await.unwrap();
}

#[test]
fn mistakes_in_sessions_stop_startup_naming_the_field() {
    let with = |sessions: &str, route: &str| {
        let base = format!(
            "listen: {{ grpc: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", http: \"127.0.0.1:0\" }}\n\
             policy:\n  routes:\n    - {route}\n{sessions}"
        );
        Config::load(Some(&base), Vec::new()).err().map(|e| e.field)
    };
    let plain = "{ name: r, path: /x, scope: \"a:b\" }";
    let keys = "sessions: { signing_keys: [{ kid: k1, key_env: KEYGATE_X }] }";
    for (sessions, route, field) in [
        (
            "",
            "{ name: r, path: /s, scope: \"a:b\", credentials: [api_key], mint_session: true }",
            "policy.routes[0].mint_session",
        ),
        (
            "",
            "{ name: r, path: /s, scope: \"a:b\", credentials: [session] }",
            "policy.routes[0].credentials",
        ),
        (
            keys,
            "{ name: r, path: /s, scope: \"a:b\", mint_session: true }",
            "policy.routes[0].mint_session",
        ),
        (
            "sessions: { signing_keys: [{ kid: k1, key_env: A }, { kid: k1, key_env: B }] }",
            plain,
            "sessions.signing_keys[1].kid",
        ),
        (
            "sessions: { signing_keys: [{ kid: 'a b', key_env: A }] }",
            plain,
            "sessions.signing_keys[0].kid",
        ),
        (
            "sessions: { ephemeral_key: true, signing_keys: [{ kid: k1, key_env: A }] }",
            plain,
            "sessions.ephemeral_key",
        ),
        (
            "sessions: { ephemeral_key: true, lifetime: 2h, max_lifetime: 1h }",
            plain,
            "sessions.max_lifetime",
        ),
    ] {
        assert_eq!(
            with(sessions, route).as_deref(),
            Some(field),
            "{sessions} / {route}"
        );
    }
    // A key that is missing or not an Ed25519 PEM stops the build, naming its field.
    let config = session_config(Backend::Memory, &["k1"]);
    for secrets in [support::secrets(), session_secrets(&[("k1", "not a pem")])] {
        let err = App::build(config.clone(), secrets).err().expect("refused");
        let err = err.downcast::<keygate::config::ConfigError>().unwrap();
        assert_eq!(err.field, "sessions.signing_keys[0].key_env", "{err}");
        assert!(
            !err.message.contains("not a pem"),
            "the value is never echoed: {err}"
        );
    }
}

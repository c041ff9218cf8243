//! JWTs from configured issuers, through the Envoy adapter: what is allowed, every way a
//! token is refused (`invalid_token`, 401), the tenant claim against `X-Tenant-Id`, and
//! routes that take only one credential kind. The keys are test fixtures
//! (`tests/fixtures/jwt/`); each test writes its issuers' JWKS files itself.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keygate::config::{ClaimsConfig, Config, IssuerConfig, RouteConfig, TenantRule};
use keygate::principal::CredentialKind;
use keygate::secret::Secret;
use keygate::server::App;
use keygate_test_support as support;
use keygate_test_support::{
    bearer, check_request, outcome_of, Backend, Outcome, READ_PATH, TENANT,
};
use serde_json::{json, Value};

const ISSUER: &str = "https://login.example.com/";
const AUDIENCE: &str = "https://api.example.com";
const HS_SECRET_VAR: &str = "KEYGATE_TEST_JWT_SECRET";
const HS_SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name),
    )
    .expect("fixture")
}

fn signing(alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::PS256 => {
            EncodingKey::from_rsa_pem(&fixture("rsa.pem")).unwrap()
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(&fixture("ec256.pem")).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&fixture("ed25519.pem")).unwrap(),
        Algorithm::HS256 => EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap(),
        other => panic!("no fixture for {other:?}"),
    }
}

/// The public JWK of a fixture key, named `kid`.
fn public_jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
    jwk.common.key_id = Some(kid.into());
    jwk
}

struct Fixture {
    app: App,
    _dir: tempfile::TempDir,
}

/// An app with two issuers — `main` (RS256, ES256, EdDSA from a JWKS file) and `shared`
/// (HS256) — a JWT-only route and an API-key-only route, and `x-access-token` read too.
fn fixture_app() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let app = App::with_store(
        jwt_config(Backend::Memory, dir.path()),
        jwt_secrets(),
        std::sync::Arc::new(keygate::store::memory::MemoryStore::new()),
    )
    .expect("the JWT configuration is valid");
    Fixture { app, _dir: dir }
}

fn jwt_secrets() -> keygate::config::Secrets {
    let mut secrets = support::secrets();
    secrets
        .named
        .insert(HS_SECRET_VAR.into(), Secret::new(HS_SECRET));
    secrets
}

/// The configuration of `fixture_app` on `backend`, its JWKS file written into `dir`.
fn jwt_config(backend: Backend<'_>, dir: &Path) -> Config {
    let jwks = JwkSet {
        keys: vec![
            public_jwk(&signing(Algorithm::RS256), Algorithm::RS256, "rsa-1"),
            public_jwk(&signing(Algorithm::ES256), Algorithm::ES256, "ec-1"),
            public_jwk(&signing(Algorithm::EdDSA), Algorithm::EdDSA, "ed-1"),
        ],
    };
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, serde_json::to_string(&jwks).unwrap()).unwrap();
    let mut config: Config = support::config(backend);
    config
        .policy
        .credential_headers
        .push(keygate::config::CredentialHeader {
            header: "x-access-token".into(),
            scheme: None,
        });
    let route = |name: &str, path: &str, kinds: Vec<CredentialKind>, tenant| RouteConfig {
        name: name.into(),
        methods: vec!["GET".into()],
        path: path.into(),
        scope: Some("contacts:read".into()),
        public: false,
        tenant,
        credentials: Some(kinds),
        internal: false,
        environments: None,
        lease_ttl: None,
        ..Default::default()
    };
    config.policy.routes.insert(
        0,
        route("app-only", "/app/**", vec![CredentialKind::Jwt], None),
    );
    config.policy.routes.insert(
        0,
        route("keys-only", "/keys/**", vec![CredentialKind::ApiKey], None),
    );
    config.policy.routes.insert(
        0,
        route(
            "tenanted",
            "/tenanted/**",
            vec![CredentialKind::Jwt],
            Some(TenantRule::Required),
        ),
    );
    let issuer = |name: &str, iss: &str, algorithms: &[&str]| IssuerConfig {
        name: name.into(),
        issuer: iss.into(),
        audiences: vec![AUDIENCE.into()],
        algorithms: algorithms.iter().map(|a| a.to_string()).collect(),
        jwks_file: None,
        jwks_url: None,
        jwks_refresh: Duration::from_secs(300),
        jwks_refetch_min: Duration::from_secs(30),
        secret_env: None,
        leeway: Duration::from_secs(5),
        max_token_lifetime: Duration::from_secs(24 * 3600),
        claims: ClaimsConfig::default(),
        roles_claim: Some("roles".into()),
        roles: [("reader".to_owned(), vec!["contacts:read".to_owned()])].into(),
    };
    let mut main = issuer("main", ISSUER, &["RS256", "ES256", "EdDSA"]);
    main.jwks_file = Some(jwks_path.display().to_string());
    let mut shared = issuer("shared", "https://shared.example.com/", &["HS256"]);
    shared.secret_env = Some(HS_SECRET_VAR.into());
    config.jwt.issuers = vec![main, shared];
    config
}

fn now() -> u64 {
    keygate::store::now_ms() / 1000
}

/// Claims of a valid token of `main`: it may read contacts for `TENANT`.
fn claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-42",
        "tenant_id": TENANT,
        "scope": "contacts:read profile",
        "iat": now(),
        "exp": now() + 1800,
    })
}

fn token(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(Into::into);
    jsonwebtoken::encode(&header, claims, &signing(alg)).unwrap()
}

fn rs256(claims: &Value) -> String {
    token(Algorithm::RS256, Some("rsa-1"), claims)
}

async fn get(f: &Fixture, path: &str, headers: &[(&str, &str)]) -> Outcome {
    outcome_of(&f.app.envoy_service(), check_request("GET", path, headers)).await
}

async fn read_with_jwt(f: &Fixture, jwt: &str) -> Outcome {
    get(f, READ_PATH, &[("authorization", &bearer(jwt))]).await
}

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

#[tokio::test]
async fn a_valid_token_of_each_algorithm_is_allowed_in_either_header() {
    let f = fixture_app();
    for (alg, kid) in [
        (Algorithm::RS256, Some("rsa-1")),
        (Algorithm::ES256, Some("ec-1")),
        (Algorithm::EdDSA, Some("ed-1")),
    ] {
        let jwt = token(alg, kid, &claims());
        assert_eq!(read_with_jwt(&f, &jwt).await, Outcome::Allowed, "{alg:?}");
        assert_eq!(
            get(&f, READ_PATH, &[("x-access-token", &jwt)]).await,
            Outcome::Allowed,
            "{alg:?} in x-access-token"
        );
    }
    let mut shared = claims();
    shared["iss"] = json!("https://shared.example.com/");
    assert_eq!(
        read_with_jwt(&f, &token(Algorithm::HS256, None, &shared)).await,
        Outcome::Allowed,
        "HS256 with the shared secret"
    );
}

#[tokio::test]
async fn the_principal_comes_from_the_claims_and_roles_grant_scopes() {
    let f = fixture_app();
    let envoy = f.app.envoy_service();
    let answer = envoy
        .decide(check_request(
            "GET",
            READ_PATH,
            &[
                ("authorization", &bearer(&rs256(&claims()))),
                ("x-keygate-key-id", "forged"),
            ],
        ))
        .await
        .unwrap();
    let headers = support_ok_headers(&answer);
    assert_eq!(
        headers.get("x-keygate-kind").map(String::as_str),
        Some("jwt")
    );
    assert_eq!(headers.get("x-keygate-key-id"), None, "no key id for a JWT");
    assert!(
        removed_headers(&answer).contains(&"x-keygate-key-id".to_owned()),
        "the client's own x-keygate-key-id does not pass"
    );
    let metadata = answer.dynamic_metadata.as_ref().expect("metadata");
    let issuer = metadata.fields.get("issuer").and_then(|v| v.kind.as_ref());
    assert!(
        matches!(issuer, Some(prost_types_kind::StringValue(s)) if s == "main"),
        "{issuer:?}"
    );
    assert_eq!(
        headers.get("x-keygate-subject").map(String::as_str),
        Some("user-42")
    );
    assert_eq!(headers.get("x-tenant-id").map(String::as_str), Some(TENANT));
    assert_eq!(
        headers.get("x-keygate-scopes").map(String::as_str),
        Some("contacts:read,profile")
    );
    // No scope claim, but a role that grants the route's scope.
    let mut by_role = claims();
    by_role.as_object_mut().unwrap().remove("scope");
    by_role["roles"] = json!(["reader", "unknown-role"]);
    assert_eq!(read_with_jwt(&f, &rs256(&by_role)).await, Outcome::Allowed);
    // Neither: authenticated, but without the scope.
    by_role["roles"] = json!("unknown-role");
    assert_eq!(
        read_with_jwt(&f, &rs256(&by_role)).await,
        Outcome::denied("insufficient_permissions", 403)
    );
}

use envoy_types::pb::google::protobuf::value::Kind as prost_types_kind;

/// The headers an allow removes before forwarding.
fn removed_headers(
    answer: &envoy_types::pb::envoy::service::auth::v3::CheckResponse,
) -> Vec<String> {
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    match &answer.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok.headers_to_remove.clone(),
        other => panic!("not an allow: {other:?}"),
    }
}

/// The identity headers of an allow, by name.
fn support_ok_headers(
    answer: &envoy_types::pb::envoy::service::auth::v3::CheckResponse,
) -> std::collections::HashMap<String, String> {
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    match &answer.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            support::header_pairs(&ok.headers).into_iter().collect()
        }
        other => panic!("not an allow: {other:?}"),
    }
}

#[tokio::test]
async fn every_bad_token_is_invalid_token() {
    let f = fixture_app();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims();
        edit(&mut c);
        rs256(&c)
    };
    let rsa_public = fixture("rsa.pub.pem");
    let header_none = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(claims().to_string().as_bytes());
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(&rsa_public).unwrap(),
    )
    .unwrap();
    let other_key = jsonwebtoken::encode(
        &{
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some("rsa-1".into());
            h
        },
        &claims(),
        &EncodingKey::from_rsa_pem(&fixture("rsa2.pem")).unwrap(),
    )
    .unwrap();
    let mut shared_for_main = claims();
    shared_for_main["iss"] = json!(ISSUER);
    let cases: Vec<(&str, String)> = vec![
        ("alg none, unsigned", format!("{header_none}.{payload}.")),
        (
            "alg none, with a signature",
            format!("{header_none}.{payload}.c2ln"),
        ),
        ("HS256 with the RSA public key as secret", confused),
        (
            "HS256 for an issuer of public keys",
            token(Algorithm::HS256, None, &shared_for_main),
        ),
        ("signed by another key under a known kid", other_key),
        ("expired", with(&|c| c["exp"] = json!(now() - 60))),
        ("not yet valid", with(&|c| c["nbf"] = json!(now() + 600))),
        (
            "unknown issuer",
            with(&|c| c["iss"] = json!("https://evil.example.com/")),
        ),
        (
            "no issuer",
            with(&|c| {
                c.as_object_mut().unwrap().remove("iss");
            }),
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!("https://other.example.com")),
        ),
        (
            "no audience",
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
        ),
        (
            "no exp",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
        ),
        (
            "no tenant claim",
            with(&|c| {
                c.as_object_mut().unwrap().remove("tenant_id");
            }),
        ),
        (
            "unknown kid",
            token(Algorithm::RS256, Some("rsa-9"), &claims()),
        ),
        (
            "payload not JSON",
            format!("{}.{}.c2ln", b64(br#"{"alg":"RS256"}"#), b64(b"not json")),
        ),
        (
            "header not JSON",
            format!("{}.{payload}.c2ln", b64(b"{alg")),
        ),
        ("too large", with(&|c| c["pad"] = json!("x".repeat(9000)))),
    ];
    for (what, jwt) in cases {
        assert_eq!(
            read_with_jwt(&f, &jwt).await,
            Outcome::denied("invalid_token", 401),
            "{what}"
        );
    }
    // Within the leeway, an expired token still passes (clock skew).
    assert_eq!(
        read_with_jwt(&f, &with(&|c| c["exp"] = json!(now() - 2))).await,
        Outcome::Allowed
    );
}

#[tokio::test]
async fn a_route_that_takes_one_kind_refuses_the_other() {
    let f = fixture_app();
    let key = f.app.admin.create(support::reader_key()).await.unwrap();
    let jwt = rs256(&claims());
    assert_eq!(
        get(&f, "/app/contacts", &[("authorization", &bearer(&jwt))]).await,
        Outcome::Allowed
    );
    assert_eq!(
        get(
            &f,
            "/app/contacts",
            &[("authorization", &bearer(&key.token))]
        )
        .await,
        Outcome::denied("insufficient_permissions", 403),
        "an API key on a JWT-only route"
    );
    assert_eq!(
        get(
            &f,
            "/keys/contacts",
            &[("authorization", &bearer(&key.token))]
        )
        .await,
        Outcome::Allowed
    );
    assert_eq!(
        get(&f, "/keys/contacts", &[("authorization", &bearer(&jwt))]).await,
        Outcome::denied("insufficient_permissions", 403),
        "a JWT on an API-key-only route"
    );
}

#[tokio::test]
async fn the_tenant_claim_must_match_x_tenant_id_and_a_required_header_stays_required() {
    let f = fixture_app();
    let jwt = bearer(&rs256(&claims()));
    let auth = ("authorization", jwt.as_str());
    assert_eq!(
        get(&f, "/tenanted/x", &[auth, ("x-tenant-id", TENANT)]).await,
        Outcome::Allowed
    );
    assert_eq!(
        get(
            &f,
            "/tenanted/x",
            &[auth, ("x-tenant-id", support::OTHER_TENANT)]
        )
        .await,
        Outcome::denied("tenant_forbidden", 403)
    );
    assert_eq!(
        get(&f, "/tenanted/x", &[auth]).await,
        Outcome::denied("tenant_required", 400)
    );
    assert_eq!(
        get(&f, "/tenanted/x", &[auth, ("x-tenant-id", "not-a-uuid")]).await,
        Outcome::denied("invalid_tenant", 400)
    );
}

#[tokio::test]
async fn a_tenant_claim_is_compared_in_canonical_form_whatever_its_case() {
    let f = fixture_app();
    let upper = TENANT.to_uppercase();
    let mut c = claims();
    c["tenant_id"] = json!(upper);
    let upper_claim = bearer(&rs256(&c));
    let lower_claim = bearer(&rs256(&claims()));
    for (claim, header) in [
        (&upper_claim, TENANT),
        (&upper_claim, upper.as_str()),
        (&lower_claim, upper.as_str()),
    ] {
        let answer = f
            .app
            .envoy_service()
            .decide(check_request(
                "GET",
                "/tenanted/x",
                &[("authorization", claim), ("x-tenant-id", header)],
            ))
            .await
            .unwrap();
        // Upstream, the tenant is the canonical form.
        assert_eq!(
            support_ok_headers(&answer)
                .get("x-tenant-id")
                .map(String::as_str),
            Some(TENANT),
            "header {header}"
        );
    }
    // Without the header too.
    let answer = f
        .app
        .envoy_service()
        .decide(check_request(
            "GET",
            READ_PATH,
            &[("authorization", &upper_claim)],
        ))
        .await
        .unwrap();
    assert_eq!(
        support_ok_headers(&answer)
            .get("x-tenant-id")
            .map(String::as_str),
        Some(TENANT)
    );
}

#[tokio::test]
async fn an_issuer_that_cannot_work_stops_startup_naming_the_field() {
    let mut config = support::config(Backend::Memory);
    config.jwt.issuers = vec![IssuerConfig {
        name: "hs".into(),
        issuer: "https://hs.example.com/".into(),
        audiences: vec![AUDIENCE.into()],
        algorithms: vec!["HS256".into()],
        jwks_file: None,
        jwks_url: None,
        jwks_refresh: Duration::from_secs(300),
        jwks_refetch_min: Duration::from_secs(30),
        secret_env: Some("KEYGATE_TEST_JWT_SECRET_NOT_SET".into()),
        leeway: Duration::from_secs(5),
        max_token_lifetime: Duration::from_secs(24 * 3600),
        claims: ClaimsConfig::default(),
        roles_claim: None,
        roles: Default::default(),
    }];
    let err = App::build(config, support::secrets())
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("KEYGATE_TEST_JWT_SECRET_NOT_SET"),
        "{err}"
    );
    for (yaml, field) in [
        ("{jwt: {issuers: [{name: a, issuer: i, audiences: [x], algorithms: [none], jwks_file: f}]}}", "jwt.issuers[0].algorithms[0]"),
        ("{jwt: {issuers: [{name: a, issuer: i, audiences: [x], algorithms: [HS256], jwks_file: f}]}}", "jwt.issuers[0].secret_env"),
        ("{jwt: {issuers: [{name: a, issuer: i, audiences: [x], algorithms: [RS256, HS256], jwks_file: f}]}}", "jwt.issuers[0].algorithms"),
        ("{jwt: {issuers: [{name: a, issuer: i, audiences: [], algorithms: [RS256], jwks_file: f}]}}", "jwt.issuers[0].audiences"),
        ("{jwt: {issuers: [{name: a, issuer: i, audiences: [x], algorithms: [RS256], jwks_file: f, secret: s}]}}", "jwt.issuers[0].secret"),
        ("{jwt: {issuers: [{name: a, issuer: i, audiences: [x], algorithms: [RS256], jwks_url: \"https://i/jwks\", jwks_refetch_min: 0s}]}}", "jwt.issuers[0].jwks_refetch_min"),
        ("{jwt: {issuers: [{name: a, issuer: i, audiences: [x], algorithms: [RS256], jwks_url: \"https://i/jwks\", jwks_refetch_min: 999ms}]}}", "jwt.issuers[0].jwks_refetch_min"),
    ] {
        let e = Config::load(Some(yaml), Vec::new()).unwrap_err();
        assert_eq!(e.field, field, "{yaml}: {e}");
    }
    // The floor itself is accepted.
    Config::load(
        Some("{jwt: {issuers: [{name: a, issuer: i, audiences: [x], algorithms: [RS256], jwks_url: \"https://i/jwks\", jwks_refetch_min: 1s}]}}"),
        Vec::new(),
    )
    .expect("jwks_refetch_min: 1s is accepted");
}

/// A JWKS endpoint the test controls: it serves whatever answer it holds now (a set, or
/// raw HTTP bytes), counts the requests, can hold its answers until released, and can be
/// stopped (its port then refuses connections).
struct JwksServer {
    url: String,
    /// The whole HTTP response, head and body.
    response: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    hits: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
    open: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

fn http_200(body: &str, content_length: bool) -> Vec<u8> {
    let length = if content_length {
        format!("content-length: {}\r\n", body.len())
    } else {
        String::new()
    };
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{length}connection: close\r\n\r\n{body}"
    )
    .into_bytes()
}

impl JwksServer {
    async fn start(set: &JwkSet) -> JwksServer {
        Self::start_with(http_200(&serde_json::to_string(set).unwrap(), true), true).await
    }

    /// A server that holds every answer until `release`.
    async fn held(set: &JwkSet) -> JwksServer {
        Self::start_with(http_200(&serde_json::to_string(set).unwrap(), true), false).await
    }

    async fn start_with(response: Vec<u8>, open: bool) -> JwksServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let response = std::sync::Arc::new(std::sync::Mutex::new(response));
        let hits = std::sync::Arc::new(tokio::sync::watch::Sender::new(0usize));
        let open = std::sync::Arc::new(tokio::sync::watch::Sender::new(open));
        let (r, h, o) = (response.clone(), hits.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                h.send_modify(|n| *n += 1);
                let bytes = r.lock().unwrap().clone();
                let mut open = o.subscribe();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let _ = open.wait_for(|o| *o).await;
                    let _ = conn.write_all(&bytes).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        JwksServer {
            url,
            response,
            hits,
            open,
            task,
        }
    }

    fn serve(&self, set: &JwkSet) {
        self.serve_raw(http_200(&serde_json::to_string(set).unwrap(), true));
    }

    fn serve_raw(&self, response: Vec<u8>) {
        *self.response.lock().unwrap() = response;
    }

    fn hits(&self) -> usize {
        *self.hits.borrow()
    }

    /// Waits until `n` requests have arrived.
    async fn hit(&self, n: usize) {
        let mut hits = self.hits.subscribe();
        tokio::time::timeout(support::PATIENCE, hits.wait_for(|h| *h >= n))
            .await
            .expect("the JWKS request arrives")
            .unwrap();
    }

    fn release(&self) {
        self.open.send_replace(true);
    }

    fn stop(&self) {
        self.task.abort();
    }
}

fn rsa2_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture("rsa2.pem")).unwrap()
}

/// An app whose one issuer gets its keys from `url`.
fn remote_app(url: &str, refetch_min: Duration) -> App {
    let mut config = support::config(Backend::Memory);
    config.jwt.issuers = vec![IssuerConfig {
        name: "remote".into(),
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        algorithms: vec!["RS256".into()],
        jwks_file: None,
        jwks_url: Some(url.into()),
        jwks_refresh: Duration::from_secs(300),
        jwks_refetch_min: refetch_min,
        secret_env: None,
        leeway: Duration::from_secs(5),
        max_token_lifetime: Duration::from_secs(24 * 3600),
        claims: ClaimsConfig::default(),
        roles_claim: None,
        roles: Default::default(),
    }];
    App::build(config, support::secrets()).unwrap()
}

fn signed_by(key: &EncodingKey, kid: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims(), key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotated_at_the_jwks_url_are_taken_without_a_restart() {
    let old = public_jwk(&signing(Algorithm::RS256), Algorithm::RS256, "old");
    let server = JwksServer::start(&JwkSet {
        keys: vec![old.clone()],
    })
    .await;
    // No least interval, so the rotated kid is fetched at once: App::build takes the
    // configuration as given, where a loaded one is refused under 1s (tested below).
    let app = remote_app(&server.url, Duration::ZERO);
    let envoy = app.envoy_service();
    let check = |jwt: String| {
        let envoy = &envoy;
        async move {
            outcome_of(
                envoy,
                check_request("GET", READ_PATH, &[("authorization", &bearer(&jwt))]),
            )
            .await
        }
    };
    assert_eq!(
        check(signed_by(&signing(Algorithm::RS256), "old")).await,
        Outcome::Allowed
    );
    // The issuer rotates: a new key beside the old one. A token under the new kid makes
    // keygate fetch the set again, and passes.
    let new = public_jwk(&rsa2_key(), Algorithm::RS256, "new");
    server.serve(&JwkSet {
        keys: vec![old, new],
    });
    assert_eq!(check(signed_by(&rsa2_key(), "new")).await, Outcome::Allowed);
    // The URL goes away: the last good set keeps working.
    server.stop();
    let mut fresh = claims();
    fresh["sub"] = json!("another-user");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("new".into());
    let still = jsonwebtoken::encode(&header, &fresh, &rsa2_key()).unwrap();
    assert_eq!(check(still).await, Outcome::Allowed);
    // A kid nobody has served while the URL is down: invalid_token, not UNAVAILABLE.
    assert_eq!(
        check(signed_by(&rsa2_key(), "newer")).await,
        Outcome::denied("invalid_token", 401)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_kids_cost_at_most_one_fetch_per_interval() {
    let key = public_jwk(&signing(Algorithm::RS256), Algorithm::RS256, "k1");
    let server = JwksServer::start(&JwkSet { keys: vec![key] }).await;
    let app = remote_app(&server.url, Duration::from_secs(3600));
    let envoy = app.envoy_service();
    // The first token fetches the set (nothing was fetched before: no server runs the
    // background refresh in this test).
    let ok = signed_by(&signing(Algorithm::RS256), "k1");
    assert_eq!(
        outcome_of(
            &envoy,
            check_request("GET", READ_PATH, &[("authorization", &bearer(&ok))])
        )
        .await,
        Outcome::Allowed
    );
    let after_first = server.hits();
    assert_eq!(after_first, 1);
    let fetched_at = keygate::telemetry::metrics()
        .jwks_fetched_at
        .with_label_values(&["remote"])
        .get();
    assert!(
        fetched_at > 1_700_000_000,
        "the last good fetch's time: {fetched_at}"
    );
    let invalid = || {
        keygate::telemetry::metrics()
            .jwt_validations
            .with_label_values(&["remote", "invalid"])
            .get()
    };
    let invalid_before = invalid();
    // All at once: each would refetch, but one was made within jwks_refetch_min.
    let outcomes = futures::future::join_all((0..20).map(|n| {
        let jwt = signed_by(&signing(Algorithm::RS256), &format!("made-up-{n}"));
        let envoy = &envoy;
        async move {
            outcome_of(
                envoy,
                check_request("GET", READ_PATH, &[("authorization", &bearer(&jwt))]),
            )
            .await
        }
    }))
    .await;
    assert!(
        outcomes
            .iter()
            .all(|o| *o == Outcome::denied("invalid_token", 401)),
        "{outcomes:?}"
    );
    assert_eq!(
        server.hits(),
        after_first,
        "no refetch within jwks_refetch_min"
    );
    // Counted by the issuer's configured name (other tests may add their own).
    assert!(invalid() >= invalid_before + 20);
}

/// A check of a token on `app`, by the Envoy adapter.
async fn check_on(app: &App, jwt: &str) -> Outcome {
    outcome_of(
        &app.envoy_service(),
        check_request("GET", READ_PATH, &[("authorization", &bearer(jwt))]),
    )
    .await
}

/// A token signed by `key` under `kid`, for a subject of its own (so no cached answer
/// stands in for the check).
fn fresh(key: &EncodingKey, kid: &str, subject: &str) -> String {
    let mut c = claims();
    c["sub"] = json!(subject);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &c, key).unwrap()
}

fn jwks_errors() -> u64 {
    keygate::telemetry::metrics()
        .jwks_fetches
        .with_label_values(&["remote", "error"])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unknown_kids_share_one_fetch_that_a_cancelled_caller_does_not_end() {
    let k1 = public_jwk(&signing(Algorithm::RS256), Algorithm::RS256, "k1");
    let set = JwkSet { keys: vec![k1] };
    // Nothing fetched yet, and the URL holds its answer: 20 callers, 10 of them with the
    // real kid, all need the set.
    let server = JwksServer::held(&set).await;
    let app = std::sync::Arc::new(remote_app(&server.url, Duration::from_secs(3600)));
    let callers: Vec<_> = (0..20)
        .map(|n| {
            let app = app.clone();
            let jwt = if n % 2 == 0 {
                fresh(&signing(Algorithm::RS256), "k1", &format!("user-{n}"))
            } else {
                signed_by(&signing(Algorithm::RS256), &format!("made-up-{n}"))
            };
            tokio::spawn(async move { (n, check_on(&app, &jwt).await) })
        })
        .collect();
    server.hit(1).await;
    server.release();
    for caller in callers {
        let (n, outcome) = caller.await.unwrap();
        let expected = if n % 2 == 0 {
            Outcome::Allowed
        } else {
            Outcome::denied("invalid_token", 401)
        };
        assert_eq!(outcome, expected, "caller {n}");
    }
    assert_eq!(server.hits(), 1, "one fetch for every caller");

    // The one caller that started a fetch goes away (its request cancelled) while the URL
    // holds its answer: the fetch goes on, and the next caller has the set.
    let server = JwksServer::held(&set).await;
    let app = std::sync::Arc::new(remote_app(&server.url, Duration::from_secs(3600)));
    let caller = tokio::spawn({
        let app = app.clone();
        async move { check_on(&app, &signed_by(&signing(Algorithm::RS256), "k1")).await }
    });
    server.hit(1).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    server.release();
    assert_eq!(
        check_on(&app, &fresh(&signing(Algorithm::RS256), "k1", "after")).await,
        Outcome::Allowed
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_jwks_response_is_refused_and_the_last_good_set_kept() {
    let k1 = public_jwk(&signing(Algorithm::RS256), Algorithm::RS256, "k1");
    let server = JwksServer::start(&JwkSet {
        keys: vec![k1.clone()],
    })
    .await;
    let app = remote_app(&server.url, Duration::ZERO);
    assert_eq!(
        check_on(&app, &signed_by(&signing(Algorithm::RS256), "k1")).await,
        Outcome::Allowed
    );
    // A set that would let `k2` in, padded past 1 MiB: with a content-length, and
    // without one (read until the connection closes).
    for (n, content_length) in [(2, true), (3, false)] {
        let kid = format!("k{n}");
        let mut set = serde_json::to_value(JwkSet {
            keys: vec![k1.clone(), public_jwk(&rsa2_key(), Algorithm::RS256, &kid)],
        })
        .unwrap();
        set["padding"] = json!("x".repeat(keygate::jwt::JWKS_MAX_BYTES));
        server.serve_raw(http_200(&set.to_string(), content_length));
        let (hits, errors) = (server.hits(), jwks_errors());
        assert_eq!(
            check_on(&app, &signed_by(&rsa2_key(), &kid)).await,
            Outcome::denied("invalid_token", 401),
            "content-length: {content_length}"
        );
        assert_eq!(server.hits(), hits + 1, "the set was fetched again");
        assert!(jwks_errors() > errors, "and the fetch failed");
        assert_eq!(
            check_on(
                &app,
                &fresh(&signing(Algorithm::RS256), "k1", &format!("after-{n}"))
            )
            .await,
            Outcome::Allowed,
            "the last good set is kept"
        );
    }
    // The same set, unpadded, is taken.
    server.serve(&JwkSet {
        keys: vec![k1, public_jwk(&rsa2_key(), Algorithm::RS256, "k2")],
    });
    assert_eq!(
        check_on(&app, &fresh(&rsa2_key(), "k2", "unpadded")).await,
        Outcome::Allowed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_the_jwks_url_is_not_followed() {
    let elsewhere = JwksServer::start(&JwkSet {
        keys: vec![public_jwk(
            &signing(Algorithm::RS256),
            Algorithm::RS256,
            "k1",
        )],
    })
    .await;
    let redirecting = JwksServer::start_with(
        format!(
            "HTTP/1.1 302 Found\r\nlocation: {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            elsewhere.url
        )
        .into_bytes(),
        true,
    )
    .await;
    let app = remote_app(&redirecting.url, Duration::from_secs(3600));
    let errors = jwks_errors();
    assert_eq!(
        check_on(&app, &signed_by(&signing(Algorithm::RS256), "k1")).await,
        Outcome::denied("invalid_token", 401)
    );
    assert_eq!(redirecting.hits(), 1);
    assert_eq!(elsewhere.hits(), 0, "the redirect was not followed");
    assert!(jwks_errors() > errors, "a redirect is a failed fetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwk_that_cannot_be_read_is_skipped_and_the_others_kept() {
    let good = serde_json::to_value(public_jwk(
        &signing(Algorithm::RS256),
        Algorithm::RS256,
        "good",
    ))
    .unwrap();
    let mut bad_parameters =
        serde_json::to_value(public_jwk(&rsa2_key(), Algorithm::RS256, "bad-parameters")).unwrap();
    bad_parameters["n"] = json!("not base64url!");
    let body = json!({"keys": [
        {"kty": "unknown-type", "kid": "unknown-type", "x": "AAAA"},
        {"kty": "RSA", "kid": "certificate-only", "x5c": ["MIIB"]},
        bad_parameters,
        good,
    ]});
    let skipped = || {
        keygate::telemetry::metrics()
            .jwks_keys_skipped
            .with_label_values(&["remote"])
            .get()
    };
    let server = JwksServer::start_with(http_200(&body.to_string(), true), true).await;
    let app = remote_app(&server.url, Duration::ZERO);
    let before = skipped();
    assert_eq!(
        check_on(&app, &signed_by(&signing(Algorithm::RS256), "good")).await,
        Outcome::Allowed
    );
    assert_eq!(skipped(), before + 3, "each unreadable key is counted");
    assert_eq!(
        check_on(&app, &signed_by(&rsa2_key(), "bad-parameters")).await,
        Outcome::denied("invalid_token", 401)
    );
    // A set with no usable key is a failed fetch: the last good set stays.
    server.serve_raw(http_200(
        &json!({"keys": [{"kty": "unknown-type", "kid": "x"}]}).to_string(),
        true,
    ));
    let errors = jwks_errors();
    assert_eq!(
        check_on(&app, &signed_by(&rsa2_key(), "unknown-kid")).await,
        Outcome::denied("invalid_token", 401)
    );
    assert!(jwks_errors() > errors);
    assert_eq!(
        check_on(&app, &fresh(&signing(Algorithm::RS256), "good", "still")).await,
        Outcome::Allowed
    );
}

/// A JWKS file is re-read when it changes, on a served replica: a key added to it is
/// taken without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_to_the_jwks_file_is_taken_without_a_restart() {
    let f = fixture_app();
    let path = f._dir.path().join("jwks.json");
    let app = std::sync::Arc::new(f.app);
    let running = keygate::server::start(app.clone()).await.unwrap();
    support::positioned(&app).await;
    let jwt = jsonwebtoken::encode(
        &{
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some("rsa-2".into());
            h
        },
        &claims(),
        &rsa2_key(),
    )
    .unwrap();
    let check = || async {
        outcome_of(
            &app.envoy_service(),
            check_request("GET", READ_PATH, &[("authorization", &bearer(&jwt))]),
        )
        .await
    };
    assert_eq!(check().await, Outcome::denied("invalid_token", 401));
    let mut set: JwkSet = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    set.keys
        .push(public_jwk(&rsa2_key(), Algorithm::RS256, "rsa-2"));
    // A new file, moved into place (as a deployment writes it), with a later mtime.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, serde_json::to_string(&set).unwrap()).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(later)
        .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    // The cached denial (negative_ttl) and the file check both pass with time.
    support::eventually(support::PATIENCE * 2, "the new key is taken", || async {
        app.cache.invalidate_all();
        (check().await == Outcome::Allowed).then_some(())
    })
    .await;
    running.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Revocation: by subject before a time, by jti, on every replica
// ---------------------------------------------------------------------------------------

use keygate_test_support::Replica;

/// A `contacts:read` request with `jwt` in `x-access-token`.
async fn read_on(r: &Replica, jwt: &str) -> Outcome {
    outcome_of(
        &r.app.envoy_service(),
        check_request("GET", READ_PATH, &[("x-access-token", jwt)]),
    )
    .await
}

async fn revoke_on(
    r: &Replica,
    req: keygate::api::proto::RevokeTokensRequest,
) -> Result<keygate::api::proto::TokenRevocation, tonic::Status> {
    r.admin()
        .await
        .revoke_tokens(support::with_admin(&r.secrets, req))
        .await
        .map(tonic::Response::into_inner)
}

/// Waits until `bus` has applied a JWT revocation (from its feed, not its own admin call).
async fn a_token_revocation_arrives(
    events: &mut tokio::sync::broadcast::Receiver<keygate::revocation::FeedEntry>,
) -> keygate::store::TokenRevocation {
    support::arrives(events, "the revocation at the replica", |item| match item {
        keygate::revocation::FeedItem::Tokens(t) => Some(t.revocation),
        _ => None,
    })
    .await
}

fn user_token(subject: &str, iat: u64, jti: Option<&str>) -> String {
    let mut c = claims();
    c["sub"] = json!(subject);
    c["iat"] = json!(iat);
    if let Some(jti) = jti {
        c["jti"] = json!(jti);
    }
    rs256(&c)
}

fn seconds(unix: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix as i64,
        nanos: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_by_subject_before_t_is_denied_on_a_second_replica_and_a_newer_one_passes()
{
    let redis = support::RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = || jwt_config(Backend::Redis(&redis), dir.path());
    let secrets = jwt_secrets();
    let first = Replica::serving(config(), &secrets).await;
    let second = Replica::serving(config(), &secrets).await;
    let t = now();
    let old = user_token("dashboard-7", t - 600, None);
    let newer = user_token("dashboard-7", t - 10, None);
    let bystander = user_token("dashboard-8", t - 600, None);
    for r in [&first, &second] {
        for token in [&old, &newer, &bystander] {
            assert_eq!(
                read_on(r, token).await,
                Outcome::Allowed,
                "before the revocation"
            );
        }
    }

    let mut second_events = second.app.bus.subscribe();
    let stored = revoke_on(
        &first,
        keygate::api::proto::RevokeTokensRequest {
            issuer: "main".into(),
            subject: "dashboard-7".into(),
            issued_before: Some(seconds(t - 60)),
            ..Default::default()
        },
    )
    .await
    .expect("the revocation is accepted");
    assert_eq!(stored.subject, "dashboard-7");
    assert_eq!(stored.issued_before, Some(seconds(t - 60)));
    // Kept until no token issued before T can be valid: T + max_token_lifetime + leeway.
    assert_eq!(
        stored.expires_at.map(|e| e.seconds),
        Some((t - 60 + 24 * 3600 + 5) as i64)
    );
    let arrived = a_token_revocation_arrives(&mut second_events).await;
    assert_eq!(arrived.issuer, "main");

    for r in [&first, &second] {
        // The old token was cached on both: the revocation reaches the cached answer.
        assert_eq!(
            read_on(r, &old).await,
            Outcome::denied("invalid_token", 401)
        );
        assert_eq!(read_on(r, &newer).await, Outcome::Allowed, "issued after T");
        assert_eq!(
            read_on(r, &bystander).await,
            Outcome::Allowed,
            "another subject"
        );
    }
    // A replica that starts afterwards loads the revocation before it answers.
    let third = Replica::serving(config(), &secrets).await;
    assert_eq!(
        read_on(&third, &old).await,
        Outcome::denied("invalid_token", 401)
    );
    assert_eq!(read_on(&third, &newer).await, Outcome::Allowed);
    support::shut_down([first, second, third]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_by_jti_is_denied_on_a_replica_that_follows_watch() {
    let redis = support::RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = jwt_secrets();
    let primary = Replica::serving(jwt_config(Backend::Redis(&redis), dir.path()), &secrets).await;
    let t = now();
    let early = user_token("user-1", t - 30, Some("jti-early"));
    let late = user_token("user-1", t - 30, Some("jti-late"));
    let kept = user_token("user-1", t - 30, Some("jti-kept"));
    // One revocation before the remote replica starts: it must load it from its remote.
    revoke_on(
        &primary,
        keygate::api::proto::RevokeTokensRequest {
            issuer: "main".into(),
            jti: "jti-early".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let remote_redis = support::RedisServer::start().await;
    let mut remote_cfg = jwt_config(Backend::Redis(&remote_redis), dir.path());
    remote_cfg.revocation.source = keygate::config::RevocationSource::Watch;
    remote_cfg.revocation.watch_url = format!("http://{}", primary.running.grpc);
    let remote = Replica::serving(remote_cfg, &secrets).await;
    assert_eq!(
        read_on(&remote, &early).await,
        Outcome::denied("invalid_token", 401)
    );
    assert_eq!(read_on(&remote, &late).await, Outcome::Allowed);

    let mut remote_events = remote.app.bus.subscribe();
    revoke_on(
        &primary,
        keygate::api::proto::RevokeTokensRequest {
            issuer: "main".into(),
            jti: "jti-late".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let arrived = a_token_revocation_arrives(&mut remote_events).await;
    assert_eq!(
        arrived.target,
        keygate::store::TokenTarget::Jti {
            jti: "jti-late".into()
        }
    );
    assert_eq!(
        read_on(&remote, &late).await,
        Outcome::denied("invalid_token", 401)
    );
    assert_eq!(read_on(&remote, &kept).await, Outcome::Allowed);
    remote.running.shutdown().await.unwrap();
    primary.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_bad_revocation_names_the_field_and_changes_nothing() {
    let redis = support::RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::serving(
        jwt_config(Backend::Redis(&redis), dir.path()),
        &jwt_secrets(),
    )
    .await;
    let req = |issuer: &str, jti: &str, subject: &str, before: Option<u64>| {
        keygate::api::proto::RevokeTokensRequest {
            issuer: issuer.into(),
            jti: jti.into(),
            subject: subject.into(),
            issued_before: before.map(seconds),
        }
    };
    let t = now();
    for (request, field) in [
        (req("nobody", "j", "", None), "issuer:"),
        (req("", "j", "", None), "issuer:"),
        (req("main", "j", "s", None), "jti:"),
        (req("main", "", "", None), "subject:"),
        (req("main", "j", "", Some(t - 10)), "before:"),
        (req("main", "", "s", Some(t + 3600)), "before:"),
        (req("main", &"j".repeat(2000), "", None), "jti:"),
    ] {
        let status = revoke_on(&replica, request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
    // Nothing was stored, and no event was appended.
    let store = replica.app.store.clone();
    assert_eq!(
        store
            .token_revocations(keygate::store::now_ms())
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(
        store.latest_event_id(0).await.unwrap(),
        keygate::store::EventId::START
    );
    // Without the admin credential, nothing either.
    let channel = replica.admin_channel().await;
    let refused = keygate::api::proto::keys_client::KeysClient::new(channel)
        .revoke_tokens(req("main", "j", "", None))
        .await
        .expect_err("no admin credential");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    replica.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_token_living_longer_than_its_issuer_allows_is_invalid_token() {
    let f = fixture_app();
    let mut c = claims();
    // max_token_lifetime is 24h in the fixture.
    c["iat"] = json!(now() - 60);
    c["exp"] = json!(now() + 24 * 3600);
    assert_eq!(
        read_with_jwt(&f, &rs256(&c)).await,
        Outcome::denied("invalid_token", 401)
    );
    // Without iat the lifetime is counted from now.
    let mut c = claims();
    c.as_object_mut().unwrap().remove("iat");
    c["exp"] = json!(now() + 25 * 3600);
    assert_eq!(
        read_with_jwt(&f, &rs256(&c)).await,
        Outcome::denied("invalid_token", 401)
    );
    c["exp"] = json!(now() + 23 * 3600);
    assert_eq!(read_with_jwt(&f, &rs256(&c)).await, Outcome::Allowed);
}

#[tokio::test]
async fn a_token_issued_in_the_future_or_expiring_too_far_ahead_is_invalid_token() {
    let f = fixture_app();
    let at = |iat: u64, exp: u64| {
        let mut c = claims();
        c["iat"] = json!(iat);
        c["exp"] = json!(exp);
        rs256(&c)
    };
    let t = now();
    // leeway is 5s and max_token_lifetime 24h in the fixture.
    for (what, jwt) in [
        ("iat 10 minutes ahead", at(t + 600, t + 1200)),
        (
            "iat 10 days ahead, exp 10 minutes after it: 10 days from now",
            at(t + 10 * 24 * 3600, t + 10 * 24 * 3600 + 600),
        ),
    ] {
        assert_eq!(
            read_with_jwt(&f, &jwt).await,
            Outcome::denied("invalid_token", 401),
            "{what}"
        );
    }
    // Within the leeway, a clock a little ahead is forgiven.
    assert_eq!(
        read_with_jwt(&f, &at(t + 2, t + 1800)).await,
        Outcome::Allowed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_revocation_covers_every_token_that_passes() {
    // A token claiming an iat after the cut-off would not be matched; none passes.
    let redis = support::RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::serving(
        jwt_config(Backend::Redis(&redis), dir.path()),
        &jwt_secrets(),
    )
    .await;
    let t = now();
    let ahead = user_token("user-ahead", t + 3600, None);
    revoke_on(
        &replica,
        keygate::api::proto::RevokeTokensRequest {
            issuer: "main".into(),
            subject: "user-ahead".into(),
            issued_before: Some(seconds(t)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        read_on(&replica, &ahead).await,
        Outcome::denied("invalid_token", 401)
    );
    replica.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revocation_lost_from_the_stream_is_loaded_again_before_any_jwt_is_judged() {
    let redis = support::RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = jwt_secrets();
    let config = || jwt_config(Backend::Redis(&redis), dir.path());
    let writer = Replica::serving(config(), &secrets).await;
    // The reader follows the stream through a feed the test can cut.
    let reader = std::sync::Arc::new(App::build(config(), secrets.clone()).unwrap());
    let feed = std::sync::Arc::new(support::SwitchableFeed::new(
        keygate::revocation::StoreFeed::new(reader.store.clone(), Duration::from_millis(200)),
    ));
    let (down, revocations_down) = (feed.down.clone(), feed.revocations_down.clone());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let follower = tokio::spawn(reader.bus.clone().follow(feed, stop_rx));
    support::positioned(&reader).await;
    let read = |jwt: String| {
        let reader = reader.clone();
        async move {
            outcome_of(
                &reader.envoy_service(),
                check_request("GET", READ_PATH, &[("x-access-token", &jwt)]),
            )
            .await
        }
    };
    let t = now();
    let old = user_token("user-9", t - 600, None);
    assert_eq!(read(old.clone()).await, Outcome::Allowed);

    let on = std::sync::atomic::Ordering::SeqCst;
    down.store(true, on);
    support::eventually(
        support::PATIENCE,
        "the reader notices it is cut off",
        || async { (!reader.bus.is_connected()).then_some(()) },
    )
    .await;
    revoke_on(
        &writer,
        keygate::api::proto::RevokeTokensRequest {
            issuer: "main".into(),
            subject: "user-9".into(),
            issued_before: Some(seconds(t - 60)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // The event is trimmed away before the reader could read it.
    redis.trim_all_events().await;

    // Back, but the revocations cannot be loaded: the loss is noticed (a flush), and no
    // JWT is judged without them — UNAVAILABLE, neither allowed nor denied.
    revocations_down.store(true, on);
    down.store(false, on);
    support::eventually(support::PATIENCE, "the reader flushes", || async {
        (reader.bus.flushes() == 1).then_some(())
    })
    .await;
    assert_eq!(
        read(old.clone()).await,
        Outcome::Error(tonic::Code::Unavailable)
    );
    assert_eq!(
        read(user_token("user-10", t, None)).await,
        Outcome::Error(tonic::Code::Unavailable)
    );

    revocations_down.store(false, on);
    let answer = support::eventually(support::PATIENCE, "the revocations are loaded", || {
        let old = old.clone();
        let read = &read;
        async move {
            let o = read(old).await;
            (o != Outcome::Error(tonic::Code::Unavailable)).then_some(o)
        }
    })
    .await;
    assert_eq!(answer, Outcome::denied("invalid_token", 401));
    assert_eq!(read(user_token("user-9", t, None)).await, Outcome::Allowed);
    stop.send(true).unwrap();
    follower.await.unwrap();
    writer.running.shutdown().await.unwrap();
}

//! Micro-benchmarks of the hot path, stage by stage, and of one argon2 verification with
//! the default parameters. Short by design (1 s warm-up, 3 s per benchmark):
//!
//!   cargo bench --bench hot_path
//!   cargo bench --bench hot_path -- argon2      (one group)
//!
//! The Envoy request used throughout is keygate-load's (`shape.rs`, shaped like the ones
//! Envoy 1.40 sends), so each figure is what one real Check costs in that stage.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;

use keygate::api::envoy::IDENTITY_PREFIX;
use keygate::api::envoy_answer::CheckAnswer;
use keygate::api::envoy_wire::{auth_request, CheckRequestView, HeaderFilter};
use keygate::apikey::{self, SecretHasher};
use keygate::cache::{CredentialCache, Verified};
use keygate::config::{Argon2Config, Config, Secrets, DEV_CONFIG};
use keygate::credential::CredentialSource;
use keygate::keys::NewKey;
use keygate::policy::Policy;
use keygate::principal::{Environment, KeyKind, Principal};
use keygate::secret::Secret;
use keygate::server::App;
use keygate::store::memory::MemoryStore;
use keygate::store::StoreError;
use prost::Message;

// keygate-load's request builder, shared rather than copied.
use keygate_load::shape::Shape;

const TENANT: &str = "5a0c6f0e-8c1b-4f6e-9a57-3d2b1c0e9f11";
const PATH: &str = "/v1/contacts/42?include=notes";

fn pepper() -> Secret {
    Secret::new("bench-pepper-bench-pepper-bench-pepper-00")
}

/// A CheckRequest as Envoy sends it for `GET PATH` with `authorization: Bearer <token>`:
/// keygate-load's request, so a figure here is what one request of a load run costs.
fn envoy_request(token: &str) -> CheckRequest {
    Shape::new("GET", PATH).check_request(
        token,
        "1723570b-6b7d-45c8-9dc7-ba3044eb9fb8",
        "10237435042807699611",
    )
}

/// The request's wire form, as tonic hands it to the decoder.
fn envoy_wire(token: &str) -> bytes::Bytes {
    envoy_request(token).encode_to_vec().into()
}

fn config() -> Config {
    // The sample policy, with argon2 cheap enough to create a key quickly.
    let env = [(
        "KEYGATE_API_KEYS__ARGON2".to_owned(),
        "{memory_kib: 64, iterations: 1, parallelism: 1}".to_owned(),
    )];
    Config::load(Some(DEV_CONFIG), env).expect("the dev config is valid")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn stages(c: &mut Criterion) {
    let cfg = config();
    let token = apikey::generate("sk", Environment::Live).token;
    let filter = HeaderFilter::new(
        cfg.policy
            .credential_headers
            .iter()
            .map(|h| h.header.as_str())
            .chain([cfg.policy.tenant_header.as_str()]),
        IDENTITY_PREFIX,
    );
    let wire = envoy_wire(&token);
    let view = |w: bytes::Bytes| CheckRequestView::decode(w).expect("decodes");
    let req = auth_request(view(wire.clone()), &filter).expect("reads");

    let source = CredentialSource::new(&cfg.policy);
    c.bench_function("credential_extract", |b| {
        b.iter(|| source.extract(black_box(&req)))
    });

    c.bench_function("apikey_parse", |b| {
        b.iter(|| apikey::parse(black_box(&token), "sk"))
    });

    let policy = Policy::compile(&cfg.policy).expect("valid policy");
    c.bench_function("policy_route", |b| {
        b.iter(|| policy.route(black_box("GET"), black_box(PATH)).is_some())
    });

    let rt = runtime();
    let cache = CredentialCache::new(&cfg.cache, &pepper());
    let principal = Arc::new(Principal::new(
        TENANT.into(),
        "key:0123456789abcdef".into(),
        KeyKind::Tenant,
        Environment::Live,
        vec!["contacts:read".into()],
    ));
    let digest = cache.digest(&token);
    let fill = Verified::Valid(principal);
    rt.block_on(async {
        let first = cache
            .get_or_verify(digest, "0123456789abcdef", || {
                let v = fill.clone();
                async move { Ok::<_, StoreError>(v) }
            })
            .await;
        assert!(!first.hit);
    });
    c.bench_function("cache_digest", |b| {
        b.iter(|| cache.digest(black_box(&token)))
    });
    c.bench_function("cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let l = cache
                .get_or_verify(black_box(digest), "0123456789abcdef", || async {
                    unreachable!("the entry is cached")
                })
                .await;
            let hit: Result<Verified, keygate::cache::VerifyError> = l.value;
            assert!(l.hit && hit.is_ok());
        })
    });

    // What keygate does with the bytes, against what the no-op does with them.
    c.bench_function("envoy_request_to_auth_request", |b| {
        b.iter(|| auth_request(view(black_box(&wire).clone()), &filter).expect("reads"))
    });
    c.bench_function("envoy_request_full_decode", |b| {
        b.iter(|| CheckRequest::decode(black_box(&wire).clone()).expect("decodes"))
    });
}

fn decide(c: &mut Criterion) {
    let rt = runtime();
    let secrets = Secrets {
        watch_token: None,
        named: Default::default(),
        pepper: pepper(),
        admin_token: Secret::new("bench-admin-token-0123"),
        redis_password: None,
    };
    let app = App::with_store(config(), secrets, Arc::new(MemoryStore::new())).expect("app");
    let token = rt
        .block_on(app.admin.create(NewKey {
            tenant_id: TENANT.into(),
            scopes: vec!["contacts:read".into()],
            ..Default::default()
        }))
        .expect("key created")
        .token;
    let envoy = app.envoy_service();
    let req = envoy_request(&token);
    let wire = envoy_wire(&token);
    let allowed = |r: &envoy_types::pb::envoy::service::auth::v3::CheckResponse| {
        r.status.as_ref().is_some_and(|s| s.code == 0)
    };
    // First sight: argon2 runs once and the principal is cached.
    let first = rt.block_on(envoy.decide(req.clone())).expect("decided");
    assert!(allowed(&first), "{first:?}");
    // From the request's bytes to the answer's bytes, as tonic calls it.
    // tonic encodes into a buffer it keeps; so does this.
    let out = std::cell::RefCell::new(Vec::with_capacity(1024));
    c.bench_function("envoy_decide_and_encode_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let view = CheckRequestView::decode(black_box(&wire).clone()).expect("decodes");
            let answer = envoy.decide_view(view).await.expect("decided");
            assert!(matches!(answer, CheckAnswer::Allow(_)));
            let mut out = out.borrow_mut();
            out.clear();
            answer.encode(&mut *out).expect("fits");
            out.len()
        })
    });
}

fn argon2(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let defaults = Argon2Config::default();
    let hasher = SecretHasher::new(pepper(), &defaults).expect("default parameters");
    let secret = apikey::generate("sk", Environment::Live).secret;
    let phc = rt.block_on(hasher.hash(&secret)).expect("hashed");
    let mut g = c.benchmark_group("argon2");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function(
        format!(
            "argon2_verify_default_{}KiB_{}it_{}lane",
            defaults.memory_kib, defaults.iterations, defaults.parallelism
        ),
        |b| {
            b.to_async(&rt).iter(|| async {
                assert!(hasher.verify(&secret, &phc).await.expect("verified"));
            })
        },
    );
    g.finish();
}

/// JWTs: an uncached validation by keygate (`JwtVerifier::verify`: header, issuer, key,
/// signature, claims, principal) next to the bare signature check of the crypto library
/// underneath (`jsonwebtoken::crypto::verify`), per algorithm; and a cached JWT through
/// the whole Envoy path.
fn jwt(c: &mut Criterion) {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use keygate::config::{ClaimsConfig, IssuerConfig};
    let fixture = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/jwt/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("fixture")
    };
    let secret = "a-benchmark-hs256-secret-of-32-bytes-or-more";
    let keys = [
        (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&fixture("rsa.pem")).unwrap(),
        ),
        (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&fixture("ec256.pem")).unwrap(),
        ),
        (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(&fixture("ed25519.pem")).unwrap(),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwkSet {
        keys: keys
            .iter()
            .map(|(alg, k)| {
                let mut jwk = Jwk::from_encoding_key(k, *alg).unwrap();
                jwk.common.key_id = Some(format!("{alg:?}"));
                jwk
            })
            .collect(),
    };
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::to_string(&jwks).unwrap()).unwrap();
    let issuer = |name: &str, iss: &str, algs: &[&str]| IssuerConfig {
        name: name.into(),
        issuer: iss.into(),
        audiences: vec!["api".into()],
        algorithms: algs.iter().map(|a| a.to_string()).collect(),
        jwks_file: None,
        jwks_url: None,
        jwks_refresh: Duration::from_secs(300),
        jwks_refetch_min: Duration::from_secs(30),
        secret_env: None,
        leeway: Duration::from_secs(30),
        max_token_lifetime: Duration::from_secs(24 * 3600),
        claims: ClaimsConfig::default(),
        roles_claim: None,
        roles: Default::default(),
    };
    let mut cfg = config();
    let mut public = issuer(
        "public",
        "https://pk.example/",
        &["RS256", "ES256", "EdDSA"],
    );
    public.jwks_file = Some(path.display().to_string());
    let mut shared = issuer("shared", "https://hs.example/", &["HS256"]);
    shared.secret_env = Some("BENCH_JWT_SECRET".into());
    cfg.jwt.issuers = vec![public, shared];
    let mut secrets = Secrets {
        watch_token: None,
        named: Default::default(),
        pepper: pepper(),
        admin_token: Secret::new("bench-admin-token-0000"),
        redis_password: None,
    };
    secrets
        .named
        .insert("BENCH_JWT_SECRET".into(), Secret::new(secret));
    let verifier = keygate::jwt::JwtVerifier::new(&cfg.jwt, None, |v| secrets.named(v)).unwrap();
    let exp = keygate::store::now_ms() / 1000 + 3600;
    let claims = |iss: &str| {
        serde_json::json!({"iss": iss, "aud": "api", "sub": "user-1", "tenant_id": TENANT,
            "scope": "contacts:read", "exp": exp})
    };
    let mut tokens: Vec<(Algorithm, String, jsonwebtoken::DecodingKey)> = keys
        .iter()
        .map(|(alg, k)| {
            let mut h = Header::new(*alg);
            h.kid = Some(format!("{alg:?}"));
            let token = jsonwebtoken::encode(&h, &claims("https://pk.example/"), k).unwrap();
            let jwk = jwks.find(&format!("{alg:?}")).unwrap();
            (
                *alg,
                token,
                jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
            )
        })
        .collect();
    tokens.push((
        Algorithm::HS256,
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("https://hs.example/"),
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap(),
        jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()).unwrap(),
    ));
    let rt = runtime();
    for (alg, token, key) in &tokens {
        let (message, signature) = token.rsplit_once('.').unwrap();
        c.bench_function(&format!("jwt_signature_{alg:?}"), |b| {
            b.iter(|| {
                assert!(
                    jsonwebtoken::crypto::verify(signature, message.as_bytes(), key, *alg).unwrap()
                )
            })
        });
        c.bench_function(&format!("jwt_validate_{alg:?}"), |b| {
            b.iter(|| {
                rt.block_on(verifier.verify(black_box(token), keygate::store::now_ms()))
                    .expect("valid")
            })
        });
    }
    // A cached RS256 JWT, request bytes to encoded answer.
    let app = App::with_store(cfg, secrets, Arc::new(MemoryStore::new())).expect("app");
    let envoy = app.envoy_service();
    let rs = &tokens[0].1;
    let wire = envoy_wire(rs);
    rt.block_on(async {
        let first = envoy
            .decide_view(CheckRequestView::decode(wire.clone()).unwrap())
            .await
            .unwrap();
        assert!(matches!(first, CheckAnswer::Allow(_)), "the JWT is allowed");
    });
    c.bench_function("envoy_decide_and_encode_jwt_cache_hit", |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            let answer = rt
                .block_on(
                    envoy.decide_view(CheckRequestView::decode(black_box(wire.clone())).unwrap()),
                )
                .unwrap();
            out.clear();
            answer.encode(&mut out).unwrap();
        })
    });
}

criterion_group! {
    name = hot_path;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = stages, decide, jwt, argon2
}
criterion_main!(hot_path);

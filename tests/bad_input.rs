//! Whatever a client puts in its headers, keygate answers with a clean decision Envoy
//! cannot misread: a denial with a non-zero status, the documented HTTP status and a JSON
//! body, or an allow with status 0 that overwrites identity headers and strips the
//! credential. Malformed tokens are rejected by their shape and checksum, before any store
//! lookup or argon2; guesses at a real key cost one argon2 at most, then the negative
//! cache answers.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::service::auth::v3::{check_response::HttpResponse, CheckResponse};
use keygate::keys::NewKey;
use keygate::server::App;
use keygate_test_support as support;
use keygate_test_support::{
    bearer, check_request, outcome, raw_check_request, read_with, Backend, CountingStore, Outcome,
};
use tokio::sync::Mutex;

/// The argon2 metric is process-wide; tests that may run argon2 take this lock, so that
/// the one measuring the metric sees only its own work.
static ARGON2_METER: Mutex<()> = Mutex::const_new(());

fn app() -> App {
    App::build(support::config(Backend::Memory), support::secrets()).unwrap()
}

/// An app whose store counts the lookups it is asked for.
fn counted_app() -> (App, Arc<CountingStore>) {
    let store = CountingStore::new();
    let app = App::with_store(
        support::config(Backend::Memory),
        support::secrets(),
        store.clone(),
    )
    .unwrap();
    (app, store)
}

fn argon2_metric() -> u64 {
    keygate::telemetry::metrics().argon2_verifications.get()
}

/// The deny response's headers, as (name, value).
fn denied_headers(resp: &CheckResponse) -> Vec<(String, String)> {
    match &resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => support::header_pairs(&d.headers),
        other => panic!("not a denial: {other:?}"),
    }
}

#[tokio::test]
async fn empty_credentials_are_missing_credentials() {
    let _meter = ARGON2_METER.lock().await;
    let app = app();
    let envoy = app.envoy_service();
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("authorization", "")],
        vec![("authorization", "Bearer")],
        vec![("authorization", "Bearer    ")],
        vec![("x-api-key", "")],
        vec![("x-api-key", "   ")],
        vec![("authorization", "Basic dXNlcjpwYXNz")],
        vec![("authorization", ""), ("x-api-key", "")],
    ];
    for headers in cases {
        let result = envoy
            .decide(check_request("GET", support::READ_PATH, &headers))
            .await;
        assert_eq!(
            outcome(&result),
            Outcome::denied("missing_credentials", 401),
            "{headers:?}"
        );
        assert!(denied_headers(&result.unwrap())
            .contains(&("www-authenticate".to_owned(), "Bearer".to_owned())));
    }
    // With encode_raw_headers: an empty raw value is an empty header, not a panic.
    let raw = raw_check_request(
        "GET",
        support::READ_PATH,
        &[("authorization", b""), ("x-api-key", b"")],
    );
    assert_eq!(
        outcome(&envoy.decide(raw).await),
        Outcome::denied("missing_credentials", 401)
    );
    // Nothing at all: no method, no path, no headers.
    let bare = envoy_types::pb::envoy::service::auth::v3::CheckRequest::default();
    assert!(matches!(
        outcome(&envoy.decide(bare).await),
        Outcome::Denied { .. }
    ));
}

#[tokio::test]
async fn sixty_four_kib_header_values_are_denied_cleanly() {
    let _meter = ARGON2_METER.lock().await;
    let app = app();
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let big = "A".repeat(64 * 1024);
    let big_key_shaped = format!("sk_live_{}", "a".repeat(64 * 1024));
    let big_jwt_shaped = format!("{0}.{0}.{0}", "a".repeat(21 * 1024));
    let before = app.hasher.verifications();

    let cases = [
        ("authorization", bearer(&big), "invalid_api_key"),
        ("authorization", bearer(&big_key_shaped), "invalid_api_key"),
        ("x-api-key", big_key_shaped.clone(), "invalid_api_key"),
        ("authorization", bearer(&big_jwt_shaped), "invalid_token"),
        (
            "authorization",
            format!("Bearer {}{big}", key.token),
            "invalid_api_key",
        ),
    ];
    for (name, value, code) in &cases {
        let result = envoy
            .decide(check_request("GET", support::READ_PATH, &[(name, value)]))
            .await;
        assert_eq!(
            outcome(&result),
            Outcome::denied(code, 401),
            "{name}: {code}"
        );
        let body = match result.unwrap().http_response {
            Some(HttpResponse::DeniedResponse(d)) => d.body,
            _ => unreachable!(),
        };
        assert!(body.len() < 512, "the body does not echo the header back");
    }
    assert_eq!(
        app.hasher.verifications(),
        before,
        "no argon2 for oversized tokens"
    );

    // A huge header that is not a credential does not stand in the way of a valid key.
    let result = envoy
        .decide(check_request(
            "GET",
            support::READ_PATH,
            &[("authorization", &bearer(&key.token)), ("x-padding", &big)],
        ))
        .await;
    assert_eq!(outcome(&result), Outcome::Allowed);
    // A huge path matches no route family.
    let long_path = format!("/v1/contacts/{big}");
    assert_eq!(
        outcome(
            &envoy
                .decide(check_request(
                    "GET",
                    &long_path,
                    &[("authorization", &bearer(&key.token))]
                ))
                .await
        ),
        Outcome::Allowed,
        "a long segment is still one segment under /v1/contacts/**"
    );
}

#[tokio::test]
async fn non_utf8_header_bytes_are_denied_cleanly() {
    let _meter = ARGON2_METER.lock().await;
    let app = app();
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();

    // The raw path itself works: a valid key in header_map is allowed.
    let good = raw_check_request(
        "GET",
        support::READ_PATH,
        &[("authorization", bearer(&key.token).as_bytes())],
    );
    assert_eq!(outcome(&envoy.decide(good).await), Outcome::Allowed);
    let before = app.hasher.verifications();

    let mut in_the_middle = bearer(&key.token).into_bytes();
    let at = in_the_middle.len() - 10;
    in_the_middle[at] = 0xff;
    let mut appended = bearer(&key.token).into_bytes();
    appended.extend_from_slice(&[0xc3, 0x28]);
    let cases: Vec<(&str, Vec<u8>, Outcome)> = vec![
        (
            "authorization",
            b"Bearer \xff\xfe\xfd".to_vec(),
            Outcome::denied("invalid_api_key", 401),
        ),
        (
            "authorization",
            b"Bearer sk_live_\xf0\x28\x8c\x28".to_vec(),
            Outcome::denied("invalid_api_key", 401),
        ),
        (
            "authorization",
            in_the_middle,
            Outcome::denied("invalid_api_key", 401),
        ),
        (
            "authorization",
            appended,
            Outcome::denied("invalid_api_key", 401),
        ),
        (
            "x-api-key",
            b"\x80\x80\x80".to_vec(),
            Outcome::denied("invalid_api_key", 401),
        ),
        (
            "authorization",
            b"\xffBearer x".to_vec(),
            Outcome::denied("missing_credentials", 401),
        ),
    ];
    for (name, value, expected) in cases {
        let req = raw_check_request("GET", support::READ_PATH, &[(name, &value)]);
        assert_eq!(outcome(&envoy.decide(req).await), expected, "{value:?}");
    }
    assert_eq!(
        app.hasher.verifications(),
        before,
        "no argon2 for non-UTF-8 tokens"
    );

    // A valid key with a non-UTF-8 tenant header: the tenant is invalid, not the key.
    let req = raw_check_request(
        "GET",
        support::READ_PATH,
        &[
            ("authorization", bearer(&key.token).as_bytes()),
            ("x-tenant-id", b"9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c1\xff"),
        ],
    );
    assert_eq!(
        outcome(&envoy.decide(req).await),
        Outcome::denied("invalid_tenant", 400)
    );
}

/// Bytes that cannot be Envoy's request are INVALID_ARGUMENT (Envoy answers its
/// `status_on_error`), say what is wrong without repeating what was sent, and cost
/// neither a store lookup nor argon2.
#[tokio::test]
async fn a_check_request_that_is_not_protobuf_is_invalid_argument() {
    use keygate::api::envoy_wire::CheckRequestView;
    use prost::Message;

    // The allow at the end runs argon2.
    let _meter = ARGON2_METER.lock().await;
    let (app, store) = counted_app();
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let good = support::check_request(
        "GET",
        support::READ_PATH,
        &[("authorization", &bearer(&key.token))],
    );
    let wire = CheckRequestView::from(&good).attributes[0].clone();
    let gets = store.gets();
    // Cut inside the token; and `request` holding an `http` whose length runs past it.
    let at = wire.windows(7).position(|w| w == b"sk_live").unwrap() + 10;
    let past = bytes::Bytes::from_static(&[0x22, 0x03, 0x12, 0x7f, 0x0a]);
    for attributes in [wire.slice(..at), past] {
        let req = CheckRequestView {
            attributes: vec![attributes],
        };
        let err = envoy.decide_view(req).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with("malformed CheckRequest"),
            "{err:?}"
        );
        assert!(!err.message().contains(&key.token[..12]), "{err:?}");
    }
    assert_eq!(
        store.gets(),
        gets,
        "no store lookup for bytes that are not a request"
    );
    // The same bytes whole are allowed.
    let req = CheckRequestView::decode(good.encode_to_vec().as_slice()).unwrap();
    assert!(matches!(
        envoy.decide_view(req).await,
        Ok(keygate::api::envoy_answer::CheckAnswer::Allow(_))
    ));
}

#[tokio::test]
async fn bad_checksums_and_unknown_prefixes_never_reach_the_store_or_argon2() {
    let _meter = ARGON2_METER.lock().await;
    let (app, store) = counted_app();
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let (_, env, key_id, secret, checksum) = support::token_parts(&key.token);
    let before = app.hasher.verifications();
    let lookups = store.gets();

    let mut bad_checksum = key.token.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'A' { 'B' } else { 'A' });
    let mut typo_in_secret: Vec<u8> = key.token.clone().into_bytes();
    let at = key.token.len() - 10;
    typo_in_secret[at] = if typo_in_secret[at] == b'x' {
        b'y'
    } else {
        b'x'
    };
    let typo_in_secret = String::from_utf8(typo_in_secret).unwrap();
    let cases = [
        bad_checksum,
        typo_in_secret,
        // The right checksum for another deployment's prefix.
        support::forge_token("eng", env, key_id, secret),
        format!("SK_{env}_{key_id}_{secret}{checksum}"),
        support::forge_token("sk", "prod", key_id, secret),
        format!("sk_{env}_{key_id}_{secret}"),
        format!("sk_{env}_{key_id}_{secret}{checksum}_"),
        format!("sk_{env}_{key_id}{secret}{checksum}"),
        format!(" {}", key.token.replace('_', "-")),
    ];
    for token in &cases {
        assert_eq!(
            outcome(&envoy.decide(read_with(token)).await),
            Outcome::denied("invalid_api_key", 401),
            "{token}"
        );
    }
    assert_eq!(app.hasher.verifications(), before);
    assert_eq!(
        store.gets(),
        lookups,
        "rejected by shape, before any lookup"
    );
    // And the real key next to them still works.
    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
}

#[tokio::test]
async fn wrong_secret_is_invalid_and_a_repeat_runs_no_second_argon2() {
    let _meter = ARGON2_METER.lock().await;
    let app = app();
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let guess = support::wrong_secret_for(&key.token);
    assert_ne!(guess, key.token);

    let before = app.hasher.verifications();
    let first = envoy.decide(read_with(&guess)).await;
    assert_eq!(outcome(&first), Outcome::denied("invalid_api_key", 401));
    assert_eq!(
        app.hasher.verifications(),
        before + 1,
        "one argon2 for a guess"
    );

    let second = envoy.decide(read_with(&guess)).await;
    assert_eq!(outcome(&second), Outcome::denied("invalid_api_key", 401));
    assert_eq!(
        app.hasher.verifications(),
        before + 1,
        "the same guess again is answered by the negative cache"
    );

    // A wrong secret tells nothing a made-up key id would not: same response.
    let made_up = support::forge_token(
        "sk",
        "live",
        &support::base62(1, 16),
        support::secret_of(&guess),
    );
    let unknown = envoy.decide(read_with(&made_up)).await;
    assert_eq!(first.unwrap(), unknown.unwrap());

    // The wrong guess did not poison the real key.
    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
    assert_eq!(app.hasher.verifications(), before + 2);

    // The secret is checked before the key's state: a guess at a revoked key learns
    // nothing about the revocation.
    app.admin.revoke(&key.record.key_id).await.unwrap();
    let other_guess = support::wrong_secret_at(&guess, 1);
    assert_eq!(
        outcome(&envoy.decide(read_with(&other_guess)).await),
        Outcome::denied("invalid_api_key", 401)
    );
    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::revoked_key()
    );
}

/// What a garbage token should be answered with.
fn garbage(i: u64) -> (String, &'static str) {
    let key_id = support::base62(i * 7 + 1, 16);
    let secret = support::base62(i * 7 + 2, 28);
    match i % 6 {
        // Random text: no credential shape at all.
        0 => (
            support::base62(i * 7 + 3, 8 + (i % 50) as usize),
            "invalid_api_key",
        ),
        // Key-shaped, checksum wrong.
        1 => {
            let mut t = support::forge_token("sk", "live", &key_id, &secret);
            let last = t.pop().unwrap();
            t.push(if last == '0' { '1' } else { '0' });
            (t, "invalid_api_key")
        }
        // Another deployment's prefix, checksum right.
        2 => (
            support::forge_token("pk", "test", &key_id, &secret),
            "invalid_api_key",
        ),
        // JWT-shaped garbage: no issuer accepts it.
        3 => (
            format!(
                "eyJ{}.{}.{}",
                support::base62(i * 7 + 4, 20),
                support::base62(i * 7 + 5, 30),
                support::base62(i * 7 + 6, 40)
            ),
            "invalid_token",
        ),
        // Well-formed, for a key id nobody has: one store lookup, no argon2.
        4 => (
            support::forge_token("sk", "live", &key_id, &secret),
            "invalid_api_key",
        ),
        // Shapes that are almost a key.
        _ => (
            format!("sk_live_{key_id}_{secret}{}", "!".repeat((i % 7) as usize)),
            "invalid_api_key",
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_garbage_tokens_are_each_denied_without_argon2() {
    let _meter = ARGON2_METER.lock().await;
    let (app, store) = counted_app();
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
    let verifications = app.hasher.verifications();
    let metric = argon2_metric();
    let lookups = store.gets();

    let tokens: Vec<(String, &str)> = (0..10_000).map(garbage).collect();
    let distinct: std::collections::HashSet<&String> = tokens.iter().map(|(t, _)| t).collect();
    assert_eq!(distinct.len(), tokens.len(), "the garbage is distinct");

    let burst = async {
        let mut wrong = Vec::new();
        for (c, chunk) in tokens.chunks(1000).enumerate() {
            let answers = futures::future::join_all(chunk.iter().enumerate().map(|(j, (t, _))| {
                let req = if j % 2 == 0 {
                    read_with(t)
                } else {
                    check_request("GET", support::READ_PATH, &[("x-api-key", t)])
                };
                envoy.decide(req)
            }))
            .await;
            for (j, (answer, (token, code))) in answers.iter().zip(chunk).enumerate() {
                let got = outcome(answer);
                if got != Outcome::denied(code, 401) {
                    wrong.push(format!("#{} {token}: {got:?}", c * 1000 + j));
                }
            }
        }
        wrong
    };
    let wrong = tokio::time::timeout(Duration::from_secs(60), burst)
        .await
        .expect("the burst is answered in time");
    assert!(
        wrong.is_empty(),
        "{} wrong answers, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(
        app.hasher.verifications(),
        verifications,
        "no argon2 for garbage"
    );
    assert_eq!(argon2_metric(), metric, "the argon2 metric agrees");
    // Only the well-formed tokens (for unknown key ids) were looked up, once each.
    let well_formed = tokens
        .iter()
        .filter(|(t, _)| keygate::apikey::parse(t, "sk").is_ok())
        .count();
    assert_eq!(well_formed, 10_000 / 6);
    assert_eq!(store.gets() - lookups, well_formed);

    // And keygate is still in shape afterwards.
    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
}

#[tokio::test]
async fn every_denial_has_a_nonzero_status_its_http_status_and_a_json_body() {
    let _meter = ARGON2_METER.lock().await;
    let app = app();
    let envoy = app.envoy_service();
    let reader = app.admin.create(support::reader_key()).await.unwrap();
    let writer = app
        .admin
        .create(NewKey {
            scopes: vec!["contacts:write".into()],
            ..support::reader_key()
        })
        .await
        .unwrap();
    let read = support::READ_PATH;
    let write = "/v1/contacts/42";
    let (reader, writer) = (bearer(&reader.token), bearer(&writer.token));
    let cases = [
        (check_request("GET", read, &[]), "missing_credentials", 401),
        (
            check_request("GET", read, &[("authorization", &bearer("nope"))]),
            "invalid_api_key",
            401,
        ),
        (
            check_request("GET", read, &[("authorization", &bearer("a.b.c"))]),
            "invalid_token",
            401,
        ),
        (
            check_request(
                "POST",
                write,
                &[("authorization", &reader), ("x-tenant-id", support::TENANT)],
            ),
            "insufficient_permissions",
            403,
        ),
        (
            check_request("GET", "/v1/unrouted", &[("authorization", &reader)]),
            "insufficient_permissions",
            403,
        ),
        (
            check_request("POST", write, &[("authorization", &writer)]),
            "tenant_required",
            400,
        ),
        (
            check_request(
                "POST",
                write,
                &[("authorization", &writer), ("x-tenant-id", "acme")],
            ),
            "invalid_tenant",
            400,
        ),
        (
            check_request(
                "POST",
                write,
                &[
                    ("authorization", &writer),
                    ("x-tenant-id", support::OTHER_TENANT),
                ],
            ),
            "tenant_forbidden",
            403,
        ),
    ];
    for (req, code, http) in cases {
        let result = envoy.decide(req).await;
        assert_eq!(outcome(&result), Outcome::denied(code, http), "{code}");
        let resp = result.unwrap();
        assert_ne!(resp.status.as_ref().unwrap().code, 0);
        assert!(
            resp.dynamic_metadata.is_none(),
            "a denial vouches for no one"
        );
        let challenge = denied_headers(&resp)
            .into_iter()
            .any(|(k, v)| k == "www-authenticate" && v == "Bearer");
        assert_eq!(
            challenge,
            http == 401,
            "www-authenticate on 401s only: {code}"
        );
    }
}

#[tokio::test]
async fn an_allow_overwrites_identity_headers_and_strips_credentials_and_smuggled_headers() {
    let _meter = ARGON2_METER.lock().await;
    let app = app();
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let key_id = key.record.key_id.clone();

    let via_headers = check_request(
        "GET",
        support::READ_PATH,
        &[
            ("authorization", &bearer(&key.token)),
            ("x-keygate-foo", "smuggled"),
            ("x-keygate-subject", "key:someone-else"),
            ("x-keygate-scopes", "*"),
            ("x-tenant-id", support::TENANT),
        ],
    );
    let via_raw = raw_check_request(
        "GET",
        support::READ_PATH,
        &[
            ("X-Api-Key", key.token.as_bytes()),
            ("X-Keygate-Foo", b"smuggled"),
            ("x-keygate-key-id", b"0000000000000000"),
        ],
    );
    for (req, credential_header) in [(via_headers, "authorization"), (via_raw, "x-api-key")] {
        let result = envoy.decide(req).await;
        assert_eq!(outcome(&result), Outcome::Allowed);
        let resp = result.unwrap();
        assert_eq!(resp.status.as_ref().unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
            unreachable!()
        };
        let mut set: Vec<(String, String)> = Vec::new();
        for h in &ok.headers {
            assert_eq!(
                h.append_action,
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                "{h:?}"
            );
            let hv = h.header.as_ref().unwrap();
            assert!(!hv.value.contains(support::secret_of(&key.token)));
            set.push((hv.key.clone(), hv.value.clone()));
        }
        set.sort();
        assert_eq!(
            set,
            vec![
                ("x-keygate-environment".to_owned(), "live".to_owned()),
                ("x-keygate-key-id".to_owned(), key_id.clone()),
                ("x-keygate-kind".to_owned(), "tenant".to_owned()),
                ("x-keygate-scopes".to_owned(), "contacts:read".to_owned()),
                ("x-keygate-subject".to_owned(), format!("key:{key_id}")),
                ("x-tenant-id".to_owned(), support::TENANT.to_owned()),
            ]
        );
        assert!(
            ok.headers_to_remove.contains(&credential_header.to_owned()),
            "the credential does not travel upstream: {:?}",
            ok.headers_to_remove
        );
        assert!(
            ok.headers_to_remove.contains(&"x-keygate-foo".to_owned()),
            "client-sent x-keygate-* headers are removed: {:?}",
            ok.headers_to_remove
        );
        let metadata = resp.dynamic_metadata.expect("identity for Envoy's logs");
        assert!(metadata.fields.contains_key("key_id"));
    }

    // A public route vouches for no one: client-sent identity headers are all removed.
    let result = envoy
        .decide(check_request(
            "GET",
            "/public/docs",
            &[
                ("x-keygate-subject", "key:someone"),
                ("x-tenant-id", support::OTHER_TENANT),
            ],
        ))
        .await;
    assert_eq!(outcome(&result), Outcome::Allowed);
    let Some(HttpResponse::OkResponse(ok)) = result.unwrap().http_response else {
        unreachable!()
    };
    assert!(ok.headers.is_empty(), "{:?}", ok.headers);
    let mut removed = ok.headers_to_remove.clone();
    removed.sort();
    assert_eq!(removed, vec!["x-keygate-subject", "x-tenant-id"]);
}

/// `policy.dynamic_metadata: false` drops the metadata and nothing else: the same
/// headers are set and removed.
#[tokio::test]
async fn without_dynamic_metadata_an_allow_sets_the_same_headers() {
    let _meter = ARGON2_METER.lock().await;
    let mut app = app();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let req = read_with(&key.token);
    assert!(app.config.policy.dynamic_metadata, "on by default");
    let a = app.envoy_service().decide(req.clone()).await.unwrap();
    app.config.policy.dynamic_metadata = false;
    let b = app.envoy_service().decide(req).await.unwrap();
    assert_eq!(outcome(&Ok(b.clone())), Outcome::Allowed);
    assert!(a.dynamic_metadata.is_some());
    assert_eq!(b.dynamic_metadata, None);
    assert_eq!(a.http_response, b.http_response);
    assert_eq!(a.status, b.status);
}

/// With `errors.opaque`, a client must not be able to tell an unknown key from a revoked
/// or expired one (`errors.opaque`) — on Envoy's Check and on keygate.v1 Check alike.
#[tokio::test]
async fn opaque_errors_hide_which_401_it_was_on_both_apis() {
    use keygate::api::proto::authorizer_server::Authorizer as _;

    let _meter = ARGON2_METER.lock().await;
    let mut config = support::config(Backend::Memory);
    config.errors.opaque = true;
    let app = App::build(config, support::secrets()).unwrap();
    let envoy = app.envoy_service();
    let internal = app.authorizer_service();
    let revoked = app.admin.create(support::reader_key()).await.unwrap();
    app.admin.revoke(&revoked.record.key_id).await.unwrap();
    let unknown = support::forge_token(
        "sk",
        "live",
        &support::base62(3, 16),
        &support::base62(4, 28),
    );

    let mut envoy_bodies = Vec::new();
    let mut internal_denials = Vec::new();
    for token in [&revoked.token, &unknown] {
        let result = envoy.decide(read_with(token)).await;
        assert_eq!(outcome(&result), Outcome::denied("unauthorized", 401));
        envoy_bodies.push(match result.unwrap().http_response {
            Some(HttpResponse::DeniedResponse(d)) => d.body,
            _ => unreachable!(),
        });
        let answer = internal
            .check(tonic::Request::new(support::read_through_keygate_v1(token)))
            .await
            .unwrap()
            .into_inner();
        assert!(!answer.allowed);
        internal_denials.push(answer.denial.expect("a denial"));
    }
    assert_eq!(
        envoy_bodies[0], envoy_bodies[1],
        "Envoy: one body for every 401"
    );
    assert_eq!(internal_denials[0].code, "unauthorized");
    assert_eq!(
        internal_denials[0], internal_denials[1],
        "keygate.v1: one denial (code and message) for every 401"
    );
}

/// Routes are matched on the path a server would route: dot segments (plain or
/// percent-encoded) cannot walk from a public route to a protected one, and a path
/// servers would read differently (an encoded `/`, `\` or NUL) is refused, whatever the
/// proxy in front normalised.
#[tokio::test]
async fn a_path_cannot_walk_from_a_public_route_to_a_protected_one() {
    // The key's own route at the end runs argon2.
    let _meter = ARGON2_METER.lock().await;
    let app = app();
    let envoy = app.envoy_service();
    let plain = |path: &str| check_request("GET", path, &[]);
    let walks = Outcome::denied("missing_credentials", 401);
    let refused = Outcome::denied("invalid_path", 400);
    for (path, expected) in [
        ("/public/../v1/contacts/42", &walks),
        ("/public/%2e%2e/v1/contacts/42", &walks),
        ("/public/.%2E/v1/contacts/42?x=1", &walks),
        ("/public//../v1/contacts/42", &refused),
        ("/public/..%2fv1/contacts/42", &refused),
        ("/public/..%5Cv1/contacts/42", &refused),
        ("/public/..\\v1/contacts/42", &refused),
        ("/public/%00", &refused),
        ("/public/..;/v1/contacts/42", &refused),
        ("/public/%zz", &refused),
    ] {
        assert_eq!(
            &support::outcome_of(&envoy, plain(path)).await,
            expected,
            "{path}"
        );
    }
    // What is public stays public, encoded or not.
    assert_eq!(
        support::outcome_of(&envoy, plain("/public/%64ocs/./x")).await,
        Outcome::Allowed
    );
    // And a key's own route still works through dot segments that stay inside it.
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let token = support::bearer(&key.token);
    assert_eq!(
        support::outcome_of(
            &envoy,
            check_request("GET", "/v1/contacts/7/../42", &[("authorization", &token)])
        )
        .await,
        Outcome::Allowed
    );
}

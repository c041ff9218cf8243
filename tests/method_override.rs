//! One request, one meaning: what keygate judges is what the upstream acts on.
//!
//! A method override header (`X-HTTP-Method-Override`, `X-HTTP-Method`,
//! `X-Method-Override`, or a spelling of one with `_` or `.`) makes many frameworks act on
//! another method than the request's own: by default (`policy.method_override: check`) the
//! request is allowed only if both methods are, spending one admission and at most one
//! lease; `strip` judges the request's own method and removes the headers upstream;
//! `deny` refuses them. And on every allow, a client header that reads as one keygate
//! owns once `_` and `.` are `-` (`x_api_key`, `x.tenant.id`) is removed.

use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, OkHttpResponse};
use keygate::authorizer::MethodOverride;
use keygate::config::Config;
use keygate::keys::NewKey;
use keygate::server::App;
use keygate_test_support as support;
use keygate_test_support::{bearer, check_request, outcome, Backend, Outcome, TENANT};

/// The test's policy after the credential headers every test policy has.
const POLICY: &str = r#"
  plans:
    three: { requests_per_minute: 1, burst: 3 }
    two_sessions: { requests_per_minute: 1000, concurrent_sessions: 2 }
  routes:
    - { name: docs, methods: [GET], path: "/docs/**", public: true }
    - { name: docs-edit, methods: [PUT], path: "/docs/**", scope: "docs:write" }
    - { name: contacts-read, methods: [GET, HEAD], path: "/v1/contacts/**", scope: "contacts:read" }
    - { name: contacts-write, methods: [POST, PUT, PATCH], path: "/v1/contacts/**", scope: "contacts:write" }
    - { name: contacts-delete, methods: [DELETE], path: "/v1/contacts/**", scope: "contacts:delete", tenant: required }
    - { name: sessions-list, methods: [GET], path: "/v1/sessions", scope: "sessions:use" }
    - { name: sessions-open, methods: [POST], path: "/v1/sessions", scope: "sessions:use", lease_ttl: 1h }
    - { name: sessions-renew, methods: [PUT], path: "/v1/sessions", scope: "sessions:use", lease_ttl: 1h }
"#;

fn app(mode: MethodOverride) -> App {
    let mut config = support::config_with_policy(Backend::Memory, POLICY);
    assert_eq!(
        config.policy.method_override,
        MethodOverride::Check,
        "check by default"
    );
    config.policy.method_override = mode;
    App::build(config, support::secrets()).unwrap()
}

async fn key(app: &App, scopes: &[&str], plan: &str) -> String {
    let key = app
        .admin
        .create(NewKey {
            tenant_id: TENANT.into(),
            name: "method override".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            plan: plan.into(),
            ..NewKey::default()
        })
        .await
        .unwrap();
    key.token
}

fn ok(resp: &CheckResponse) -> &OkHttpResponse {
    match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok,
        other => panic!("not an allow: {other:?}"),
    }
}

fn set_upstream<'r>(ok: &'r OkHttpResponse, name: &str) -> Option<&'r str> {
    ok.headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

/// The headers frameworks read, and spellings of them an upstream reading `_` and `.` as
/// `-` takes for them (PHP's `HTTP_X_HTTP_METHOD_OVERRIDE`).
const OVERRIDE_HEADERS: [&str; 6] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "X-HTTP-Method-Override",
    "x_http_method_override",
    "x.http.method",
];

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
];

/// For each override header, each method a request is sent with and each method it
/// names: allowed exactly when the key may make both on that path (no route takes
/// OPTIONS, TRACE or CONNECT; `delete` needs the tenant header, sent here).
#[tokio::test]
async fn each_override_header_is_judged_on_both_methods() {
    let app = app(MethodOverride::Check);
    let envoy = app.envoy_service();
    let writer = bearer(&key(&app, &["contacts:read", "contacts:write"], "").await);
    let reader = bearer(&key(&app, &["contacts:read"], "").await);
    let deleter = bearer(&key(&app, &["contacts:read", "contacts:delete"], "").await);
    let keys: [(&str, &[&str]); 3] = [
        (&writer, &["GET", "HEAD", "POST", "PUT", "PATCH"]),
        (&reader, &["GET", "HEAD"]),
        (&deleter, &["GET", "HEAD", "DELETE"]),
    ];
    let mut allowed_with_override = 0;
    for (token, may) in keys {
        for real in METHODS {
            let plain = check_request(
                real,
                "/v1/contacts/42",
                &[("authorization", token), ("x-tenant-id", TENANT)],
            );
            let expected_alone = if may.contains(&real) {
                Outcome::Allowed
            } else {
                Outcome::denied("insufficient_permissions", 403)
            };
            assert_eq!(
                support::outcome_of(&envoy, plain).await,
                expected_alone,
                "{real} alone"
            );
            for header in OVERRIDE_HEADERS {
                for named in METHODS {
                    let req = check_request(
                        real,
                        "/v1/contacts/42",
                        &[
                            ("authorization", token),
                            ("x-tenant-id", TENANT),
                            (header, named),
                        ],
                    );
                    let expected = if may.contains(&real) && may.contains(&named) {
                        allowed_with_override += 1;
                        Outcome::Allowed
                    } else {
                        Outcome::denied("insufficient_permissions", 403)
                    };
                    assert_eq!(
                        support::outcome_of(&envoy, req).await,
                        expected,
                        "{real} with {header}: {named}, may {may:?}"
                    );
                }
            }
        }
    }
    assert!(allowed_with_override > 0, "some pairs are allowed");
}

/// Frameworks upper-case the value; a request is judged on every header it carries.
#[tokio::test]
async fn values_are_read_in_any_case_and_every_override_header_counts() {
    let app = app(MethodOverride::Check);
    let envoy = app.envoy_service();
    let writer = bearer(&key(&app, &["contacts:read", "contacts:write"], "").await);
    let judge = |headers: Vec<(&'static str, &'static str)>| {
        let mut all = vec![("authorization", writer.as_str()), ("x-tenant-id", TENANT)];
        all.extend(headers);
        check_request("POST", "/v1/contacts/42", &all)
    };
    let forbidden = Outcome::denied("insufficient_permissions", 403);
    for (headers, expected) in [
        (vec![("x-http-method-override", "delete")], &forbidden),
        (vec![("x-http-method-override", " Delete ")], &forbidden),
        (vec![("x-http-method-override", "patch")], &Outcome::Allowed),
        (
            vec![
                ("x-http-method-override", "PUT"),
                ("x-http-method", "PATCH"),
            ],
            &Outcome::Allowed,
        ),
        (
            vec![
                ("x-http-method-override", "PUT"),
                ("x-http-method", "DELETE"),
            ],
            &forbidden,
        ),
        (
            vec![("x-method-override", "GET"), ("x_http_method", "DELETE")],
            &forbidden,
        ),
    ] {
        assert_eq!(
            &support::outcome_of(&envoy, judge(headers.clone())).await,
            expected,
            "{headers:?}"
        );
    }
}

/// A value that is not a method: which method an upstream would make of it is anyone's
/// guess (`DELETE,PUT` is what two headers of one name arrive as).
#[tokio::test]
async fn a_malformed_override_is_refused_even_on_a_public_route() {
    let app = app(MethodOverride::Check);
    let envoy = app.envoy_service();
    let writer = bearer(&key(&app, &["contacts:read", "contacts:write"], "").await);
    let refused = Outcome::denied("invalid_request", 400);
    for value in [
        "",
        "   ",
        "DELETE,PUT",
        "DELETE, PUT",
        "DEL ETE",
        "GET/",
        "(GET)",
        "DÉLETE",
        "GET\"",
    ] {
        for header in OVERRIDE_HEADERS {
            let protected = check_request(
                "POST",
                "/v1/contacts/42",
                &[("authorization", &writer), (header, value)],
            );
            assert_eq!(
                support::outcome_of(&envoy, protected).await,
                refused,
                "{header}: {value:?}"
            );
            let public = check_request("GET", "/docs/x", &[(header, value)]);
            assert_eq!(
                support::outcome_of(&envoy, public).await,
                refused,
                "{header}: {value:?} on a public route"
            );
        }
    }
}

/// GET /docs is public, PUT /docs needs `docs:write`: a GET that overrides to PUT needs
/// it too, and is then an authenticated allow.
#[tokio::test]
async fn a_public_route_overridden_to_a_protected_one_needs_a_credential() {
    let app = app(MethodOverride::Check);
    let envoy = app.envoy_service();
    let override_put = ("x-http-method-override", "PUT");
    assert_eq!(
        support::outcome_of(&envoy, check_request("GET", "/docs/x", &[])).await,
        Outcome::Allowed
    );
    assert_eq!(
        support::outcome_of(&envoy, check_request("GET", "/docs/x", &[override_put])).await,
        Outcome::denied("missing_credentials", 401)
    );
    // Overriding to another public method stays public (GET to GET is no override).
    let same = check_request("GET", "/docs/x", &[("x-http-method-override", "get")]);
    assert_eq!(support::outcome_of(&envoy, same).await, Outcome::Allowed);
    let reader = bearer(&key(&app, &["contacts:read"], "").await);
    let editor = bearer(&key(&app, &["docs:write"], "").await);
    assert_eq!(
        support::outcome_of(
            &envoy,
            check_request(
                "GET",
                "/docs/x",
                &[("authorization", &reader), override_put]
            )
        )
        .await,
        Outcome::denied("insufficient_permissions", 403)
    );
    let resp = envoy
        .decide(check_request(
            "GET",
            "/docs/x",
            &[("authorization", &editor), override_put],
        ))
        .await;
    assert_eq!(outcome(&resp), Outcome::Allowed);
    let resp = resp.unwrap();
    assert_eq!(
        set_upstream(ok(&resp), "x-keygate-scopes"),
        Some("docs:write")
    );
}

/// The overriding route's tenant rule holds too: DELETE requires the tenant header.
#[tokio::test]
async fn the_overriding_routes_tenant_rule_holds() {
    let app = app(MethodOverride::Check);
    let envoy = app.envoy_service();
    let deleter = bearer(&key(&app, &["contacts:read", "contacts:delete"], "").await);
    let get = |headers: &[(&str, &str)]| {
        let mut all = vec![("authorization", deleter.as_str())];
        all.extend_from_slice(headers);
        check_request("GET", "/v1/contacts/42", &all)
    };
    assert_eq!(
        support::outcome_of(&envoy, get(&[])).await,
        Outcome::Allowed
    );
    assert_eq!(
        support::outcome_of(&envoy, get(&[("x-http-method", "DELETE")])).await,
        Outcome::denied("tenant_required", 400)
    );
    assert_eq!(
        support::outcome_of(
            &envoy,
            get(&[("x-http-method", "DELETE"), ("x-tenant-id", TENANT)])
        )
        .await,
        Outcome::Allowed
    );
}

/// Three override headers on one request spend one admission: a burst of three admits
/// three such requests (its plan refills one a minute), then refuses.
#[tokio::test]
async fn overrides_spend_one_admission() {
    let app = app(MethodOverride::Check);
    let envoy = app.envoy_service();
    let writer = bearer(&key(&app, &["contacts:read", "contacts:write"], "three").await);
    let req = || {
        check_request(
            "POST",
            "/v1/contacts/42",
            &[
                ("authorization", &writer),
                ("x-http-method-override", "PUT"),
                ("x-http-method", "PATCH"),
                ("x-method-override", "GET"),
            ],
        )
    };
    for i in 0..3 {
        assert_eq!(
            support::outcome_of(&envoy, req()).await,
            Outcome::Allowed,
            "request {i}"
        );
    }
    assert_eq!(
        support::outcome_of(&envoy, req()).await,
        Outcome::denied("rate_limited", 429)
    );
}

/// A lease is taken when the overriding route takes one, once per request: a key of two
/// sessions opens two, whatever the request's own route says.
#[tokio::test]
async fn an_overriding_route_that_takes_a_lease_takes_one() {
    let app = app(MethodOverride::Check);
    let envoy = app.envoy_service();
    let token = bearer(&key(&app, &["sessions:use"], "two_sessions").await);
    let req = |method: &str, named: Option<&str>| {
        let mut headers = vec![("authorization", token.as_str())];
        if let Some(m) = named {
            headers.push(("x-http-method-override", m));
        }
        check_request(method, "/v1/sessions", &headers)
    };
    // GET takes no lease; GET that is a POST does; POST that is a PUT takes one, not two.
    let plain = envoy.decide(req("GET", None)).await.unwrap();
    assert_eq!(set_upstream(ok(&plain), "x-keygate-lease-id"), None);
    let mut leases = Vec::new();
    for (method, named) in [("GET", "POST"), ("POST", "PUT")] {
        let resp = envoy.decide(req(method, Some(named))).await;
        assert_eq!(outcome(&resp), Outcome::Allowed, "{method} as {named}");
        let resp = resp.unwrap();
        let lease = set_upstream(ok(&resp), "x-keygate-lease-id").map(str::to_owned);
        leases.push(lease.expect("the lease id goes upstream"));
    }
    assert_ne!(leases[0], leases[1]);
    assert_eq!(
        outcome(&envoy.decide(req("GET", Some("POST"))).await),
        Outcome::denied("rate_limited", 429),
        "both sessions are in use"
    );
    assert_eq!(
        outcome(&envoy.decide(req("GET", None)).await),
        Outcome::Allowed
    );
}

/// `strip`: judged on the request's own method, and every override header, in every
/// spelling and whatever its value, is removed upstream. `check` keeps them.
#[tokio::test]
async fn strip_judges_the_own_method_and_removes_every_spelling() {
    for mode in [MethodOverride::Strip, MethodOverride::Check] {
        let app = app(mode);
        let envoy = app.envoy_service();
        let writer = bearer(&key(&app, &["contacts:read", "contacts:write"], "").await);
        let headers = [
            ("authorization", writer.as_str()),
            ("x-http-method-override", "PUT"),
            ("x_http_method", "patch"),
            ("x.method.override", "POST"),
            ("x-http-method-overrides", "DELETE"),
        ];
        let resp = envoy
            .decide(check_request("POST", "/v1/contacts/42", &headers))
            .await;
        assert_eq!(outcome(&resp), Outcome::Allowed, "{mode:?}");
        let resp = resp.unwrap();
        let mut removed: Vec<&str> = ok(&resp)
            .headers_to_remove
            .iter()
            .map(String::as_str)
            .filter(|h| *h != "authorization")
            .collect();
        removed.sort();
        let expected: &[&str] = match mode {
            MethodOverride::Strip => &[
                "x-http-method-override",
                "x.method.override",
                "x_http_method",
            ],
            _ => &[],
        };
        assert_eq!(removed, expected, "{mode:?}");
    }
    // Under strip, a DELETE override is no DELETE, and a malformed one is removed too.
    let app = app(MethodOverride::Strip);
    let envoy = app.envoy_service();
    let writer = bearer(&key(&app, &["contacts:read", "contacts:write"], "").await);
    for value in ["DELETE", "DELETE, PUT", ""] {
        let req = check_request(
            "POST",
            "/v1/contacts/42",
            &[
                ("authorization", &writer),
                ("x-http-method-override", value),
            ],
        );
        let resp = envoy.decide(req).await;
        assert_eq!(outcome(&resp), Outcome::Allowed, "{value:?}");
        assert!(ok(&resp.unwrap())
            .headers_to_remove
            .contains(&"x-http-method-override".to_owned()));
    }
    let public = envoy
        .decide(check_request("GET", "/docs/x", &[("x_http_method", "PUT")]))
        .await
        .unwrap();
    assert_eq!(ok(&public).headers_to_remove, ["x_http_method"]);
}

/// `deny`: any override header is refused, whatever its value, public routes included.
#[tokio::test]
async fn deny_refuses_every_override_header() {
    let app = app(MethodOverride::Deny);
    let envoy = app.envoy_service();
    let writer = bearer(&key(&app, &["contacts:read", "contacts:write"], "").await);
    let refused = Outcome::denied("invalid_request", 400);
    for header in OVERRIDE_HEADERS {
        for value in ["POST", "GET", "bad value"] {
            let req = check_request(
                "POST",
                "/v1/contacts/42",
                &[("authorization", &writer), (header, value)],
            );
            assert_eq!(support::outcome_of(&envoy, req).await, refused, "{header}");
            let public = check_request("GET", "/docs/x", &[(header, value)]);
            assert_eq!(
                support::outcome_of(&envoy, public).await,
                refused,
                "{header}"
            );
        }
    }
    let plain = check_request("POST", "/v1/contacts/42", &[("authorization", &writer)]);
    assert_eq!(support::outcome_of(&envoy, plain).await, Outcome::Allowed);
}

#[test]
fn method_override_is_check_strip_or_deny_and_a_typo_names_the_field() {
    let load = |value: &str| {
        Config::load(
            Some(&format!("policy: {{ method_override: {value} }}")),
            Vec::new(),
        )
    };
    for (value, mode) in [
        ("check", MethodOverride::Check),
        ("strip", MethodOverride::Strip),
        ("deny", MethodOverride::Deny),
    ] {
        assert_eq!(load(value).unwrap().policy.method_override, mode);
    }
    let err = load("allow").unwrap_err();
    assert_eq!(err.field, "policy.method_override", "{err:?}");
}

/// On every allow, a client header that reads as a header keygate owns once `_` and `.`
/// are `-` is removed: the tenant header, `x-keygate-*`, and the credential headers (an
/// upstream reading `HTTP_X_API_KEY` must not find another key than the one judged).
#[tokio::test]
async fn aliases_of_owned_headers_are_removed_on_every_allow() {
    let app = app(MethodOverride::Check);
    let envoy = app.envoy_service();
    let reader = key(&app, &["contacts:read"], "").await;
    let auth = bearer(&reader);
    let aliases = [
        "x_api_key",
        "x.api.key",
        "x-api_key",
        "x_tenant_id",
        "x.tenant.id",
        "x_keygate_subject",
        "x.keygate.scopes",
    ];
    let mut headers: Vec<(&str, &str)> = aliases.iter().map(|a| (*a, "smuggled")).collect();
    headers.push(("x_custom", "kept"));
    for credential in [
        ("authorization", auth.as_str()),
        ("x-api-key", reader.as_str()),
    ] {
        let mut all = headers.clone();
        all.push(credential);
        let resp = envoy
            .decide(check_request("GET", "/v1/contacts/42", &all))
            .await;
        assert_eq!(outcome(&resp), Outcome::Allowed);
        let resp = resp.unwrap();
        let mut removed: Vec<&str> = ok(&resp)
            .headers_to_remove
            .iter()
            .map(String::as_str)
            .collect();
        removed.sort();
        let mut expected: Vec<&str> = aliases.to_vec();
        expected.push(credential.0);
        expected.sort();
        assert_eq!(removed, expected, "credential in {}", credential.0);
    }
    // A public route too.
    let resp = envoy
        .decide(check_request("GET", "/docs/x", &headers))
        .await
        .unwrap();
    let mut removed = ok(&resp).headers_to_remove.clone();
    removed.sort();
    let mut expected: Vec<String> = aliases.iter().map(|a| a.to_string()).collect();
    expected.sort();
    assert_eq!(removed, expected);
}

use super::*;
use crate::policy::RouteConfig;
use crate::request::PathRelaxation;

fn route(name: &str, methods: &[&str], path: &str, scope: Option<&str>) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        path: path.into(),
        scope: scope.map(Into::into),
        public: scope.is_none(),
        tenant: None,
        credentials: None,
        internal: false,
        environments: None,
        lease_ttl: None,
        ..Default::default()
    }
}

fn policy(routes: Vec<RouteConfig>) -> Policy {
    Policy::compile(&PolicyConfig {
        routes,
        opt_in_scopes: vec!["billing:partner:allocate".into()],
        ..PolicyConfig::default()
    })
    .unwrap()
}

#[test]
fn first_matching_family_wins_and_query_is_ignored() {
    let p = policy(vec![
        route("read", &["GET"], "/v1/contacts/**", Some("contacts:read")),
        route(
            "write",
            &["POST", "delete"],
            "/v1/contacts/*",
            Some("contacts:write"),
        ),
        route("health", &[], "/healthz", None),
    ]);
    let name = |m, path| p.route(m, path).map(|r| r.name.to_string());
    assert_eq!(name("GET", "/v1/contacts"), Some("read".into()));
    assert_eq!(
        name("GET", "/v1/contacts/42/notes?x=1"),
        Some("read".into())
    );
    assert_eq!(name("POST", "/v1/contacts/42"), Some("write".into()));
    assert_eq!(name("DELETE", "/v1/contacts/42/"), Some("write".into()));
    assert_eq!(name("POST", "/v1/contacts/42/x"), None);
    assert_eq!(name("POST", "/v1/contacts/"), None);
    assert_eq!(name("PUT", "/healthz"), Some("health".into()));
    assert_eq!(name("GET", "/healthzz"), None);
    assert_eq!(name("GET", "/v1/contactsx"), None);
    assert_eq!(name("GET", "healthz"), None);
}

#[test]
fn unmatched_requests_fall_back_only_when_configured() {
    let cfg = PolicyConfig {
        unmatched: Unmatched::Authenticated,
        ..PolicyConfig::default()
    };
    let p = Policy::compile(&cfg).unwrap();
    assert_eq!(
        p.route("GET", "/anything").unwrap().requirement,
        Requirement::Authenticated
    );
    assert!(policy(vec![]).route("GET", "/anything").is_none());
}

#[test]
fn empty_scopes_grant_nothing_and_wildcards_skip_opt_in() {
    let p = policy(vec![]);
    let held = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(!p.grants(&[], "contacts:read"));
    assert!(p.grants(&held(&["contacts:read"]), "contacts:read"));
    assert!(!p.grants(&held(&["contacts:read"]), "contacts:write"));
    assert!(p.grants(&held(&["contacts:*"]), "contacts:write"));
    assert!(!p.grants(&held(&["contacts:*"]), "contactsx:write"));
    assert!(p.grants(&held(&["*"]), "billing:read"));
    assert!(!p.grants(&held(&["*"]), "billing:partner:allocate"));
    assert!(!p.grants(&held(&["billing:*"]), "billing:partner:allocate"));
    assert!(p.grants(
        &held(&["billing:partner:allocate"]),
        "billing:partner:allocate"
    ));
}

#[test]
fn a_key_holds_wildcards_only_whole_or_trailing_and_a_route_requires_none() {
    for held in ["contacts:read", "*", "contacts:*", "billing:partner:*"] {
        assert!(valid_held_scope(held), "{held}");
    }
    for bad in [
        "contacts*",
        "*:read",
        "con*tacts:read",
        "contacts:*:*",
        "",
        "A:b",
    ] {
        assert!(!valid_held_scope(bad), "{bad}");
    }
    assert!(valid_required_scope("contacts:read"));
    assert!(!valid_required_scope("contacts:*"));
    assert!(!valid_required_scope("*"));
}

#[test]
fn bad_routes_are_refused_with_their_field() {
    let bad = |r: RouteConfig| {
        Policy::compile(&PolicyConfig {
            routes: vec![r],
            ..PolicyConfig::default()
        })
        .unwrap_err()
        .field
    };
    assert_eq!(
        bad(route("a", &[], "/a/**/b", Some("x:y"))),
        "policy.routes[0].path"
    );
    assert_eq!(
        bad(route("a", &[], "/a/b*", Some("x:y"))),
        "policy.routes[0].path"
    );
    assert_eq!(
        bad(route("a", &[], "/a", Some("X Y"))),
        "policy.routes[0].scope"
    );
    assert_eq!(
        bad(route("a", &["G T"], "/a", None)),
        "policy.routes[0].methods[0]"
    );
    for path in ["/v1/admin;x/**", "/v1/a%3Bb", "/v1/a%3bb"] {
        assert_eq!(
            bad(route("a", &[], path, Some("x:y"))),
            "policy.routes[0].path",
            "{path}"
        );
    }
    for path in [
        "/v1/%7eme",
        "/v1/./a",
        "/v1/a/..",
        "/v1/a%2Fb",
        "/v1/a\\b",
        "/v1/%c0%ae",
        "//v1",
    ] {
        assert_eq!(
            bad(route("a", &[], path, Some("x:y"))),
            "policy.routes[0].path",
            "{path}"
        );
    }
    let mut twice = route("a", &[], "/a/**", None);
    twice.path_relaxations = vec![PathRelaxation::EncodedSlash, PathRelaxation::EncodedSlash];
    assert_eq!(bad(twice), "policy.routes[0].path_relaxations[1]");
    let mut no_req = route("a", &[], "/a", None);
    no_req.public = false;
    assert_eq!(bad(no_req), "policy.routes[0].scope");
}

fn name_of(p: &Policy, method: &str, path: &str) -> Result<Option<String>, PathError> {
    p.route_of(method, path)
        .map(|r| r.map(|r| r.name.to_string()))
}

/// A public catch-all behind a protected family: the shape where a path that one
/// server reads as the family and keygate as the catch-all would open the family.
fn admin_and_public() -> Policy {
    policy(vec![
        route("admin", &[], "/admin/**", Some("admin:all")),
        route("files", &[], "/files/**", Some("files:read")),
        route("everything", &[], "/**", None),
    ])
}

/// What `p` makes of each GET: its route's name, or why the path is refused. Every
/// case is checked; a failure names the path.
fn assert_routes(p: &Policy, cases: &[(&str, Result<Option<&str>, PathError>)]) {
    for (path, expected) in cases {
        let expected = expected.map(|name| name.map(str::to_owned));
        assert_eq!(name_of(p, "GET", path), expected, "{path}");
    }
}

#[test]
fn a_path_read_case_blind_on_another_route_is_refused() {
    assert_routes(
        &admin_and_public(),
        &[
            ("/admin/users", Ok(Some("admin"))),
            ("/ADMIN/users", Err(PathError::Readings)),
            ("/Admin/users", Err(PathError::Readings)),
            ("/%41dmin/users", Err(PathError::Readings)),
            // Upper case that lands on the same route either way is fine.
            ("/admin/Users/AbC", Ok(Some("admin"))),
            ("/Other/X", Ok(Some("everything"))),
        ],
    );
    // A literal in upper case: every path is also matched case-blind.
    let upper = policy(vec![
        route("me", &[], "/v1/Me/**", Some("me:read")),
        route("everything", &[], "/**", None),
    ]);
    assert_routes(
        &upper,
        &[
            ("/v1/Me/x", Ok(Some("me"))),
            ("/v1/me/x", Err(PathError::Readings)),
        ],
    );
}

#[test]
fn a_path_read_without_trailing_dots_or_spaces_on_another_route_is_refused() {
    let p = admin_and_public();
    for path in [
        "/admin./users",
        "/admin../users",
        "/admin%20/users",
        "/admin.%20./x",
    ] {
        assert_eq!(name_of(&p, "GET", path), Err(PathError::Readings), "{path}");
    }
    for path in ["/x/.../y", "/x/..%20/y", "/x/%20"] {
        assert_eq!(name_of(&p, "GET", path), Err(PathError::Readings), "{path}");
    }
    assert_routes(
        &p,
        &[
            ("/admin/users.", Ok(Some("admin"))),
            ("/other./x.", Ok(Some("everything"))),
        ],
    );
}

#[test]
fn a_relaxed_path_is_taken_only_by_a_route_that_names_it_on_every_reading() {
    let mut files = route("files", &[], "/files/**", Some("files:read"));
    files.path_relaxations = vec![PathRelaxation::EncodedSlash, PathRelaxation::EncodedPercent];
    let p = policy(vec![
        route("admin", &[], "/admin/**", Some("admin:all")),
        files,
        route("everything", &[], "/**", None),
    ]);
    assert_routes(
        &p,
        &[
            ("/files/a%2Fb", Ok(Some("files"))),
            ("/files/a%2fb?x=%2f", Ok(Some("files"))),
            ("/files/100%2541", Ok(Some("files"))),
            // Decoded, the path leaves the route: refused.
            ("/files/..%2F..%2Fadmin/users", Err(PathError::EncodedSlash)),
            ("/files/%252e%252e/admin/x", Err(PathError::EncodedPercent)),
            // Elsewhere, or with a relaxation the route does not name, refused.
            ("/other/a%2Fb", Err(PathError::EncodedSlash)),
            ("/files/a%5Cb", Err(PathError::EncodedBackslash)),
            ("/files/a//b", Err(PathError::EmptySegment)),
            // And what is refused outright stays refused.
            ("/files/a%2Fb%00", Err(PathError::Unprintable)),
            ("/files/a%2Fb;x", Err(PathError::Parameters)),
        ],
    );
    // Without any relaxed route, the strict answer.
    assert_routes(
        &admin_and_public(),
        &[("/files/a%2Fb", Err(PathError::EncodedSlash))],
    );
}

#[test]
fn empty_segments_relaxed_are_merged_only_where_both_readings_agree() {
    let mut files = route("files", &[], "/files/**", Some("files:read"));
    files.path_relaxations = vec![PathRelaxation::EmptySegments];
    let p = policy(vec![
        route("public", &[], "/public/**", None),
        files,
        route("v1", &[], "/v1/**", Some("v1:read")),
    ]);
    assert_routes(
        &p,
        &[
            ("/files/a//b", Ok(Some("files"))),
            ("/files//a/", Ok(Some("files"))),
            // Merged, `..` leaves `/files`; kept, it removes the empty segment.
            ("/files/a//../../v1/x", Err(PathError::EmptySegment)),
            ("//files/a", Err(PathError::EmptySegment)),
            ("/public//x", Err(PathError::EmptySegment)),
        ],
    );
}

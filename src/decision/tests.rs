use super::*;
use crate::settings::ConfigError;

#[test]
fn a_refused_path_is_answered_naming_what_was_refused() {
    for (i, refused) in PathError::ALL.into_iter().enumerate() {
        assert_eq!(refused.index(), i, "ALL is in declaration order");
    }
    let default = ErrorShape::compile(&ErrorsConfig::default()).unwrap();
    let mut bodies = std::collections::HashSet::new();
    for refused in PathError::ALL {
        let e = default.answer_to(&Denial::invalid_path(refused));
        assert_eq!((e.code.as_str(), e.status), ("invalid_path", 400));
        assert!(e.message.ends_with(&format!("{refused}.")), "{}", e.message);
        let body: serde_json::Value = serde_json::from_str(&e.body).unwrap();
        assert_eq!(body["error"]["message"], *e.message, "{}", e.body);
        bodies.insert(e.body.clone());
    }
    assert_eq!(bodies.len(), PathError::ALL.len(), "one answer per reason");
    // Without a reason, and where the deployment words invalid_path itself, one answer.
    let plain = default.answer_to(&Denial::new(DenyReason::InvalidPath));
    assert_eq!(plain, default.answer(DenyReason::InvalidPath));
    let own = shape("errors: { codes: { invalid_path: { message: \"Bad path.\" } } }").unwrap();
    let e = own.answer_to(&Denial::invalid_path(PathError::Backslash));
    assert_eq!(&*e.message, "Bad path.");
}

#[test]
fn every_code_has_the_status_of_the_design_table() {
    let expected = [
        ("missing_credentials", 401),
        ("invalid_api_key", 401),
        ("expired_api_key", 401),
        ("revoked_api_key", 401),
        ("invalid_token", 401),
        ("insufficient_permissions", 403),
        ("tenant_required", 400),
        ("invalid_tenant", 400),
        ("tenant_forbidden", 403),
        ("rate_limited", 429),
    ];
    for (code, status) in expected {
        let reason = DenyReason::from_code(code).expect(code);
        assert_eq!(reason.http_status(), status, "{code}");
        assert_eq!(reason.code(), code);
    }
}

fn shape(yaml: &str) -> Result<ErrorShape, ConfigError> {
    let cfg = crate::config::Config::load(Some(yaml), Vec::new())?;
    ErrorShape::compile(&cfg.errors)
}

#[test]
fn default_body_is_the_documented_json_shape() {
    let shape = ErrorShape::default();
    let e = shape.answer(DenyReason::TenantForbidden);
    let v: serde_json::Value = serde_json::from_str(&e.body).unwrap();
    assert_eq!(v["error"]["code"], "tenant_forbidden");
    assert_eq!(v["error"]["message"], DenyReason::TenantForbidden.message());
    assert_eq!(e.status, 403);
    assert_eq!(shape.www_authenticate(e), None);
    let unauth = shape.answer(DenyReason::RevokedApiKey);
    assert_eq!(shape.www_authenticate(unauth), Some("Bearer"));
}

#[test]
fn opaque_errors_hide_which_401_it_was_but_not_403s() {
    let shape = shape("errors: {opaque: true}").unwrap();
    let revoked = shape.answer(DenyReason::RevokedApiKey);
    let unknown = shape.answer(DenyReason::InvalidApiKey);
    assert_eq!(revoked, unknown);
    assert_eq!(revoked.code, OPAQUE_CODE);
    let forbidden = shape.answer(DenyReason::TenantForbidden);
    assert!(forbidden.body.contains("tenant_forbidden"));
}

#[test]
fn a_message_only_body_is_exactly_that() {
    let shape = shape(
        "errors: {opaque: true, opaque_message: Unauthenticated., body: {message: '{message}'}}",
    )
    .unwrap();
    for reason in [
        DenyReason::MissingCredentials,
        DenyReason::InvalidApiKey,
        DenyReason::ExpiredApiKey,
        DenyReason::RevokedApiKey,
    ] {
        assert_eq!(
            &*shape.answer(reason).body,
            r#"{"message":"Unauthenticated."}"#
        );
        assert_eq!(shape.answer(reason).status, 401);
    }
}

#[test]
fn per_code_status_and_message_and_key_order_are_kept() {
    let shape = shape(
        r#"
errors:
  body: '{"status": "{status}", "error_code": "{code}", "detail": "{message} ({code})"}'
  codes:
    insufficient_permissions: {status: 401, message: The API key lacks required permissions}
"#,
    )
    .unwrap();
    let e = shape.answer(DenyReason::InsufficientPermissions);
    assert_eq!(e.status, 401);
    assert_eq!(
        &*e.body,
        r#"{"status":401,"error_code":"insufficient_permissions","detail":"The API key lacks required permissions (insufficient_permissions)"}"#
    );
    assert_eq!(shape.www_authenticate(e), Some("Bearer"));
}

#[test]
fn a_code_can_be_shown_as_the_one_the_api_documents() {
    let shape = shape(
        r#"
errors:
  codes:
    missing_credentials: {code: invalid_api_key}
    invalid_token: {code: invalid_api_key, message: The API key is malformed.}
    rate_limited: {code: too_many_requests, status: 429}
"#,
    )
    .unwrap();
    let missing = shape.answer(DenyReason::MissingCredentials);
    assert_eq!(missing.code, "invalid_api_key");
    assert_eq!(missing.status, 401);
    assert_eq!(
        &*missing.body,
        r#"{"error":{"code":"invalid_api_key","message":"No credentials were provided."}}"#
    );
    let jwt = shape.answer(DenyReason::InvalidToken);
    assert_eq!(jwt.code, "invalid_api_key");
    assert!(
        jwt.body.contains(r#""code":"invalid_api_key""#),
        "{}",
        jwt.body
    );
    assert_eq!(shape.www_authenticate(jwt), Some("Bearer"));
    assert_eq!(
        shape.answer(DenyReason::RateLimited).code,
        "too_many_requests"
    );
    // Codes not named keep keygate's; metrics and logs count keygate's own.
    assert_eq!(
        shape.answer(DenyReason::InvalidApiKey).code,
        "invalid_api_key"
    );
    assert_eq!(
        Decision::deny(DenyReason::MissingCredentials).label(),
        "missing_credentials"
    );
}

#[test]
fn a_message_with_quotes_stays_valid_json() {
    let shape =
        shape(r#"errors: {codes: {rate_limited: {message: 'Slow "down" \ please'}}}"#).unwrap();
    let body = &shape.answer(DenyReason::RateLimited).body;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["message"], r#"Slow "down" \ please"#);
}

#[test]
fn mistakes_in_errors_name_their_field() {
    for (yaml, field) in [
        (
            "errors: {codes: {no_such_code: {status: 401}}}",
            "errors.codes.no_such_code",
        ),
        (
            "errors: {codes: {rate_limited: {status: 503}}}",
            "errors.codes.rate_limited.status",
        ),
        (
            "errors: {codes: {rate_limited: {message: ' '}}}",
            "errors.codes.rate_limited.message",
        ),
        (
            "errors: {opaque: true, codes: {expired_api_key: {message: x}}}",
            "errors.codes.expired_api_key",
        ),
        (
            "errors: {body: '{\"message\": \"{mesage}\"}'}",
            "errors.body",
        ),
        ("errors: {body: '[1'}", "errors.body"),
        ("errors: {body: [1, 2]}", "errors.body"),
        (
            "errors: {www_authenticate: \"a\\nb\"}",
            "errors.www_authenticate",
        ),
        (
            "errors: {codes: {missing_credentials: {code: ''}}}",
            "errors.codes.missing_credentials.code",
        ),
        (
            "errors: {codes: {invalid_token: {code: Invalid_Key}}}",
            "errors.codes.invalid_token.code",
        ),
        (
            "errors: {codes: {invalid_token: {code: 'invalid key'}}}",
            "errors.codes.invalid_token.code",
        ),
        (
            "errors: {codes: {invalid_token: {code: 'a\"b'}}}",
            "errors.codes.invalid_token.code",
        ),
        (
            "errors: {opaque: true, codes: {invalid_token: {code: invalid_api_key}}}",
            "errors.codes.invalid_token",
        ),
    ] {
        let err = shape(yaml)
            .err()
            .unwrap_or_else(|| panic!("accepted: {yaml}"));
        assert_eq!(err.field, field, "{yaml}: {err}");
    }
}

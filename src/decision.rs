//! The answer keygate gives: allow with who the caller is, deny with a public error code,
//! or "unavailable" when a backend needed for the answer is down.
//!
//! `DenyReason` is a closed set: its names are keygate's error codes, so every adapter
//! speaks the same vocabulary and an operator can alert on them. A deployment may show a
//! client another code for one of them (the one its API documents, `errors.codes`); metrics
//! and logs keep keygate's. This module knows no wire format; adapters turn a `Decision`
//! into Envoy's or keygate's own response.
//!
//! An allow may carry the session token its route minted: `SessionToken` is plain data
//! defined here, so the decision needs no JWT machinery (`jwt::session` signs it).
//!
//! Its setting, `errors` (`ErrorsConfig`, in `config.rs`), compiles into an `ErrorShape`.
//! It names only plain data below it (`principal`, `request`, `secret`, `settings`):
//! telemetry labels decisions by its codes, so nothing that records metrics may be
//! named here.

mod config;

use std::fmt;
use std::sync::Arc;

use serde_yaml_ng::Value;

use crate::principal::Principal;
use crate::request::PathError;
use crate::secret::Secret;
use crate::settings::ConfigError;

pub use config::{CodeConfig, ErrorsConfig};

/// A public error code, with its HTTP status and the message a client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    MissingCredentials,
    InvalidApiKey,
    ExpiredApiKey,
    RevokedApiKey,
    InvalidToken,
    InsufficientPermissions,
    TenantRequired,
    InvalidTenant,
    TenantForbidden,
    RateLimited,
    /// The path cannot be normalised safely (`request::normalize_path`).
    InvalidPath,
    /// The request carries what keygate will not judge: a method override refused by
    /// `policy.method_override`, or one whose value is not a method.
    InvalidRequest,
}

impl DenyReason {
    pub const ALL: [DenyReason; 12] = [
        DenyReason::MissingCredentials,
        DenyReason::InvalidApiKey,
        DenyReason::ExpiredApiKey,
        DenyReason::RevokedApiKey,
        DenyReason::InvalidToken,
        DenyReason::InsufficientPermissions,
        DenyReason::TenantRequired,
        DenyReason::InvalidTenant,
        DenyReason::TenantForbidden,
        DenyReason::RateLimited,
        DenyReason::InvalidPath,
        DenyReason::InvalidRequest,
    ];

    /// The public error code, as it appears in response bodies, logs and metrics.
    pub fn code(self) -> &'static str {
        match self {
            DenyReason::MissingCredentials => "missing_credentials",
            DenyReason::InvalidApiKey => "invalid_api_key",
            DenyReason::ExpiredApiKey => "expired_api_key",
            DenyReason::RevokedApiKey => "revoked_api_key",
            DenyReason::InvalidToken => "invalid_token",
            DenyReason::InsufficientPermissions => "insufficient_permissions",
            DenyReason::TenantRequired => "tenant_required",
            DenyReason::InvalidTenant => "invalid_tenant",
            DenyReason::TenantForbidden => "tenant_forbidden",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::InvalidPath => "invalid_path",
            DenyReason::InvalidRequest => "invalid_request",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            DenyReason::MissingCredentials
            | DenyReason::InvalidApiKey
            | DenyReason::ExpiredApiKey
            | DenyReason::RevokedApiKey
            | DenyReason::InvalidToken => 401,
            DenyReason::InsufficientPermissions | DenyReason::TenantForbidden => 403,
            DenyReason::TenantRequired
            | DenyReason::InvalidTenant
            | DenyReason::InvalidPath
            | DenyReason::InvalidRequest => 400,
            DenyReason::RateLimited => 429,
        }
    }

    /// The default message for this code. It never contains request data, so it can never
    /// echo a secret back.
    pub fn message(self) -> &'static str {
        match self {
            DenyReason::MissingCredentials => "No credentials were provided.",
            DenyReason::InvalidApiKey => "The API key is not valid.",
            DenyReason::ExpiredApiKey => "The API key has expired.",
            DenyReason::RevokedApiKey => "The API key has been revoked.",
            DenyReason::InvalidToken => "The token is not valid.",
            DenyReason::InsufficientPermissions => {
                "The credential does not grant access to this route."
            }
            DenyReason::TenantRequired => "The X-Tenant-Id header is required on this route.",
            DenyReason::InvalidTenant => "The X-Tenant-Id header must be a UUID.",
            DenyReason::TenantForbidden => "The credential may not act for this tenant.",
            DenyReason::RateLimited => "Too many requests.",
            DenyReason::InvalidPath => "The request path cannot be interpreted safely.",
            DenyReason::InvalidRequest => "The request's method override cannot be accepted.",
        }
    }

    pub fn is_unauthenticated(self) -> bool {
        self.http_status() == 401
    }

    pub fn from_code(code: &str) -> Option<DenyReason> {
        DenyReason::ALL.into_iter().find(|r| r.code() == code)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A key's rate limit as the client is told it (`x-ratelimit-*`, `retry-after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// The plan's requests per minute.
    pub limit: u32,
    /// About how many more would be admitted now (exact at the edge, where every
    /// admission is asked of the store).
    pub remaining: u32,
    /// Seconds until the whole burst is available again.
    pub reset: u64,
    /// On a denial: seconds after which one request will be admitted.
    pub retry_after: Option<u64>,
}

impl RateInfo {
    /// The headers the client is sent, on allows and on 429s alike.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", self.remaining.to_string()),
            ("x-ratelimit-reset", self.reset.to_string()),
        ]
    }
}

/// A denial as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenyReason,
    /// Seconds after which a retry may succeed (rate limits).
    pub retry_after: Option<u64>,
    /// With `rate_limited`: the limit, for the `x-ratelimit-*` headers.
    pub rate: Option<RateInfo>,
    /// With `invalid_path`: what in the path was refused, named in the answer's message.
    pub path: Option<PathError>,
}

impl Denial {
    pub fn new(reason: DenyReason) -> Self {
        Denial {
            reason,
            retry_after: None,
            rate: None,
            path: None,
        }
    }

    /// 400 `invalid_path`, naming what was refused.
    pub fn invalid_path(refused: PathError) -> Self {
        Denial {
            path: Some(refused),
            ..Denial::new(DenyReason::InvalidPath)
        }
    }

    /// 429 `rate_limited`, with the limit and when to retry.
    pub fn rate_limited(rate: RateInfo) -> Self {
        Denial {
            reason: DenyReason::RateLimited,
            retry_after: rate.retry_after,
            rate: Some(rate),
            path: None,
        }
    }
}

/// What a client is shown for one denial: every part fixed at startup, so a denial
/// formats nothing and can echo nothing from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicError {
    /// The code shown: keygate's own, the one `errors.codes.<code>.code` names instead, or
    /// `unauthorized` for every authentication failure when opaque.
    pub code: String,
    pub message: Arc<str>,
    pub status: u16,
    /// The whole JSON body.
    pub body: Arc<str>,
}

/// The deployment's error answers (`errors`), compiled once: for each public code its
/// status, message and body.
#[derive(Debug, Clone)]
pub struct ErrorShape {
    answers: Vec<PublicError>,
    /// `invalid_path`'s answer for each `PathError`, its message naming what was refused
    /// (unless the deployment set `invalid_path`'s message).
    path_answers: Vec<PublicError>,
    www_authenticate: Option<Arc<str>>,
}

/// The code every authentication failure shows with `errors.opaque`.
pub const OPAQUE_CODE: &str = "unauthorized";

const PLACEHOLDERS: [&str; 3] = ["code", "message", "status"];

impl ErrorShape {
    /// The answer to `reason`.
    pub fn answer(&self, reason: DenyReason) -> &PublicError {
        &self.answers[reason.index()]
    }

    /// The answer to a denial: its reason's, or for a refused path the one naming what
    /// was refused.
    pub fn answer_to(&self, denial: &Denial) -> &PublicError {
        match denial.path {
            Some(refused) if denial.reason == DenyReason::InvalidPath => {
                &self.path_answers[refused.index()]
            }
            _ => self.answer(denial.reason),
        }
    }

    /// The `www-authenticate` value for a 401, if one is sent.
    pub fn www_authenticate(&self, error: &PublicError) -> Option<&str> {
        (error.status == 401)
            .then_some(self.www_authenticate.as_deref())
            .flatten()
    }

    /// Compiles `errors`; any mistake names its field.
    pub fn compile(cfg: &ErrorsConfig) -> Result<ErrorShape, ConfigError> {
        let template = match &cfg.body {
            Value::String(text) => serde_yaml_ng::from_str(text)
                .map_err(|e| ConfigError::new("errors.body", format!("not JSON: {e}")))?,
            other => other.clone(),
        };
        if !matches!(template, Value::Mapping(_)) {
            return Err(ConfigError::new("errors.body", "must be a JSON object"));
        }
        check_placeholders(&template)?;
        for (code, over) in &cfg.codes {
            let field = |f: &str| format!("errors.codes.{code}{f}");
            let reason = DenyReason::from_code(code).ok_or_else(|| {
                let known: Vec<_> = DenyReason::ALL.iter().map(|r| r.code()).collect();
                ConfigError::new(
                    field(""),
                    format!("not a public error code; one of {}", known.join(", ")),
                )
            })?;
            if let Some(public) = &over.code {
                if !is_public_code(public) {
                    return Err(ConfigError::new(
                        field(".code"),
                        "must be 1 to 64 of [a-z0-9_.-] (the code the client is shown)",
                    ));
                }
            }
            if let Some(status) = over.status {
                if !(400..=499).contains(&status) {
                    return Err(ConfigError::new(
                        field(".status"),
                        "must be a 4xx status (a backend failure is never a denial)",
                    ));
                }
            }
            if let Some(m) = &over.message {
                if m.trim().is_empty() || m.len() > 1024 {
                    return Err(ConfigError::new(
                        field(".message"),
                        "must be 1 to 1024 bytes",
                    ));
                }
            }
            if cfg.opaque && reason.is_unauthenticated() {
                return Err(ConfigError::new(
                    field(""),
                    "has no effect with errors.opaque: every authentication failure \
                     answers with errors.opaque_message",
                ));
            }
        }
        if cfg.opaque_message.trim().is_empty() || cfg.opaque_message.len() > 1024 {
            return Err(ConfigError::new(
                "errors.opaque_message",
                "must be 1 to 1024 bytes",
            ));
        }
        if cfg
            .www_authenticate
            .bytes()
            .any(|b| !(b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b)))
        {
            return Err(ConfigError::new(
                "errors.www_authenticate",
                "is not a valid header value",
            ));
        }
        let public = |code: String, message: String, status: u16| {
            let body = render(&template, &code, &message, status);
            let body = serde_json::to_string(&body).map_err(|e| {
                ConfigError::new("errors.body", format!("cannot be written as JSON: {e}"))
            })?;
            Ok::<_, ConfigError>(PublicError {
                code,
                message: message.into(),
                status,
                body: body.into(),
            })
        };
        let answers = DenyReason::ALL
            .into_iter()
            .map(|reason| {
                let over = cfg.codes.get(reason.code()).cloned().unwrap_or_default();
                if cfg.opaque && reason.is_unauthenticated() {
                    return public(OPAQUE_CODE.to_owned(), cfg.opaque_message.clone(), 401);
                }
                public(
                    over.code.unwrap_or_else(|| reason.code().to_owned()),
                    over.message.unwrap_or_else(|| reason.message().to_owned()),
                    over.status.unwrap_or(reason.http_status()),
                )
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let invalid_path = &answers[DenyReason::InvalidPath.index()];
        let own_message = cfg
            .codes
            .get(DenyReason::InvalidPath.code())
            .is_some_and(|o| o.message.is_some());
        let path_answers = PathError::ALL
            .into_iter()
            .map(|refused| {
                if own_message {
                    return Ok(invalid_path.clone());
                }
                // Fixed per reason, no request data: "… safely: the path holds a backslash."
                let base = DenyReason::InvalidPath.message().trim_end_matches('.');
                let message = format!("{base}: {refused}.");
                public(invalid_path.code.clone(), message, invalid_path.status)
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(ErrorShape {
            answers,
            path_answers,
            www_authenticate: (!cfg.www_authenticate.is_empty())
                .then(|| cfg.www_authenticate.as_str().into()),
        })
    }
}

/// A code a client may be shown: 1 to 64 of `[a-z0-9_.-]`, so that it needs no escaping
/// in a body, a header or a log line.
fn is_public_code(code: &str) -> bool {
    (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

impl Default for ErrorShape {
    fn default() -> Self {
        ErrorShape::compile(&ErrorsConfig::default()).expect("the default shape compiles")
    }
}

/// Refuses a `{name}` in a string of the template that is not a placeholder: a typo would
/// otherwise reach every client verbatim.
fn check_placeholders(v: &Value) -> Result<(), ConfigError> {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(open) = rest.find('{') {
                let after = &rest[open + 1..];
                if let Some(close) = after.find('}') {
                    let name = &after[..close];
                    let looks_like_one = !name.is_empty()
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if looks_like_one && !PLACEHOLDERS.contains(&name) {
                        return Err(ConfigError::new(
                            "errors.body",
                            format!("unknown placeholder {{{name}}}; use {{code}}, {{message}} or {{status}}"),
                        ));
                    }
                }
                rest = after;
            }
            Ok(())
        }
        Value::Mapping(m) => {
            for (k, v) in m {
                if !k.is_string() {
                    return Err(ConfigError::new(
                        "errors.body",
                        "object keys must be strings",
                    ));
                }
                check_placeholders(v)?;
            }
            Ok(())
        }
        Value::Sequence(items) => items.iter().try_for_each(check_placeholders),
        Value::Tagged(_) => Err(ConfigError::new("errors.body", "YAML tags are not JSON")),
        _ => Ok(()),
    }
}

/// The template with its placeholders filled: a string that is exactly `{status}` becomes
/// the number.
fn render(v: &Value, code: &str, message: &str, status: u16) -> Value {
    match v {
        Value::String(s) if s == "{status}" => Value::Number(status.into()),
        Value::String(s) => Value::String(
            s.replace("{code}", code)
                .replace("{message}", message)
                .replace("{status}", &status.to_string()),
        ),
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), render(v, code, message, status)))
                .collect(),
        ),
        Value::Sequence(items) => Value::Sequence(
            items
                .iter()
                .map(|v| render(v, code, message, status))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// An allowed request: who the caller is and the tenant the request acts for.
#[derive(Debug, Clone)]
pub struct Allowed {
    /// `None` on public routes.
    pub principal: Option<Arc<Principal>>,
    pub effective_tenant: Option<String>,
    /// The route family that matched, for logs and metrics.
    pub route: Arc<str>,
    /// The key's rate limit, when its plan has one: sent to the client.
    pub rate: Option<RateInfo>,
    /// The concurrent-session lease this request took (routes with `lease_ttl`).
    pub lease_id: Option<String>,
    /// The session token this request minted (routes with `mint_session`).
    pub session: Option<SessionToken>,
}

/// A minted token and when it expires (unix ms).
#[derive(Clone)]
pub struct SessionToken {
    pub token: Secret,
    pub expires_at_ms: u64,
}

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionToken")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// A backend needed for the answer could not be reached. Never a denial, never an allow:
/// the adapter reports it as an error so the caller's own failure policy decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub backend: &'static str,
}

#[derive(Debug, Clone)]
pub enum Decision {
    Allow(Allowed),
    Deny(Denial),
    Unavailable(Unavailable),
}

impl Decision {
    pub fn deny(reason: DenyReason) -> Self {
        Decision::Deny(Denial::new(reason))
    }

    /// `allow`, a deny code, or `unavailable`: the label decisions are counted by.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Allow(_) => "allow",
            Decision::Deny(d) => d.reason.code(),
            Decision::Unavailable(_) => "unavailable",
        }
    }
}

#[cfg(test)]
mod tests;

//! The answer keygate gives: allow with who the caller is, deny with a public error code,
//! or "unavailable" when a backend needed for the answer is down.
//!
//! `DenyReason` is a closed set: its names are the public error codes, so every adapter
//! speaks the same vocabulary and an operator can alert on them. This module knows no wire
//! format; adapters turn a `Decision` into Envoy's or keygate's own response.

use std::fmt;
use std::sync::Arc;

use crate::principal::Principal;

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
}

impl DenyReason {
    pub const ALL: [DenyReason; 11] = [
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
            DenyReason::TenantRequired | DenyReason::InvalidTenant | DenyReason::InvalidPath => 400,
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
        }
    }

    pub fn is_unauthenticated(self) -> bool {
        self.http_status() == 401
    }

    pub fn from_code(code: &str) -> Option<DenyReason> {
        DenyReason::ALL.into_iter().find(|r| r.code() == code)
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
}

impl Denial {
    pub fn new(reason: DenyReason) -> Self {
        Denial {
            reason,
            retry_after: None,
            rate: None,
        }
    }

    /// 429 `rate_limited`, with the limit and when to retry.
    pub fn rate_limited(rate: RateInfo) -> Self {
        Denial {
            reason: DenyReason::RateLimited,
            retry_after: rate.retry_after,
            rate: Some(rate),
        }
    }

    /// The JSON error body. With `opaque`, every 401 carries one message so that a client
    /// cannot tell an unknown key from a revoked or expired one.
    pub fn body(&self, opaque: bool) -> String {
        let (code, message) = self.public(opaque);
        serde_json::json!({"error": {"code": code, "message": message}}).to_string()
    }

    /// The code and message a client is shown.
    pub fn public(&self, opaque: bool) -> (&'static str, &'static str) {
        if opaque && self.reason.is_unauthenticated() {
            ("unauthorized", "The request could not be authenticated.")
        } else {
            (self.reason.code(), self.reason.message())
        }
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
mod tests {
    use super::*;

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

    #[test]
    fn body_is_the_documented_json_shape() {
        let body = Denial::new(DenyReason::TenantForbidden).body(false);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "tenant_forbidden");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
    }

    #[test]
    fn opaque_errors_hide_which_401_it_was_but_not_403s() {
        let revoked = Denial::new(DenyReason::RevokedApiKey).body(true);
        let unknown = Denial::new(DenyReason::InvalidApiKey).body(true);
        assert_eq!(revoked, unknown);
        let forbidden = Denial::new(DenyReason::TenantForbidden).body(true);
        assert!(forbidden.contains("tenant_forbidden"));
    }
}

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
//! Its setting, `errors` (`ErrorsConfig`, in `config.rs`), compiles into an `ErrorShape`
//! (`shape.rs`).
//! It names only plain data below it (`principal`, `request`, `secret`, `settings`):
//! telemetry labels decisions by its codes, so nothing that records metrics may be
//! named here.

mod config;
mod shape;

use std::fmt;
use std::sync::Arc;

use crate::principal::Principal;
use crate::request::PathError;
use crate::secret::Secret;

pub use config::{CodeConfig, ErrorsConfig};
pub use shape::{ErrorShape, PublicError, OPAQUE_CODE};

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

/// A minted token and when it expires (unix ms). `Secret` keeps the token out of `Debug`.
#[derive(Clone, Debug)]
pub struct SessionToken {
    pub token: Secret,
    pub expires_at_ms: u64,
}

/// A backend needed for the answer could not be reached. Never a denial, never an allow:
/// the adapter reports it as an error so the caller's own failure policy decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub backend: &'static str,
}

impl Unavailable {
    /// The store of record (Redis, or the in-process store) could not be asked.
    pub const STORE: Unavailable = Unavailable { backend: "store" };
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

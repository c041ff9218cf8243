//! Who the caller is, once authenticated. Built from a key record (or, later, a JWT);
//! shared read-only through the cache, so it is cheap to hand to every request.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a key may act as. See docs/architecture.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    Tenant,
    Partner,
    Runtime,
}

/// A key's environment; test keys are a separate world with their own plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Live,
    Test,
}

macro_rules! str_enum {
    ($ty:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $s),+ }
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($ty::$variant),)+
                    _ => Err(format!(
                        "must be one of: {}",
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// What the caller presented: routes can accept only some (`policy.routes[].credentials`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    ApiKey,
    Jwt,
    /// keygate's own session token, minted from an API key.
    Session,
}

str_enum!(KeyKind { Tenant => "tenant", Partner => "partner", Runtime => "runtime" });
str_enum!(CredentialKind { ApiKey => "api_key", Jwt => "jwt", Session => "session" });
str_enum!(Environment { Live => "live", Test => "test" });

/// An authenticated caller. Its JSON form is what keygate's module inside Envoy learns
/// from an allow (`api::envoy_learn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The tenant a tenant key or JWT belongs to; empty for partner and runtime keys,
    /// which act for the tenant the request names (or none).
    pub tenant_id: Box<str>,
    /// `key:<key_id>` for API keys; the `sub` claim for JWTs.
    pub subject: Box<str>,
    pub key_id: Option<Box<str>>,
    pub kind: KeyKind,
    pub environment: Environment,
    pub scopes: Vec<String>,
    pub plan: Option<Box<str>>,
    /// Unix milliseconds.
    pub expires_at: Option<u64>,
    /// `scopes` joined by commas, computed once: it is sent upstream on every allow.
    pub scopes_header: Box<str>,
    pub credential: CredentialKind,
    /// The JWT issuer's configured name (`jwt.issuers[].name`); `None` for API keys.
    pub issuer: Option<std::sync::Arc<str>>,
    /// The partner a partner key belongs to, and the service a runtime key belongs to.
    pub partner_id: Option<Box<str>>,
    pub service: Option<Box<str>>,
    /// What a JWT revocation can name; `None` for API keys.
    pub token_ids: Option<Box<TokenIds>>,
}

/// A JWT's `jti` and `iat`, for revocations that name them. Boxed in `Principal`, so the
/// principal of an API key, the most numerous in the cache, does not carry their room
/// (BENCHMARKS.md, memory).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenIds {
    pub jti: Option<Box<str>>,
    /// Unix seconds.
    pub issued_at: Option<u64>,
}

/// The one expiry rule: a credential expiring at `expires_at_ms` is expired from that
/// millisecond on.
pub fn expired(expires_at_ms: u64, now_ms: u64) -> bool {
    now_ms >= expires_at_ms
}

impl Principal {
    /// What the caller is, as sent upstream (`x-keygate-kind`): the key's kind, `jwt` or
    /// `session`.
    pub fn kind_label(&self) -> &'static str {
        match self.credential {
            CredentialKind::ApiKey => self.kind.as_str(),
            other => other.as_str(),
        }
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|exp| expired(exp, now_ms))
    }

    /// How long until it expires (`None`: it does not).
    pub fn life_left(&self, now_ms: u64) -> Option<std::time::Duration> {
        self.expires_at
            .map(|exp| std::time::Duration::from_millis(exp.saturating_sub(now_ms)))
    }

    /// A principal with no key id, plan or expiry; set those fields as they apply.
    pub fn new(
        tenant_id: String,
        subject: String,
        kind: KeyKind,
        environment: Environment,
        scopes: Vec<String>,
    ) -> Self {
        let scopes_header = scopes.join(",").into();
        Principal {
            tenant_id: tenant_id.into(),
            subject: subject.into(),
            key_id: None,
            kind,
            environment,
            scopes,
            plan: None,
            expires_at: None,
            scopes_header,
            credential: CredentialKind::ApiKey,
            issuer: None,
            partner_id: None,
            service: None,
            token_ids: None,
        }
    }
}

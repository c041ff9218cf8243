//! `jwt`: the issuers whose JWTs keygate accepts, one by one, and how their claims become a
//! principal; with its validation. The verifier's own setting: `config` places it in the
//! file, and it knows nothing of that.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{duration, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Longer tokens are refused unread (`invalid_token`).
    pub max_token_bytes: usize,
    pub issuers: Vec<IssuerConfig>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            max_token_bytes: 8192,
            issuers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// A short name: metric label and log field (never a claim's value).
    pub name: String,
    /// The `iss` claim this issuer's tokens carry.
    pub issuer: String,
    /// Accepted `aud` values; a token must name one of them.
    pub audiences: Vec<String>,
    /// `RS256` … `PS512`, `ES256`, `ES384`, `EdDSA`; `HS256/384/512` only with `secret_env`.
    pub algorithms: Vec<String>,
    /// A JWKS document (`{"keys": [...]}`) with the issuer's public keys.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// The issuer's JWKS URL: fetched at start, refreshed every `jwks_refresh` and when a
    /// token names an unknown `kid` (at most once per `jwks_refetch_min`); while it fails,
    /// the last good set is kept. `https://`, or `http://` to a loopback address.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh", deserialize_with = "duration")]
    pub jwks_refresh: Duration,
    /// The least time between two fetches caused by unknown `kid`s (at least 1s).
    #[serde(default = "default_jwks_refetch_min", deserialize_with = "duration")]
    pub jwks_refetch_min: Duration,
    /// For HS*: the environment variable that holds the shared secret (or, with `_FILE`
    /// appended, names the file that does). Never the secret itself.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    /// The longest life a token may claim: `exp - iat` (or, without `iat`, `exp` - now);
    /// and `exp` may lie at most this (+ `leeway`) after now, while `iat` may lie at most
    /// `leeway` after now. A token outside these bounds is refused. It bounds how long a
    /// revocation must be kept.
    #[serde(default = "default_max_token_lifetime", deserialize_with = "duration")]
    pub max_token_lifetime: Duration,
    #[serde(default)]
    pub claims: ClaimsConfig,
    /// A claim holding the caller's roles (a string or an array), mapped by `roles`.
    #[serde(default)]
    pub roles_claim: Option<String>,
    /// Role → the scopes it grants, added to those of the scopes claim.
    #[serde(default)]
    pub roles: HashMap<String, Vec<String>>,
}

/// The least `jwks_refetch_min`: below it, a flood of made-up `kid`s would become a flood
/// of fetches from the issuer.
pub const JWKS_REFETCH_FLOOR: Duration = Duration::from_secs(1);

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}

fn default_jwks_refetch_min() -> Duration {
    Duration::from_secs(30)
}

fn default_max_token_lifetime() -> Duration {
    // 30 days: the longest access-token lifetime the common identity providers allow.
    Duration::from_secs(30 * 24 * 3600)
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// Which claims carry the principal.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimsConfig {
    pub subject: String,
    /// A token without it is refused (`invalid_token`).
    pub tenant: String,
    /// A space-separated string (`scope`) or an array (`scp`, `permissions`).
    pub scopes: String,
}

impl Default for ClaimsConfig {
    fn default() -> Self {
        ClaimsConfig {
            subject: "sub".into(),
            tenant: "tenant_id".into(),
            scopes: "scope".into(),
        }
    }
}

/// Algorithm names keygate accepts, and whether each needs a shared secret.
pub const ALGORITHMS: [(&str, bool); 12] = [
    ("HS256", true),
    ("HS384", true),
    ("HS512", true),
    ("RS256", false),
    ("RS384", false),
    ("RS512", false),
    ("PS256", false),
    ("PS384", false),
    ("PS512", false),
    ("ES256", false),
    ("ES384", false),
    ("EdDSA", false),
];

/// An error naming `field` when one of the `earlier` issuers is the `same` already.
fn unique(
    earlier: &[IssuerConfig],
    field: String,
    same: impl Fn(&IssuerConfig) -> bool,
) -> Result<(), ConfigError> {
    if earlier.iter().any(same) {
        return Err(ConfigError::new(field, "is used by an earlier issuer"));
    }
    Ok(())
}

impl JwtConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_token_bytes < 64 {
            return Err(ConfigError::new(
                "jwt.max_token_bytes",
                "must be at least 64",
            ));
        }
        for (i, iss) in self.issuers.iter().enumerate() {
            let field = |f: &str| format!("jwt.issuers[{i}].{f}");
            if iss.name.is_empty()
                || !iss
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(ConfigError::new(field("name"), "must be 1+ of a-z 0-9 - _"));
            }
            let earlier = &self.issuers[..i];
            unique(earlier, field("name"), |o| o.name == iss.name)?;
            if iss.issuer.is_empty() {
                return Err(ConfigError::new(field("issuer"), "must not be empty"));
            }
            unique(earlier, field("issuer"), |o| o.issuer == iss.issuer)?;
            if iss.audiences.is_empty() {
                return Err(ConfigError::new(
                    field("audiences"),
                    "must name at least one audience",
                ));
            }
            if iss.algorithms.is_empty() {
                return Err(ConfigError::new(
                    field("algorithms"),
                    "must name at least one algorithm",
                ));
            }
            let mut shared = None;
            for (j, a) in iss.algorithms.iter().enumerate() {
                let Some((_, needs_secret)) = ALGORITHMS.iter().find(|(n, _)| n == a) else {
                    return Err(ConfigError::new(
                        format!("jwt.issuers[{i}].algorithms[{j}]"),
                        "must be one of HS256 HS384 HS512 RS256 RS384 RS512 PS256 PS384 PS512 \
                         ES256 ES384 EdDSA (`none` is never accepted)",
                    ));
                };
                if shared.is_some_and(|s| s != *needs_secret) {
                    return Err(ConfigError::new(
                        field("algorithms"),
                        "must not mix HS* (shared secret) with public-key algorithms",
                    ));
                }
                shared = Some(*needs_secret);
            }
            let sources = [
                iss.jwks_file.is_some(),
                iss.jwks_url.is_some(),
                iss.secret_env.is_some(),
            ]
            .iter()
            .filter(|s| **s)
            .count();
            if shared == Some(true) && (iss.secret_env.is_none() || sources != 1) {
                return Err(ConfigError::new(
                    field("secret_env"),
                    "HS* algorithms need secret_env (and no jwks_file or jwks_url)",
                ));
            }
            if shared == Some(false) && (iss.secret_env.is_some() || sources != 1) {
                return Err(ConfigError::new(
                    field("jwks_file"),
                    "public-key algorithms need one of jwks_file or jwks_url (and no secret_env)",
                ));
            }
            if let Some(url) = &iss.jwks_url {
                let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                    .iter()
                    .any(|p| url.starts_with(p));
                if !url.starts_with("https://") && !loopback {
                    return Err(ConfigError::new(
                        field("jwks_url"),
                        "must be https:// (http:// only to a loopback address)",
                    ));
                }
            }
            if iss.jwks_refresh < Duration::from_secs(1) {
                return Err(ConfigError::new(
                    field("jwks_refresh"),
                    "must be at least 1s",
                ));
            }
            if iss.jwks_refetch_min < JWKS_REFETCH_FLOOR {
                return Err(ConfigError::new(
                    field("jwks_refetch_min"),
                    "must be at least 1s (each unknown kid would fetch the JWKS URL)",
                ));
            }
            if iss.max_token_lifetime < Duration::from_secs(1)
                || iss.max_token_lifetime > Duration::from_secs(10 * 365 * 24 * 3600)
            {
                return Err(ConfigError::new(
                    field("max_token_lifetime"),
                    "must be between 1s and 10 years",
                ));
            }
            for (role, scopes) in &iss.roles {
                for s in scopes {
                    if !crate::policy::valid_held_scope(s) {
                        return Err(ConfigError::new(
                            format!("jwt.issuers[{i}].roles.{role}"),
                            format!("`{s}` is not a scope"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

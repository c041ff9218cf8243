//! `policy`: where credentials are read, the tenant header, method overrides, plans, and
//! the route families; with its validation, which ends in compiling the `Policy`. The
//! policy's own setting, read by the modules that enforce parts of it (credential
//! extraction, the limiter, the authorizer): `config` places it in the file, and it
//! knows nothing of that.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::settings::{optional_duration, valid_header_name, ConfigError};
use crate::tenant::TenantRule;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialHeader {
    pub header: String,
    /// For `authorization`-style headers: the scheme before the token (`Bearer`).
    #[serde(default)]
    pub scheme: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Deny requests that match no route family (403).
    Deny,
    /// Allow any authenticated caller on unmatched routes.
    Authenticated,
}

/// What a request carrying a method override header does (`policy.method_override`).
/// Frameworks act on the header instead of the request's method (Rack's MethodOverride,
/// Express's `method-override`, Symfony and Laravel, ASP.NET and OData: docs/security.md),
/// so a key allowed to POST somewhere would DELETE there if only the POST were judged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodOverride {
    /// Allowed only if allowed for the request's own method and for each method its
    /// override headers name; an override value that is not a method is refused.
    #[default]
    Check,
    /// Judged on the request's own method; an allow removes the headers (the adapter).
    Strip,
    /// Refused, 400 `invalid_request`, whatever the value.
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub credential_headers: Vec<CredentialHeader>,
    /// Remove the credential headers before the request goes upstream.
    pub strip_credential_headers: bool,
    /// Also hand the principal to Envoy as dynamic metadata (namespace
    /// `envoy.filters.http.ext_authz`), for access logs, RBAC or rate-limit descriptors.
    /// Envoy pays for reading it on every allow; without a use for it, turn it off.
    pub dynamic_metadata: bool,
    pub tenant_header: String,
    /// Default for routes that do not say `tenant:`.
    pub require_tenant_header: bool,
    pub unmatched: Unmatched,
    /// A request carrying `X-HTTP-Method-Override`, `X-HTTP-Method` or `X-Method-Override`
    /// (which many frameworks act on instead of the method): judged on both methods
    /// (`check`), the header removed upstream (`strip`), or refused (`deny`).
    pub method_override: MethodOverride,
    /// Scopes that wildcards never grant; a key must name them.
    pub opt_in_scopes: Vec<String>,
    /// Scopes only partner keys hold: exact (`billing:partner:read`) or a family
    /// (`billing:partner:*`). Tenant keys cannot be given them, and JWTs and tenant keys
    /// are never granted them.
    pub partner_scopes: Vec<String>,
    /// The key environments the whole deployment accepts (`[live]` refuses test keys with
    /// 403); routes may narrow it. Any when left out.
    pub environments: Option<Vec<crate::principal::Environment>>,
    /// Plans by name: a key's rate limit and concurrent sessions.
    pub plans: BTreeMap<String, PlanConfig>,
    /// The plan of a key that names none, by environment.
    pub default_plans: DefaultPlans,
    pub routes: Vec<RouteConfig>,
}

/// What a plan allows one key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// The sustained rate (`gcra`), or the most in any rolling minute (`rolling_window`).
    pub requests_per_minute: u32,
    /// How requests are counted.
    #[serde(default)]
    pub algorithm: PlanAlgorithm,
    /// How many may come at once (`gcra` only); the rate per minute when left out.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Concurrent-session leases the key may hold; none when left out.
    #[serde(default)]
    pub concurrent_sessions: Option<u32>,
}

/// How a plan counts a key's requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanAlgorithm {
    /// A sustained rate with a burst (GCRA): `burst` at once, then one every
    /// `60 s / requests_per_minute`. In any 60 s, up to `burst + requests_per_minute`.
    #[default]
    Gcra,
    /// At most `requests_per_minute` in any rolling 60 s (a log of admissions per key).
    RollingWindow,
}

/// The most requests a minute of a `rolling_window` plan: its log holds one entry per
/// admission in the window, per key.
pub const MAX_ROLLING_WINDOW: u32 = 10_000;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultPlans {
    pub live: Option<String>,
    pub test: Option<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            credential_headers: vec![
                CredentialHeader {
                    header: "authorization".into(),
                    scheme: Some("Bearer".into()),
                },
                CredentialHeader {
                    header: "x-access-token".into(),
                    scheme: None,
                },
                CredentialHeader {
                    header: "x-api-key".into(),
                    scheme: None,
                },
            ],
            strip_credential_headers: true,
            dynamic_metadata: true,
            tenant_header: "x-tenant-id".into(),
            require_tenant_header: false,
            unmatched: Unmatched::Deny,
            method_override: MethodOverride::Check,
            opt_in_scopes: Vec::new(),
            partner_scopes: Vec::new(),
            environments: None,
            plans: BTreeMap::new(),
            default_plans: DefaultPlans::default(),
            routes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Empty: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// `/v1/contacts/*/notes/**`: `*` is one segment, a trailing `**` any rest.
    pub path: String,
    #[serde(default)]
    pub scope: Option<String>,
    /// No credential needed.
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub tenant: Option<TenantRule>,
    /// The credential kinds accepted (`[jwt]` for JWT-only routes, `[api_key]`); any when
    /// left out. Another kind there is 403 `insufficient_permissions`.
    #[serde(default)]
    pub credentials: Option<Vec<crate::principal::CredentialKind>>,
    /// An internal route: runtime keys only, and runtime keys nowhere else.
    #[serde(default)]
    pub internal: bool,
    /// The key environments accepted here (`[live]`); the policy's when left out.
    #[serde(default)]
    pub environments: Option<Vec<crate::principal::Environment>>,
    /// Each allowed request takes one of the key's concurrent sessions for this long (an
    /// API whose "create session" is an ordinary request); the lease id goes upstream
    /// in `x-keygate-lease-id`, and `keygate.v1.Authorizer/ReleaseLease` gives it back.
    #[serde(default, deserialize_with = "optional_duration")]
    pub lease_ttl: Option<std::time::Duration>,
    /// Each allowed request mints a session token from its API key (an API whose
    /// "create session" is an HTTP call): `x-keygate-session-token` and
    /// `x-keygate-session-expires-at` go upstream and back to the client. Needs
    /// `sessions` and `credentials: [api_key]`.
    #[serde(default)]
    pub mint_session: bool,
    /// Paths refused by default that this route takes: `encoded_slash` (`%2F`),
    /// `encoded_backslash` (`%5C`), `encoded_percent` (`%25` before two hex digits),
    /// `empty_segments` (`//`). Such a path is allowed only if every reading of it falls
    /// on this route (docs/security.md).
    #[serde(default)]
    pub path_relaxations: Vec<crate::request::PathRelaxation>,
}

impl PolicyConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.credential_headers.is_empty() {
            return Err(ConfigError::new(
                "policy.credential_headers",
                "must name at least one header",
            ));
        }
        for (i, h) in self.credential_headers.iter().enumerate() {
            if !valid_header_name(&h.header) {
                return Err(ConfigError::new(
                    format!("policy.credential_headers[{i}].header"),
                    "must be a lower-case HTTP header name",
                ));
            }
        }
        if !valid_header_name(&self.tenant_header) {
            return Err(ConfigError::new(
                "policy.tenant_header",
                "must be a lower-case HTTP header name",
            ));
        }
        for (name, plan) in &self.plans {
            let field = |f: &str| format!("policy.plans.{name}.{f}");
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ConfigError::new(
                    format!("policy.plans.{name}"),
                    "a plan's name must be 1 to 64 of a-z A-Z 0-9 - _",
                ));
            }
            const MAX: u32 = 10_000_000;
            if plan.requests_per_minute == 0 || plan.requests_per_minute > MAX {
                return Err(ConfigError::new(
                    field("requests_per_minute"),
                    format!("must be 1 to {MAX}"),
                ));
            }
            if plan.algorithm == PlanAlgorithm::RollingWindow {
                if plan.requests_per_minute > MAX_ROLLING_WINDOW {
                    return Err(ConfigError::new(
                        field("requests_per_minute"),
                        format!(
                            "must be 1 to {MAX_ROLLING_WINDOW} with algorithm: rolling_window \
                             (its log keeps an entry per request of the last minute)"
                        ),
                    ));
                }
                if plan.burst.is_some() {
                    return Err(ConfigError::new(
                        field("burst"),
                        "a rolling_window plan has no burst: it admits requests_per_minute \
                         in any 60 s, all at once if they come so",
                    ));
                }
            }
            if plan.burst.is_some_and(|b| b == 0 || b > MAX) {
                return Err(ConfigError::new(
                    field("burst"),
                    format!("must be 1 to {MAX}"),
                ));
            }
            if plan
                .concurrent_sessions
                .is_some_and(|c| c == 0 || c > 100_000)
            {
                return Err(ConfigError::new(
                    field("concurrent_sessions"),
                    "must be 1 to 100000",
                ));
            }
        }
        for (env, plan) in [
            ("live", &self.default_plans.live),
            ("test", &self.default_plans.test),
        ] {
            if let Some(p) = plan.as_ref().filter(|p| !self.plans.contains_key(*p)) {
                return Err(ConfigError::new(
                    format!("policy.default_plans.{env}"),
                    format!("names no plan in policy.plans: {p}"),
                ));
            }
        }
        crate::policy::Policy::compile(self)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn refused(plan: &str) -> (String, String) {
        let yaml = format!("policy:\n  plans:\n    p: {plan}\n");
        let e = Config::load(Some(&yaml), Vec::new()).expect_err(plan);
        (e.field.to_string(), e.message)
    }

    #[test]
    fn a_rolling_window_plan_is_refused_naming_the_field_it_cannot_take() {
        let (field, message) =
            refused("{requests_per_minute: 60, algorithm: rolling_window, burst: 10}");
        assert_eq!(field, "policy.plans.p.burst", "{message}");
        let (field, message) = refused("{requests_per_minute: 10001, algorithm: rolling_window}");
        assert_eq!(field, "policy.plans.p.requests_per_minute", "{message}");
        assert!(message.contains("10000"), "{message}");
        let (_, message) = refused("{requests_per_minute: 60, algorithm: sliding}");
        assert!(message.contains("rolling_window"), "{message}");
        let ok =
            "policy:\n  plans:\n    p: {requests_per_minute: 10000, algorithm: rolling_window}\n";
        let c = Config::load(Some(ok), Vec::new()).unwrap();
        assert_eq!(
            c.policy.plans["p"].algorithm,
            super::PlanAlgorithm::RollingWindow
        );
    }
}

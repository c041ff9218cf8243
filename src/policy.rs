//! Route families → what they require: a scope, or nothing (public); whether the tenant
//! header is required. Compiled once from the configuration; matching allocates nothing.
//!
//! Empty scopes grant nothing. A key scope `contacts:*` grants every `contacts:…` scope
//! and `*` grants everything, except the policy's opt-in scopes, which only a key that
//! names them exactly holds, and its partner scopes, which only partner keys hold.
//!
//! Its setting (`policy`: `PolicyConfig`, its routes, plans and `MethodOverride`) is
//! `config.rs`, validated there by compiling it. The tenant rule a route names is the
//! tenant module's (`TenantRule`, below this one); the modules that read the policy
//! (credential extraction, the limiter, the authorizer) are never named here.

mod config;

use std::sync::Arc;

use crate::principal::{CredentialKind, Environment, KeyKind, Principal};
use crate::request::{normalize_path, path_readings, PathError, Relaxations};
use crate::settings::ConfigError;
use crate::tenant::TenantRule;

pub use config::{
    CredentialHeader, DefaultPlans, MethodOverride, PlanAlgorithm, PlanConfig, PolicyConfig,
    RouteConfig, Unmatched,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*` or `{name}`: exactly one non-empty segment.
    One,
    /// A trailing `**`: zero or more segments.
    Rest,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    methods: Vec<String>,
    segments: Vec<Segment>,
    pub requirement: Requirement,
    pub tenant: TenantRule,
    /// `None`: any credential kind.
    pub credentials: Option<Vec<CredentialKind>>,
    /// Runtime keys only, and runtime keys nowhere else.
    pub internal: bool,
    /// `None`: any environment.
    pub environments: Option<Vec<Environment>>,
    /// Each allowed request takes a concurrent-session lease for this long.
    pub lease_ttl: Option<std::time::Duration>,
    /// Each allowed request mints a session token.
    pub mint_session: bool,
    /// The paths refused by default this route takes (`path_relaxations`).
    pub relaxations: Relaxations,
}

impl Route {
    /// Whether this route takes this caller at all (before its tenant and scopes): its
    /// credential kind, runtime keys exactly on internal routes, its environment.
    /// A session token only where the route names `session`: it is handed to browsers and
    /// WebSocket clients, so it must not open every route its key could.
    pub fn accepts(&self, p: &Principal) -> bool {
        let runtime = p.credential == CredentialKind::ApiKey && p.kind == KeyKind::Runtime;
        let named = match &self.credentials {
            Some(kinds) => kinds.contains(&p.credential),
            None => p.credential != CredentialKind::Session,
        };
        named
            && self.internal == runtime
            && self
                .environments
                .as_ref()
                .is_none_or(|e| e.contains(&p.environment))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Public,
    Scope(String),
    /// Unmatched requests under `unmatched: authenticated`.
    Authenticated,
}

#[derive(Debug, Clone)]
pub struct Policy {
    routes: Vec<Route>,
    fallback: Option<Route>,
    opt_in_scopes: Vec<String>,
    partner_scopes: Vec<String>,
    /// Every relaxation some route takes: a path needing another is refused outright.
    relaxed: Relaxations,
    /// Some route's literal has an upper-case letter: every path is also matched
    /// case-blind, not only those with one.
    upper_literals: bool,
}

impl Policy {
    pub fn compile(cfg: &PolicyConfig) -> Result<Policy, ConfigError> {
        let default_tenant = if cfg.require_tenant_header {
            TenantRule::Required
        } else {
            TenantRule::Optional
        };
        let mut routes = Vec::with_capacity(cfg.routes.len());
        for (i, r) in cfg.routes.iter().enumerate() {
            let field = |f: &str| format!("policy.routes[{i}].{f}");
            if r.name.trim().is_empty() {
                return Err(ConfigError::new(field("name"), "must not be empty"));
            }
            if cfg.routes[..i].iter().any(|o| o.name == r.name) {
                return Err(ConfigError::new(
                    field("name"),
                    "is used by an earlier route",
                ));
            }
            let segments = compile_path(&r.path).map_err(|m| ConfigError::new(field("path"), m))?;
            let requirement = match (&r.scope, r.public) {
                (Some(_), true) => {
                    return Err(ConfigError::new(
                        field("scope"),
                        "a public route cannot also require a scope",
                    ))
                }
                (Some(s), false) => {
                    if !valid_required_scope(s) {
                        return Err(ConfigError::new(
                            field("scope"),
                            "must look like `resource:action` (a-z, 0-9, `-`, `_`, `.`)",
                        ));
                    }
                    Requirement::Scope(s.clone())
                }
                (None, true) => Requirement::Public,
                (None, false) => {
                    return Err(ConfigError::new(
                        field("scope"),
                        "is required unless the route is `public: true`",
                    ))
                }
            };
            let mut methods = Vec::with_capacity(r.methods.len());
            for (j, m) in r.methods.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(ConfigError::new(
                        format!("policy.routes[{i}].methods[{j}]"),
                        "must be an HTTP method name",
                    ));
                }
                methods.push(m.to_ascii_uppercase());
            }
            if r.internal
                && r.credentials
                    .as_ref()
                    .is_some_and(|k| !k.contains(&CredentialKind::ApiKey))
            {
                return Err(ConfigError::new(
                    field("credentials"),
                    "an internal route takes runtime keys, so its credentials must include api_key",
                ));
            }
            if r.lease_ttl
                .is_some_and(|t| t.is_zero() || t > std::time::Duration::from_secs(86_400))
            {
                return Err(ConfigError::new(
                    field("lease_ttl"),
                    "must be above zero and at most 24h",
                ));
            }
            if r.mint_session && r.credentials.as_deref() != Some(&[CredentialKind::ApiKey]) {
                return Err(ConfigError::new(
                    field("mint_session"),
                    "session tokens are minted from API keys: set `credentials: [api_key]`",
                ));
            }
            if r.environments.as_ref().is_some_and(Vec::is_empty) {
                return Err(ConfigError::new(
                    field("environments"),
                    "must name at least one environment",
                ));
            }
            for (j, relaxation) in r.path_relaxations.iter().enumerate() {
                if r.path_relaxations[..j].contains(relaxation) {
                    return Err(ConfigError::new(
                        format!("policy.routes[{i}].path_relaxations[{j}]"),
                        "is named twice",
                    ));
                }
            }
            routes.push(Route {
                name: Arc::from(r.name.as_str()),
                methods,
                segments,
                requirement,
                tenant: r.tenant.unwrap_or(default_tenant),
                credentials: r.credentials.clone(),
                internal: r.internal,
                environments: r.environments.clone().or_else(|| cfg.environments.clone()),
                lease_ttl: r.lease_ttl,
                mint_session: r.mint_session,
                relaxations: r.path_relaxations.iter().copied().collect(),
            });
        }
        for (i, s) in cfg.opt_in_scopes.iter().enumerate() {
            if !valid_required_scope(s) {
                return Err(ConfigError::new(
                    format!("policy.opt_in_scopes[{i}]"),
                    "must be a scope without wildcards",
                ));
            }
        }
        for (i, s) in cfg.partner_scopes.iter().enumerate() {
            if !valid_held_scope(s) || s == "*" {
                return Err(ConfigError::new(
                    format!("policy.partner_scopes[{i}]"),
                    "must be a scope or a family like `billing:partner:*`",
                ));
            }
        }
        if cfg.environments.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::new(
                "policy.environments",
                "must name at least one environment",
            ));
        }
        let fallback = (cfg.unmatched == Unmatched::Authenticated).then(|| Route {
            name: Arc::from("unmatched"),
            methods: Vec::new(),
            segments: vec![Segment::Rest],
            requirement: Requirement::Authenticated,
            tenant: default_tenant,
            credentials: None,
            internal: false,
            environments: cfg.environments.clone(),
            lease_ttl: None,
            mint_session: false,
            relaxations: Relaxations::NONE,
        });
        let relaxed = routes
            .iter()
            .fold(Relaxations::NONE, |all, r| all.union(r.relaxations));
        let upper_literals = routes.iter().any(|r| {
            r.segments.iter().any(
                |s| matches!(s, Segment::Literal(l) if l.bytes().any(|b| b.is_ascii_uppercase())),
            )
        });
        Ok(Policy {
            routes,
            fallback,
            opt_in_scopes: cfg.opt_in_scopes.clone(),
            partner_scopes: cfg.partner_scopes.clone(),
            relaxed,
            upper_literals,
        })
    }

    /// The route family a request path falls on, decided on every reading of the path
    /// that common servers take; `path` as received, query included. Refused (400
    /// `invalid_path`) when the path is one servers read differently
    /// (`request::normalize_path`), or when its readings fall on different routes: read
    /// case-blind (IIS, ASP.NET, `equalsIgnoreCase` routers), or with the trailing dots
    /// and spaces of its segments dropped (Windows). A path refused for something a route
    /// may relax (`path_relaxations`) is taken only by a route that names every
    /// relaxation it needs, and only if all its readings (`request::path_readings`) fall
    /// on that route. An ordinary path costs the match and one pass over its bytes.
    pub fn route_of(&self, method: &str, path: &str) -> Result<Option<&Route>, PathError> {
        let refused = match normalize_path(path) {
            Ok(normal) => {
                let route = self.route(method, &normal);
                self.agree(method, &normal, route)?;
                return Ok(route);
            }
            Err(e) => e,
        };
        if refused.relaxation().is_none() || self.relaxed.is_empty() {
            return Err(refused);
        }
        let readings = path_readings(path, self.relaxed)?;
        let route = self.route(method, &readings.paths[0]);
        if !route.is_some_and(|r| r.relaxations.covers(readings.used)) {
            return Err(refused);
        }
        for reading in &readings.paths {
            if !same(self.route(method, reading), route) {
                return Err(refused);
            }
            self.agree(method, reading, route)?;
        }
        Ok(route)
    }

    /// Refuses a normal path that falls on another route than `route` when read
    /// case-blind, or with its segments' trailing dots and spaces dropped.
    fn agree(&self, method: &str, path: &str, route: Option<&Route>) -> Result<(), PathError> {
        let bytes = path.as_bytes();
        let mut upper = self.upper_literals;
        let mut trailing = false;
        for (i, &b) in bytes.iter().enumerate() {
            upper |= b.is_ascii_uppercase();
            let ends_segment = matches!(bytes.get(i + 1), None | Some(b'/'));
            trailing |= ends_segment && (b == b'.' || (b == b'0' && bytes[..=i].ends_with(b"%20")));
        }
        if upper {
            let blind = self
                .routes
                .iter()
                .find(|r| r.matches_as(method, path, true))
                .or(self.fallback.as_ref());
            if !same(blind, route) {
                return Err(PathError::Readings);
            }
        }
        if trailing {
            let mut trimmed = String::with_capacity(path.len());
            for seg in path[1..].split('/') {
                let mut t = seg;
                while let Some(rest) = t.strip_suffix('.').or_else(|| t.strip_suffix("%20")) {
                    t = rest;
                }
                if t.is_empty() && !seg.is_empty() {
                    // `...` or `..%20`: a parent directory to some, a name to others.
                    return Err(PathError::Readings);
                }
                trimmed.push('/');
                trimmed.push_str(t);
            }
            if !same(self.route(method, &trimmed), route) {
                return Err(PathError::Readings);
            }
        }
        Ok(())
    }

    /// The first route family that matches, or the fallback. `path` may carry a query.
    pub fn route(&self, method: &str, path: &str) -> Option<&Route> {
        let path = path.split(['?', '#']).next().unwrap_or("");
        self.routes
            .iter()
            .find(|r| r.matches_as(method, path, false))
            .or(self.fallback.as_ref())
    }

    /// Whether `principal` holds `required`: a partner scope only a partner key can.
    pub fn grants_to(&self, principal: &Principal, required: &str) -> bool {
        let partner =
            principal.credential == CredentialKind::ApiKey && principal.kind == KeyKind::Partner;
        (partner || !partner_only(&self.partner_scopes, required))
            && self.grants(&principal.scopes, required)
    }

    /// Whether only partner keys may hold `scope` (`policy.partner_scopes`).
    pub fn is_partner_scope(&self, scope: &str) -> bool {
        partner_only(&self.partner_scopes, scope)
    }

    /// Whether `held` grants `required`.
    pub fn grants(&self, held: &[String], required: &str) -> bool {
        let opt_in = self.opt_in_scopes.iter().any(|s| s == required);
        held.iter().any(|h| {
            h == required
                || (!opt_in
                    && (h == "*"
                        || h.strip_suffix('*')
                            .is_some_and(|stem| stem.ends_with(':') && required.starts_with(stem))))
        })
    }
}

/// Whether two lookups found the same route (or both none).
fn same(a: Option<&Route>, b: Option<&Route>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl Route {
    /// `blind`: literals compared ignoring ASCII case.
    fn matches_as(&self, method: &str, path: &str, blind: bool) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
        {
            return false;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(l) => match parts.next() {
                    Some(p) if p == l || (blind && p.eq_ignore_ascii_case(l)) => {}
                    _ => return false,
                },
            }
        }
        // A trailing slash is the same route as none.
        match parts.next() {
            None => true,
            Some("") => parts.next().is_none(),
            Some(_) => false,
        }
    }
}

fn compile_path(path: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("must start with `/`".into());
    };
    if path.contains(['?', '#']) {
        return Err("must not contain a query or fragment".into());
    }
    if path.contains(';') || path.to_ascii_lowercase().contains("%3b") {
        // No request path with one is ever matched (`request::normalize_path`).
        return Err("must not contain `;`: request paths with path parameters are refused".into());
    }
    // Requests are matched on their normal form: a route written otherwise (`%7e`, a dot
    // segment, `%2F`) would match nothing, or not what it says.
    match normalize_path(path) {
        Ok(normal) if normal == path => {}
        Ok(normal) => {
            return Err(format!(
                "must be written as request paths are normalised: `{normal}`"
            ))
        }
        Err(e) => return Err(format!("is not a path a request could match: {e}")),
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let mut out = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        out.push(match *p {
            "**" if i + 1 == parts.len() => Segment::Rest,
            "**" => return Err("`**` may only be the last segment".into()),
            "*" => Segment::One,
            p if p.starts_with('{') && p.ends_with('}') => Segment::One,
            "" => return Err("must not contain empty segments (`//`)".into()),
            p if p.contains('*') => return Err(format!("segment `{p}`: `*` must stand alone")),
            p => Segment::Literal(p.to_owned()),
        });
    }
    Ok(out)
}

/// Whether `scope` (held or required) falls under one of the policy's partner scopes:
/// the same scope, or inside a `family:*` (a held `billing:partner:*` is inside
/// `billing:*`'s family only if the pattern is that wide).
pub fn partner_only(patterns: &[String], scope: &str) -> bool {
    patterns.iter().any(|p| {
        p == scope
            || p.strip_suffix('*')
                .is_some_and(|stem| scope.starts_with(stem))
    })
}

/// A scope a route can require (or the policy mark opt-in): no wildcard.
pub fn valid_required_scope(s: &str) -> bool {
    valid_scope(s) && !s.contains('*')
}

/// A scope a key can hold: a required scope, `*`, or `resource:*` (a trailing `:*`,
/// which `grants` reads as every scope under `resource:`).
pub fn valid_held_scope(s: &str) -> bool {
    valid_scope(s)
        && (!s.contains('*') || s == "*" || (s.ends_with(":*") && s.matches('*').count() == 1))
}

/// The characters and length of any scope.
fn valid_scope(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b':' | b'-' | b'_' | b'.' | b'*')
        })
}

#[cfg(test)]
mod tests;

//! The pipeline: route → extract → authenticate → resolve tenant → authorize → Decision.
//! One straight line, each stage in its own module; this file only wires them. A stage's
//! failure becomes the decision through the `From` impl beside the failure's type (an
//! outage is `Unavailable`, never a deny or an allow). Session tokens, minted and judged,
//! are `session.rs`'s.

mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::authn::{Authenticator, AuthnFailure};
use crate::credential::CredentialSource;
use crate::decision::{Allowed, Decision, Denial, DenyReason};
use crate::header_alias::folds_to;
use crate::jwt::session::SessionKeys;
use crate::policy::{Policy, PolicyConfig, Requirement, Route};
use crate::principal::{CredentialKind, Principal};
use crate::ratelimit::Limiter;
use crate::request::AuthRequest;
use crate::telemetry::metrics;
use crate::tenant::{self, Delegations, TenantRule};

pub use session::{MintFailure, MintedSession, SessionRequest};

/// `policy.method_override`'s setting, defined with the policy; re-exported where it is
/// enforced.
pub use crate::policy::MethodOverride;

pub struct Authorizer {
    policy: Policy,
    credentials: CredentialSource,
    authn: Authenticator,
    delegations: Arc<Delegations>,
    limiter: Arc<Limiter>,
    usage: Arc<crate::usage::UsageCounter>,
    tenant_header: String,
    method_override: MethodOverride,
    sessions: Option<Arc<SessionKeys>>,
}

/// The headers frameworks read a method override from, as they spell them.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Whether a header name carries a method override to some upstream: one of
/// `METHOD_OVERRIDE_HEADERS` in any case, or an alias of one (`x_http_method_override`
/// is `HTTP_X_HTTP_METHOD_OVERRIDE` to PHP, as `X-HTTP-Method-Override` is).
pub fn is_method_override_header(name: &str) -> bool {
    METHOD_OVERRIDE_HEADERS
        .iter()
        .any(|h| folds_to(name.as_bytes(), h.as_bytes()))
}

/// An HTTP method as RFC 9110 spells one: a token (`1*tchar`).
fn is_method_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Authorizer {
    pub fn new(
        policy_cfg: &PolicyConfig,
        policy: Policy,
        authn: Authenticator,
        delegations: Arc<Delegations>,
        limiter: Arc<Limiter>,
        usage: Arc<crate::usage::UsageCounter>,
        sessions: Option<Arc<SessionKeys>>,
    ) -> Self {
        Authorizer {
            policy,
            credentials: CredentialSource::new(policy_cfg),
            authn,
            delegations,
            limiter,
            usage,
            tenant_header: policy_cfg.tenant_header.clone(),
            method_override: policy_cfg.method_override,
            sessions,
        }
    }

    /// Who a credential is. A session token is judged on its key's state as this replica
    /// knows it now, not on what the key was when the token was minted: it passes only
    /// while its key is active (and, for a partner key, still delegated the token's
    /// tenant), holds only the scopes both it and its key hold now, and spends its key's
    /// current plan.
    async fn principal_of(
        &self,
        credential: crate::credential::Credential<'_>,
    ) -> Result<Arc<Principal>, AuthnFailure> {
        let principal = self.authn.authenticate(credential).await?;
        if principal.credential != CredentialKind::Session {
            return Ok(principal);
        }
        self.session_principal(&principal).await
    }

    pub fn credentials(&self) -> &CredentialSource {
        &self.credentials
    }

    /// Who `token` is (an API key or a JWT), without a route: for calls that act on the
    /// caller itself, such as taking a lease.
    pub async fn authenticate(
        &self,
        token: &str,
    ) -> Result<Arc<crate::principal::Principal>, AuthnFailure> {
        let token = token.trim();
        let credential = if token.is_empty() {
            crate::credential::Credential::None
        } else {
            crate::credential::classify(token)
        };
        self.principal_of(credential).await
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    pub fn tenant_header(&self) -> &str {
        &self.tenant_header
    }

    /// `policy.method_override`: under `strip`, adapters remove every header for which
    /// `is_method_override_header` holds from an allowed request.
    pub fn method_override(&self) -> MethodOverride {
        self.method_override
    }

    /// Decides one request, and records the decision in metrics and the log.
    pub async fn check(&self, req: &AuthRequest) -> Decision {
        let started = Instant::now();
        let decision = self.decide(req).await;
        let m = metrics();
        let took = started.elapsed();
        m.check_duration.observe(took.as_secs_f64());
        if crate::telemetry::tracing_enabled() {
            tracing::Span::current().record("keygate.check_us", micros(took));
        }
        m.count_decision(decision.label());
        match &decision {
            Decision::Allow(a) => tracing::debug!(
                event = "decision.allowed",
                method = %req.method,
                route = %a.route,
                key_id = a.principal.as_ref().and_then(|p| p.key_id.as_deref()).unwrap_or(""),
                tenant = a.effective_tenant.as_deref().unwrap_or(""),
                "request allowed"
            ),
            Decision::Deny(d) => match DENIALS_LOGGED.admit() {
                Some(not_logged) => tracing::info!(
                    event = "decision.denied",
                    method = %req.method,
                    code = d.reason.code(),
                    peer = req.peer.as_deref().unwrap_or(""),
                    not_logged,
                    "request denied"
                ),
                None => tracing::debug!(
                    event = "decision.denied",
                    method = %req.method,
                    code = d.reason.code(),
                    "request denied"
                ),
            },
            Decision::Unavailable(u) => match UNDECIDED_LOGGED.admit() {
                Some(not_logged) => tracing::warn!(
                    event = "decision.unavailable",
                    method = %req.method,
                    backend = u.backend,
                    not_logged,
                    "request could not be decided: backend unavailable"
                ),
                None => tracing::debug!(
                    event = "decision.unavailable",
                    backend = u.backend,
                    "request could not be decided: backend unavailable"
                ),
            },
        }
        decision
    }

    async fn decide(&self, req: &AuthRequest) -> Decision {
        let routes = match self.routes(req) {
            Routed::Judge(routes) => routes,
            Routed::Decided(decided) => return decided,
        };
        let traced = crate::telemetry::tracing_enabled();
        let started = traced.then(Instant::now);
        let principal = self.principal_of(self.credentials.extract(req)).await;
        let authenticated = traced.then(Instant::now);
        let principal = match principal {
            Ok(p) => p,
            Err(failure) => return failure.into(),
        };
        let decision = self.authorize(req, &routes, &principal).await;
        if let (Some(started), Some(authenticated)) = (started, authenticated) {
            // The check's span (the adapter's), when traced.
            let span = tracing::Span::current();
            span.record("keygate.authn_us", micros(authenticated - started));
            span.record("keygate.authorize_us", micros(authenticated.elapsed()));
        }
        self.count_usage(&principal, &decision);
        decision
    }

    /// Counts a decision on an authenticated key in its usage: allowed, or denied after
    /// authentication (scope, tenant, rate limit). Not a request that could not be decided.
    fn count_usage(&self, principal: &Principal, decision: &Decision) {
        if let Some(key_id) = principal.key_id.as_deref() {
            match decision {
                Decision::Allow(_) => self.usage.record(key_id, true),
                Decision::Deny(_) => self.usage.record(key_id, false),
                Decision::Unavailable(_) => {}
            }
        }
    }

    /// `check`'s decision from what this replica knows now, with no store read, argon2,
    /// JWT validation, rate limit or lease: `None` wherever `check` would need one (or
    /// mint a session). Where it answers, it answers as `check` would. For the module
    /// inside Envoy (`api::envoy_module`), which hands the rest to the service. What it
    /// decides is counted in usage as `check` counts it (the module reports its usage to
    /// the service); it records no metric.
    pub fn decide_known(&self, req: &AuthRequest) -> Option<Decision> {
        let routes = match self.routes(req) {
            Routed::Judge(routes) => routes,
            Routed::Decided(decided) => return Some(decided),
        };
        let principal = match self
            .authn
            .authenticate_known(self.credentials.extract(req))?
        {
            Ok(p) => p,
            Err(failure) => return Some(failure.into()),
        };
        let decision = self.authorize_known(req, &routes, &principal)?;
        self.count_usage(&principal, &decision);
        Some(decision)
    }

    /// `decide_known` once the credential is known: admission, tenant, scope; `None`
    /// where the service must answer.
    fn authorize_known(
        &self,
        req: &AuthRequest,
        routes: &Routes<'_>,
        principal: &Arc<Principal>,
    ) -> Option<Decision> {
        let rule = match self.admission(routes, principal) {
            Ok(rule) => rule,
            Err(reason) => return Some(Decision::deny(reason)),
        };
        let header = req.header(&self.tenant_header);
        let effective_tenant =
            match tenant::resolve_known(principal, rule, header, &self.delegations)? {
                Ok(t) => t,
                Err(failure) => return Some(failure.into()),
            };
        let mints = match self.scoped(routes, principal, &effective_tenant) {
            Ok(mint) => mint.is_some(),
            Err(reason) => return Some(Decision::deny(reason)),
        };
        let needs_more = mints
            || self.limiter.limited(principal).is_some()
            || routes.judged().any(|r| r.lease_ttl.is_some());
        if needs_more {
            return None;
        }
        Some(Decision::Allow(Allowed {
            principal: Some(Arc::clone(principal)),
            effective_tenant,
            route: routes.route?.name.clone(),
            rate: None,
            lease_id: None,
            session: None,
        }))
    }

    /// The routes a request falls on: its own and those of the methods its override
    /// headers name. A refused path or override is denied here, and a public route is
    /// allowed here, before any credential (`Routed::Decided`).
    fn routes<'a>(&'a self, req: &AuthRequest) -> Routed<'a> {
        // Routes are matched on the path the upstream will route, not on its raw bytes,
        // whatever the proxy in front normalised or did not.
        // (`Policy::route_of`: every reading of the path common servers take.)
        let route = match self.policy.route_of(&req.method, &req.path) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(event = "decision.path_refused", reason = %e, "request path refused");
                return Routed::Decided(Decision::Deny(Denial::invalid_path(e)));
            }
        };
        let overrides = match self.method_overrides(req) {
            Ok(methods) => methods,
            Err(reason) => {
                tracing::debug!(event = "decision.method_override_refused", mode = ?self.method_override, "method override refused");
                return Routed::Decided(Decision::deny(reason));
            }
        };
        // The routes of the methods an upstream may act on instead (none, mostly).
        let mut also: Vec<Option<&Route>> = Vec::with_capacity(overrides.len());
        for m in &overrides {
            match self.policy.route_of(m, &req.path) {
                Ok(r) => also.push(r),
                Err(e) => {
                    tracing::debug!(event = "decision.path_refused", reason = %e, "request path refused");
                    return Routed::Decided(Decision::Deny(Denial::invalid_path(e)));
                }
            }
        }
        let public = |r: &&Route| r.requirement == Requirement::Public;
        if let Some(r) = route.filter(public) {
            // A public route that an override takes elsewhere is public only if there too.
            if also.iter().all(|a| a.as_ref().is_some_and(public)) {
                return Routed::Decided(Decision::Allow(Allowed {
                    principal: None,
                    effective_tenant: None,
                    route: r.name.clone(),
                    rate: None,
                    lease_id: None,
                    session: None,
                }));
            }
        }
        Routed::Judge(Routes { route, also })
    }

    /// The methods other than its own that `req` names in method override headers, for
    /// `policy.method_override: check` (in upper case, as frameworks read them); none
    /// under `strip`; `invalid_request` for any under `deny`, and under `check` for a
    /// value that is not a method (repeated headers arrive joined by commas: which one an
    /// upstream would take is anyone's guess).
    fn method_overrides(&self, req: &AuthRequest) -> Result<Vec<String>, DenyReason> {
        let mut methods = Vec::new();
        if self.method_override == MethodOverride::Strip {
            return Ok(methods);
        }
        for (name, value) in &req.headers {
            if !is_method_override_header(name) {
                continue;
            }
            let method = value.trim_matches([' ', '\t']);
            if self.method_override == MethodOverride::Deny || !is_method_token(method) {
                return Err(DenyReason::InvalidRequest);
            }
            if !method.eq_ignore_ascii_case(&req.method)
                && !methods
                    .iter()
                    .any(|m: &String| m.eq_ignore_ascii_case(method))
            {
                methods.push(method.to_ascii_uppercase());
            }
        }
        Ok(methods)
    }

    /// What an authenticated caller may do here: route admission, tenant, scope, rate.
    /// `routes.also`: the routes of the methods the request's override headers name, each
    /// of which must admit the caller as its own route does; a public one admits anyone.
    /// One admission and at most one lease are spent whatever their number.
    async fn authorize(
        &self,
        req: &AuthRequest,
        routes: &Routes<'_>,
        principal: &Arc<crate::principal::Principal>,
    ) -> Decision {
        let rule = match self.admission(routes, principal) {
            Ok(rule) => rule,
            Err(reason) => return Decision::deny(reason),
        };
        let header = req.header(&self.tenant_header);
        let effective_tenant =
            match tenant::resolve(principal, rule, header, &self.delegations).await {
                Ok(t) => t,
                Err(failure) => return failure.into(),
            };
        let mint = match self.scoped(routes, principal, &effective_tenant) {
            Ok(mint) => mint,
            Err(reason) => return Decision::deny(reason),
        };
        // Last: only a request that would otherwise pass spends an admission, and nothing
        // after the lease can deny (a lease taken for a denied request would be held
        // until it expires).
        let rate = match self.limiter.check(principal).await.admission() {
            Ok(rate) => rate,
            Err(refused) => return refused.into(),
        };
        // The longest lease any judged route takes: one lease, whichever method acts.
        let lease_ttl = routes.judged().filter_map(|r| r.lease_ttl).max();
        let lease_id = match lease_ttl {
            None => None,
            Some(ttl) => match self.limiter.route_lease(principal, ttl).await {
                Ok(id) => id,
                Err(refused) => return refused.into(),
            },
        };
        let session = mint.map(|(keys, tenant)| {
            let scopes = self.session_scopes(principal);
            self.sign_session(keys, principal, tenant, scopes, keys.lifetime)
                .token
        });
        let route = routes
            .route
            .expect("admission denies a request no route covers");
        Decision::Allow(Allowed {
            principal: Some(Arc::clone(principal)),
            effective_tenant,
            route: route.name.clone(),
            rate,
            lease_id,
            session,
        })
    }

    /// Admission, before the tenant: some route covers the request (authenticated, but
    /// no route family covers it: denied), and every judged route accepts the caller's
    /// kind. The tenant rule of the judged routes.
    fn admission(
        &self,
        routes: &Routes<'_>,
        principal: &Principal,
    ) -> Result<TenantRule, DenyReason> {
        if routes.route.is_none() || routes.also.iter().any(Option::is_none) {
            return Err(DenyReason::InsufficientPermissions);
        }
        if !routes.judged().all(|r| r.accepts(principal)) {
            return Err(DenyReason::InsufficientPermissions);
        }
        Ok(
            if routes.judged().any(|r| r.tenant == TenantRule::Required) {
                TenantRule::Required
            } else {
                TenantRule::Optional
            },
        )
    }

    /// After the tenant: every judged route's scope, and the session a route mints
    /// (checked before anything is spent).
    #[allow(clippy::type_complexity)]
    fn scoped<'s>(
        &'s self,
        routes: &Routes<'_>,
        principal: &Principal,
        effective_tenant: &Option<String>,
    ) -> Result<Option<(&'s Arc<SessionKeys>, String)>, DenyReason> {
        for r in routes.judged() {
            if let Requirement::Scope(scope) = &r.requirement {
                if !self.policy.grants_to(principal, scope) {
                    return Err(DenyReason::InsufficientPermissions);
                }
            }
        }
        match (&self.sessions, routes.route.is_some_and(|r| r.mint_session)) {
            (Some(keys), true) => Ok(Some((
                keys,
                Self::session_tenant(principal, effective_tenant.clone())?,
            ))),
            _ => Ok(None),
        }
    }
}

/// What routing made of a request: routes to judge the caller on, or the decision
/// already (a refused path, a public route).
enum Routed<'a> {
    Judge(Routes<'a>),
    Decided(Decision),
}

/// The routes a request falls on (`Authorizer::routes`).
struct Routes<'a> {
    /// Its own; `None`: no route family covers it.
    route: Option<&'a Route>,
    /// Those of the methods its override headers name.
    also: Vec<Option<&'a Route>>,
}

impl<'a> Routes<'a> {
    /// The routes that need something of the caller (a public one admits anyone).
    /// Without overrides, the request's own route alone, and nothing allocated.
    fn judged(&self) -> impl Iterator<Item = &'a Route> + '_ {
        self.route
            .into_iter()
            .chain(self.also.iter().flatten().copied())
            .filter(|r| r.requirement != Requirement::Public)
    }
}

/// Denials and undecidable requests are logged at most this often (each line saying how
/// many were left out since the last); `keygate_decisions_total` counts every one.
static DENIALS_LOGGED: crate::telemetry::LogBudget = crate::telemetry::LogBudget::new(10);
static UNDECIDED_LOGGED: crate::telemetry::LogBudget = crate::telemetry::LogBudget::new(10);

/// Microseconds, as an OpenTelemetry integer attribute (i64).
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

//! The pipeline: route → extract → authenticate → resolve tenant → authorize → Decision.
//! One straight line, each stage in its own module; this file only wires them.

use std::sync::Arc;
use std::time::Instant;

use crate::authn::{Authenticator, AuthnFailure};
use crate::config::PolicyConfig;
use crate::credential::CredentialSource;
use crate::decision::{Allowed, Decision, Denial, DenyReason, Unavailable};
use crate::policy::{Policy, Requirement};
use crate::ratelimit::{Limiter, RouteLeaseRefused, Verdict};
use crate::request::{normalize_path, AuthRequest};
use crate::telemetry::metrics;
use crate::tenant::{self, Delegations, TenantFailure};

pub struct Authorizer {
    policy: Policy,
    credentials: CredentialSource,
    authn: Authenticator,
    delegations: Arc<Delegations>,
    limiter: Arc<Limiter>,
    usage: Arc<crate::usage::UsageCounter>,
    tenant_header: String,
}

impl Authorizer {
    pub fn new(
        policy_cfg: &PolicyConfig,
        policy: Policy,
        authn: Authenticator,
        delegations: Arc<Delegations>,
        limiter: Arc<Limiter>,
        usage: Arc<crate::usage::UsageCounter>,
    ) -> Self {
        Authorizer {
            policy,
            credentials: CredentialSource::new(policy_cfg),
            authn,
            delegations,
            limiter,
            usage,
            tenant_header: policy_cfg.tenant_header.clone(),
        }
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
        self.authn.authenticate(credential).await
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    pub fn tenant_header(&self) -> &str {
        &self.tenant_header
    }

    /// Decides one request, and records the decision in metrics and the log.
    pub async fn check(&self, req: &AuthRequest) -> Decision {
        let started = Instant::now();
        let decision = self.decide(req).await;
        let m = metrics();
        m.check_duration.observe(started.elapsed().as_secs_f64());
        m.count_decision(decision.label());
        match &decision {
            Decision::Allow(a) => tracing::debug!(
                method = %req.method,
                route = %a.route,
                key_id = a.principal.as_ref().and_then(|p| p.key_id.as_deref()).unwrap_or(""),
                tenant = a.effective_tenant.as_deref().unwrap_or(""),
                "request allowed"
            ),
            Decision::Deny(d) => tracing::info!(
                method = %req.method,
                code = d.reason.code(),
                peer = req.peer.as_deref().unwrap_or(""),
                "request denied"
            ),
            Decision::Unavailable(u) => tracing::warn!(
                method = %req.method,
                backend = u.backend,
                "request could not be decided: backend unavailable"
            ),
        }
        decision
    }

    async fn decide(&self, req: &AuthRequest) -> Decision {
        // Routes are matched on the path the upstream will route, not on its raw bytes,
        // whatever the proxy in front normalised or did not.
        let path = match normalize_path(&req.path) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(reason = %e, "request path refused");
                return Decision::deny(DenyReason::InvalidPath);
            }
        };
        let route = self.policy.route(&req.method, &path);
        if let Some(r) = route {
            if r.requirement == Requirement::Public {
                return Decision::Allow(Allowed {
                    principal: None,
                    effective_tenant: None,
                    route: r.name.clone(),
                    rate: None,
                    lease_id: None,
                });
            }
        }
        let principal = match self.authn.authenticate(self.credentials.extract(req)).await {
            Ok(p) => p,
            Err(AuthnFailure::Deny(reason)) => return Decision::deny(reason),
            Err(AuthnFailure::Unavailable) => {
                return Decision::Unavailable(Unavailable { backend: "store" })
            }
        };
        let decision = self.authorize(req, route, &principal).await;
        if let Some(key_id) = principal.key_id.as_deref() {
            match decision {
                Decision::Allow(_) => self.usage.record(key_id, true),
                Decision::Deny(_) => self.usage.record(key_id, false),
                Decision::Unavailable(_) => {}
            }
        }
        decision
    }

    /// What an authenticated caller may do here: route admission, tenant, scope, rate.
    async fn authorize(
        &self,
        req: &AuthRequest,
        route: Option<&crate::policy::Route>,
        principal: &Arc<crate::principal::Principal>,
    ) -> Decision {
        // Authenticated, but no route family covers the request.
        let Some(route) = route else {
            return Decision::deny(DenyReason::InsufficientPermissions);
        };
        if !route.accepts(principal) {
            return Decision::deny(DenyReason::InsufficientPermissions);
        }
        let header = req.header(&self.tenant_header);
        let effective_tenant =
            match tenant::resolve(principal, route.tenant, header, &self.delegations).await {
                Ok(t) => t,
                Err(TenantFailure::Deny(reason)) => return Decision::deny(reason),
                Err(TenantFailure::Unavailable) => {
                    return Decision::Unavailable(Unavailable { backend: "store" })
                }
            };
        if let Requirement::Scope(scope) = &route.requirement {
            if !self.policy.grants_to(principal, scope) {
                return Decision::deny(DenyReason::InsufficientPermissions);
            }
        }
        // Last: only a request that would otherwise pass spends an admission.
        let rate = match self.limiter.check(principal).await {
            Verdict::Unlimited => None,
            Verdict::Admitted(info) => Some(info),
            Verdict::Limited(info) => return Decision::Deny(Denial::rate_limited(info)),
            Verdict::Unavailable => return Decision::Unavailable(Unavailable { backend: "store" }),
        };
        let lease_id = match route.lease_ttl {
            None => None,
            Some(ttl) => match self.limiter.route_lease(principal, ttl).await {
                Ok(id) => id,
                Err(RouteLeaseRefused::Full) => {
                    return Decision::Deny(Denial::new(DenyReason::RateLimited))
                }
                Err(RouteLeaseRefused::Unavailable) => {
                    return Decision::Unavailable(Unavailable { backend: "store" })
                }
            },
        };
        Decision::Allow(Allowed {
            principal: Some(Arc::clone(principal)),
            effective_tenant,
            route: route.name.clone(),
            rate,
            lease_id,
        })
    }
}

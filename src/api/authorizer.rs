//! `keygate.v1.Authorizer`: the same decision as Envoy's Check, for internal callers that
//! hold a credential and want keygate's verdict in keygate's terms; and the concurrent-
//! session leases of a key's plan.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::proto::{self, authorizer_server::Authorizer as AuthorizerApi};
use super::Reply;
use crate::authn::AuthnFailure;
use crate::authorizer::{Authorizer, MintFailure, SessionRequest};
use crate::decision::{Decision, Denial, DenyReason, ErrorShape, RateInfo};
use crate::principal::Principal;
use crate::ratelimit::LeaseError;
use crate::request::AuthRequest;
use crate::revocation::RevocationBus;
use crate::telemetry::ErrorChain;

pub struct AuthorizerService {
    authorizer: Arc<Authorizer>,
    errors: Arc<ErrorShape>,
    gate: Option<Arc<RevocationBus>>,
}

impl AuthorizerService {
    pub fn new(authorizer: Arc<Authorizer>, errors: Arc<ErrorShape>) -> Self {
        AuthorizerService {
            authorizer,
            errors,
            gate: None,
        }
    }

    /// Answers only once `bus` has its position in the revocation stream.
    pub fn gated(mut self, bus: Arc<RevocationBus>) -> Self {
        self.gate = Some(bus);
        self
    }

    /// The request's message, once the service answers at all (`gated`).
    fn admitted<T>(&self, request: Request<T>) -> Result<T, Status> {
        super::starting(&self.gate)?;
        Ok(request.into_inner())
    }

    /// Renews the lease for `ttl`, or with `None` releases it.
    async fn renew_or_release(
        &self,
        lease_id: &str,
        ttl: Option<Duration>,
    ) -> Reply<proto::LeaseResponse> {
        self.authorizer
            .limiter()
            .renew_or_release(lease_id, ttl)
            .await
            .map_err(lease_status)?;
        Ok(Response::new(proto::LeaseResponse {}))
    }
}

pub fn principal_proto(p: &Principal) -> proto::Principal {
    proto::Principal {
        tenant_id: p.tenant_id.to_string(),
        subject: p.subject.to_string(),
        key_id: p.key_id.as_deref().unwrap_or_default().to_owned(),
        kind: p.kind_label().to_owned(),
        environment: p.environment.as_str().to_owned(),
        scopes: p.scopes.clone(),
        expires_at: p
            .expires_at
            .filter(|e| *e != crate::store::NEVER)
            .map(super::timestamp),
        plan: p.plan.as_deref().unwrap_or_default().to_owned(),
        partner_id: p.partner_id.as_deref().unwrap_or_default().to_owned(),
        service: p.service.as_deref().unwrap_or_default().to_owned(),
        issuer: p.issuer.as_deref().unwrap_or_default().to_owned(),
    }
}

#[tonic::async_trait]
impl AuthorizerApi for AuthorizerService {
    async fn check(&self, request: Request<proto::CheckRequest>) -> Reply<proto::CheckResponse> {
        super::starting(&self.gate)?;
        // The caller's trace context comes as gRPC metadata, as OpenTelemetry's gRPC
        // instrumentations send it.
        let trace_context: std::collections::HashMap<String, String> =
            if crate::telemetry::tracing_enabled() {
                crate::telemetry::TRACE_HEADERS
                    .iter()
                    .filter_map(|name| {
                        let value = request.metadata().get(*name)?.to_str().ok()?;
                        Some((name.to_string(), value.to_owned()))
                    })
                    .collect()
            } else {
                Default::default()
            };
        let r = request.into_inner();
        if r.method.is_empty() {
            return Err(Status::invalid_argument("method: must not be empty"));
        }
        if !r.path.starts_with('/') {
            return Err(Status::invalid_argument("path: must start with `/`"));
        }
        let mut headers: std::collections::HashMap<String, String> = r
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        if !r.tenant_id.is_empty() {
            headers.insert(self.authorizer.tenant_header().to_owned(), r.tenant_id);
        }
        let req = AuthRequest {
            method: r.method.to_ascii_uppercase(),
            path: r.path,
            headers,
            peer: None,
            credential: Some(r.credential),
        };
        let span = crate::telemetry::check_span(&trace_context, "keygate.v1");
        let response = match super::traced_check(&self.authorizer, &req, span).await {
            Decision::Allow(a) => proto::CheckResponse {
                allowed: true,
                principal: a.principal.as_deref().map(principal_proto),
                effective_tenant: a.effective_tenant.unwrap_or_default(),
                denial: None,
                rate_limit: a.rate.map(rate_proto),
            },
            Decision::Deny(d) => proto::CheckResponse {
                allowed: false,
                principal: None,
                effective_tenant: String::new(),
                denial: Some(self.denial(&d)),
                rate_limit: d.rate.map(rate_proto),
            },
            Decision::Unavailable(u) => return Err(super::unavailable(u.backend)),
        };
        Ok(Response::new(response))
    }

    async fn acquire_lease(
        &self,
        request: Request<proto::AcquireLeaseRequest>,
    ) -> Reply<proto::AcquireLeaseResponse> {
        let r = self.admitted(request)?;
        let ttl = lease_ttl(r.ttl_seconds)?;
        let principal = match self.authorizer.authenticate(&r.credential).await {
            Ok(p) => p,
            Err(AuthnFailure::Deny(reason)) => {
                return Ok(Response::new(proto::AcquireLeaseResponse {
                    denial: Some(self.denial(&Denial::new(reason))),
                    ..Default::default()
                }))
            }
            Err(AuthnFailure::Unavailable) => return Err(super::unavailable("store")),
        };
        match self.authorizer.limiter().acquire(&principal, ttl).await {
            Ok(lease_id) => Ok(Response::new(proto::AcquireLeaseResponse {
                lease_id,
                expires_at: Some(super::timestamp(
                    crate::store::now_ms() + ttl.as_millis() as u64,
                )),
                denial: None,
            })),
            Err(e @ LeaseError::Full { .. }) => {
                // The deployment's code and status for rate_limited; the message says why.
                let error = self.errors.answer(DenyReason::RateLimited);
                Ok(Response::new(proto::AcquireLeaseResponse {
                    denial: Some(proto::Denial {
                        code: error.code.clone(),
                        message: e.to_string(),
                        http_status: u32::from(error.status),
                    }),
                    ..Default::default()
                }))
            }
            Err(e) => Err(lease_status(e)),
        }
    }

    async fn renew_lease(
        &self,
        request: Request<proto::RenewLeaseRequest>,
    ) -> Reply<proto::LeaseResponse> {
        let r = request.into_inner();
        let ttl = lease_ttl(r.ttl_seconds)?;
        self.renew_or_release(&r.lease_id, Some(ttl)).await
    }

    async fn mint_session_token(
        &self,
        request: Request<proto::MintSessionTokenRequest>,
    ) -> Reply<proto::MintSessionTokenResponse> {
        let r = self.admitted(request)?;
        let req = SessionRequest {
            credential: r.credential,
            tenant_id: r.tenant_id,
            scopes: r.scopes,
            ttl: (r.ttl_seconds > 0).then(|| Duration::from_secs(u64::from(r.ttl_seconds))),
        };
        match self.authorizer.mint_session(req).await {
            Ok(m) => Ok(Response::new(proto::MintSessionTokenResponse {
                token: m.token.token.expose().to_owned(),
                expires_at: Some(super::timestamp(m.token.expires_at_ms)),
                tenant_id: m.tenant_id,
                scopes: m.scopes,
                denial: None,
            })),
            Err(MintFailure::Deny(reason)) => Ok(Response::new(proto::MintSessionTokenResponse {
                denial: Some(self.denial(&Denial::new(reason))),
                ..Default::default()
            })),
            Err(MintFailure::Invalid { field, message }) => {
                Err(Status::invalid_argument(format!("{field}: {message}")))
            }
            Err(MintFailure::Disabled) => Err(Status::failed_precondition(
                "session tokens are not configured (sessions.signing_keys)",
            )),
            Err(MintFailure::Unavailable) => Err(super::unavailable("store")),
        }
    }

    async fn release_lease(
        &self,
        request: Request<proto::ReleaseLeaseRequest>,
    ) -> Reply<proto::LeaseResponse> {
        self.renew_or_release(&request.into_inner().lease_id, None)
            .await
    }
}

impl AuthorizerService {
    fn denial(&self, d: &Denial) -> proto::Denial {
        let error = self.errors.answer_to(d);
        proto::Denial {
            code: error.code.to_owned(),
            message: error.message.to_string(),
            http_status: u32::from(error.status),
        }
    }
}

fn rate_proto(r: RateInfo) -> proto::RateLimit {
    proto::RateLimit {
        limit: r.limit,
        remaining: r.remaining,
        reset_seconds: r.reset,
        retry_after_seconds: r.retry_after.unwrap_or(0),
    }
}

/// A lease's ttl: 1 s to a day.
fn lease_ttl(seconds: u32) -> Result<Duration, Status> {
    if seconds == 0 || seconds > 86_400 {
        return Err(Status::invalid_argument("ttl_seconds: must be 1 to 86400"));
    }
    Ok(Duration::from_secs(u64::from(seconds)))
}

fn lease_status(e: LeaseError) -> Status {
    match e {
        LeaseError::NoSessions => Status::failed_precondition(e.to_string()),
        LeaseError::Full { .. } => Status::resource_exhausted(e.to_string()),
        LeaseError::Unknown => Status::not_found(format!("lease_id: {e}")),
        LeaseError::Unavailable(_) => Status::unavailable(ErrorChain(&e).to_string()),
    }
}

//! Envoy's `envoy.service.auth.v3.Authorization/Check`.
//!
//! What Envoy does with our answer (docs/architecture.md): `status` is
//! always set, because a response without it reads as OK; a deny carries the HTTP status,
//! JSON body and headers the client sees; an undecidable request is a gRPC error
//! (UNAVAILABLE), so Envoy's own `failure_mode_allow` / `status_on_error` decides — never
//! an allow, never a deny.

use std::sync::Arc;

use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::{
    check_response::HttpResponse, CheckRequest, CheckResponse, DeniedHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use super::envoy_answer::{overwrite, AllowAnswer, CheckAnswer, Identity};
pub use super::envoy_answer::{HEADER_KEY_ID, HEADER_KIND, HEADER_SCOPES, HEADER_SUBJECT};
use super::envoy_learn::{Learned, LEARN_HEADER};
use super::envoy_wire::{self, Authorization, CheckRequestView, HeaderFilter};
use super::Reply;
use crate::authorizer::{
    is_method_override_header, Authorizer, MethodOverride, METHOD_OVERRIDE_HEADERS,
};
use crate::config::RulesId;
use crate::decision::{Allowed, Decision, Denial, ErrorShape, PublicError};
use crate::header_alias::OwnedHeaders;
use crate::request::AuthRequest;
use crate::revocation::RevocationBus;
use crate::store::Cursor;

/// Headers under this prefix are keygate's to set; a client's are never passed on.
pub const IDENTITY_PREFIX: &str = "x-keygate-";

pub struct EnvoyAuthorization {
    authorizer: Arc<Authorizer>,
    /// The tenant header's name, shared with every allow answer.
    tenant_header: Arc<str>,
    options: EnvoyOptions,
    /// The request headers any decision or answer consults.
    headers: HeaderFilter,
    /// The headers keygate reads or sets (tenant, credentials, `x-keygate-*`): an allow
    /// removes every other spelling of them.
    owned: OwnedHeaders,
    /// `policy.method_override: strip`: an allow removes the method override headers.
    strip_overrides: bool,
    errors: Arc<ErrorShape>,
    gate: Option<Arc<RevocationBus>>,
}

/// Where an adapter takes the Envoy authorization of the moment from (the HTTP
/// authorization listener, the module inside Envoy): a live reload (`server::Live`)
/// swaps it between two requests, never during one.
pub trait CurrentEnvoy: Send + Sync {
    fn envoy(&self) -> Arc<EnvoyAuthorization>;
}

/// How keygate's answers to Envoy are shaped (from `errors` and `policy`).
#[derive(Debug, Clone, Copy)]
pub struct EnvoyOptions {
    /// Remove the credential headers upstream (`policy.strip_credential_headers`).
    pub strip_credentials: bool,
    /// The principal in Envoy's dynamic metadata (`policy.dynamic_metadata`).
    pub dynamic_metadata: bool,
    /// The id of the settings these answers are decided by (`Config::rules_id`): in what
    /// keygate's module inside Envoy learns, which it keeps only if its own rules have
    /// the same.
    pub rules: RulesId,
}

impl EnvoyAuthorization {
    pub fn new(
        authorizer: Arc<Authorizer>,
        errors: Arc<ErrorShape>,
        options: EnvoyOptions,
    ) -> Self {
        // Credentials, the tenant, identity headers (to strip the client's), and method
        // overrides (judged or stripped). Traced, the trace context too.
        let trace = crate::telemetry::tracing_enabled()
            .then_some(crate::telemetry::TRACE_HEADERS)
            .into_iter()
            .flatten();
        let headers = HeaderFilter::new(
            authorizer
                .credentials()
                .header_names()
                .chain([authorizer.tenant_header()])
                .chain(METHOD_OVERRIDE_HEADERS)
                .chain(trace),
            IDENTITY_PREFIX,
        );
        let owned = OwnedHeaders::new(
            authorizer
                .credentials()
                .header_names()
                .chain([authorizer.tenant_header()]),
            IDENTITY_PREFIX,
        );
        EnvoyAuthorization {
            tenant_header: authorizer.tenant_header().into(),
            strip_overrides: authorizer.method_override() == MethodOverride::Strip,
            authorizer,
            options,
            headers,
            owned,
            errors,
            gate: None,
        }
    }

    /// Answers only once `bus` has its position in the revocation stream.
    pub fn gated(mut self, bus: Arc<RevocationBus>) -> Self {
        self.gate = Some(bus);
        self
    }

    /// The answer for an envoy-types CheckRequest (tests, benchmarks): decided as the same
    /// bytes from Envoy would be.
    pub async fn decide(&self, req: CheckRequest) -> Result<CheckResponse, Status> {
        let answer = self.decide_view(CheckRequestView::from(&req)).await?;
        answer
            .to_response()
            .map_err(|e| Status::internal(format!("keygate's answer does not decode: {e}")))
    }

    /// The answer for one CheckRequest: a response, or UNAVAILABLE.
    pub async fn decide_view(&self, req: CheckRequestView) -> Result<CheckAnswer, Status> {
        super::starting(&self.gate)?;
        let auth_req = envoy_wire::auth_request(req, &self.headers)
            .map_err(|e| Status::invalid_argument(format!("malformed CheckRequest: {e}")))?;
        let span = crate::telemetry::check_span(&auth_req.headers, "envoy");
        let after = self.learn_position(&auth_req);
        let decision = super::traced_check(&self.authorizer, &auth_req, span).await;
        match decision {
            Decision::Allow(allowed) => {
                Ok(CheckAnswer::Allow(self.allow(&auth_req, allowed, after)))
            }
            Decision::Deny(denial) => Ok(CheckAnswer::Message(self.deny(&denial))),
            Decision::Unavailable(u) => Err(super::unavailable(u.backend)),
        }
    }

    /// A request another adapter read (`api::http_authz`), decided and shaped as this
    /// adapter's answer would be: the same identity headers, removals and denials.
    pub(crate) async fn decide_request(
        &self,
        auth_req: AuthRequest,
        adapter: &'static str,
    ) -> Result<Answer, Status> {
        super::starting(&self.gate)?;
        let span = crate::telemetry::check_span(&auth_req.headers, adapter);
        let after = self.learn_position(&auth_req);
        let decision = super::traced_check(&self.authorizer, &auth_req, span).await;
        self.answer(&auth_req, decision, after)
    }

    /// The answer to `auth_req` from what this replica knows now, if it can be given
    /// without the store, argon2 or any other wait (`Authorizer::decide_known`), and
    /// only once the revocation follower has its position: for the module inside Envoy.
    pub(crate) fn decide_known(&self, auth_req: &AuthRequest) -> Option<Answer> {
        super::starting(&self.gate).ok()?;
        let decision = self.authorizer.decide_known(auth_req)?;
        self.answer(auth_req, decision, None).ok()
    }

    /// `after`: `learn_position`, taken before the decision.
    fn answer(
        &self,
        auth_req: &AuthRequest,
        decision: Decision,
        after: Option<Cursor>,
    ) -> Result<Answer, Status> {
        match decision {
            Decision::Allow(allowed) => Ok(Answer::Allow(self.allow(auth_req, allowed, after))),
            Decision::Deny(denial) => Ok(Answer::Deny {
                error: self.errors.answer_to(&denial).clone(),
                headers: denial_headers(&self.errors, &denial),
            }),
            Decision::Unavailable(u) => Err(super::unavailable(u.backend)),
        }
    }

    /// The id of the settings this adapter's answers are decided by.
    pub(crate) fn rules_id(&self) -> RulesId {
        self.options.rules
    }

    /// Where a decision finds the request's credential.
    pub(crate) fn credentials(&self) -> &crate::credential::CredentialSource {
        self.authorizer.credentials()
    }

    /// Whether every request of `principal` needs the service: its plan limits its rate,
    /// which only the service (with the store) counts.
    pub(crate) fn rate_limited(&self, principal: &crate::principal::Principal) -> bool {
        self.authorizer.limiter().limited(principal).is_some()
    }

    /// Whether a request header of this (lower-case) name is one a decision or an answer
    /// consults; other adapters keep only these, as this one does.
    pub(crate) fn consults(&self, name: &[u8]) -> bool {
        self.headers.wants(name)
    }

    /// The allow's parts: identity headers, the headers to remove, the client's headers.
    /// `after`: where the replica was when it started deciding, if the module inside
    /// Envoy asked to learn from this allow (`learn_position`).
    pub(crate) fn allow(
        &self,
        req: &AuthRequest,
        allowed: Allowed,
        after: Option<Cursor>,
    ) -> AllowAnswer {
        let mut remove: Vec<String> = Vec::new();
        let identity = match allowed.principal {
            Some(principal) => {
                let learn = after.and_then(|after| {
                    Learned::of(
                        &principal,
                        allowed.effective_tenant.as_deref(),
                        &after,
                        self.options.rules,
                    )
                    .map(|l| l.to_json())
                });
                let identity = Identity {
                    tenant: allowed.effective_tenant,
                    principal,
                    tenant_header: Arc::clone(&self.tenant_header),
                    metadata: self.options.dynamic_metadata,
                    lease_id: allowed.lease_id.clone(),
                    session: allowed
                        .session
                        .as_ref()
                        .map(|t| (t.token.clone(), super::rfc3339(t.expires_at_ms))),
                    learn,
                };
                // Any other x-keygate-* the client sent is not ours to vouch for: only the
                // ones this answer overwrites may stay.
                // Acting for no tenant: a client-sent tenant header must not pass either.
                for name in req.headers.keys() {
                    let ours = name.starts_with(IDENTITY_PREFIX)
                        || (identity.tenant.is_none() && name.as_str() == &*self.tenant_header);
                    if ours && !identity.headers().any(|(n, _)| n == name) {
                        remove.push(name.clone());
                    }
                }
                Some(identity)
            }
            None => {
                // Public route: nothing vouched for, so no identity header may pass.
                for name in req.headers.keys() {
                    if name.starts_with(IDENTITY_PREFIX) || name.as_str() == &*self.tenant_header {
                        remove.push(name.clone());
                    }
                }
                None
            }
        };
        // A client's `x_tenant_id`, `x.api.key` or `x.keygate.subject`: an upstream reading
        // `_` and `.` as `-` would take it for the header keygate read or vouches for, so
        // it goes too. Under `method_override: strip`, so do the method overrides.
        for name in req.headers.keys() {
            let goes = self.owned.is_alias(name)
                || (self.strip_overrides && is_method_override_header(name));
            if goes && !remove.contains(name) {
                remove.push(name.clone());
            }
        }
        if self.options.strip_credentials {
            for name in self.authorizer.credentials().header_names() {
                if req.headers.contains_key(name) {
                    remove.push(name.to_owned());
                }
            }
        }
        let response_headers = allowed
            .rate
            .map(|r| r.headers().to_vec())
            .unwrap_or_default();
        AllowAnswer {
            identity,
            remove,
            response_headers,
        }
    }

    /// Where this replica is in the revocation stream, if the request asks to learn from
    /// the answer (the module inside Envoy, `api::envoy_learn`) and the principal goes
    /// into dynamic metadata at all. Taken before the decision: every event up to it
    /// was applied before the decision started, so the answer is at least that fresh.
    fn learn_position(&self, req: &AuthRequest) -> Option<Cursor> {
        if !self.options.dynamic_metadata || !req.headers.contains_key(LEARN_HEADER) {
            return None;
        }
        Some(self.gate.as_ref()?.last_applied())
    }

    fn deny(&self, denial: &Denial) -> CheckResponse {
        let error = self.errors.answer_to(denial);
        let headers = denial_headers(&self.errors, denial)
            .iter()
            .map(|(name, value)| overwrite(name, value))
            .collect();
        CheckResponse {
            status: Some(rpc::Status {
                code: grpc_code(error.status) as i32,
                message: error.code.to_owned(),
                ..Default::default()
            }),
            dynamic_metadata: None,
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: i32::from(error.status),
                }),
                headers,
                body: error.body.to_string(),
            })),
        }
    }
}

#[tonic::async_trait]
impl Authorization for EnvoyAuthorization {
    async fn check(&self, request: Request<CheckRequestView>) -> Reply<CheckAnswer> {
        self.decide_view(request.into_inner())
            .await
            .map(Response::new)
    }
}

/// A decision shaped for a client, in no wire format.
pub(crate) enum Answer {
    Allow(AllowAnswer),
    Deny {
        error: PublicError,
        headers: Vec<(&'static str, String)>,
    },
}

/// The headers a denial sets on the client's response, in order: its content type, the
/// challenge of a 401, `retry-after` and the `x-ratelimit-*` of a rate limit. Every adapter
/// sends these.
pub(crate) fn denial_headers(errors: &ErrorShape, denial: &Denial) -> Vec<(&'static str, String)> {
    let error = errors.answer_to(denial);
    let mut headers = vec![("content-type", "application/json".to_owned())];
    if let Some(challenge) = errors.www_authenticate(error) {
        headers.push(("www-authenticate", challenge.to_owned()));
    }
    if let Some(secs) = denial.retry_after {
        headers.push(("retry-after", secs.to_string()));
    }
    headers.extend(denial.rate.iter().flat_map(|r| r.headers()));
    headers
}

/// The gRPC status code carried in a denial's `status` (any non-zero code denies).
fn grpc_code(http_status: u16) -> tonic::Code {
    match http_status {
        401 => tonic::Code::Unauthenticated,
        400 => tonic::Code::InvalidArgument,
        429 => tonic::Code::ResourceExhausted,
        _ => tonic::Code::PermissionDenied,
    }
}

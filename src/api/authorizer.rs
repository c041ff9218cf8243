//! `keygate.v1.Authorizer/Check`: the same decision as Envoy's Check, for internal callers
//! that hold a credential and want keygate's verdict in keygate's terms.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::{self, authorizer_server::Authorizer as AuthorizerApi};
use crate::authorizer::Authorizer;
use crate::decision::Decision;
use crate::principal::Principal;
use crate::request::AuthRequest;
use crate::revocation::RevocationBus;

pub struct AuthorizerService {
    authorizer: Arc<Authorizer>,
    opaque_errors: bool,
    gate: Option<Arc<RevocationBus>>,
}

impl AuthorizerService {
    pub fn new(authorizer: Arc<Authorizer>, opaque_errors: bool) -> Self {
        AuthorizerService {
            authorizer,
            opaque_errors,
            gate: None,
        }
    }

    /// Answers only once `bus` has its position in the revocation stream.
    pub fn gated(mut self, bus: Arc<RevocationBus>) -> Self {
        self.gate = Some(bus);
        self
    }
}

pub fn principal_proto(p: &Principal) -> proto::Principal {
    proto::Principal {
        tenant_id: p.tenant_id.clone(),
        subject: p.subject.clone(),
        key_id: p.key_id.clone().unwrap_or_default(),
        kind: p.kind_label().to_owned(),
        environment: p.environment.as_str().to_owned(),
        scopes: p.scopes.clone(),
        expires_at: p.expires_at.map(super::timestamp),
        plan: p.plan.clone().unwrap_or_default(),
        partner_id: p.partner_id.clone().unwrap_or_default(),
        service: p.service.clone().unwrap_or_default(),
        issuer: p.issuer.as_deref().unwrap_or_default().to_owned(),
    }
}

#[tonic::async_trait]
impl AuthorizerApi for AuthorizerService {
    async fn check(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        super::starting(&self.gate)?;
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
        let response = match self.authorizer.check(&req).await {
            Decision::Allow(a) => proto::CheckResponse {
                allowed: true,
                principal: a.principal.as_deref().map(principal_proto),
                effective_tenant: a.effective_tenant.unwrap_or_default(),
                denial: None,
            },
            Decision::Deny(d) => {
                let (code, message) = d.public(self.opaque_errors);
                proto::CheckResponse {
                    allowed: false,
                    principal: None,
                    effective_tenant: String::new(),
                    denial: Some(proto::Denial {
                        code: code.to_owned(),
                        message: message.to_owned(),
                        http_status: d.reason.http_status() as u32,
                    }),
                }
            }
            Decision::Unavailable(u) => {
                return Err(Status::unavailable(format!(
                    "authorization backend unavailable: {}",
                    u.backend
                )))
            }
        };
        Ok(Response::new(response))
    }
}

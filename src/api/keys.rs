//! `keygate.v1.Keys`: key administration over gRPC, on the admin listener. Every call
//! must carry `authorization: Bearer <admin token>`; there is no default credential.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::proto::{self, keys_server::Keys};
use super::{timestamp, Reply};
use crate::keys::{
    AdminError, KeyAdmin, KeyOwner, KeyUpdate, NewKey, RevokeTokens, StatusFilter, TokenAdmin,
};
use crate::secret::Secret;
use crate::store::{now_ms, KeyRecord};
use crate::telemetry::ErrorChain;

pub struct KeysService {
    admin: Arc<KeyAdmin>,
    tokens: Arc<TokenAdmin>,
}

impl KeysService {
    pub fn new(admin: Arc<KeyAdmin>, tokens: Arc<TokenAdmin>) -> Self {
        KeysService { admin, tokens }
    }
}

/// Checks the admin credential on every call, in constant time.
pub fn admin_auth(token: Secret) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    bearer_auth(vec![token], "admin credential missing or wrong")
}

/// Lets a call through only with `authorization: Bearer <one of tokens>` (compared in
/// constant time); otherwise UNAUTHENTICATED with `refusal`. No tokens: nothing passes.
pub fn bearer_auth(
    tokens: Vec<Secret>,
    refusal: &'static str,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Every token is compared, so the time taken does not say which one is close.
        let matched = tokens
            .iter()
            .fold(false, |any, t| t.matches(presented) | any);
        if matched {
            Ok(req)
        } else {
            Err(Status::unauthenticated(refusal))
        }
    }
}

pub(crate) fn status(e: AdminError) -> Status {
    match e {
        AdminError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        AdminError::NotFound(_) => Status::not_found(e.to_string()),
        AdminError::Unavailable(_) => Status::unavailable(ErrorChain(&e).to_string()),
        AdminError::Internal(m) => Status::internal(m),
    }
}

/// The answer of a call that answers with one key (`get`, `revoke`, `update`).
fn key_answer(answer: Result<KeyRecord, AdminError>) -> Reply<proto::Key> {
    answer
        .map(|rec| Response::new(key_proto(&rec)))
        .map_err(status)
}

/// A request's count of seconds (`expires_in_seconds`, `grace_seconds`): never negative.
fn seconds(field: &str, seconds: i64) -> Result<Duration, Status> {
    u64::try_from(seconds)
        .map(Duration::from_secs)
        .map_err(|_| Status::invalid_argument(format!("{field}: must not be negative")))
}

/// `expires_in_seconds`: a lifetime, or 0 for the default one.
fn expires_in(expires_in_seconds: i64) -> Result<Option<Duration>, Status> {
    let lifetime = seconds("expires_in_seconds", expires_in_seconds)?;
    Ok((!lifetime.is_zero()).then_some(lifetime))
}

pub fn key_proto(r: &KeyRecord) -> proto::Key {
    proto::Key {
        key_id: r.key_id.clone(),
        tenant_id: r.tenant_id.clone(),
        name: r.name.clone(),
        kind: r.kind.as_str().to_owned(),
        environment: r.environment.as_str().to_owned(),
        scopes: r.scopes.clone(),
        plan: r.plan.clone().unwrap_or_default(),
        created_at: Some(timestamp(r.created_at_ms)),
        expires_at: (r.expires_at_ms != crate::store::NEVER).then(|| timestamp(r.expires_at_ms)),
        revoked_at: r.revoked_at_ms.map(timestamp),
        status: r.status(now_ms()).as_str().to_owned(),
        token_prefix: r.token_prefix.clone(),
        partner_id: r.partner_id.clone().unwrap_or_default(),
        service: r.service.clone().unwrap_or_default(),
        rotated_from: r.rotated_from.clone().unwrap_or_default(),
        requests_allowed: r.usage.allowed,
        requests_denied: r.usage.denied,
        last_used_at: r.usage.last_used_at_ms.map(timestamp),
    }
}

#[tonic::async_trait]
impl Keys for KeysService {
    async fn create_key(
        &self,
        request: Request<proto::CreateKeyRequest>,
    ) -> Reply<proto::CreateKeyResponse> {
        let r = request.into_inner();
        let created = self
            .admin
            .create(NewKey {
                tenant_id: r.tenant_id,
                name: r.name,
                scopes: r.scopes,
                environment: r.environment,
                kind: r.kind,
                partner_id: r.partner_id,
                service: r.service,
                expires_in: expires_in(r.expires_in_seconds)?,
                never_expires: r.never_expires,
                plan: r.plan,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(proto::CreateKeyResponse {
            key: Some(key_proto(&created.record)),
            token: created.token,
        }))
    }

    async fn get_key(&self, request: Request<proto::GetKeyRequest>) -> Reply<proto::Key> {
        key_answer(self.admin.get(&request.into_inner().key_id).await)
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Reply<proto::ListKeysResponse> {
        let r = request.into_inner();
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let shown: StatusFilter = r.status.parse().map_err(status)?;
        let page = self
            .admin
            .list_with(
                &KeyOwner {
                    tenant_id: r.tenant_id.clone(),
                    partner_id: r.partner_id.clone(),
                    service: r.service.clone(),
                },
                shown,
                r.page_size as usize,
                after,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListKeysResponse {
            keys: page.keys.iter().map(key_proto).collect(),
            next_page_token: page.next_after.unwrap_or_default(),
        }))
    }

    async fn revoke_key(&self, request: Request<proto::RevokeKeyRequest>) -> Reply<proto::Key> {
        key_answer(self.admin.revoke(&request.into_inner().key_id).await)
    }

    async fn update_key(&self, request: Request<proto::UpdateKeyRequest>) -> Reply<proto::Key> {
        let r = request.into_inner();
        let update = KeyUpdate {
            name: r.name,
            scopes: r.scopes.map(|s| s.scopes),
            plan: r.plan,
            expires_in: expires_in(r.expires_in_seconds)?,
        };
        key_answer(self.admin.update(&r.key_id, update).await)
    }

    async fn delete_key(
        &self,
        request: Request<proto::DeleteKeyRequest>,
    ) -> Reply<proto::DeleteKeyResponse> {
        self.admin
            .delete(&request.into_inner().key_id)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::DeleteKeyResponse {}))
    }

    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Reply<proto::RotateKeyResponse> {
        let r = request.into_inner();
        let grace = seconds("grace_seconds", r.grace_seconds)?;
        let rotated = self.admin.rotate(&r.key_id, grace).await.map_err(status)?;
        Ok(Response::new(proto::RotateKeyResponse {
            key: Some(key_proto(&rotated.successor.record)),
            token: rotated.successor.token,
            previous: Some(key_proto(&rotated.previous)),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<proto::ListAuditRequest>,
    ) -> Reply<proto::ListAuditResponse> {
        let r = request.into_inner();
        let given = |s: String| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        let q = crate::audit::AuditQuery {
            key_id: given(r.key_id),
            tenant_id: given(r.tenant_id),
            since_ms: r.since.as_ref().map_or(0, super::timestamp_ms),
            limit: if r.limit == 0 { 100 } else { r.limit as usize },
        };
        let entries = self.admin.audit_log(&q).await.map_err(status)?;
        Ok(Response::new(proto::ListAuditResponse {
            entries: entries
                .into_iter()
                .map(|e| proto::AuditEntry {
                    id: e.id,
                    at: Some(timestamp(e.at_ms)),
                    action: e.action,
                    key_id: e.key_id.unwrap_or_default(),
                    tenant_id: e.tenant_id.unwrap_or_default(),
                    partner_id: e.partner_id.unwrap_or_default(),
                    actor: e.actor,
                    outcome: e.outcome,
                })
                .collect(),
        }))
    }

    async fn revoke_tokens(
        &self,
        request: Request<proto::RevokeTokensRequest>,
    ) -> Reply<proto::TokenRevocation> {
        let r = request.into_inner();
        let given = |s: String| (!s.is_empty()).then_some(s);
        let stored = self
            .tokens
            .revoke(RevokeTokens {
                issuer: r.issuer,
                jti: given(r.jti),
                subject: given(r.subject),
                before_ms: r.issued_before.as_ref().map(super::timestamp_ms),
            })
            .await
            .map_err(status)?;
        Ok(Response::new(super::revocations::token_revocation_proto(
            &stored,
        )))
    }
}

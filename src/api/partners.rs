//! `keygate.v1.Partners`: delegations, on the admin listener behind the admin credential.

use std::sync::Arc;

use tonic::{Request, Response};

use super::keys::status;
use super::proto::{self, partners_server::Partners};
use super::Reply;
use crate::keys::PartnerAdmin;
use crate::store::Delegation;

pub struct PartnersService {
    admin: Arc<PartnerAdmin>,
}

impl PartnersService {
    pub fn new(admin: Arc<PartnerAdmin>) -> Self {
        PartnersService { admin }
    }

    async fn set(
        &self,
        r: proto::DelegationRequest,
        granted: bool,
    ) -> Reply<proto::DelegationResponse> {
        let (d, changed) = self
            .admin
            .set(&r.partner_id, &r.tenant_id, granted)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::DelegationResponse {
            delegation: Some(delegation_proto(d)),
            changed,
        }))
    }
}

fn delegation_proto(d: Delegation) -> proto::Delegation {
    proto::Delegation {
        partner_id: d.partner_id,
        tenant_id: d.tenant_id,
    }
}

#[tonic::async_trait]
impl Partners for PartnersService {
    async fn delegate(
        &self,
        request: Request<proto::DelegationRequest>,
    ) -> Reply<proto::DelegationResponse> {
        self.set(request.into_inner(), true).await
    }

    async fn undelegate(
        &self,
        request: Request<proto::DelegationRequest>,
    ) -> Reply<proto::DelegationResponse> {
        self.set(request.into_inner(), false).await
    }

    async fn list_delegations(
        &self,
        request: Request<proto::ListDelegationsRequest>,
    ) -> Reply<proto::ListDelegationsResponse> {
        let r = request.into_inner();
        let all = self
            .admin
            .list(&r.partner_id, &r.tenant_id)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListDelegationsResponse {
            delegations: all.into_iter().map(delegation_proto).collect(),
        }))
    }
}

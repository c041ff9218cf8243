//! `PartnerAdmin`: grants and withdraws delegations (which tenants a partner's keys may
//! act for) and lists them. Audited; it must not know the transport, and changes nothing
//! when an argument is wrong.

use std::sync::Arc;

use super::{check_id, check_tenant, invalid, AdminError};
use crate::audit::{Audit, Subject};
use crate::store::{now_ms, Delegation, DelegationRecords, DelegationsOf};
use crate::tenant::Delegations;

/// Delegations: which tenants a partner's keys may act for. A change is written with its
/// stream event and forgotten here at once (other replicas forget on the event).
pub struct PartnerAdmin {
    store: Arc<dyn DelegationRecords>,
    delegations: Arc<Delegations>,
    audit: Arc<Audit>,
}

impl PartnerAdmin {
    pub fn new(
        store: Arc<dyn DelegationRecords>,
        delegations: Arc<Delegations>,
        audit: Arc<Audit>,
    ) -> Self {
        PartnerAdmin {
            store,
            delegations,
            audit,
        }
    }

    /// Grants (`granted`) or withdraws; returns whether anything changed. Audited.
    pub async fn set(
        &self,
        partner_id: &str,
        tenant_id: &str,
        granted: bool,
    ) -> Result<(Delegation, bool), AdminError> {
        let r = self.set_delegation(partner_id, tenant_id, granted).await;
        let subject = Subject {
            key_id: None,
            tenant_id: Some(tenant_id.trim().to_owned()).filter(|t| !t.is_empty()),
            partner_id: Some(partner_id.trim().to_owned()).filter(|p| !p.is_empty()),
        };
        let action = if granted {
            "delegation.granted"
        } else {
            "delegation.withdrawn"
        };
        self.audit.admin(action, subject, &r).await;
        r
    }

    async fn set_delegation(
        &self,
        partner_id: &str,
        tenant_id: &str,
        granted: bool,
    ) -> Result<(Delegation, bool), AdminError> {
        let d = Delegation {
            partner_id: check_id("partner_id", partner_id)?.to_owned(),
            tenant_id: check_tenant(tenant_id)?,
        };
        let changed = self.store.set_delegation(&d, granted, now_ms()).await?;
        if changed {
            self.delegations.changed(&d.partner_id, &d.tenant_id);
        }
        tracing::info!(event = "admin.delegation_set", partner = %d.partner_id, tenant = %d.tenant_id, granted, changed, "delegation set");
        Ok((d, changed))
    }

    /// A partner's tenants, or a tenant's partners: exactly one of the two.
    pub async fn list(
        &self,
        partner_id: &str,
        tenant_id: &str,
    ) -> Result<Vec<Delegation>, AdminError> {
        let of = match (partner_id.trim().is_empty(), tenant_id.trim().is_empty()) {
            (false, true) => DelegationsOf::Partner(check_id("partner_id", partner_id)?.to_owned()),
            (true, false) => DelegationsOf::Tenant(check_tenant(tenant_id)?),
            _ => {
                return Err(invalid(
                    "partner_id",
                    "give exactly one of partner_id and tenant_id",
                ))
            }
        };
        Ok(self.store.delegations(&of).await?)
    }
}

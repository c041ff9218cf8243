//! A partner's right to act for a tenant.

/// One delegation: `partner_id` may act for `tenant_id`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Delegation {
    pub partner_id: String,
    pub tenant_id: String,
}

/// Which delegations to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DelegationsOf {
    Partner(String),
    Tenant(String),
}

impl DelegationsOf {
    /// The delegation between the one listed and `other` (a tenant of the partner, or a
    /// partner of the tenant).
    pub fn with(&self, other: String) -> Delegation {
        match self {
            DelegationsOf::Partner(p) => Delegation {
                partner_id: p.clone(),
                tenant_id: other,
            },
            DelegationsOf::Tenant(t) => Delegation {
                partner_id: other,
                tenant_id: t.clone(),
            },
        }
    }
}

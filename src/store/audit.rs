//! The audit trail's entries as the store keeps them, and the query that reads them back.
//! What is audited, and when, is `crate::audit`'s business.

use serde::{Deserialize, Serialize};

/// One audited event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// The stream position, set when read back.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub at_ms: u64,
    /// `key.created`, `key.rotated`, `key.updated`, `key.revoked`, `key.deleted`,
    /// `delegation.granted`, `delegation.withdrawn`, `tokens.revoked`, `key.failures`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner_id: Option<String>,
    pub actor: String,
    /// `ok`, or `refused: <why>`.
    pub outcome: String,
}

/// What to read back: oldest first, from `since_ms`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub key_id: Option<String>,
    pub tenant_id: Option<String>,
    pub since_ms: u64,
    pub limit: usize,
}

impl AuditQuery {
    pub fn matches(&self, e: &AuditEntry) -> bool {
        e.at_ms >= self.since_ms
            && self
                .key_id
                .as_ref()
                .is_none_or(|k| e.key_id.as_ref() == Some(k))
            && self
                .tenant_id
                .as_ref()
                .is_none_or(|t| e.tenant_id.as_ref() == Some(t))
    }
}

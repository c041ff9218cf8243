//! A key as stored, its status and owner, the changes an update may make, its usage.

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::principal::{Environment, KeyKind};

/// A key as stored. Holds the argon2id hash of the secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    /// The tenant a tenant key belongs to; empty for partner and runtime keys.
    #[serde(default)]
    pub tenant_id: String,
    /// The partner a partner key belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner_id: Option<String>,
    /// The internal service a runtime key belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub name: String,
    pub kind: KeyKind,
    pub environment: Environment,
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The token's public head, `<prefix>_<env>_<key_id>`.
    pub token_prefix: String,
    /// argon2id PHC string of the secret (peppered).
    pub hash: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// The key this one replaced (`keys rotate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
    /// Kept beside the record, not in it (`add_usage`); never written by `create`.
    #[serde(skip)]
    pub usage: KeyUsage,
}

/// A key's use, as flushed by the replicas (accurate to their flush interval).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub allowed: u64,
    pub denied: u64,
    pub last_used_at_ms: Option<u64>,
}

/// Usage of one key since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub key_id: String,
    pub allowed: u64,
    pub denied: u64,
    pub last_used_at_ms: u64,
}

/// Usage a store could not write: the deltas of the parts that failed, and the first
/// failure. Every other part of the batch was written.
#[derive(Debug, thiserror::Error)]
// Not repeating its source: `telemetry::ErrorChain` prints it.
#[error("usage of {} key(s) was not written", .unwritten.len())]
pub struct UsageNotWritten {
    pub unwritten: Vec<UsageDelta>,
    #[source]
    pub error: StoreError,
}

/// `expires_at_ms` of a key that never expires.
pub const NEVER: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

/// Whose keys: the index a key is listed under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Tenant(String),
    Partner(String),
    Service(String),
}

impl Owner {
    /// The index's name in the store (`tenant:<id>`, `partner:<id>`, `service:<name>`).
    pub fn index_name(&self) -> String {
        match self {
            Owner::Tenant(t) => format!("tenant:{t}"),
            Owner::Partner(p) => format!("partner:{p}"),
            Owner::Service(s) => format!("service:{s}"),
        }
    }
}

impl KeyRecord {
    pub fn owner(&self) -> Owner {
        match (&self.partner_id, &self.service) {
            (Some(p), _) => Owner::Partner(p.clone()),
            (None, Some(s)) => Owner::Service(s.clone()),
            (None, None) => Owner::Tenant(self.tenant_id.clone()),
        }
    }

    pub fn status(&self, now_ms: u64) -> KeyStatus {
        if self.revoked_at_ms.is_some() {
            KeyStatus::Revoked
        } else if crate::principal::expired(self.expires_at_ms, now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

/// The fields an update may change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyChange {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// `Some(None)` clears the plan.
    pub plan: Option<Option<String>>,
    pub expires_at_ms: Option<u64>,
}

impl KeyChange {
    pub fn apply(&self, record: &mut KeyRecord) {
        if let Some(n) = &self.name {
            record.name = n.clone();
        }
        if let Some(s) = &self.scopes {
            record.scopes = s.clone();
        }
        if let Some(p) = &self.plan {
            record.plan = p.clone();
        }
        if let Some(e) = self.expires_at_ms {
            record.expires_at_ms = e;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    pub keys: Vec<KeyRecord>,
    /// The last key id of this page when more may follow.
    pub next_after: Option<String>,
}

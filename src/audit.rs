//! The audit trail: who changed which key, delegation or JWT revocation, when, and with
//! what outcome; and keys whose secrets are being guessed. Each entry is a structured
//! log event (target `audit`) and an entry of a bounded store stream, read back by
//! `keygate audit list`. It never holds a token or a secret: key ids, tenants, partners,
//! the actor (a fingerprint of the admin credential, or `keygate` itself) and outcomes.

use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::secret::Secret;
use crate::store::{now_ms, AuditLog};
use crate::telemetry::ErrorChain;

pub use crate::store::audit::{AuditEntry, AuditQuery};

/// Where audit entries go.
pub struct Audit {
    store: Arc<dyn AuditLog>,
    /// Who the admin API acts as: `admin:` and the first 8 bytes of SHA-256 of the admin
    /// credential, in hex (which credential, without the credential).
    admin_actor: String,
}

/// The subject of an entry.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub key_id: Option<String>,
    pub tenant_id: Option<String>,
    pub partner_id: Option<String>,
}

impl Audit {
    pub fn new(store: Arc<dyn AuditLog>, admin_token: &Secret) -> Self {
        let digest = Sha256::digest(admin_token.expose().as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Audit {
            store,
            admin_actor: format!("admin:{hex}"),
        }
    }

    /// An admin action's entry, with its outcome.
    pub async fn admin<T, E: std::error::Error>(
        &self,
        action: &str,
        subject: Subject,
        result: &Result<T, E>,
    ) {
        let outcome = match result {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("refused: {}", ErrorChain(e)),
        };
        self.record(action, subject, self.admin_actor.clone(), outcome)
            .await
    }

    /// An entry keygate makes of its own accord (e.g. a key's secret being guessed).
    pub async fn system(&self, action: &str, subject: Subject, outcome: String) {
        self.record(action, subject, "keygate".into(), outcome)
            .await
    }

    async fn record(&self, action: &str, subject: Subject, actor: String, outcome: String) {
        let entry = AuditEntry {
            id: String::new(),
            at_ms: now_ms(),
            action: action.to_owned(),
            key_id: subject.key_id,
            tenant_id: subject.tenant_id,
            partner_id: subject.partner_id,
            actor,
            outcome,
        };
        tracing::info!(
            target: "audit",
            event = "audit.recorded",
            action = %entry.action,
            key_id = entry.key_id.as_deref().unwrap_or(""),
            tenant = entry.tenant_id.as_deref().unwrap_or(""),
            partner = entry.partner_id.as_deref().unwrap_or(""),
            actor = %entry.actor,
            outcome = %entry.outcome,
            "audit"
        );
        if let Err(e) = self.store.append_audit(&entry).await {
            tracing::warn!(event = "audit.store_failed", error = %ErrorChain(&e), action = %entry.action, "cannot write the audit entry to the store; it is in this log only");
        }
    }

    pub async fn list(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, crate::store::StoreError> {
        self.store.audit(q).await
    }
}

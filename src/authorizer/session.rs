//! Session tokens: minting one from an API key (`Authorizer::mint_session`, and a route
//! that mints one for the request it allows), and judging one against its key's state
//! now (`session_principal`). The signing keys and the token format are
//! `jwt/session.rs`'s; what a stage's failure means for a mint is here, beside
//! `MintFailure`.

use std::sync::Arc;
use std::time::Duration;

use super::Authorizer;
use crate::authn::AuthnFailure;
use crate::decision::{DenyReason, SessionToken};
use crate::jwt::session::SessionKeys;
use crate::principal::{CredentialKind, KeyKind, Principal};
use crate::tenant::{self, TenantFailure, TenantRule};

/// A session token asked for (`keygate.v1.Authorizer/MintSessionToken`), unvalidated.
#[derive(Debug, Clone, Default)]
pub struct SessionRequest {
    /// The API key it is minted from.
    pub credential: String,
    /// The tenant it acts for (a partner key's delegated tenant); the key's own if empty.
    pub tenant_id: String,
    /// A subset of the key's scopes; all of them (but partner-only ones) if empty.
    pub scopes: Vec<String>,
    /// `sessions.lifetime` if `None`.
    pub ttl: Option<Duration>,
}

/// A minted session token, with what it grants.
#[derive(Debug, Clone)]
pub struct MintedSession {
    pub token: SessionToken,
    pub tenant_id: String,
    pub scopes: Vec<String>,
}

/// Why no session token was minted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MintFailure {
    /// `sessions` is not configured.
    Disabled,
    /// A bad argument, named.
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The credential's (or the request's) denial.
    Deny(DenyReason),
    Unavailable,
}

/// The API key it is minted from is not authenticated: denied, or undecided when the
/// store could not be asked.
impl From<AuthnFailure> for MintFailure {
    fn from(f: AuthnFailure) -> Self {
        match f {
            AuthnFailure::Deny(reason) => MintFailure::Deny(reason),
            AuthnFailure::Unavailable => MintFailure::Unavailable,
        }
    }
}

/// Its tenant cannot be settled: as when its API key is not authenticated.
impl From<TenantFailure> for MintFailure {
    fn from(f: TenantFailure) -> Self {
        AuthnFailure::from(f).into()
    }
}

impl From<DenyReason> for MintFailure {
    fn from(reason: DenyReason) -> Self {
        MintFailure::Deny(reason)
    }
}

impl Authorizer {
    /// Mints a session token from an API key: for the key's tenant (or a partner key's
    /// delegated one), a subset of its scopes, `sessions.lifetime` unless asked otherwise,
    /// never past the key's own expiry.
    pub async fn mint_session(&self, r: SessionRequest) -> Result<MintedSession, MintFailure> {
        let keys = self.sessions.as_deref().ok_or(MintFailure::Disabled)?;
        let invalid = |field, message: String| MintFailure::Invalid { field, message };
        let ttl = r.ttl.unwrap_or(keys.lifetime);
        if ttl < Duration::from_secs(1) || ttl > keys.max_lifetime {
            return Err(invalid(
                "ttl_seconds",
                format!(
                    "must be 1 to {} (sessions.max_lifetime)",
                    keys.max_lifetime.as_secs()
                ),
            ));
        }
        if let Some(bad) = r
            .scopes
            .iter()
            .find(|s| !crate::policy::valid_held_scope(s))
        {
            return Err(invalid("scopes", format!("{bad:?} is not a scope")));
        }
        let principal = self.authenticate(&r.credential).await?;
        if principal.credential != CredentialKind::ApiKey {
            return Err(invalid(
                "credential",
                "session tokens are minted from an API key".into(),
            ));
        }
        let requested = (!r.tenant_id.trim().is_empty()).then_some(r.tenant_id.as_str());
        let rule = if principal.kind == KeyKind::Partner {
            TenantRule::Required
        } else {
            TenantRule::Optional
        };
        let tenant = tenant::resolve(&principal, rule, requested, &self.delegations).await?;
        let scopes = if r.scopes.is_empty() {
            self.session_scopes(&principal)
        } else {
            let granted = |s: &String| {
                !self.policy.is_partner_scope(s) && self.policy.grants(&principal.scopes, s)
            };
            if !r.scopes.iter().all(granted) {
                return Err(DenyReason::InsufficientPermissions.into());
            }
            r.scopes
        };
        let tenant = Self::session_tenant(&principal, tenant)?;
        let minted = self.sign_session(keys, &principal, tenant, scopes, ttl);
        if let Some(key_id) = principal.key_id.as_deref() {
            self.usage.record(key_id, true);
        }
        Ok(minted)
    }

    /// What a session token of `parent` holds unless asked for less: its scopes but the
    /// partner-only ones (a session token never acts as a partner).
    pub(super) fn session_scopes(&self, parent: &Principal) -> Vec<String> {
        parent
            .scopes
            .iter()
            .filter(|s| !self.policy.is_partner_scope(s))
            .cloned()
            .collect()
    }

    /// The tenant a session token of `parent` would act in, or why it may not be minted.
    /// Checked before anything is spent (an admission, a lease), so a refusal leaves
    /// nothing behind.
    pub(super) fn session_tenant(
        parent: &Principal,
        tenant: Option<String>,
    ) -> Result<String, DenyReason> {
        // A runtime key serves internal routes only; a session token is for clients.
        if parent.kind == KeyKind::Runtime || parent.credential != CredentialKind::ApiKey {
            return Err(DenyReason::InsufficientPermissions);
        }
        tenant.ok_or(DenyReason::TenantRequired)
    }

    /// Signs a session token for an authenticated API key acting in `tenant_id` (already
    /// checked by `session_tenant`).
    pub(super) fn sign_session(
        &self,
        keys: &SessionKeys,
        parent: &Principal,
        tenant_id: String,
        scopes: Vec<String>,
        ttl: Duration,
    ) -> MintedSession {
        let now = crate::store::now_ms();
        let mut expires = now.saturating_add(ttl.as_millis() as u64);
        if let Some(key_expiry) = parent.expires_at {
            expires = expires.min(key_expiry);
        }
        let token = keys.sign(parent, &tenant_id, &scopes, now, expires);
        tracing::info!(
            event = "session.minted",
            key_id = parent.key_id.as_deref().unwrap_or(""),
            tenant = %tenant_id,
            "session token minted"
        );
        MintedSession {
            token,
            tenant_id,
            scopes,
        }
    }

    /// A session token's principal, judged on its key's state now (`principal_of`).
    pub(super) async fn session_principal(
        &self,
        token: &Principal,
    ) -> Result<Arc<Principal>, AuthnFailure> {
        let invalid = || AuthnFailure::Deny(DenyReason::InvalidToken);
        let key_id = token.key_id.as_deref().ok_or_else(invalid)?;
        let parent = self.authn.session_parent(key_id).await?;
        if parent.environment != token.environment {
            return Err(invalid());
        }
        match parent.kind {
            KeyKind::Tenant if parent.tenant_id == token.tenant_id => {}
            KeyKind::Partner => {
                let partner = parent.partner_id.as_deref().unwrap_or("");
                if !self
                    .delegations
                    .delegated(partner, &token.tenant_id)
                    .await?
                {
                    tracing::debug!(
                        event = "session.delegation_withdrawn",
                        key_id,
                        "session token refused: its tenant is no longer delegated"
                    );
                    return Err(invalid());
                }
            }
            _ => return Err(invalid()),
        }
        // What both hold: the token's scopes its key still grants, and the key's scopes
        // the token grants (a token's `contacts:*` and a key narrowed to `contacts:read`
        // leave `contacts:read`).
        let mut scopes: Vec<String> = Vec::with_capacity(token.scopes.len());
        let pairs = [
            (&token.scopes, &parent.scopes),
            (&parent.scopes, &token.scopes),
        ];
        for (candidates, granter) in pairs {
            for s in candidates {
                if self.policy.grants(granter, s) && !scopes.contains(s) {
                    scopes.push(s.clone());
                }
            }
        }
        let mut p = Principal::new(
            token.tenant_id.to_string(),
            token.subject.to_string(),
            KeyKind::Tenant,
            parent.environment,
            scopes,
        );
        p.credential = CredentialKind::Session;
        p.key_id = token.key_id.clone();
        p.plan = parent.plan.clone();
        p.expires_at = match (token.expires_at, parent.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        p.issuer = token.issuer.clone();
        p.token_ids = token.token_ids.clone();
        Ok(Arc::new(p))
    }
}

//! `TokenAdmin`: revokes JWTs of a configured issuer by `jti` or by subject, stores the
//! revocation with its event and applies it here at once. Audited; it must not know the
//! transport, and changes nothing when an argument is wrong.

use std::sync::Arc;

use super::{invalid, AdminError};
use crate::audit::{Audit, Subject};
use crate::jwt::revoked::RevokedTokens;
use crate::jwt::JwtVerifier;
use crate::store::{now_ms, TokenRevocation, TokenRevocations, TokenTarget};

/// What to revoke, as given by the caller (unvalidated): one of `jti` or `subject`.
#[derive(Debug, Clone, Default)]
pub struct RevokeTokens {
    /// The issuer's configured name.
    pub issuer: String,
    pub jti: Option<String>,
    pub subject: Option<String>,
    /// With `subject`: revoke tokens issued before this (unix ms); default now.
    pub before_ms: Option<u64>,
}

/// Longest `jti` or subject a revocation takes.
const MAX_CLAIM_LEN: usize = 1024;
/// How far in the future a cut-off may lie: clocks differ a little, never by minutes.
const MAX_CUTOFF_AHEAD_MS: u64 = 60_000;

/// JWT revocation: validated, stored with its event, and applied here at once (other
/// replicas get it from the stream).
pub struct TokenAdmin {
    store: Arc<dyn TokenRevocations>,
    jwt: Arc<JwtVerifier>,
    revoked: Arc<RevokedTokens>,
    audit: Arc<Audit>,
}

impl TokenAdmin {
    pub fn new(
        store: Arc<dyn TokenRevocations>,
        jwt: Arc<JwtVerifier>,
        revoked: Arc<RevokedTokens>,
        audit: Arc<Audit>,
    ) -> Self {
        TokenAdmin {
            store,
            jwt,
            revoked,
            audit,
        }
    }

    /// Revokes JWTs. Audited.
    pub async fn revoke(&self, req: RevokeTokens) -> Result<TokenRevocation, AdminError> {
        let r = self.revoke_tokens(req).await;
        self.audit
            .admin("tokens.revoked", Subject::default(), &r)
            .await;
        r
    }

    pub(crate) async fn revoke_tokens(
        &self,
        req: RevokeTokens,
    ) -> Result<TokenRevocation, AdminError> {
        let now = now_ms();
        let revocation = self.revocation(req, now)?;
        let stored = self.store.revoke_tokens(&revocation).await?;
        self.revoked.apply(&stored);
        tracing::info!(event = "admin.jwts_revoked", issuer = %stored.issuer, "JWTs revoked");
        Ok(stored)
    }

    fn revocation(&self, req: RevokeTokens, now: u64) -> Result<TokenRevocation, AdminError> {
        let lifetime = self.jwt.revocation_lifetime(&req.issuer).ok_or_else(|| {
            let names = self.jwt.issuer_names();
            if names.is_empty() {
                invalid("issuer", "no JWT issuer is configured")
            } else {
                invalid(
                    "issuer",
                    format!(
                        "no issuer named {:?} is configured (configured: {})",
                        req.issuer,
                        names.join(", ")
                    ),
                )
            }
        })?;
        let claim = |field: &'static str, value: String| {
            if value.is_empty() || value.len() > MAX_CLAIM_LEN {
                Err(invalid(
                    field,
                    format!("must be 1 to {MAX_CLAIM_LEN} bytes"),
                ))
            } else {
                Ok(value)
            }
        };
        let (target, cutoff) = match (req.jti, req.subject) {
            (Some(_), Some(_)) => return Err(invalid("jti", "give a jti or a subject, not both")),
            (None, None) => return Err(invalid("subject", "give a jti or a subject")),
            (Some(jti), None) => {
                if req.before_ms.is_some() {
                    return Err(invalid("before", "only with subject"));
                }
                // A token carrying this jti was issued by now, so it expires within its
                // issuer's bound from now.
                (
                    TokenTarget::Jti {
                        jti: claim("jti", jti)?,
                    },
                    now,
                )
            }
            (None, Some(subject)) => {
                let before_ms = req.before_ms.unwrap_or(now);
                if before_ms > now + MAX_CUTOFF_AHEAD_MS {
                    return Err(invalid("before", "must not be in the future"));
                }
                let subject = claim("subject", subject)?;
                (TokenTarget::Subject { subject, before_ms }, before_ms)
            }
        };
        Ok(TokenRevocation {
            issuer: req.issuer,
            target,
            at_ms: now,
            expires_at_ms: cutoff.saturating_add(lifetime.as_millis() as u64),
        })
    }
}

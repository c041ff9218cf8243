//! Credential → Principal. For API keys: parse (no I/O), then the cache, then on a miss
//! the store and argon2, once per token however many requests wait for it.
//!
//! The secret is checked before the key's state is looked at, so a caller without the
//! secret learns nothing about whether a key id is revoked or expired.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::apikey::{self, ApiKeysConfig, Argon2Config, HashError, SecretHasher};
use crate::cache::{CredentialCache, Digest, Verified};
use crate::credential::Credential;
use crate::decision::{Decision, DenyReason, Unavailable};
use crate::jwt::revoked::RevokedTokens;
use crate::principal::{CredentialKind, Environment, Principal};
use crate::store::{now_ms, KeyRecord, KeyRecords, KeyStatus, StoreError};
use crate::telemetry::{metrics, ErrorChain};
use crate::tenant::TenantFailure;

/// Why authentication did not produce a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthnFailure {
    Deny(DenyReason),
    /// The store could not be asked; the answer is unknown.
    Unavailable,
}

/// A caller not authenticated is denied, or undecided when the store could not be asked:
/// an outage is never a denial.
impl From<AuthnFailure> for Decision {
    fn from(f: AuthnFailure) -> Decision {
        match f {
            AuthnFailure::Deny(reason) => Decision::deny(reason),
            AuthnFailure::Unavailable => Decision::Unavailable(Unavailable::STORE),
        }
    }
}

/// A session token's tenant, settled again when it is judged (`Authorizer`).
impl From<TenantFailure> for AuthnFailure {
    fn from(f: TenantFailure) -> AuthnFailure {
        match f {
            TenantFailure::Deny(reason) => AuthnFailure::Deny(reason),
            TenantFailure::Unavailable => AuthnFailure::Unavailable,
        }
    }
}

pub struct Authenticator {
    store: Arc<dyn KeyRecords>,
    hasher: SecretHasher,
    cache: Arc<CredentialCache>,
    prefix: String,
    accept_test_keys: bool,
    failures: Arc<FailureBudget>,
    jwt: Arc<crate::jwt::JwtVerifier>,
    revoked_tokens: Arc<RevokedTokens>,
    audit: Arc<crate::audit::Audit>,
}

/// Failed verifications per key id in a fixed window (`api_keys.argon2.failures_per_key`
/// per `failure_window`): anyone who knows a key id can mint well-formed guesses (the
/// checksum is public), and each would cost one argon2 run. Past the bound, unverified
/// tokens for that key id are refused without argon2 until the window ends. One per
/// process: a live reload of the policy keeps it (its settings need a restart), so a
/// reload never gives a guesser a fresh window.
pub struct FailureBudget {
    counts: moka::sync::Cache<Box<str>, Arc<AtomicU32>>,
    limit: u32,
}

impl FailureBudget {
    pub fn new(cfg: &Argon2Config) -> Self {
        FailureBudget {
            // A window starts at a key id's first failure (time to live, not to idle).
            counts: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cfg.failure_window)
                .build(),
            limit: cfg.failures_per_key,
        }
    }

    fn exhausted(&self, key_id: &str) -> bool {
        self.counts
            .get(key_id)
            .is_some_and(|n| n.load(Ordering::Relaxed) >= self.limit)
    }

    /// Counts one failure; returns whether it used up the window's budget (once per
    /// window).
    fn failed(&self, key_id: &str) -> bool {
        let n = self
            .counts
            .get_with(key_id.into(), Arc::default)
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        n == self.limit
    }
}

impl Authenticator {
    // Each argument is a part the wiring (`server::rules`) shares between versions of the
    // rules; a struct of them would only restate that list.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn KeyRecords>,
        hasher: SecretHasher,
        cache: Arc<CredentialCache>,
        api_keys: &ApiKeysConfig,
        jwt: Arc<crate::jwt::JwtVerifier>,
        revoked_tokens: Arc<RevokedTokens>,
        audit: Arc<crate::audit::Audit>,
        failures: Arc<FailureBudget>,
    ) -> Self {
        Authenticator {
            store,
            hasher,
            cache,
            prefix: api_keys.prefix.clone(),
            accept_test_keys: api_keys.accept_test_keys,
            failures,
            jwt,
            revoked_tokens,
            audit,
        }
    }

    pub async fn authenticate(
        &self,
        credential: Credential<'_>,
    ) -> Result<Arc<Principal>, AuthnFailure> {
        match credential {
            Credential::None => Err(AuthnFailure::Deny(DenyReason::MissingCredentials)),
            Credential::ApiKey(token) => self.api_key(token).await,
            Credential::Jwt(token) => self.jwt_token(token).await,
            Credential::Unrecognized => Err(AuthnFailure::Deny(DenyReason::InvalidApiKey)),
        }
    }

    async fn api_key(&self, token: &str) -> Result<Arc<Principal>, AuthnFailure> {
        let parsed = self.parse_api_key(token)?;
        let digest = self.cache.digest(token);
        let lookup = self
            .cache
            .get_or_verify(digest, parsed.key_id, || {
                self.verify(parsed.key_id, parsed.secret, parsed.environment, digest)
            })
            .await;
        match lookup.value {
            Ok(verified) => api_key_answer(verified),
            Err(e) => {
                tracing::warn!(event = "authn.store_unavailable", key_id = parsed.key_id, error = %ErrorChain(&e), "cannot verify API key: store unavailable");
                Err(AuthnFailure::Unavailable)
            }
        }
    }

    /// The token's form, read with no I/O: a malformed key, or a test key where test keys
    /// are not accepted, is `invalid_api_key`.
    fn parse_api_key<'t>(&self, token: &'t str) -> Result<apikey::ParsedToken<'t>, AuthnFailure> {
        let parsed = match apikey::parse(token, &self.prefix) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(event = "authn.api_key_malformed", reason = %e, "API key rejected before lookup");
                return Err(AuthnFailure::Deny(DenyReason::InvalidApiKey));
            }
        };
        if parsed.environment == Environment::Test && !self.accept_test_keys {
            return Err(AuthnFailure::Deny(DenyReason::InvalidApiKey));
        }
        Ok(parsed)
    }

    /// `authenticate` on what this replica knows now, with no store read, no argon2 and
    /// no JWT validation: `None` where any of those would be needed (the module inside
    /// Envoy hands such a request to the service). A session token is never answered
    /// here: it is judged on its key's state, read apart.
    pub fn authenticate_known(
        &self,
        credential: Credential<'_>,
    ) -> Option<Result<Arc<Principal>, AuthnFailure>> {
        let (verified, jwt) = match credential {
            Credential::None => {
                return Some(Err(AuthnFailure::Deny(DenyReason::MissingCredentials)))
            }
            Credential::Unrecognized => {
                return Some(Err(AuthnFailure::Deny(DenyReason::InvalidApiKey)))
            }
            Credential::ApiKey(token) => match self.parse_api_key(token) {
                Err(failure) => return Some(Err(failure)),
                Ok(_) => (self.cache.peek(&self.cache.digest(token))?, false),
            },
            Credential::Jwt(token) => {
                if self.jwt.is_empty() {
                    return Some(Err(AuthnFailure::Deny(DenyReason::InvalidToken)));
                }
                (self.cache.peek(&self.cache.digest(token))?, true)
            }
        };
        if let Verified::Valid(p) = &verified {
            if p.credential == CredentialKind::Session {
                return None;
            }
        }
        Some(if jwt {
            self.jwt_answer(verified)
        } else {
            api_key_answer(verified)
        })
    }

    /// A JWT: validated once (shared by concurrent first uses), then answered from the
    /// cache until its `exp` (bounded by `cache.ttl`), like an API key. Every answer, cached
    /// or not, is checked against the JWT revocations: they name no token digest, so they
    /// cannot drop cache entries the way a key's revocation does.
    async fn jwt_token(&self, token: &str) -> Result<Arc<Principal>, AuthnFailure> {
        if self.jwt.is_empty() {
            return Err(AuthnFailure::Deny(DenyReason::InvalidToken));
        }
        let digest = self.cache.digest(token);
        let lookup = self
            .cache
            .get_or_verify(digest, JWT_CACHE_KEY, || async {
                Ok(match self.jwt.verify(token, now_ms()).await {
                    Ok(p) => Verified::Valid(Arc::new(p)),
                    Err(e) => {
                        tracing::info!(event = "authn.jwt_rejected", reason = %e, "JWT rejected");
                        Verified::Invalid(DenyReason::InvalidToken)
                    }
                })
            })
            .await;
        match lookup.value {
            Ok(verified) => self.jwt_answer(verified),
            Err(_) => Err(AuthnFailure::Unavailable),
        }
    }

    /// What a JWT's verification (cached or fresh) answers now: expired and revoked
    /// tokens are `invalid_token`; with the JWT revocations not loaded, undecided.
    fn jwt_answer(&self, verified: Verified) -> Result<Arc<Principal>, AuthnFailure> {
        match verified {
            Verified::Valid(p) => {
                let now = now_ms();
                if p.is_expired(now) {
                    return Err(AuthnFailure::Deny(DenyReason::InvalidToken));
                }
                match self.revoked_tokens.is_revoked(&p, now) {
                    Ok(false) => Ok(p),
                    Ok(true) => {
                        tracing::info!(
                            event = "authn.jwt_revoked",
                            issuer = p.issuer.as_deref().unwrap_or(""),
                            "JWT rejected: revoked"
                        );
                        Err(AuthnFailure::Deny(DenyReason::InvalidToken))
                    }
                    Err(e) => {
                        tracing::warn!(event = "authn.jwt_undecidable", error = %e, "cannot judge a JWT now");
                        Err(AuthnFailure::Unavailable)
                    }
                }
            }
            Verified::Invalid(_) | Verified::Refused(_) => {
                Err(AuthnFailure::Deny(DenyReason::InvalidToken))
            }
        }
    }

    /// The current state of the key a session token was minted from, as this replica
    /// knows it: its principal while it is active, `invalid_token` once it is revoked,
    /// deleted or expired. Read from the key's record (never from a secret), cached under
    /// the key's own state entry and dropped by the key's events like its token's entry,
    /// so once a replica has applied a key's change, no session token of that key is
    /// judged here on the key's old state.
    pub async fn session_parent(&self, key_id: &str) -> Result<Arc<Principal>, AuthnFailure> {
        let digest = self.cache.state_digest(key_id);
        let lookup = self
            .cache
            .get_or_verify(digest, key_id, || async {
                Ok(match self.store.get(key_id).await? {
                    None => Verified::Invalid(DenyReason::InvalidApiKey),
                    Some(record) => match record.status(now_ms()) {
                        KeyStatus::Revoked => Verified::Invalid(DenyReason::RevokedApiKey),
                        KeyStatus::Expired => Verified::Invalid(DenyReason::ExpiredApiKey),
                        KeyStatus::Active => Verified::Valid(Arc::new(principal_of(&record))),
                    },
                })
            })
            .await;
        match lookup.value {
            Ok(Verified::Valid(p)) if !p.is_expired(now_ms()) => Ok(p),
            Ok(_) => {
                tracing::debug!(
                    event = "authn.session_key_inactive",
                    key_id,
                    "session token refused: its key is no longer active"
                );
                Err(AuthnFailure::Deny(DenyReason::InvalidToken))
            }
            Err(e) => {
                tracing::warn!(event = "authn.session_key_unreadable", key_id, error = %ErrorChain(&e), "cannot read a session token's key: store unavailable");
                Err(AuthnFailure::Unavailable)
            }
        }
    }

    /// Store + argon2: what is true of this token now. argon2 is skipped when this token
    /// was verified against the same stored hash before (its entry expired, the record
    /// is read again for its state).
    async fn verify(
        &self,
        key_id: &str,
        secret: &str,
        environment: Environment,
        digest: Digest,
    ) -> Result<Verified, StoreError> {
        let Some((record, verifier)) = self.store.get_verifiable(key_id).await? else {
            tracing::debug!(
                event = "authn.api_key_unknown",
                key_id,
                "API key id unknown"
            );
            return Ok(Verified::Invalid(DenyReason::InvalidApiKey));
        };
        if record.environment != environment {
            return Ok(Verified::Invalid(DenyReason::InvalidApiKey));
        }
        let verified = if self.cache.verified_before(key_id, &digest, &record.hash) {
            Ok(true)
        } else if let Some(stored) = verifier.as_deref() {
            // Another replica (or an earlier start) ran argon2 for this key's token: its
            // verifier answers for the one secret this key id has, right or wrong.
            Ok(self.hasher.verifier_matches(key_id, secret, stored))
        } else if self.failures.exhausted(key_id) {
            metrics().argon2_refused.inc();
            tracing::debug!(
                event = "authn.api_key_guesses_refused",
                key_id,
                "API key verification refused: too many wrong secrets"
            );
            return Ok(Verified::Refused(DenyReason::InvalidApiKey));
        } else {
            let verified = self.hasher.verify(secret, &record.hash).await;
            if matches!(verified, Ok(true)) && record.revoked_at_ms.is_none() {
                self.leave_verifier(key_id, secret).await;
            }
            verified
        };
        match verified {
            Ok(true) => self.cache.note_verified(key_id, digest, &record.hash),
            Ok(false) => {
                metrics().bad_secrets.inc();
                if self.failures.failed(key_id) {
                    // Someone is guessing at this key: say so once per window.
                    let subject = crate::audit::Subject {
                        key_id: Some(key_id.to_owned()),
                        tenant_id: (!record.tenant_id.is_empty()).then(|| record.tenant_id.clone()),
                        partner_id: record.partner_id.clone(),
                    };
                    self.audit
                        .system(
                            "key.failures",
                            subject,
                            format!(
                                "{} wrong secrets within the failure window; further guesses are refused without argon2",
                                self.failures.limit
                            ),
                        )
                        .await;
                }
                tracing::info!(
                    event = "authn.api_key_wrong_secret",
                    key_id,
                    "wrong secret presented for API key"
                );
                return Ok(Verified::Invalid(DenyReason::InvalidApiKey));
            }
            Err(e @ HashError::Busy(_)) => {
                tracing::warn!(event = "authn.argon2_unavailable", key_id, error = %e, "cannot verify API key now");
                return Err(StoreError::unavailable("verifying an API key", e));
            }
            Err(e) => {
                tracing::error!(event = "authn.api_key_hash_unreadable", key_id, error = %e, "API key hash cannot be verified");
                return Err(StoreError::Corrupt(e.to_string()));
            }
        }
        Ok(match record.status(now_ms()) {
            KeyStatus::Revoked => Verified::Invalid(DenyReason::RevokedApiKey),
            KeyStatus::Expired => Verified::Invalid(DenyReason::ExpiredApiKey),
            KeyStatus::Active => Verified::Valid(Arc::new(principal_of(&record))),
        })
    }
}

impl Authenticator {
    /// Leaves the verifier of a token argon2 has just accepted beside its key's record,
    /// so no other replica runs argon2 for it. A failure costs only that: logged, not
    /// turned into a denial.
    async fn leave_verifier(&self, key_id: &str, secret: &str) {
        let verifier = self.hasher.verifier(key_id, secret);
        if let Err(e) = self.store.set_verifier(key_id, &verifier).await {
            tracing::warn!(event = "authn.verifier_not_stored", key_id, error = %ErrorChain(&e), "cannot store an API key's verifier; other replicas will run argon2 for it");
        }
    }
}

/// The cache's invalidation name for JWT entries: no API key id has this shape, so no
/// key's revocation touches them (a flush does).
/// What an API key's verification (cached or fresh) answers now: an expired key is
/// `expired_api_key`.
fn api_key_answer(verified: Verified) -> Result<Arc<Principal>, AuthnFailure> {
    match verified {
        Verified::Valid(p) if p.is_expired(now_ms()) => {
            Err(AuthnFailure::Deny(DenyReason::ExpiredApiKey))
        }
        Verified::Valid(p) => Ok(p),
        Verified::Invalid(reason) | Verified::Refused(reason) => Err(AuthnFailure::Deny(reason)),
    }
}

const JWT_CACHE_KEY: &str = "jwt";

pub fn principal_of(record: &KeyRecord) -> Principal {
    let mut p = Principal::new(
        record.tenant_id.clone(),
        format!("key:{}", record.key_id),
        record.kind,
        record.environment,
        record.scopes.clone(),
    );
    p.key_id = Some(record.key_id.as_str().into());
    p.partner_id = record.partner_id.as_deref().map(Into::into);
    p.service = record.service.as_deref().map(Into::into);
    p.plan = record.plan.as_deref().map(Into::into);
    p.expires_at = Some(record.expires_at_ms);
    p
}

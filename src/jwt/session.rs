//! keygate's own session tokens: short-lived EdDSA JWTs minted from an API key, for
//! clients (WebSockets, browsers) that must not hold the key itself.
//!
//! Owns the signing keys (the first signs, all verify), their public JWKS, and the claims
//! a session token carries. Verification is the JWT issuer machinery's: the verifier
//! gets these keys as one more issuer, named `session`, whose tokens become principals
//! that act for their parent key (its id, environment and plan). Revoking or rotating
//! the parent revokes the issuer's tokens of subject `key:<id>` (`keys.rs`). What may be
//! minted (which key, which tenant, which scopes) is the authorizer's decision, not this
//! module's. A minted token is a `decision::SessionToken` (plain data, re-exported here).
//! Its setting (`sessions`) is `session/config.rs`.

mod config;

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ed25519_dalek::SigningKey;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use rand::{Rng, TryRngCore};
use serde::Serialize;

use crate::principal::Principal;
use crate::secret::Secret;
use crate::settings::ConfigError;

pub use config::{SessionsConfig, SigningKeyConfig};

/// What `sign` returns: plain data the decision carries, defined there.
pub use crate::decision::SessionToken;

/// The configured name of keygate's own issuer: in revocations, metrics and logs.
pub const ISSUER_NAME: &str = "session";

/// Claims a session token carries beyond the usual ones; read back by the verifier.
pub const CLAIM_KEY_ID: &str = "key_id";
pub const CLAIM_ENVIRONMENT: &str = "env";
pub const CLAIM_PLAN: &str = "plan";

/// The signing keys and the rules of keygate's session tokens.
pub struct SessionKeys {
    signing_kid: String,
    signing: EncodingKey,
    /// Every configured key's public half, by `kid`.
    public: Vec<(String, DecodingKey)>,
    jwks: Arc<str>,
    pub issuer: String,
    pub audience: String,
    pub lifetime: Duration,
    pub max_lifetime: Duration,
    pub leeway: Duration,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("signing_kid", &self.signing_kid)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    tenant_id: &'a str,
    scope: String,
    iat: u64,
    exp: u64,
    jti: String,
    key_id: &'a str,
    env: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<&'a str>,
}

impl SessionKeys {
    /// The configured keys (`None` when sessions are off). `secret` reads a key by the
    /// variable named in its `key_env`.
    pub fn load(
        cfg: &SessionsConfig,
        secret: impl Fn(&str) -> Result<Option<Secret>, ConfigError>,
    ) -> Result<Option<SessionKeys>, ConfigError> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        if cfg.ephemeral_key {
            let seed: [u8; 32] = rand::rngs::OsRng.unwrap_err().random();
            let key = encoding_key(&SigningKey::from_bytes(&seed));
            keys.push(("ephemeral".to_owned(), key));
        }
        for (i, k) in cfg.signing_keys.iter().enumerate() {
            let field = format!("sessions.signing_keys[{i}].key_env");
            let pem = secret(&k.key_env)?.ok_or_else(|| {
                ConfigError::new(
                    &field,
                    format!(
                        "{} (or {}_FILE) is not set: it holds the Ed25519 private key `{}`",
                        k.key_env, k.key_env, k.kid
                    ),
                )
            })?;
            // jsonwebtoken reads the PEM armour (any line width, text around it), the
            // dalek the PKCS#8 inside (either version: with the public key or without).
            let key = EncodingKey::from_ed_pem(pem.expose().as_bytes()).ok();
            let key = key.and_then(|k| SigningKey::from_pkcs8_der(k.as_bytes()).ok());
            let key = key.ok_or_else(|| {
                ConfigError::new(
                    &field,
                    format!(
                        "{} is not an Ed25519 private key in PKCS#8 PEM \
                         (openssl genpkey -algorithm ed25519)",
                        k.key_env
                    ),
                )
            })?;
            keys.push((k.kid.clone(), encoding_key(&key)));
        }
        let mut public = Vec::new();
        let mut jwks = JwkSet { keys: Vec::new() };
        for (kid, key) in &keys {
            let mut jwk = Jwk::from_encoding_key(key, Algorithm::EdDSA).map_err(|e| {
                ConfigError::new("sessions.signing_keys", format!("key {kid}: {e}"))
            })?;
            jwk.common.key_id = Some(kid.clone());
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            jwk.common.key_algorithm = Some(KeyAlgorithm::EdDSA);
            let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| {
                ConfigError::new("sessions.signing_keys", format!("key {kid}: {e}"))
            })?;
            public.push((kid.clone(), decoding));
            jwks.keys.push(jwk);
        }
        let jwks = serde_json::to_string(&jwks).expect("a JWKS serializes");
        let (signing_kid, signing) = keys.swap_remove(0);
        Ok(Some(SessionKeys {
            signing_kid,
            signing,
            public,
            jwks: jwks.into(),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            lifetime: cfg.lifetime,
            max_lifetime: cfg.max_lifetime,
            leeway: cfg.leeway,
        }))
    }

    /// The public keys, as served at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Arc<str> {
        self.jwks.clone()
    }

    /// The keys tokens are verified with, by `kid`.
    pub(super) fn public_keys(&self) -> impl Iterator<Item = (&str, &DecodingKey)> {
        self.public.iter().map(|(kid, k)| (kid.as_str(), k))
    }

    /// Signs a token for `parent` acting in `tenant` with `scopes`, issued at `now_ms`
    /// and expiring at `expires_at_ms` (both already decided by the caller).
    pub fn sign(
        &self,
        parent: &Principal,
        tenant: &str,
        scopes: &[String],
        now_ms: u64,
        expires_at_ms: u64,
    ) -> SessionToken {
        let key_id = parent.key_id.as_deref().unwrap_or_default();
        let claims = Claims {
            iss: &self.issuer,
            aud: &self.audience,
            sub: &parent.subject,
            tenant_id: tenant,
            scope: scopes.join(" "),
            iat: now_ms / 1000,
            exp: expires_at_ms / 1000,
            jti: crate::secret::random_base62(22),
            key_id,
            env: parent.environment.as_str(),
            plan: parent.plan.as_deref(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.signing_kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.signing)
            .expect("an Ed25519 key signs any claims");
        SessionToken {
            token: Secret::new(token),
            // Whole seconds, as `exp` says.
            expires_at_ms: (expires_at_ms / 1000) * 1000,
        }
    }
}

/// `key` as jsonwebtoken takes an Ed25519 key: PKCS#8 DER without the public key (the
/// form `openssl genpkey` writes, and the only one its JWK conversion reads).
fn encoding_key(key: &SigningKey) -> EncodingKey {
    let der = KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_der()
    .expect("an Ed25519 seed encodes");
    EncodingKey::from_ed_der(der.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::{Environment, KeyKind};

    fn ephemeral() -> SessionKeys {
        let cfg = SessionsConfig {
            ephemeral_key: true,
            ..SessionsConfig::default()
        };
        SessionKeys::load(&cfg, |_| Ok(None)).unwrap().unwrap()
    }

    #[test]
    fn an_ephemeral_key_signs_what_its_published_half_verifies_and_each_start_has_its_own() {
        let keys = ephemeral();
        let parent = Principal::new(
            "t".into(),
            "key:k".into(),
            KeyKind::Tenant,
            Environment::Live,
            vec![],
        );
        let now_ms = 1_700_000_000_000;
        let token = keys.sign(&parent, "t", &[], now_ms, now_ms + 60_000);
        let (kid, public) = keys.public_keys().next().unwrap();
        assert_eq!(kid, "ephemeral");
        let mut rules = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        rules.validate_exp = false;
        rules.set_audience(&[&keys.audience]);
        let claims =
            jsonwebtoken::decode::<serde_json::Value>(token.token.expose(), public, &rules)
                .expect("verified with the published key");
        assert_eq!(claims.claims["sub"], "key:k");
        assert_ne!(keys.jwks(), ephemeral().jwks());
    }
}

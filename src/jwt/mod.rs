//! JWTs from configured issuers: a token → a principal, or why not.
//!
//! Owns signature and claim validation (with `jsonwebtoken`), the issuers' key sets, and
//! the mapping of claims to a principal. A token costs no I/O, except one whose `kid` its
//! issuer's JWKS URL does not have yet: that refetches the set (rate-limited, shared by
//! concurrent callers) before the token is judged. A failing URL keeps the last good set,
//! and an unknown `kid` is `invalid_token` then, never UNAVAILABLE.
//! It must not guess: the issuer is chosen by the token's `iss`, the key by its `kid`,
//! and the algorithm must be one the issuer allows *and* match the key's kind, so an
//! RSA public key can never be used as an HMAC secret, and `alg: none` is never accepted
//! (`jsonwebtoken` has no such algorithm). Every failure is one public code,
//! `invalid_token`; the reason stays in the log.
//!
//! Its setting (`jwt`: the issuers) is `config.rs`; keygate's own session tokens and
//! theirs (`sessions`) are `session.rs` and `session/config.rs`.
//!
//! One file over 500 lines because it is one thing: from a token's bytes to a principal
//! (issuer choice, algorithm and key check, claim mapping); where the keys come from is
//! `jwks.rs`.

mod config;
mod jwks;
pub mod revoked;
pub mod session;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::file_watch::FileWatch;
use crate::principal::{CredentialKind, Environment, KeyKind, Principal, TokenIds};
use crate::secret::Secret;
use crate::settings::ConfigError;

pub use config::{ClaimsConfig, IssuerConfig, JwtConfig, ALGORITHMS};
pub use jwks::JWKS_MAX_BYTES;
use jwks::{FileJwks, KeySet, Keys, RemoteJwks, FILE_CHECK};

/// Why a token is not valid. Only for logs and tests: the client sees `invalid_token`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token longer than jwt.max_token_bytes")]
    TooLarge,
    #[error("token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("no configured issuer has this iss")]
    UnknownIssuer,
    #[error("issuer {issuer}: no key with this kid")]
    UnknownKey { issuer: Arc<str> },
    #[error("issuer {issuer}: {reason}")]
    Rejected { issuer: Arc<str>, reason: String },
    #[error("issuer {issuer}: claim {claim} missing or not a string")]
    MissingClaim { issuer: Arc<str>, claim: String },
}

impl JwtError {
    /// The configured name of the issuer the token was judged by, if it got that far.
    pub fn issuer(&self) -> Option<&str> {
        match self {
            JwtError::UnknownKey { issuer }
            | JwtError::Rejected { issuer, .. }
            | JwtError::MissingClaim { issuer, .. } => Some(issuer),
            JwtError::TooLarge | JwtError::Malformed(_) | JwtError::UnknownIssuer => None,
        }
    }
}

/// The issuers' keys and rules, built once from the configuration.
pub struct JwtVerifier {
    issuers: Vec<Issuer>,
    max_token_bytes: usize,
}

struct Issuer {
    name: Arc<str>,
    iss: String,
    /// One per allowed algorithm: `jsonwebtoken` checks a token against one key family
    /// at a time, and the token's own `alg` picks it (only from this list).
    validations: Vec<(Algorithm, Validation)>,
    keys: Keys,
    claims: ClaimsConfig,
    roles_claim: Option<String>,
    roles: HashMap<String, Vec<String>>,
    leeway_secs: u64,
    max_lifetime_secs: u64,
    /// keygate's own session tokens: their principal acts for the parent key.
    session: bool,
}

/// Only what is read before the signature is checked: which issuer to ask.
#[derive(serde::Deserialize)]
struct Unverified {
    iss: Option<String>,
}

impl JwtVerifier {
    /// `secret` gives an HS* issuer's shared secret by the name in its `secret_env`.
    /// `sessions`: keygate's own session keys, accepted as the issuer `session`.
    pub fn new(
        cfg: &JwtConfig,
        sessions: Option<&session::SessionKeys>,
        secret: impl Fn(&str) -> Result<Option<Secret>, ConfigError>,
    ) -> Result<Self, ConfigError> {
        let mut issuers = Vec::with_capacity(cfg.issuers.len() + 1);
        for (i, c) in cfg.issuers.iter().enumerate() {
            issuers.push(Issuer::new(i, c, &secret)?);
        }
        issuers.extend(sessions.map(Issuer::session));
        Ok(JwtVerifier {
            issuers,
            max_token_bytes: cfg.max_token_bytes,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// How long after its cut-off a revocation of `issuer`'s tokens (by configured name)
    /// must be kept: no token it matches is valid later (`max_token_lifetime` + `leeway`).
    /// `None` if no issuer has that name.
    pub fn revocation_lifetime(&self, issuer: &str) -> Option<Duration> {
        self.issuers
            .iter()
            .find(|i| &*i.name == issuer)
            .map(|i| Duration::from_secs(i.max_lifetime_secs + i.leeway_secs))
    }

    /// The configured issuers' names, for messages.
    pub fn issuer_names(&self) -> Vec<&str> {
        self.issuers.iter().map(|i| &*i.name).collect()
    }

    /// Keeps every key set fresh until `stop` turns true: JWKS URLs fetched now, then
    /// every `jwks_refresh`; JWKS files re-read when they change.
    pub async fn refresh_in_background(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let (mut files, mut remotes) = (Vec::new(), Vec::new());
        for issuer in &self.issuers {
            match &issuer.keys {
                Keys::File(f) => files.push(f.clone()),
                Keys::Remote(r) => remotes.push(r.clone()),
                Keys::Shared(_) | Keys::Own(_) => {}
            }
        }
        for file in files {
            let (mut stop, mut changes) = (stop.clone(), file.changes.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        () = changes.changed() => file.reload(),
                    }
                }
            });
        }
        if remotes.is_empty() {
            return;
        }
        let refresh = remotes
            .iter()
            .map(|r| r.refresh)
            .min()
            .unwrap_or(Duration::from_secs(300));
        loop {
            for r in &remotes {
                r.refetch(r.refresh / 2).await;
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(refresh) => {}
            }
        }
    }

    /// The principal a valid token names. Counted by issuer and result
    /// (`keygate_jwt_validations_total`; a token no issuer claims counts as `unknown`).
    pub async fn verify(&self, token: &str, now_ms: u64) -> Result<Principal, JwtError> {
        let result = self.validate(token, now_ms).await;
        let (issuer, outcome) = match &result {
            Ok(p) => (p.issuer.as_deref().unwrap_or("unknown"), "valid"),
            Err(e) => (e.issuer().unwrap_or("unknown"), "invalid"),
        };
        crate::telemetry::metrics()
            .jwt_validations
            .with_label_values(&[issuer, outcome])
            .inc();
        result
    }

    async fn validate(&self, token: &str, now_ms: u64) -> Result<Principal, JwtError> {
        if token.len() > self.max_token_bytes {
            return Err(JwtError::TooLarge);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        let peek: Unverified = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| JwtError::Malformed(e.to_string()))?;
        let issuer = peek
            .iss
            .and_then(|iss| self.issuers.iter().find(|i| i.iss == iss))
            .ok_or(JwtError::UnknownIssuer)?;
        let kid = header.kid.as_deref();
        let set = match &issuer.keys {
            Keys::Shared(_) => None,
            Keys::Own(set) => Some(set.clone()),
            Keys::File(file) => Some(file.current()),
            Keys::Remote(remote) => {
                let mut set = remote.current();
                if set.get(kid).is_none() {
                    // A rotation this replica has not seen yet, or a made-up kid: ask the
                    // URL again, at most once per `jwks_refetch_min`.
                    remote.refetch(remote.refetch_min).await;
                    set = remote.current();
                }
                Some(set)
            }
        };
        let key = match (&issuer.keys, &set) {
            (Keys::Shared(k), _) => Some(k),
            (_, Some(set)) => set.get(kid),
            _ => None,
        }
        .ok_or_else(|| JwtError::UnknownKey {
            issuer: issuer.name.clone(),
        })?;
        let validation = issuer
            .validations
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, v)| v)
            .ok_or_else(|| JwtError::Rejected {
                issuer: issuer.name.clone(),
                reason: format!("algorithm {:?} is not allowed for this issuer", header.alg),
            })?;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, key, validation).map_err(|e| {
                JwtError::Rejected {
                    issuer: issuer.name.clone(),
                    reason: e.to_string(),
                }
            })?;
        issuer.principal(&data.claims, now_ms)
    }
}

impl Issuer {
    fn new(
        i: usize,
        c: &IssuerConfig,
        secret: &impl Fn(&str) -> Result<Option<Secret>, ConfigError>,
    ) -> Result<Self, ConfigError> {
        let field = |f: &str| format!("jwt.issuers[{i}].{f}");
        let algorithms: Vec<Algorithm> = c
            .algorithms
            .iter()
            .map(|a| {
                Algorithm::from_str(a)
                    .map_err(|e| ConfigError::new(field("algorithms"), e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let keys = match (&c.secret_env, &c.jwks_file) {
            (None, None) if c.jwks_url.is_some() => Keys::Remote(Arc::new(RemoteJwks {
                issuer: Arc::from(c.name.as_str()),
                url: c.jwks_url.clone().unwrap_or_default(),
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| ConfigError::new(field("jwks_url"), e.to_string()))?,
                set: RwLock::default(),
                fetching: std::sync::Mutex::default(),
                fetched: tokio::sync::watch::Sender::new(0),
                refetch_min: c.jwks_refetch_min,
                refresh: c.jwks_refresh,
            })),
            (Some(var), _) => {
                let value = secret(var)?.ok_or_else(|| {
                    ConfigError::new(
                        var.clone(),
                        format!("not set: the shared secret of JWT issuer {}", c.name),
                    )
                })?;
                if value.expose().len() < 32 {
                    return Err(ConfigError::new(
                        var.clone(),
                        "must be at least 32 bytes long",
                    ));
                }
                Keys::Shared(
                    DecodingKey::from_secret(value.expose().as_bytes())
                        .map_err(|e| ConfigError::new(var.clone(), e.to_string()))?,
                )
            }
            (None, Some(path)) => {
                // Before reading, so that a change made while reading is seen.
                let changes = FileWatch::new([path], FILE_CHECK);
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(field("jwks_file"), format!("cannot read {path}: {e}"))
                })?;
                let set = KeySet::from_jwks(&c.name, &text)
                    .map_err(|e| ConfigError::new(field("jwks_file"), e))?;
                Keys::File(Arc::new(FileJwks {
                    issuer: Arc::from(c.name.as_str()),
                    path: path.clone(),
                    set: RwLock::new(Arc::new(set)),
                    changes,
                }))
            }
            (None, None) => return Err(ConfigError::new(field("jwks_file"), "no key source")),
        };
        let validations = algorithms
            .into_iter()
            .map(|alg| {
                let mut v = Validation::new(alg);
                v.leeway = c.leeway.as_secs();
                v.validate_nbf = true;
                v.set_issuer(&[c.issuer.as_str()]);
                v.set_audience(&c.audiences);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                (alg, v)
            })
            .collect();
        Ok(Issuer {
            name: Arc::from(c.name.as_str()),
            iss: c.issuer.clone(),
            validations,
            keys,
            claims: c.claims.clone(),
            roles_claim: c.roles_claim.clone(),
            roles: c.roles.clone(),
            leeway_secs: c.leeway.as_secs(),
            max_lifetime_secs: c.max_token_lifetime.as_secs(),
            session: false,
        })
    }

    /// keygate's own issuer: EdDSA only, every configured session key by `kid`.
    fn session(keys: &session::SessionKeys) -> Issuer {
        let by_kid = keys
            .public_keys()
            .map(|(kid, k)| (kid.to_owned(), k.clone()))
            .collect();
        let mut v = Validation::new(Algorithm::EdDSA);
        v.leeway = keys.leeway.as_secs();
        v.validate_nbf = true;
        v.set_issuer(&[keys.issuer.as_str()]);
        v.set_audience(&[keys.audience.as_str()]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        Issuer {
            name: Arc::from(session::ISSUER_NAME),
            iss: keys.issuer.clone(),
            validations: vec![(Algorithm::EdDSA, v)],
            // Every session token names its key: no "only key" fallback.
            keys: Keys::Own(Arc::new(KeySet { by_kid, only: None })),
            claims: ClaimsConfig::default(),
            roles_claim: None,
            roles: HashMap::new(),
            leeway_secs: keys.leeway.as_secs(),
            max_lifetime_secs: keys.max_lifetime.as_secs(),
            session: true,
        }
    }

    fn principal(&self, claims: &Map<String, Value>, now_ms: u64) -> Result<Principal, JwtError> {
        let text = |claim: &str| -> Result<String, JwtError> {
            claims
                .get(claim)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| JwtError::MissingClaim {
                    issuer: self.name.clone(),
                    claim: claim.to_owned(),
                })
        };
        let subject = text(&self.claims.subject)?;
        // A UUID in the canonical form `X-Tenant-Id` is compared in (lower case, hyphens).
        let tenant = text(&self.claims.tenant)?;
        let tenant = crate::tenant::parse_tenant(&tenant).unwrap_or(tenant);
        let mut scopes = strings(claims.get(&self.claims.scopes));
        if let Some(roles_claim) = &self.roles_claim {
            for role in strings(claims.get(roles_claim)) {
                if let Some(granted) = self.roles.get(&role) {
                    scopes.extend(granted.iter().cloned());
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        scopes.retain(|s| crate::policy::valid_held_scope(s) && seen.insert(s.clone()));
        let seconds = |claim: &str| claims.get(claim).and_then(Value::as_u64);
        // `exp` is required and was checked, with the leeway.
        let exp = seconds("exp").ok_or_else(|| JwtError::MissingClaim {
            issuer: self.name.clone(),
            claim: "exp".into(),
        })?;
        let issued_at = seconds("iat");
        let now = now_ms / 1000;
        let rejected = |reason: String| JwtError::Rejected {
            issuer: self.name.clone(),
            reason,
        };
        // A token cannot have been issued later than now (give or take the clock skew):
        // one that claims so would also slip past a revocation of its subject "issued
        // before T" for as long as its claimed `iat` lies after T.
        if let Some(iat) = issued_at {
            if iat > now.saturating_add(self.leeway_secs) {
                return Err(rejected(format!(
                    "iat is {}s in the future (leeway {}s)",
                    iat - now,
                    self.leeway_secs
                )));
            }
        }
        // A bounded lifetime is what lets a revocation be forgotten once every token it
        // matches has expired. With `iat` at most `leeway` ahead (above), `exp - iat` within
        // the bound also keeps `exp - now` within it (+ leeway): no token is valid for
        // longer than that from the moment it is judged, whatever `iat` it claims.
        let life = exp.saturating_sub(issued_at.unwrap_or(now));
        if life > self.max_lifetime_secs {
            return Err(rejected(format!(
                "lifetime of {life}s is over max_token_lifetime ({}s)",
                self.max_lifetime_secs
            )));
        }
        let mut p = Principal::new(tenant, subject, KeyKind::Tenant, Environment::Live, scopes);
        p.credential = CredentialKind::Jwt;
        if self.session {
            // Signed by keygate: the parent key's id, environment and plan, as minted.
            p.credential = CredentialKind::Session;
            p.key_id = Some(text(session::CLAIM_KEY_ID)?.into());
            p.environment =
                text(session::CLAIM_ENVIRONMENT)?
                    .parse()
                    .map_err(|e| JwtError::Rejected {
                        issuer: self.name.clone(),
                        reason: format!("claim env: {e}"),
                    })?;
            p.plan = claims
                .get(session::CLAIM_PLAN)
                .and_then(Value::as_str)
                .map(Into::into);
        }
        p.issuer = Some(self.name.clone());
        p.token_ids = Some(Box::new(TokenIds {
            jti: claims
                .get("jti")
                .and_then(Value::as_str)
                .filter(|j| !j.is_empty())
                .map(Into::into),
            issued_at,
        }));
        // The principal expires when the validation would fail, so the cache never
        // outlives it.
        p.expires_at = Some(exp.saturating_add(self.leeway_secs).saturating_mul(1000));
        Ok(p)
    }
}

/// A claim as a list of strings: a space-separated string, or an array of strings.
fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::Jwk;

    fn rsa_jwk(kid: &str) -> String {
        let pem = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/jwt/rsa.pem"
        ))
        .unwrap();
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.into());
        serde_json::to_string(&jwk).unwrap()
    }

    #[test]
    fn a_key_that_cannot_be_used_is_skipped_and_the_others_kept() {
        let unusable = [
            r#"{"kty": "unknown-type", "kid": "a", "x": "AAAA"}"#,
            r#"{"kty": "RSA", "kid": "b", "x5c": ["MIIB"]}"#,
            r#"{"kty": "RSA", "kid": "c", "n": "not base64url!", "e": "AQAB"}"#,
            r#"{"kty": "RSA", "kid": "d", "use": "enc", "n": "AQAB", "e": "AQAB"}"#,
            r#"7"#,
        ];
        let good = rsa_jwk("good");
        // A key without a kid cannot be chosen in a set of several.
        let no_kid = r#"{"kty": "RSA", "n": "AQAB", "e": "AQAB"}"#;
        let text = format!(r#"{{"keys": [{}, {no_kid}, {good}]}}"#, unusable.join(", "));
        let set = KeySet::from_jwks("unit", &text).unwrap();
        assert_eq!(set.by_kid.keys().collect::<Vec<_>>(), ["good"]);
        assert!(set.only.is_none(), "a set of several keys has no only key");
        // Alone, each is a set with no usable key: an error.
        for k in unusable {
            let e = KeySet::from_jwks("unit", &format!(r#"{{"keys": [{k}]}}"#))
                .err()
                .expect(k);
            assert!(e.contains("no usable key"), "{k}: {e}");
        }
        // One key without a kid serves tokens without one.
        let alone = KeySet::from_jwks(
            "unit",
            r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}"#,
        )
        .unwrap();
        assert!(alone.get(None).is_some());
    }
}

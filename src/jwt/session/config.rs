//! `sessions`: keygate's own short-lived session tokens (EdDSA JWTs minted from an API
//! key), their lifetime and the keys that sign them; with its validation. The session
//! module's own setting: `config` places it in the file, and it knows nothing of that.

use std::time::Duration;

use serde::Deserialize;

use crate::settings::{duration, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// The `iss` of keygate's session tokens.
    pub issuer: String,
    /// Their `aud`.
    pub audience: String,
    /// A token's lifetime when the caller asks for none (never past its key's expiry).
    #[serde(deserialize_with = "duration")]
    pub lifetime: Duration,
    /// The longest lifetime a caller may ask for.
    #[serde(deserialize_with = "duration")]
    pub max_lifetime: Duration,
    /// Clock skew allowed on `exp`.
    #[serde(deserialize_with = "duration")]
    pub leeway: Duration,
    /// Ed25519 keys: the first signs, every one verifies and is published at
    /// `/.well-known/jwks.json` (rotation with overlap: add the new key first, keep the
    /// old one until its tokens have expired).
    pub signing_keys: Vec<SigningKeyConfig>,
    /// Sign with a key generated at startup, forgotten at exit (`serve --dev`: one
    /// replica, tokens die with the process). Only when `signing_keys` is empty.
    pub ephemeral_key: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKeyConfig {
    /// The `kid` tokens signed with it carry.
    pub kid: String,
    /// The environment variable holding the PKCS#8 PEM private key (or, with `_FILE`
    /// appended, naming the file that does). Never the key itself.
    pub key_env: String,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            issuer: "keygate".into(),
            audience: "keygate-session".into(),
            lifetime: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(24 * 3600),
            leeway: Duration::from_secs(5),
            signing_keys: Vec::new(),
            ephemeral_key: false,
        }
    }
}

impl SessionsConfig {
    /// Whether keygate mints and accepts session tokens.
    pub fn enabled(&self) -> bool {
        !self.signing_keys.is_empty() || self.ephemeral_key
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.issuer.trim().is_empty() {
            return Err(ConfigError::new("sessions.issuer", "must not be empty"));
        }
        if self.audience.trim().is_empty() {
            return Err(ConfigError::new("sessions.audience", "must not be empty"));
        }
        if self.lifetime.as_secs() == 0 {
            return Err(ConfigError::new("sessions.lifetime", "must be at least 1s"));
        }
        if self.max_lifetime < self.lifetime {
            return Err(ConfigError::new(
                "sessions.max_lifetime",
                "must be at least sessions.lifetime",
            ));
        }
        if self.ephemeral_key && !self.signing_keys.is_empty() {
            return Err(ConfigError::new(
                "sessions.ephemeral_key",
                "only without sessions.signing_keys",
            ));
        }
        let mut kids = std::collections::HashSet::new();
        for (i, k) in self.signing_keys.iter().enumerate() {
            let field = |f: &str| format!("sessions.signing_keys[{i}].{f}");
            if k.kid.is_empty()
                || k.kid.len() > 64
                || !k
                    .kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(ConfigError::new(
                    field("kid"),
                    "must be 1 to 64 of A-Z a-z 0-9 . _ -",
                ));
            }
            if !kids.insert(k.kid.as_str()) {
                return Err(ConfigError::new(field("kid"), "is used twice"));
            }
            if k.key_env.is_empty() {
                return Err(ConfigError::new(field("key_env"), "must name a variable"));
            }
        }
        Ok(())
    }
}

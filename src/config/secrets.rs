//! Secrets: read from the environment or files, never from the YAML.

use super::ConfigError;
use crate::secret::Secret;

/// Secrets, read from the environment or files, never from the YAML.
#[derive(Clone, Debug)]
pub struct Secrets {
    pub pepper: Secret,
    pub admin_token: Secret,
    pub redis_password: Option<Secret>,
    /// `KEYGATE_WATCH_TOKEN`: what `Revocations/Watch` on the public gRPC port asks for
    /// (without it, Watch is served on the admin port only), and what this replica
    /// presents to another keygate with `revocation.source: watch`.
    pub watch_token: Option<Secret>,
    /// Secrets the configuration names by variable (a JWT issuer's `secret_env`), given
    /// directly; any not here is read from the environment by `named`.
    pub named: std::collections::HashMap<String, Secret>,
}

impl Secrets {
    /// The secret the configuration names `var`: given in `named`, or `var` / `var_FILE`.
    pub fn named(&self, var: &str) -> Result<Option<Secret>, ConfigError> {
        match self.named.get(var) {
            Some(s) => Ok(Some(s.clone())),
            None => env_secret(var),
        }
    }
}

impl Secrets {
    /// Reads the secrets. In dev mode, missing ones are generated for this process.
    pub fn from_env(dev: bool) -> Result<Secrets, ConfigError> {
        let pepper = match env_secret("KEYGATE_PEPPER")? {
            Some(p) => p,
            None if dev => Secret::random(43),
            None => {
                return Err(ConfigError::new(
                    "KEYGATE_PEPPER",
                    "not set: set KEYGATE_PEPPER or KEYGATE_PEPPER_FILE (at least 32 bytes)",
                ))
            }
        };
        if pepper.expose().len() < 32 {
            return Err(ConfigError::new(
                "KEYGATE_PEPPER",
                "must be at least 32 bytes long",
            ));
        }
        let admin_token = match env_secret("KEYGATE_ADMIN_TOKEN")? {
            Some(t) => t,
            None if dev => Secret::random(32),
            None => {
                return Err(ConfigError::new(
                    "KEYGATE_ADMIN_TOKEN",
                    "not set: the admin API has no default credential; set \
                     KEYGATE_ADMIN_TOKEN or KEYGATE_ADMIN_TOKEN_FILE",
                ))
            }
        };
        if admin_token.expose().len() < 16 {
            return Err(ConfigError::new(
                "KEYGATE_ADMIN_TOKEN",
                "must be at least 16 characters long",
            ));
        }
        let watch_token = env_secret("KEYGATE_WATCH_TOKEN")?;
        if watch_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(ConfigError::new(
                "KEYGATE_WATCH_TOKEN",
                "must be at least 16 characters long",
            ));
        }
        Ok(Secrets {
            pepper,
            admin_token,
            redis_password: env_secret("KEYGATE_REDIS_PASSWORD")?,
            watch_token,
            named: Default::default(),
        })
    }
}

/// `NAME` from the environment, or the trimmed contents of the file `NAME_FILE` names.
fn env_secret(name: &str) -> Result<Option<Secret>, ConfigError> {
    if let Ok(v) = std::env::var(name) {
        if !v.is_empty() {
            return Ok(Some(Secret::new(v)));
        }
    }
    let file_var = format!("{name}_FILE");
    match std::env::var(&file_var) {
        Ok(path) if !path.is_empty() => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::new(&file_var, format!("cannot read {path}: {e}")))?;
            let text = text.trim();
            if text.is_empty() {
                return Err(ConfigError::new(&file_var, format!("{path} is empty")));
            }
            Ok(Some(Secret::new(text.to_owned())))
        }
        _ => Ok(None),
    }
}

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
        let pepper = required(
            "KEYGATE_PEPPER",
            dev.then_some(43),
            "not set: set KEYGATE_PEPPER or KEYGATE_PEPPER_FILE (at least 32 bytes)",
        )?;
        at_least("KEYGATE_PEPPER", &pepper, 32, "bytes")?;
        let admin_token = required(
            "KEYGATE_ADMIN_TOKEN",
            dev.then_some(32),
            "not set: the admin API has no default credential; set \
             KEYGATE_ADMIN_TOKEN or KEYGATE_ADMIN_TOKEN_FILE",
        )?;
        at_least("KEYGATE_ADMIN_TOKEN", &admin_token, 16, "characters")?;
        let watch_token = env_secret("KEYGATE_WATCH_TOKEN")?;
        if let Some(t) = &watch_token {
            at_least("KEYGATE_WATCH_TOKEN", t, 16, "characters")?;
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

impl Secrets {
    /// The secrets of keygate's module inside Envoy, which never verifies a key nor
    /// serves the admin API: a random pepper and admin token of its own (its cache is
    /// keyed by that pepper), and `KEYGATE_WATCH_TOKEN` (or `_FILE`), required, to
    /// follow the service's `Watch` stream.
    pub fn for_module() -> Result<Secrets, ConfigError> {
        let watch_token = required(
            "KEYGATE_WATCH_TOKEN",
            None,
            "not set: keygate's module inside Envoy follows the service's Watch stream with \
             it; set KEYGATE_WATCH_TOKEN or KEYGATE_WATCH_TOKEN_FILE in Envoy's environment",
        )?;
        at_least("KEYGATE_WATCH_TOKEN", &watch_token, 16, "characters")?;
        Ok(Secrets {
            pepper: Secret::random(43),
            admin_token: Secret::random(32),
            redis_password: None,
            watch_token: Some(watch_token),
            named: Default::default(),
        })
    }
}

/// A secret keygate cannot run without, `var` (see `env_secret`); when it is not set, a
/// random one of `dev_len` for this process (dev mode), else an error saying `not_set`.
fn required(
    var: &str,
    dev_len: Option<usize>,
    not_set: &'static str,
) -> Result<Secret, ConfigError> {
    match (env_secret(var)?, dev_len) {
        (Some(s), _) => Ok(s),
        (None, Some(len)) => Ok(Secret::random(len)),
        (None, None) => Err(ConfigError::new(var, not_set)),
    }
}

/// An error unless `secret` (from `var`) is at least `min` bytes long; `unit` is what
/// the message counts them as.
fn at_least(var: &str, secret: &Secret, min: usize, unit: &str) -> Result<(), ConfigError> {
    if secret.expose().len() < min {
        return Err(ConfigError::new(
            var,
            format!("must be at least {min} {unit} long"),
        ));
    }
    Ok(())
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

//! Typed configuration, loaded and validated once at startup.
//!
//! One YAML file; every field can be overridden by an environment variable
//! `KEYGATE_<SECTION>__<FIELD>` (double underscore between levels, value parsed as YAML).
//! Secrets never come from the YAML: the pepper, the admin token, the watch token and the
//! Redis password are read from `KEYGATE_PEPPER`, `KEYGATE_ADMIN_TOKEN`,
//! `KEYGATE_WATCH_TOKEN`, `KEYGATE_REDIS_PASSWORD` or the files named by the same
//! variables with `_FILE` appended. Any error names the field.
//!
//! This module is the top of the settings: it reads the file, layers the environment,
//! checks what spans sections (routes that need sessions, the `session` issuer name), and
//! holds the sections of the wiring (`listen`, `store`, `revocation`) and the secrets.
//! Every other section belongs, with its validation, to the module that consumes it
//! (`api_keys`: `apikey`; `cache`; `errors`: `decision`; `jwt` and `sessions`: `jwt`;
//! `logging` and `traces`: `telemetry`; `policy`; `rate_limits`: `ratelimit`), and is
//! re-exported here, so `config::…` paths keep naming it. Those modules never name this
//! one; `ConfigError` and the duration fields are `settings`'.
//!
//! The environment layer is the few lines of `apply_override`, not figment's `Env`
//! provider, which reads values in its own syntax rather than YAML, reads the process's
//! environment rather than the pairs `load` is given (as the tests give theirs), and
//! would take `KEYGATE_PEPPER` and the other secrets for fields without a filter.

use serde::Deserialize;
use serde_yaml_ng::Value;

// `listen`, `revocation` and `store` name it as `super::duration`.
use crate::settings::duration;

mod listen;
mod reload;
mod revocation;
mod secrets;
mod store;

pub use listen::{ListenConfig, TlsConfig};
pub use reload::RulesId;
pub use revocation::{RevocationConfig, RevocationSource};
pub use secrets::Secrets;
pub use store::{StoreBackend, StoreConfig};

pub use crate::apikey::{ApiKeysConfig, Argon2Config};
pub use crate::cache::CacheConfig;
pub use crate::decision::{CodeConfig, ErrorsConfig};
pub use crate::jwt::session::{SessionsConfig, SigningKeyConfig};
pub use crate::jwt::{ClaimsConfig, IssuerConfig, JwtConfig, ALGORITHMS as JWT_ALGORITHMS};
pub use crate::policy::{
    CredentialHeader, DefaultPlans, PlanAlgorithm, PlanConfig, PolicyConfig, RouteConfig, Unmatched,
};
pub use crate::ratelimit::{OnStoreError, RateLimitConfig};
pub use crate::settings::{parse_duration, ConfigError};
pub use crate::telemetry::{LogFormat, LoggingConfig, TracesConfig};
pub use crate::tenant::TenantRule;

/// The sample configuration `keygate serve --dev` runs on.
pub const DEV_CONFIG: &str = include_str!("../../config/dev.yaml");

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: ListenConfig,
    pub store: StoreConfig,
    pub api_keys: ApiKeysConfig,
    pub cache: CacheConfig,
    pub errors: ErrorsConfig,
    pub logging: LoggingConfig,
    pub policy: PolicyConfig,
    pub revocation: RevocationConfig,
    pub jwt: JwtConfig,
    pub rate_limits: RateLimitConfig,
    pub sessions: SessionsConfig,
    pub traces: TracesConfig,
    /// The merged document this was read from (the file with the environment over it):
    /// what a reload compares section by section (`reload.rs`).
    #[serde(skip)]
    pub source: Value,
}

impl Config {
    /// Loads `yaml` (or the defaults), applies `KEYGATE_…__…` overrides from `env`, and
    /// validates the result.
    pub fn load(
        yaml: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut root: Value = match yaml {
            Some(text) => serde_yaml_ng::from_str(text).map_err(|e| {
                let at = e
                    .location()
                    .map(|l| format!("line {}, column {}", l.line(), l.column()))
                    .unwrap_or_else(|| "file".into());
                ConfigError::new(at, e.to_string())
            })?,
            None => Value::Mapping(Default::default()),
        };
        if root.is_null() {
            root = Value::Mapping(Default::default());
        }
        for (name, value) in env {
            if let Some(path) = override_path(&name) {
                apply_override(&mut root, &path, &value)?;
            }
        }
        for secret_field in [
            "pepper",
            "admin_token",
            "watch_token",
            "redis_password",
            "password",
        ] {
            if find_key(&root, secret_field) {
                return Err(ConfigError::new(
                    secret_field,
                    "secrets are not read from the configuration file; use the \
                     KEYGATE_… environment variables or their _FILE variants",
                ));
            }
        }
        let source = root.clone();
        let mut config: Config = serde_path_to_error::deserialize(root).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(
                if path == "." { "config".into() } else { path },
                e.into_inner().to_string(),
            )
        })?;
        config.validate()?;
        config.source = source;
        Ok(config)
    }

    /// Each section checks its own fields; the first error stops startup, naming its field.
    fn validate(&self) -> Result<(), ConfigError> {
        self.api_keys.validate()?;
        self.cache.validate()?;
        self.errors.validate()?;
        self.store.validate()?;
        self.policy.validate()?;
        self.revocation.validate()?;
        self.jwt.validate()?;
        self.rate_limits.validate()?;
        self.sessions.validate()?;
        self.traces.validate()?;
        for (i, r) in self.policy.routes.iter().enumerate() {
            let sessions_only =
                r.credentials.as_deref() == Some(&[crate::principal::CredentialKind::Session]);
            if (r.mint_session || sessions_only) && !self.sessions.enabled() {
                return Err(ConfigError::new(
                    format!(
                        "policy.routes[{i}].{}",
                        if r.mint_session {
                            "mint_session"
                        } else {
                            "credentials"
                        }
                    ),
                    "needs session tokens: configure sessions.signing_keys",
                ));
            }
        }
        if self.sessions.enabled()
            && self
                .jwt
                .issuers
                .iter()
                .any(|i| i.name == crate::jwt::session::ISSUER_NAME)
        {
            return Err(ConfigError::new(
                "jwt.issuers[].name",
                "`session` names keygate's own session tokens while sessions are enabled",
            ));
        }
        if self.sessions.enabled()
            && self
                .jwt
                .issuers
                .iter()
                .any(|i| i.issuer == self.sessions.issuer)
        {
            return Err(ConfigError::new(
                "sessions.issuer",
                "is the issuer of a configured JWT issuer; keygate's session tokens need their own",
            ));
        }
        Ok(())
    }
}

/// `KEYGATE_STORE__REDIS_URL` → `["store", "redis_url"]`.
fn override_path(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix("KEYGATE_")?;
    if !rest.contains("__") {
        return None;
    }
    Some(rest.split("__").map(|s| s.to_ascii_lowercase()).collect())
}

fn apply_override(root: &mut Value, path: &[String], raw: &str) -> Result<(), ConfigError> {
    let field = path.join(".");
    let value: Value = serde_yaml_ng::from_str(raw).unwrap_or_else(|_| Value::String(raw.into()));
    let mut node = root;
    for (i, part) in path.iter().enumerate() {
        let Value::Mapping(map) = node else {
            return Err(ConfigError::new(
                &field,
                "cannot override inside a non-mapping",
            ));
        };
        let key = Value::String(part.clone());
        if i + 1 == path.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map
            .entry(key)
            .or_insert_with(|| Value::Mapping(Default::default()));
    }
    Ok(())
}

fn find_key(v: &Value, name: &str) -> bool {
    match v {
        Value::Mapping(m) => m
            .iter()
            .any(|(k, v)| k.as_str() == Some(name) || find_key(v, name)),
        Value::Sequence(s) => s.iter().any(|v| find_key(v, name)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::load(Some(yaml), Vec::new())
    }

    #[test]
    fn redis_urls_this_build_cannot_use_are_refused_naming_the_field() {
        for url in ["http://127.0.0.1:6379", "redis://[::1"] {
            let e = load(&format!(
                "store: {{backend: redis, redis_url: \"{url}\"}}\n"
            ))
            .unwrap_err();
            assert_eq!(e.field, "store.redis_url", "{url}");
        }
        assert!(load("store: {backend: redis, redis_url: \"rediss://h:6380\"}\n").is_ok());
        let e = load("store: {backend: redis, redis_url: \"redis://h\", tls_ca_file: /x}\n")
            .unwrap_err();
        assert_eq!(e.field, "store.tls_ca_file");
        assert!(load("store: {backend: redis, redis_url: \"redis://10.0.0.1:6379/2\"}\n").is_ok());
    }

    #[test]
    fn cluster_settings_that_cannot_work_are_refused_naming_the_field() {
        for (yaml, field) in [
            (
                "{backend: redis, cluster_nodes: [\"http://h:1\"]}",
                "store.cluster_nodes[0]",
            ),
            (
                "{backend: redis, cluster_nodes: [\"redis://a:1\", \"redis://u:p@b:2\"]}",
                "store.cluster_nodes[1]",
            ),
            (
                "{backend: redis, stream_partitions: 0}",
                "store.stream_partitions",
            ),
            (
                "{backend: redis, stream_partitions: 257}",
                "store.stream_partitions",
            ),
            (
                "{backend: memory, cluster_nodes: [\"redis://a:1\"]}",
                "store.cluster_nodes",
            ),
            (
                "{backend: memory, stream_partitions: 16}",
                "store.stream_partitions",
            ),
            (
                "{backend: redis, cluster_nodes: [\"redis://a:1\"], tls_ca_file: /x}",
                "store.tls_ca_file",
            ),
        ] {
            let e = load(&format!("store: {yaml}\n")).unwrap_err();
            assert_eq!(e.field, field, "{yaml}");
        }
        let c = load("store: {backend: redis, cluster_nodes: [\"redis://a:1\"]}\n").unwrap();
        assert_eq!((c.store.partitions(), c.store.replica_acks()), (16, 1));
        let c = load("store: {backend: redis}\n").unwrap();
        assert_eq!((c.store.partitions(), c.store.replica_acks()), (1, 0));
        let c = load("store: {backend: redis, stream_partitions: 16, replica_acks: 2}\n").unwrap();
        assert_eq!((c.store.partitions(), c.store.replica_acks()), (16, 2));
    }

    #[test]
    fn the_dev_config_is_valid() {
        let c = load(DEV_CONFIG).unwrap();
        assert!(!c.policy.routes.is_empty());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.listen.grpc.port(), 50051);
        assert_eq!(c.listen.admin.to_string(), "127.0.0.1:50052");
        assert_eq!(
            c.api_keys.default_lifetime,
            Duration::from_secs(180 * 86400)
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e = load("cache:\n  ttl: soon\n").unwrap_err();
        assert_eq!(e.field, "cache.ttl");
        let e = load("listen:\n  grpc: nowhere\n").unwrap_err();
        assert_eq!(e.field, "listen.grpc");
        let e = load("stroe: {}\n").unwrap_err();
        assert!(e.message.contains("stroe"), "{e}");
        let e = load(
            "policy:\n  routes:\n    - {name: a, path: /a, public: true}\n    - {name: b, path: nope, scope: x}\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "policy.routes[1].path");
        let e = load("api_keys:\n  prefix: SK\n").unwrap_err();
        assert_eq!(e.field, "api_keys.prefix");
        for nice in ["-1", "20"] {
            let e = load(&format!("api_keys:\n  argon2: {{nice: {nice}}}\n")).unwrap_err();
            assert_eq!(e.field, "api_keys.argon2.nice");
        }
        let ok = load("api_keys:\n  argon2: {nice: 19}\n").unwrap();
        assert_eq!(ok.api_keys.argon2.nice, 19);
    }

    #[test]
    fn secrets_in_the_yaml_are_refused() {
        let e = load("store:\n  password: hunter2\n").unwrap_err();
        assert_eq!(e.field, "password");
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn environment_overrides_any_field() {
        let env = vec![
            (
                "KEYGATE_LISTEN__GRPC".to_string(),
                "127.0.0.1:6000".to_string(),
            ),
            ("KEYGATE_CACHE__TTL".to_string(), "5s".to_string()),
            ("KEYGATE_ERRORS__OPAQUE".to_string(), "true".to_string()),
            ("KEYGATE_PEPPER".to_string(), "ignored here".to_string()),
        ];
        let c = Config::load(Some("cache: {ttl: 60s}\n"), env).unwrap();
        assert_eq!(c.listen.grpc.port(), 6000);
        assert_eq!(c.cache.ttl, Duration::from_secs(5));
        assert!(c.errors.opaque);
        let bad = vec![("KEYGATE_CACHE__TTL".to_string(), "forever".to_string())];
        assert_eq!(Config::load(None, bad).unwrap_err().field, "cache.ttl");
    }
}

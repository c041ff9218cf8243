//! Typed configuration, loaded and validated once at startup.
//!
//! One YAML file; every field can be overridden by an environment variable
//! `KEYGATE_<SECTION>__<FIELD>` (double underscore between levels, value parsed as YAML).
//! Secrets never come from the YAML: the pepper, the admin token, the watch token and the
//! Redis password are read from `KEYGATE_PEPPER`, `KEYGATE_ADMIN_TOKEN`,
//! `KEYGATE_WATCH_TOKEN`, `KEYGATE_REDIS_PASSWORD` or the files named by the same
//! variables with `_FILE` appended. Any error names the field.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

use crate::secret::Secret;

/// The sample configuration `keygate serve --dev` runs on.
pub const DEV_CONFIG: &str = include_str!("../config/dev.yaml");

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevocationSource {
    /// The store's own stream (Redis, or the embedded store).
    Store,
    /// Another keygate's `keygate.v1.Revocations/Watch` (a replica in another region).
    Watch,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationConfig {
    pub source: RevocationSource,
    /// With `source: watch`: the other keygate's gRPC address, e.g. http://10.0.0.5:50051.
    pub watch_url: String,
    /// How long one blocking read of the stream waits before it is issued again.
    #[serde(deserialize_with = "duration")]
    pub read_block: Duration,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            source: RevocationSource::Store,
            watch_url: String::new(),
            read_block: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Envoy ext_authz, keygate.v1.Authorizer, health, reflection.
    pub grpc: SocketAddr,
    /// keygate.v1.Keys; loopback by default, since it manages credentials.
    pub admin: SocketAddr,
    /// /metrics, /healthz, /readyz.
    pub http: SocketAddr,
    /// Connections older than this are closed gracefully so that long-lived Envoy
    /// connections spread over new replicas.
    #[serde(deserialize_with = "duration")]
    pub max_connection_age: Duration,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            grpc: "0.0.0.0:50051".parse().expect("literal"),
            admin: "127.0.0.1:50052".parse().expect("literal"),
            http: "0.0.0.0:9090".parse().expect("literal"),
            max_connection_age: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Redis,
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// Without a password: that comes from KEYGATE_REDIS_PASSWORD.
    pub redis_url: String,
    /// Prefix of every Redis key keygate writes.
    pub namespace: String,
    /// Upper bound on one Redis command on the request path.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Redis,
            redis_url: "redis://127.0.0.1:6379".into(),
            namespace: "keygate".into(),
            timeout: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiKeysConfig {
    /// The token prefix of this deployment (`sk` → `sk_live_…`).
    pub prefix: String,
    /// Whether `…_test_…` keys are accepted by this deployment.
    pub accept_test_keys: bool,
    #[serde(deserialize_with = "duration")]
    pub default_lifetime: Duration,
    /// The longest lifetime the admin API will grant.
    #[serde(deserialize_with = "duration")]
    pub max_lifetime: Duration,
    pub argon2: Argon2Config,
}

impl Default for ApiKeysConfig {
    fn default() -> Self {
        ApiKeysConfig {
            prefix: "sk".into(),
            accept_test_keys: true,
            default_lifetime: Duration::from_secs(180 * 86_400),
            max_lifetime: Duration::from_secs(2 * 365 * 86_400),
            argon2: Argon2Config::default(),
        }
    }
}

/// argon2id cost. The defaults are OWASP's second recommended set (19 MiB, 2 passes,
/// 1 lane); see the README for the time they give.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Argon2Config {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// How many verifications may run at once (keygate's argon2 threads). Default: one
    /// less than the cores.
    pub verify_concurrency: usize,
    /// How much nicer than the rest of keygate the argon2 threads run (0–19; 0 = the same
    /// priority). On contended cores, cached keys are served first.
    pub nice: i32,
    /// Most verifications waiting for an argon2 thread. A cold key that finds the queue
    /// full is answered UNAVAILABLE (never allowed, never denied), at once.
    pub queue_depth: usize,
    /// Most failed verifications (wrong secrets) of one key id per `failure_window`.
    /// Beyond it, an unverified token for that key id is denied `invalid_api_key` without
    /// argon2 until the window ends. A token already verified here is never affected.
    pub failures_per_key: u32,
    #[serde(deserialize_with = "duration")]
    pub failure_window: Duration,
}

impl Default for Argon2Config {
    fn default() -> Self {
        Argon2Config {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
            // One core stays free for cache hits: with every core on argon2, a flood of
            // cold keys multiplied warm-key p99 by 15 (BENCHMARKS.md).
            verify_concurrency: std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1).max(1)),
            // Weight 110 against 1024 (Linux CFS): beside busy cache hits argon2 gets about
            // a tenth of a core, so a cold key still verifies in a few hundred ms.
            nice: 10,
            // At ~15 ms a verification, 64 queued jobs are about half a second of one
            // thread: past Envoy's 200 ms default, a longer queue only holds answers that
            // nobody waits for any more.
            queue_depth: 64,
            failures_per_key: 10,
            failure_window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Upper bound on how long a verified key is trusted without asking the store again.
    #[serde(deserialize_with = "duration")]
    pub ttl: Duration,
    /// How long a failed verification is remembered.
    #[serde(deserialize_with = "duration")]
    pub negative_ttl: Duration,
    pub max_entries: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            max_entries: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorsConfig {
    /// One message for every 401, so clients cannot tell unknown from revoked keys.
    pub opaque: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A tracing filter: `info`, `debug`, `keygate=trace,info`, …
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialHeader {
    pub header: String,
    /// For `authorization`-style headers: the scheme before the token (`Bearer`).
    #[serde(default)]
    pub scheme: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Deny requests that match no route family (403).
    Deny,
    /// Allow any authenticated caller on unmatched routes.
    Authenticated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantRule {
    Required,
    Optional,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub credential_headers: Vec<CredentialHeader>,
    /// Remove the credential headers before the request goes upstream.
    pub strip_credential_headers: bool,
    /// Also hand the principal to Envoy as dynamic metadata (namespace
    /// `envoy.filters.http.ext_authz`), for access logs, RBAC or rate-limit descriptors.
    /// Envoy pays for reading it on every allow; without a use for it, turn it off.
    pub dynamic_metadata: bool,
    pub tenant_header: String,
    /// Default for routes that do not say `tenant:`.
    pub require_tenant_header: bool,
    pub unmatched: Unmatched,
    /// Scopes that wildcards never grant; a key must name them.
    pub opt_in_scopes: Vec<String>,
    pub routes: Vec<RouteConfig>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            credential_headers: vec![
                CredentialHeader {
                    header: "authorization".into(),
                    scheme: Some("Bearer".into()),
                },
                CredentialHeader {
                    header: "x-access-token".into(),
                    scheme: None,
                },
                CredentialHeader {
                    header: "x-api-key".into(),
                    scheme: None,
                },
            ],
            strip_credential_headers: true,
            dynamic_metadata: true,
            tenant_header: "x-tenant-id".into(),
            require_tenant_header: false,
            unmatched: Unmatched::Deny,
            opt_in_scopes: Vec::new(),
            routes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Empty: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// `/v1/contacts/*/notes/**`: `*` is one segment, a trailing `**` any rest.
    pub path: String,
    #[serde(default)]
    pub scope: Option<String>,
    /// No credential needed.
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub tenant: Option<TenantRule>,
}

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
        let config: Config = serde_path_to_error::deserialize(root).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(
                if path == "." { "config".into() } else { path },
                e.into_inner().to_string(),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !crate::apikey::token::valid_prefix(&self.api_keys.prefix) {
            return Err(ConfigError::new(
                "api_keys.prefix",
                "must be 1-16 characters of a-z and 0-9",
            ));
        }
        let a = &self.api_keys.argon2;
        argon2::Params::new(a.memory_kib, a.iterations, a.parallelism, None)
            .map_err(|e| ConfigError::new("api_keys.argon2", e.to_string()))?;
        if a.verify_concurrency == 0 {
            return Err(ConfigError::new(
                "api_keys.argon2.verify_concurrency",
                "must be at least 1",
            ));
        }
        if !(0..=19).contains(&a.nice) {
            return Err(ConfigError::new(
                "api_keys.argon2.nice",
                "must be from 0 (keygate's own priority) to 19 (the lowest)",
            ));
        }
        if a.queue_depth == 0 {
            return Err(ConfigError::new(
                "api_keys.argon2.queue_depth",
                "must be at least 1",
            ));
        }
        if a.failures_per_key == 0 {
            return Err(ConfigError::new(
                "api_keys.argon2.failures_per_key",
                "must be at least 1",
            ));
        }
        if a.failure_window.is_zero() {
            return Err(ConfigError::new(
                "api_keys.argon2.failure_window",
                "must be above zero",
            ));
        }
        if self.api_keys.default_lifetime.is_zero()
            || self.api_keys.default_lifetime > self.api_keys.max_lifetime
        {
            return Err(ConfigError::new(
                "api_keys.default_lifetime",
                "must be above zero and at most api_keys.max_lifetime",
            ));
        }
        if self.cache.ttl.is_zero() {
            return Err(ConfigError::new("cache.ttl", "must be above zero"));
        }
        if self.store.backend == StoreBackend::Redis {
            // Only what this build can connect to: TLS to Redis is not compiled in, and
            // would otherwise fail later, at the first connection, with a library message.
            let url = &self.store.redis_url;
            if url.starts_with("rediss://") {
                return Err(ConfigError::new(
                    "store.redis_url",
                    "rediss:// (TLS) is not supported by this build; use redis:// (or \
                     redis+unix:// for a local socket) behind a TLS tunnel",
                ));
            }
            if !url.starts_with("redis://") && !url.starts_with("redis+unix://") {
                return Err(ConfigError::new(
                    "store.redis_url",
                    "must start with redis:// or redis+unix://",
                ));
            }
            url.parse::<redis::ConnectionInfo>()
                .map_err(|e| ConfigError::new("store.redis_url", e.to_string()))?;
        }
        if self.store.redis_url.contains('@') {
            return Err(ConfigError::new(
                "store.redis_url",
                "must not carry credentials; use KEYGATE_REDIS_PASSWORD",
            ));
        }
        if self.policy.credential_headers.is_empty() {
            return Err(ConfigError::new(
                "policy.credential_headers",
                "must name at least one header",
            ));
        }
        for (i, h) in self.policy.credential_headers.iter().enumerate() {
            if !valid_header_name(&h.header) {
                return Err(ConfigError::new(
                    format!("policy.credential_headers[{i}].header"),
                    "must be a lower-case HTTP header name",
                ));
            }
        }
        if !valid_header_name(&self.policy.tenant_header) {
            return Err(ConfigError::new(
                "policy.tenant_header",
                "must be a lower-case HTTP header name",
            ));
        }
        if self.revocation.source == RevocationSource::Watch
            && !(self.revocation.watch_url.starts_with("http://")
                || self.revocation.watch_url.starts_with("https://"))
        {
            return Err(ConfigError::new(
                "revocation.watch_url",
                "must be an http:// or https:// URL when revocation.source is watch",
            ));
        }
        if self.revocation.read_block.is_zero()
            || self.revocation.read_block > Duration::from_secs(30)
        {
            return Err(ConfigError::new(
                "revocation.read_block",
                "must be above zero and at most 30s",
            ));
        }
        crate::policy::Policy::compile(&self.policy)?;
        Ok(())
    }
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
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

/// Parses `90d`, `500ms`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (e.g. 500ms, 60s, 90d)"))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::load(Some(yaml), Vec::new())
    }

    #[test]
    fn redis_urls_this_build_cannot_use_are_refused_naming_the_field() {
        for url in [
            "rediss://127.0.0.1:6379",
            "http://127.0.0.1:6379",
            "redis://[::1",
        ] {
            let e = load(&format!(
                "store: {{backend: redis, redis_url: \"{url}\"}}\n"
            ))
            .unwrap_err();
            assert_eq!(e.field, "store.redis_url", "{url}");
        }
        let e = load("store: {backend: redis, redis_url: \"rediss://h:6379\"}\n").unwrap_err();
        assert!(
            e.message.contains("not supported by this build"),
            "{}",
            e.message
        );
        assert!(load("store: {backend: redis, redis_url: \"redis://10.0.0.1:6379/2\"}\n").is_ok());
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

//! `store`: where keys, indexes and the revocation stream live (Redis, or the embedded
//! store).

use std::time::Duration;

use serde::Deserialize;

use super::{duration, ConfigError};

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

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.backend == StoreBackend::Redis {
            // Only what this build can connect to: TLS to Redis is not compiled in, and
            // would otherwise fail later, at the first connection, with a library message.
            let url = &self.redis_url;
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
        if self.redis_url.contains('@') {
            return Err(ConfigError::new(
                "store.redis_url",
                "must not carry credentials; use KEYGATE_REDIS_PASSWORD",
            ));
        }
        Ok(())
    }
}

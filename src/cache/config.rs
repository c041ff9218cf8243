//! `cache`: how long verified credentials (and failures) are remembered, with its
//! validation. The cache's own setting: `config` places it in the file, and it knows
//! nothing of that.

use std::time::Duration;

use serde::Deserialize;

use crate::settings::{duration, ConfigError};

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

impl CacheConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl.is_zero() {
            return Err(ConfigError::new("cache.ttl", "must be above zero"));
        }
        Ok(())
    }
}

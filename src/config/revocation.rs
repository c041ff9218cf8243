//! `revocation`: where this replica's revocation events come from.

use std::time::Duration;

use serde::Deserialize;

use super::{duration, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevocationSource {
    /// The store's own stream (Redis, or the embedded store).
    Store,
    /// Another keygate's `keygate.v1.Revocations/Watch` (a replica in another region).
    Watch,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

impl RevocationConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.source == RevocationSource::Watch && !self.watch_url.starts_with("http://") {
            return Err(ConfigError::new(
                "revocation.watch_url",
                "must be an http:// URL when revocation.source is watch (this build has no TLS)",
            ));
        }
        if self.read_block.is_zero() || self.read_block > Duration::from_secs(30) {
            return Err(ConfigError::new(
                "revocation.read_block",
                "must be above zero and at most 30s",
            ));
        }
        Ok(())
    }
}

//! `rate_limits`: how plans' limits are enforced (the plans themselves are in `policy`),
//! with its validation. The limiter's own setting: `config` places it in the file, and
//! it knows nothing of that.

use std::time::Duration;

use serde::Deserialize;

use crate::settings::{duration, ConfigError};

/// What a limit check does when the store cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// gRPC UNAVAILABLE: Envoy's `failure_mode_allow` / `status_on_error` decides.
    Unavailable,
    /// Let the request pass, counted in `keygate_rate_limit_store_errors_total`.
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub on_store_error: OnStoreError,
    /// The most admissions one replica reserves for a key in one store call.
    pub max_reservation: u32,
    /// How long a replica may spend what it reserved; the rest goes back.
    #[serde(deserialize_with = "duration")]
    pub reservation_ttl: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            on_store_error: OnStoreError::Unavailable,
            max_reservation: 512,
            reservation_ttl: Duration::from_millis(250),
        }
    }
}

impl RateLimitConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_reservation == 0 || self.max_reservation > 10_000 {
            return Err(ConfigError::new(
                "rate_limits.max_reservation",
                "must be 1 to 10000",
            ));
        }
        if self.reservation_ttl < Duration::from_millis(10)
            || self.reservation_ttl > Duration::from_secs(10)
        {
            return Err(ConfigError::new(
                "rate_limits.reservation_ttl",
                "must be between 10ms and 10s",
            ));
        }
        Ok(())
    }
}

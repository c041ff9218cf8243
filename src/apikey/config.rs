//! `api_keys`: the token prefix, lifetimes, and argon2id's cost and bounds, with their
//! validation. API keys' own settings: `config` places them in the file, and they know
//! nothing of it.

use std::time::Duration;

use serde::Deserialize;

use crate::settings::{duration, within, ConfigError};

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
    /// Whether keys that never expire (`keys create --expires-in never`) may be created.
    pub allow_non_expiring: bool,
    /// How often each replica writes the usage it counted (`keys get`'s requests and
    /// last use are accurate to this), and once more on shutdown.
    #[serde(deserialize_with = "duration")]
    pub usage_flush_interval: Duration,
    pub argon2: Argon2Config,
}

impl Default for ApiKeysConfig {
    fn default() -> Self {
        ApiKeysConfig {
            prefix: "sk".into(),
            accept_test_keys: true,
            default_lifetime: Duration::from_secs(180 * 86_400),
            max_lifetime: Duration::from_secs(2 * 365 * 86_400),
            allow_non_expiring: false,
            usage_flush_interval: Duration::from_secs(10),
            argon2: Argon2Config::default(),
        }
    }
}

/// argon2id cost. The defaults are OWASP's second recommended set (19 MiB, 2 passes,
/// 1 lane); see the README for the time they give.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

impl ApiKeysConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        within(
            "api_keys.usage_flush_interval",
            self.usage_flush_interval,
            Duration::from_millis(100)..=Duration::from_secs(3600),
            "must be between 100ms and 1h",
        )?;
        if !crate::apikey::token::valid_prefix(&self.prefix) {
            return Err(ConfigError::new(
                "api_keys.prefix",
                "must be 1-16 characters of a-z and 0-9",
            ));
        }
        let a = &self.argon2;
        argon2::Params::new(a.memory_kib, a.iterations, a.parallelism, None)
            .map_err(|e| ConfigError::new("api_keys.argon2", e.to_string()))?;
        if a.verify_concurrency == 0 {
            return Err(ConfigError::new(
                "api_keys.argon2.verify_concurrency",
                "must be at least 1",
            ));
        }
        within(
            "api_keys.argon2.nice",
            a.nice,
            0..=19,
            "must be from 0 (keygate's own priority) to 19 (the lowest)",
        )?;
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
        if self.default_lifetime.is_zero() || self.default_lifetime > self.max_lifetime {
            return Err(ConfigError::new(
                "api_keys.default_lifetime",
                "must be above zero and at most api_keys.max_lifetime",
            ));
        }
        Ok(())
    }
}

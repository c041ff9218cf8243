//! What keygate's integration tests and benchmarks share: a `redis-server` and a Redis
//! Cluster of their own, a test configuration, test secrets, replicas, hand-forged tokens,
//! realistic Envoy `CheckRequest`s, and a reading of Envoy's `CheckResponse` that checks
//! the invariants Envoy relies on.
//!
//! A crate of its own (a dev-dependency of keygate, `publish = false`) so that each test
//! binary links it once rather than compiling a copy; everything is re-exported here,
//! `keygate_test_support::config`, `keygate_test_support::RedisServer`, and so on.

use std::future::Future;
use std::time::{Duration, Instant};

mod cluster;
mod config;
mod envoy;
pub mod logs;
mod redis_server;
mod replica;
mod store;
mod tokens;

pub use cluster::*;
pub use config::*;
pub use envoy::*;
pub use redis_server::*;
pub use replica::*;
pub use store::*;
pub use tokens::*;

/// The tenant test keys belong to.
pub const TENANT: &str = "9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11";
/// Another tenant, whose keys must never show up in `TENANT`'s answers.
pub const OTHER_TENANT: &str = "0b3f6a2e-8c11-4c1e-9d55-9f1c7d4e2b7a";

/// A route that needs `contacts:read` (see `config`).
pub const READ_PATH: &str = "/v1/contacts/42?fields=name";

/// How long a test waits for something that should happen "soon".
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Polls `probe` until it returns `Some`, or fails the test after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

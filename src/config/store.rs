//! `store`: where keys, indexes and the revocation stream live (Redis, or the embedded
//! store).

use std::time::Duration;

use serde::Deserialize;

use super::{duration, ConfigError};
use crate::settings::within;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Redis,
    Memory,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// The Redis ACL user (its password: KEYGATE_REDIS_PASSWORD). `default` when left out.
    pub username: Option<String>,
    /// With `rediss://`: the CA (PEM) the server's certificate must chain to; the system's
    /// roots when left out.
    pub tls_ca_file: Option<String>,
    /// A Redis Cluster's seed nodes; when given, `redis_url` is not used.
    pub cluster_nodes: Vec<String>,
    /// The revocation stream's partitions, fixed for the life of the data: 1 on one Redis,
    /// `CLUSTER_PARTITIONS` on a Cluster, unless set.
    pub stream_partitions: Option<usize>,
    /// How many replicas must have a change (a revocation, a new key) before the admin
    /// call returns: 1 on a Cluster, 0 on one Redis, unless set.
    pub replica_acks: Option<u32>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Redis,
            redis_url: "redis://127.0.0.1:6379".into(),
            namespace: "keygate".into(),
            timeout: Duration::from_millis(500),
            username: None,
            tls_ca_file: None,
            cluster_nodes: Vec::new(),
            stream_partitions: None,
            replica_acks: None,
        }
    }
}

impl StoreConfig {
    /// The stream partitions this store is written with.
    pub fn partitions(&self) -> usize {
        self.stream_partitions
            .unwrap_or(if self.cluster_nodes.is_empty() {
                1
            } else {
                crate::store::redis::CLUSTER_PARTITIONS
            })
    }

    /// Replicas a change waits for.
    pub fn replica_acks(&self) -> u32 {
        self.replica_acks
            .unwrap_or(u32::from(!self.cluster_nodes.is_empty()))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let max = crate::store::redis::MAX_PARTITIONS;
        within(
            "store.stream_partitions",
            self.partitions(),
            1..=max,
            format!("must be 1 to {max}"),
        )?;
        if self.backend == StoreBackend::Memory && !self.cluster_nodes.is_empty() {
            return Err(ConfigError::new(
                "store.cluster_nodes",
                "only with store.backend: redis",
            ));
        }
        if self.backend == StoreBackend::Memory && self.partitions() != 1 {
            return Err(ConfigError::new(
                "store.stream_partitions",
                "the memory store has one partition",
            ));
        }
        for (i, node) in self.cluster_nodes.iter().enumerate() {
            let field = format!("store.cluster_nodes[{i}]");
            if !["redis://", "rediss://"]
                .iter()
                .any(|s| node.starts_with(s))
            {
                return Err(ConfigError::new(
                    &field,
                    "must start with redis:// or rediss:// (TLS)",
                ));
            }
            if node.contains('@') {
                return Err(ConfigError::new(
                    &field,
                    "must not carry credentials; use KEYGATE_REDIS_PASSWORD",
                ));
            }
            node.parse::<redis::ConnectionInfo>()
                .map_err(|e| ConfigError::new(&field, e.to_string()))?;
        }
        if self.backend == StoreBackend::Redis {
            let url = &self.redis_url;
            if !["redis://", "rediss://", "redis+unix://"]
                .iter()
                .any(|scheme| url.starts_with(scheme))
            {
                return Err(ConfigError::new(
                    "store.redis_url",
                    "must start with redis://, rediss:// (TLS) or redis+unix://",
                ));
            }
            let tls = if self.cluster_nodes.is_empty() {
                url.starts_with("rediss://")
            } else {
                self.cluster_nodes
                    .iter()
                    .all(|n| n.starts_with("rediss://"))
            };
            if self.tls_ca_file.is_some() && !tls {
                return Err(ConfigError::new(
                    "store.tls_ca_file",
                    "only with rediss:// URLs (store.redis_url, or every store.cluster_nodes)",
                ));
            }
            if let Some(path) = &self.tls_ca_file {
                std::fs::metadata(path).map_err(|e| {
                    ConfigError::new("store.tls_ca_file", format!("cannot read {path}: {e}"))
                })?;
            }
            if self
                .username
                .as_deref()
                .is_some_and(|u| u.is_empty() || u.contains(char::is_whitespace))
            {
                return Err(ConfigError::new(
                    "store.username",
                    "must be an ACL user name",
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

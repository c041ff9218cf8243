//! The Redis store: one Redis, or a Redis Cluster.
//!
//! Layout. Records, their indexes and the revocation stream are split into a fixed number
//! of partitions (`store.stream_partitions`: 1 on one Redis, 16 by default on a Cluster),
//! each under a hash tag of its own, so that a Cluster spreads them while every script
//! that writes state and appends its event touches one slot. A key id, a partner id and a
//! JWT revocation's rule key each belong to partition `crc32(name) % partitions`. With one
//! partition the tag is `keys`, the layout of every earlier keygate.
//!
//! - `<ns>:{<p>}:key:<key_id>`   with one partition, a hash: `data` (record JSON, no
//!   secret), `revoked_at_ms`, usage counters.
//! - `<ns>:{<p>}:keys:<n>`       with more, `RECORD_BUCKETS` hashes per partition, whose
//!   fields are key ids and values
//!   `<revoked_at_ms>|<allowed>|<denied>|<last_used_ms>|<packed record>` (`packed.rs`,
//!   `record.lua`): under half the memory. A layout of several partitions is new (no
//!   earlier keygate wrote one), so it starts packed.
//! - `<ns>:{<p>}:tenant:<id>`    sorted set of the owner's key ids (score 0, ordered by id),
//!   in the owner's partition; likewise `partner:<id>` and `service:<name>`. Where that is
//!   not the key's partition, the entry is added before the record and removed after it,
//!   so a crash in between leaves at worst an entry without a record, which `list` skips.
//! - `<ns>:{<p>}:deleg:partner:<id>` / `deleg:tenant:<id>`  sets, in the partner's
//!   partition: a partner's tenants, a tenant's partners
//! - `<ns>:{<p>}:tokens`         hash: JWT revocations, rule key → JSON
//! - `<ns>:{<p>}:tokens:expiry`  sorted set: rule key by expiry (unix ms), for pruning
//! - `<ns>:{<p>}:events`         the partition's revocation stream (XADD MAXLEN ~)
//! - `<ns>:{keys}:audit`         the audit trail (XADD MAXLEN ~), entry JSON
//! - `<ns>:{keys}:layout`        the number of partitions the data was written with
//!
//! A key's rate-limit state and leases sit under a hash tag of their own key id, so a
//! Cluster spreads them over every slot (they are what requests write):
//!
//! - `<ns>:{<key_id>}:rate`       the GCRA state (theoretical arrival time, unix ms)
//! - `<ns>:{<key_id>}:reservations`  hash: reservation id → what it granted, until it is
//!   given back (`reserve.lua`: a retry or a second give-back changes nothing)
//! - `<ns>:{<key_id>}:window`     sorted set: a rolling window's admissions, by the end
//!   of the time each may be spent in
//! - `<ns>:{<key_id>}:leases`     sorted set: lease id by expiry
//!
//! Writes that touch more than one key are Lua scripts rather than MULTI/EXEC: a script
//! can read and decide (does the key exist? is it already revoked?) inside the same atomic
//! step, which MULTI cannot without WATCH retries.
//!
//! Files: `conn.rs` connections and running a call under the timeout, `failure.rs` what
//! a failed call is reported as (never a redis error's own text), `health.rs`
//! failing fast while one Redis refuses connections, `layout.rs` where each Redis key
//! lives, `writes.rs` changes that wait for replicas, `records.rs` key records and their
//! two formats, `events.rs` the revocation stream, and one file per remaining store
//! trait (`delegations.rs`, `audit_log.rs`, `usage_sink.rs`, `token_revocations.rs`,
//! `rate_ledger.rs`). This file holds the public constants, `RedisStore` and its
//! constructors and accessors. The Lua scripts are in `src/store/lua/`.

mod audit_log;
mod conn;
mod delegations;
mod events;
mod failure;
mod health;
mod layout;
mod rate_ledger;
mod records;
mod token_revocations;
mod usage_sink;
mod writes;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use tokio::sync::OnceCell;

use self::conn::{Client, Conn};
use self::failure::redis_outage;
pub use self::failure::RedisFailure;
use self::health::Health;
use self::layout::Layout;
pub use self::layout::{partition_tag, slot_of_tag};
use super::{KeyStore, StoreError};
use crate::secret::Secret;

/// Approximate bound on each partition's revocation stream.
pub const STREAM_MAX_LEN: usize = 100_000;

/// The hashes a partition's packed records are spread over: enough that none grows large
/// (ten million keys in 16 partitions are ~600 a hash), few enough that a small store's
/// are not mostly empty overhead. Part of the packed layout: fixed.
pub const RECORD_BUCKETS: usize = 1024;

/// Most stream partitions: each is followed on a connection of its own by every replica.
pub const MAX_PARTITIONS: usize = 256;

/// Most keys one usage script call updates (`add_usage`): Redis runs nothing else while
/// a script runs, so a large flush is written in several short calls.
pub const USAGE_KEYS_PER_CALL: usize = 500;

/// Stream partitions on a Redis Cluster unless configured: enough to spread over 16
/// masters, few enough that each replica's followers stay cheap.
pub const CLUSTER_PARTITIONS: usize = 16;

pub struct RedisStore {
    client: Client,
    /// Whether Redis is known to refuse connections (then every call fails at once).
    health: Arc<Health>,
    conn: OnceCell<Conn>,
    /// Blocking stream reads get a connection per partition: a blocked XREAD would
    /// otherwise hold up every request multiplexed on the shared one.
    blocking: Vec<OnceCell<Conn>>,
    /// Changes of state, which wait for replicas (`write`).
    writes: OnceCell<Conn>,
    /// Rate-limit reservations, when they wait for replicas (`reserve`): WAIT blocks its
    /// connection, so neither the request path's nor the admin writes' wait behind it.
    reservations: OnceCell<Conn>,
    replica_acks: u32,
    timeout: Duration,
    layout: Layout,
    create: Script,
    revoke: Script,
    update: Script,
    delete: Script,
    revoke_tokens: Script,
    delegation: Script,
    reserve: Script,
    lease: Script,
    usage: Script,
    record: Script,
    /// `verifier.lua`: a verifier beside a key record, in either format.
    verifier: Script,
}

/// How to reach Redis beyond its URL.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// The ACL user.
    pub username: Option<String>,
    /// PEM of the CA a `rediss://` server's certificate must chain to.
    pub tls_ca: Option<Vec<u8>>,
    /// A Redis Cluster's seed nodes (`redis://host:port`). Empty: the URL names one Redis.
    pub cluster_nodes: Vec<String>,
    /// The revocation stream's partitions (1..=`MAX_PARTITIONS`).
    pub partitions: usize,
    /// Replicas that must have a change before it is acknowledged (0: the master's word).
    pub replica_acks: u32,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            username: None,
            tls_ca: None,
            cluster_nodes: Vec::new(),
            partitions: 1,
            replica_acks: 0,
        }
    }
}

impl RedisStore {
    /// Prepares a store on one Redis; the connection is made on first use, so keygate can
    /// start (and report itself not ready) while Redis is still coming up.
    pub fn new(
        url: &str,
        password: Option<&Secret>,
        namespace: &str,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        Self::with_options(url, password, namespace, timeout, &RedisOptions::default())
    }

    /// `new`, as an ACL user, over TLS checked against a CA of its own, on a Cluster, with
    /// more partitions.
    pub fn with_options(
        url: &str,
        password: Option<&Secret>,
        namespace: &str,
        timeout: Duration,
        opts: &RedisOptions,
    ) -> Result<Self, StoreError> {
        // The URL and the nodes are not quoted back: they may hold a password.
        let unavailable = |e: redis::RedisError| redis_outage("building the Redis client", &e);
        if !(1..=MAX_PARTITIONS).contains(&opts.partitions) {
            return Err(StoreError::Corrupt(format!(
                "{} stream partitions: must be 1 to {MAX_PARTITIONS}",
                opts.partitions
            )));
        }
        let certificates = |ca: &Vec<u8>| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        };
        let client = if opts.cluster_nodes.is_empty() {
            let mut info: redis::ConnectionInfo = url.parse().map_err(unavailable)?;
            if let Some(p) = password {
                info.redis.password = Some(p.expose().to_owned());
            }
            if let Some(user) = &opts.username {
                info.redis.username = Some(user.clone());
            }
            Client::Single(match &opts.tls_ca {
                None => redis::Client::open(info).map_err(unavailable)?,
                Some(ca) => {
                    redis::Client::build_with_tls(info, certificates(ca)).map_err(unavailable)?
                }
            })
        } else {
            let nodes = opts
                .cluster_nodes
                .iter()
                .map(|n| n.parse::<redis::ConnectionInfo>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            // Retries are few and short: a command that cannot be answered within the
            // store's timeout is UNAVAILABLE, and the caller (Envoy) decides.
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(100)
                .connection_timeout(timeout)
                .response_timeout(timeout);
            if let Some(p) = password {
                builder = builder.password(p.expose().to_owned());
            }
            if let Some(user) = &opts.username {
                builder = builder.username(user.clone());
            }
            if let Some(ca) = &opts.tls_ca {
                builder = builder.certs(certificates(ca));
            }
            Client::Cluster(builder.build().map_err(unavailable)?)
        };
        let health = Arc::new(Health::new(&client, timeout));
        Ok(RedisStore {
            client,
            health,
            conn: OnceCell::new(),
            blocking: (0..opts.partitions).map(|_| OnceCell::new()).collect(),
            writes: OnceCell::new(),
            reservations: OnceCell::new(),
            replica_acks: opts.replica_acks,
            timeout,
            layout: Layout::new(namespace, opts.partitions),
            create: Script::new(include_str!("../lua/create.lua")),
            revoke: Script::new(include_str!("../lua/revoke.lua")),
            update: Script::new(include_str!("../lua/update.lua")),
            delete: Script::new(include_str!("../lua/delete.lua")),
            revoke_tokens: Script::new(include_str!("../lua/revoke_tokens.lua")),
            delegation: Script::new(include_str!("../lua/delegation.lua")),
            reserve: Script::new(include_str!("../lua/reserve.lua")),
            lease: Script::new(include_str!("../lua/lease.lua")),
            usage: Script::new(include_str!("../lua/usage.lua")),
            record: Script::new(include_str!("../lua/record.lua")),
            verifier: Script::new(include_str!("../lua/verifier.lua")),
        })
    }

    /// Whether Redis is marked down: it refused or dropped a connection, and no probe has
    /// reached it since (see `Health`). Never on a Cluster.
    pub fn is_marked_down(&self) -> bool {
        self.health.down.load(Ordering::Acquire)
    }

    /// Calls this store failed at once, without asking Redis, because it was marked down.
    pub fn failed_at_once(&self) -> u64 {
        self.health.refused.load(Ordering::Relaxed)
    }

    /// Probes of a Redis marked down that did not reach it.
    pub fn failed_probes(&self) -> u64 {
        self.health.probes_failed.load(Ordering::Relaxed)
    }

    /// The partition `key_id`'s record and events are in.
    pub fn partition_of(&self, key_id: &str) -> usize {
        self.layout.partition_of(key_id)
    }

    /// Partition `partition`'s hash tag (what decides its Cluster slot).
    pub fn partition_tag(&self, partition: usize) -> &str {
        &self.layout.tags[partition]
    }
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: String = self
            .run("pinging Redis", redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }
}

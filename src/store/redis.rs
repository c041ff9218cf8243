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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, Script};
use tokio::sync::OnceCell;

use super::{
    AuditLog, Delegation, DelegationEvent, DelegationRecords, DelegationSource, DelegationsOf,
    EventId, EventKind, EventLog, KeyChange, KeyPage, KeyRecord, KeyRecords, KeyStore, KeyUsage,
    LeaseOp, LeaseResult, Owner, RateGrant, RateRequest, RateRule, RevocationEvent, StoreError,
    StreamEntry, TokenRevocation, TokenRevocationEvent, TokenRevocations, UsageDelta,
    UsageNotWritten, UsageSink, DELEGATED, TOKENS_REVOKED, UNDELEGATED,
};
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

/// Usage script calls sent at once by one flush.
const USAGE_CALLS_IN_FLIGHT: usize = 4;

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

#[derive(Clone)]
enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A connection to one Redis or to a Cluster (which follows MOVED, ASK and failovers
/// itself); every command below goes through one of these.
#[derive(Clone)]
enum Conn {
    Single(Managed),
    Cluster(ClusterConnection),
}

/// One Redis's connection manager, shared, so that `Health` can bring it back after an
/// outage without keeping it alive.
#[derive(Clone)]
struct Managed(Arc<ConnectionManager>);

impl redis::aio::ConnectionLike for Managed {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let mut manager = ConnectionManager::clone(&self.0);
        Box::pin(async move { manager.send_packed_command(cmd).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        let mut manager = ConnectionManager::clone(&self.0);
        Box::pin(async move { manager.send_packed_commands(cmd, offset, count).await })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where each Redis key lives: the partitions' hash tags.
struct Layout {
    ns: String,
    tags: Vec<String>,
}

/// Redis Cluster's slots (CRC16 of the hash tag, modulo this).
const SLOTS: u16 = 16384;

/// The slot a hash tag puts its keys in.
pub fn slot_of_tag(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % SLOTS
}

/// The hash tag of `partition` of `partitions` (see `Layout::new`).
pub fn partition_tag(partitions: usize, partition: usize) -> String {
    if partitions <= 1 {
        return "keys".to_owned();
    }
    let width = usize::from(SLOTS) / partitions;
    let band = (partition * width)..((partition + 1) * width);
    (0u32..)
        .map(|n| format!("k{partition}.{n}"))
        .find(|tag| band.contains(&usize::from(slot_of_tag(tag))))
        .expect("a range of at least 64 slots is hit within a few thousand tries")
}

impl Layout {
    /// With one partition the tag is `keys`. With more, partition `i`'s tag is the first of
    /// `k<i>.0`, `k<i>.1`, … whose slot falls in the `i`-th of `partitions` equal ranges of
    /// the slots: however a Cluster splits its slots into ranges, the partitions spread as
    /// evenly as the ranges do (a tag hashed at random would leave that to chance).
    fn new(ns: &str, partitions: usize) -> Layout {
        Layout {
            ns: ns.to_owned(),
            tags: (0..partitions.max(1))
                .map(|i| partition_tag(partitions, i))
                .collect(),
        }
    }

    fn partitions(&self) -> usize {
        self.tags.len()
    }

    fn hash_of(&self, name: &str) -> usize {
        crc32fast::hash(name.as_bytes()) as usize
    }

    /// The partition a key id, partner id or rule key belongs to.
    fn partition_of(&self, name: &str) -> usize {
        self.hash_of(name) % self.partitions()
    }

    fn key(&self, partition: usize, rest: &str) -> String {
        format!("{}:{{{}}}:{rest}", self.ns, self.tags[partition])
    }

    /// Keys outside the partitions (the audit trail, the layout marker), under the tag of
    /// every earlier keygate.
    fn global(&self, rest: &str) -> String {
        format!("{}:{{keys}}:{rest}", self.ns)
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
        let unavailable = |e: redis::RedisError| StoreError::Unavailable(e.to_string());
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
            create: Script::new(include_str!("lua/create.lua")),
            revoke: Script::new(include_str!("lua/revoke.lua")),
            update: Script::new(include_str!("lua/update.lua")),
            delete: Script::new(include_str!("lua/delete.lua")),
            revoke_tokens: Script::new(include_str!("lua/revoke_tokens.lua")),
            delegation: Script::new(include_str!("lua/delegation.lua")),
            reserve: Script::new(include_str!("lua/reserve.lua")),
            lease: Script::new(include_str!("lua/lease.lua")),
            usage: Script::new(include_str!("lua/usage.lua")),
            record: Script::new(include_str!("lua/record.lua")),
            verifier: Script::new(include_str!("lua/verifier.lua")),
        })
    }

    /// How this layout keeps key records (see `RecordFormat`).
    fn format(&self) -> RecordFormat {
        if self.layout.partitions() > 1 {
            RecordFormat::Packed
        } else {
            RecordFormat::Hash
        }
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

    /// The Redis key that holds `key_id`'s record: its own hash with one partition; with
    /// more, one of its partition's `RECORD_BUCKETS` hashes, where the record is the field
    /// named by the key id (a field costs a third of what a Redis key does).
    pub fn key_key(&self, key_id: &str) -> String {
        let p = self.partition_of(key_id);
        match self.format() {
            RecordFormat::Hash => self.layout.key(p, &format!("key:{key_id}")),
            RecordFormat::Packed => {
                let bucket =
                    self.layout.hash_of(key_id) / self.layout.partitions() % RECORD_BUCKETS;
                self.layout.key(p, &format!("keys:{bucket}"))
            }
        }
    }

    fn index_key(&self, partition: usize, owner: &Owner) -> String {
        self.layout.key(partition, &owner.index_name())
    }

    /// An owner's index lives in the owner's partition: one sorted set per owner, whatever
    /// the partitions of its keys.
    fn index_partition(&self, owner: &Owner) -> usize {
        self.layout.partition_of(&owner.index_name())
    }

    /// Both sets of a delegation live in the partner's partition.
    fn delegation_key(&self, partition: usize, of: &DelegationsOf) -> String {
        match of {
            DelegationsOf::Partner(p) => self.layout.key(partition, &format!("deleg:partner:{p}")),
            DelegationsOf::Tenant(t) => self.layout.key(partition, &format!("deleg:tenant:{t}")),
        }
    }

    fn tokens_key(&self, partition: usize) -> String {
        self.layout.key(partition, "tokens")
    }

    fn tokens_expiry_key(&self, partition: usize) -> String {
        self.layout.key(partition, "tokens:expiry")
    }

    pub fn events_key(&self, partition: usize) -> String {
        self.layout.key(partition, "events")
    }

    fn audit_key(&self) -> String {
        self.layout.global("audit")
    }

    fn layout_key(&self) -> String {
        self.layout.global("layout")
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let mut conn = self.open(self.timeout).await?;
                self.check_layout(&mut conn).await?;
                Ok::<_, StoreError>(conn)
            })
            .await?;
        Ok(conn.clone())
    }

    /// A connection of its own for blocking reads of `partition`.
    async fn blocking_conn(
        &self,
        partition: usize,
        response_timeout: Duration,
    ) -> Result<Conn, StoreError> {
        // The shared connection first: it checks the layout.
        self.conn().await?;
        let conn = self.blocking[partition]
            .get_or_try_init(|| self.open(response_timeout))
            .await?;
        Ok(conn.clone())
    }

    async fn open(&self, response_timeout: Duration) -> Result<Conn, StoreError> {
        let epoch = self.health.admit()?;
        let connect = async {
            match &self.client {
                Client::Single(client) => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(self.timeout)
                        .set_response_timeout(response_timeout)
                        .set_number_of_retries(1)
                        .set_max_delay(200);
                    let manager =
                        Arc::new(ConnectionManager::new_with_config(client.clone(), config).await?);
                    self.health.opened(&manager);
                    Ok(Conn::Single(Managed(manager)))
                }
                Client::Cluster(client) => {
                    let config = redis::cluster::ClusterConfig::new()
                        .set_connection_timeout(self.timeout)
                        .set_response_timeout(response_timeout);
                    client
                        .get_async_connection_with_config(config)
                        .await
                        .map(Conn::Cluster)
                }
            }
        };
        tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| StoreError::Unavailable("timed out connecting to Redis".into()))?
            .map_err(|e| self.health.failed(e, epoch))
    }

    /// Refuses data written with another number of partitions: its records and events
    /// would be looked for in the wrong places, and revocations missed. The first keygate
    /// to reach an empty store records its number.
    async fn check_layout(&self, conn: &mut Conn) -> Result<(), StoreError> {
        let want = self.layout.partitions();
        let recorded: String = self
            .run(
                Script::new(include_str!("lua/layout.lua"))
                    .key(self.layout_key())
                    .key(self.layout.global("events"))
                    .key(self.audit_key())
                    .arg(want)
                    .invoke_async(conn),
            )
            .await?;
        let found: usize = recorded
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("{} is not a number", self.layout_key())))?;
        if found == want {
            return Ok(());
        }
        Err(StoreError::Corrupt(format!(
            "the store under namespace {:?} was written with {found} stream partition(s), and \
             store.stream_partitions is {want}: keygate would look for keys and revocations \
             in the wrong places and miss them. Set store.stream_partitions: {found} (see \
             \"Changing the stream partitions\" in docs/operations.md)",
            self.layout.ns
        )))
    }

    /// Runs a script that changes state in `partition` on the writes' own connection, then
    /// waits until `replica_acks` replicas of that partition's master have it: a change
    /// acknowledged to the caller survives the master's failover. The wait blocks its
    /// connection, which is why writes do not share the request path's.
    async fn write<T: redis::FromRedisValue>(
        &self,
        partition: usize,
        change: Change<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.waiting_conn(&self.writes).await?;
        let out = match change {
            Change::Script(invocation) => self.run(invocation.invoke_async(&mut conn)).await?,
            Change::Command(cmd) => self.run(cmd.query_async(&mut conn)).await?,
        };
        let slot = slot_of_tag(&self.layout.tags[partition]);
        self.await_replicas(&mut conn, slot, Acks::AllConnected)
            .await?;
        Ok(out)
    }

    /// After a write through `conn` to `slot`, waits until `replica_acks` replicas of the
    /// slot's master have it (nothing to wait for with `replica_acks` 0). Fewer answered:
    /// with `Acks::AllConnected`, enough if they are all the master has connected;
    /// otherwise UNAVAILABLE, the write on the master only.
    async fn await_replicas(
        &self,
        conn: &mut Conn,
        slot: u16,
        acks: Acks,
    ) -> Result<(), StoreError> {
        let what = match acks {
            Acks::AllConnected => "change",
            Acks::Strict => "reservation",
        };
        if self.replica_acks == 0 {
            return Ok(());
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.replica_acks)
            .arg(self.timeout.as_millis() as u64);
        let acked: u32 = self.on_slot_master(conn, slot, &wait).await?;
        if acked >= self.replica_acks {
            return Ok(());
        }
        if acks == Acks::Strict {
            crate::telemetry::metrics().store_errors.inc();
            return Err(StoreError::Unavailable(format!(
                "the {what} reached {acked} replica(s) in time, store.replica_acks is {}: \
                 not spent (a failover could lose it)",
                self.replica_acks
            )));
        }
        // Fewer answered than asked: wait for the replicas there are. A master left with
        // none (its replica failed over to it, or died) has nobody to copy to; refusing
        // then would report a revocation that is in force as failed.
        let info: String = self
            .on_slot_master(conn, slot, redis::cmd("INFO").arg("replication"))
            .await?;
        let connected: u32 = info
            .lines()
            .find_map(|l| l.strip_prefix("connected_slaves:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        if acked >= self.replica_acks.min(connected) {
            tracing::warn!(
                slot,
                acked,
                wanted = self.replica_acks,
                "a {what} was acknowledged by fewer replicas than store.replica_acks: its master has no more connected"
            );
            return Ok(());
        }
        crate::telemetry::metrics().store_errors.inc();
        Err(StoreError::Unavailable(format!(
            "the {what} is on the master, but {acked} of its {connected} replica(s) \
             acknowledged it in time (store.replica_acks is {}): a failover now could lose \
             it; retry (the call is idempotent)",
            self.replica_acks
        )))
    }

    /// `cmd` (which names no key) on the master of `slot`, through `conn`.
    async fn on_slot_master<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
        slot: u16,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let limit = self.timeout * 2;
        match conn {
            Conn::Single(c) => self.run_for(limit, cmd.query_async(c)).await,
            Conn::Cluster(c) => {
                // Sent to the master of the slot, on the connection the script went
                // through (WAIT counts that connection's writes).
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(slot, SlotAddr::Master),
                ));
                let value = self.run_for(limit, c.route_command(cmd, route)).await?;
                redis::from_redis_value(&value).map_err(unavailable)
            }
        }
    }

    /// A connection of its own for calls followed by `WAIT` (which blocks its
    /// connection), opened on first use, after the shared one.
    async fn waiting_conn(&self, cell: &OnceCell<Conn>) -> Result<Conn, StoreError> {
        self.conn().await?;
        let conn = cell.get_or_try_init(|| self.open(self.timeout * 2)).await?;
        Ok(conn.clone())
    }

    /// Runs one Redis exchange under the store's timeout.
    async fn run<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.run_for(self.timeout, f).await
    }

    /// Runs one Redis exchange under `limit`; at once an error while Redis is marked down
    /// (`Health`), without sending anything.
    async fn run_for<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let epoch = self.health.admit()?;
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(|e| self.health.failed(e, epoch)),
            Err(_) => Err(StoreError::Unavailable(
                "Redis did not answer in time".into(),
            )),
        }
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    crate::telemetry::metrics().store_errors.inc();
    StoreError::Unavailable(e.to_string())
}

/// The first wait between two probes of a Redis marked down; it doubles up to
/// `PROBE_MAX_WAIT`.
const PROBE_FIRST_WAIT: Duration = Duration::from_millis(50);
const PROBE_MAX_WAIT: Duration = Duration::from_secs(1);

/// What a call is answered while Redis is marked down.
const MARKED_DOWN: &str =
    "Redis refused or dropped the connection; marked down until a probe reaches it again";

/// Fails fast while one Redis is known to refuse connections.
///
/// Without this a killed Redis costs every call a full `store.timeout`: the connection
/// manager waits out its reconnection backoff before it gives up, and the check behind the
/// call outlives Envoy's own timeout (so `rate_limits.on_store_error: allow` never gets to
/// allow). A refused connection marks the store down (a reset one, once a new connection
/// is refused too: `Health::check`); while it is down every call
/// fails at once (UNAVAILABLE, counted in `keygate_store_fast_failures_total`, and in
/// `keygate_store_errors_total` as every failed call is), and one background probe
/// connects anew, at once and then on a bounded backoff (`PROBE_FIRST_WAIT` doubling to
/// `PROBE_MAX_WAIT`). When it gets a PONG, the connections opened before are brought back
/// (each reconnected) and then the store is marked up: the first call after that goes
/// through as usual. A Redis that accepts and does not answer is not refusing: each call
/// still waits `store.timeout` for it.
///
/// A Redis Cluster is never marked down as a whole: a refused node is one master of
/// several, whose slots fail over, and the cluster client routes around it itself.
struct Health {
    /// What the probe connects with; `None` on a Cluster (never marked down).
    probe: Option<redis::Client>,
    timeout: Duration,
    /// Read on every call; changed only under `state`.
    down: AtomicBool,
    epoch: AtomicU64,
    state: Mutex<HealthState>,
    /// Calls failed at once while down (this store's share of the metric).
    refused: AtomicU64,
    /// Probes that did not reach Redis.
    probes_failed: AtomicU64,
}

#[derive(Default)]
struct HealthState {
    down: bool,
    probing: bool,
    /// A dropped connection's check is under way (`Health::check`).
    checking: bool,
    /// The single Redis's connection managers opened so far (those still in use), which
    /// the probe reconnects before marking the store up: a manager whose last reconnection
    /// failed would otherwise fail its next call before it tries again.
    managers: Vec<Weak<ConnectionManager>>,
}

impl Health {
    fn new(client: &Client, timeout: Duration) -> Health {
        // In /metrics (at 0) from the start, not from the first outage on.
        health_metrics();
        Health {
            probe: match client {
                Client::Single(c) => Some(c.clone()),
                Client::Cluster(_) => None,
            },
            timeout,
            down: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            state: Mutex::new(HealthState::default()),
            refused: AtomicU64::new(0),
            probes_failed: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Before a call: the epoch it runs in (for `failed`), or the error at once when the
    /// store is marked down.
    fn admit(&self) -> Result<u64, StoreError> {
        if !self.down.load(Ordering::Acquire) {
            return Ok(self.epoch.load(Ordering::Acquire));
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        health_metrics().fast_failures.inc();
        crate::telemetry::metrics().store_errors.inc();
        Err(StoreError::Unavailable(MARKED_DOWN.into()))
    }

    fn opened(&self, manager: &Arc<ConnectionManager>) {
        let mut state = self.state();
        state.managers.retain(|m| m.strong_count() > 0);
        state.managers.push(Arc::downgrade(manager));
    }

    /// A call begun in `epoch` failed with `e`: a refused connection marks the store down
    /// (unless it was marked up since the call began: that call was on a connection of the
    /// outage). A dropped one marks it down only if a new connection is refused too: one
    /// connection closed (by Redis's idle `timeout`, `CLIENT KILL`, a proxy) is not an
    /// outage, and must not fail every other call.
    fn failed(self: &Arc<Self>, e: redis::RedisError, epoch: u64) -> StoreError {
        if self.probe.is_some() {
            if e.is_connection_refusal() {
                self.mark_down(epoch, &e);
            } else if e.is_connection_dropped() {
                self.check(epoch);
            }
        }
        unavailable(e)
    }

    /// After a dropped connection: one new connection decides whether Redis is down.
    fn check(self: &Arc<Self>, epoch: u64) {
        {
            let mut state = self.state();
            if state.down || state.probing || state.checking {
                return;
            }
            state.checking = true;
        }
        let health = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(h) = health.upgrade() else {
                return;
            };
            let reaches = h.reaches_redis().await;
            h.state().checking = false;
            if !reaches {
                h.mark_down(epoch, &"a connection was dropped and a new one is refused");
            }
        });
    }

    fn mark_down(self: &Arc<Self>, epoch: u64, why: &dyn std::fmt::Display) {
        let mut state = self.state();
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if !state.down {
            state.down = true;
            self.down.store(true, Ordering::Release);
            health_metrics().marked_down.inc();
            tracing::warn!(error = %why, "Redis is down: store calls fail at once until a probe reaches it again");
        }
        if !state.probing {
            state.probing = true;
            tokio::spawn(probe(Arc::downgrade(self)));
        }
    }

    /// A new connection to Redis answers PING.
    async fn reaches_redis(&self) -> bool {
        let Some(client) = &self.probe else {
            return true;
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let ping = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        matches!(
            tokio::time::timeout(self.timeout * 2, ping).await,
            Ok(Ok(_))
        )
    }

    /// Redis answers again: every manager reconnects (its first call after a failed
    /// reconnection only starts a new one), then the store is marked up.
    async fn bring_back(&self) {
        let managers: Vec<Arc<ConnectionManager>> = self
            .state()
            .managers
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for manager in managers {
            for _ in 0..2 {
                let mut m = ConnectionManager::clone(&manager);
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(&mut m);
                if let Ok(Ok(_)) = tokio::time::timeout(self.timeout, ping).await {
                    break;
                }
            }
        }
        let mut state = self.state();
        state.down = false;
        state.probing = false;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.down.store(false, Ordering::Release);
        health_metrics().marked_down.dec();
        tracing::info!("Redis answers again: store marked up");
    }
}

/// Probes a Redis marked down until it answers (or the store is dropped).
async fn probe(health: Weak<Health>) {
    let mut wait = PROBE_FIRST_WAIT;
    loop {
        let Some(h) = health.upgrade() else {
            return;
        };
        if h.reaches_redis().await {
            h.bring_back().await;
            return;
        }
        h.probes_failed.fetch_add(1, Ordering::Relaxed);
        drop(h);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(PROBE_MAX_WAIT);
    }
}

struct HealthMetrics {
    marked_down: prometheus::IntGauge,
    fast_failures: prometheus::IntCounter,
}

/// The store's health metrics, in keygate's registry from the first Redis store on.
fn health_metrics() -> &'static HealthMetrics {
    static METRICS: OnceLock<HealthMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let marked_down = prometheus::IntGauge::new(
            "store_marked_down",
            "1 while Redis is marked down (it refused a connection): store calls fail at once until a probe reaches it again.",
        )
        .expect("valid metric");
        let fast_failures = prometheus::IntCounter::new(
            "store_fast_failures_total",
            "Store calls failed at once, without asking Redis, because it was marked down.",
        )
        .expect("valid metric");
        let registry = &crate::telemetry::metrics().registry;
        for c in [
            Box::new(marked_down.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(fast_failures.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        HealthMetrics {
            marked_down,
            fast_failures,
        }
    })
}

/// A key record's raw hash fields, as `RECORD_FIELDS` names them: `data` (JSON),
/// `revoked_at_ms`, and the usage counters.
type RecordFields = (
    Option<String>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
);

/// The hash fields a record is read from (the scripts that return a record read the
/// same, in this order).
const RECORD_FIELDS: [&str; 5] = [
    "data",
    "revoked_at_ms",
    "used_allowed",
    "used_denied",
    "last_used_ms",
];

/// What XINFO STREAM says of the revocation stream.
struct StreamInfo {
    last_generated: EventId,
    length: u64,
    entries_added: u64,
    first_entry: Option<EventId>,
}

/// How key records are kept: the hash of every earlier keygate (one partition), or the
/// packed string of partitioned layouts (`record.lua`, `packed.rs`), a third of the
/// memory. A layout with more than one partition is new (no earlier keygate could write
/// one), so it starts packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecordFormat {
    Hash,
    Packed,
}

/// What `RedisStore::await_replicas` accepts when fewer replicas than `replica_acks`
/// acknowledge a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acks {
    /// As many as the master has connected (admin changes: a revocation in force is not
    /// reported as failed because the master has lost its replica).
    AllConnected,
    /// `replica_acks`, whatever the master has (rate-limit grants: one not on a replica
    /// is not spent).
    Strict,
}

/// A change for `RedisStore::write`.
enum Change<'a> {
    Script(&'a redis::ScriptInvocation<'a>),
    Command(&'a redis::Cmd),
}

impl RedisStore {
    /// The script that changes `key_id`'s record: `hash_script` with one partition, else
    /// `record.lua`'s `op`; its keys (the record's, the partition's stream) and the
    /// operation's leading arguments given, the rest for the caller to add.
    fn record_change<'a>(
        &'a self,
        hash_script: &'a Script,
        op: &str,
        key_id: &str,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = match self.format() {
            RecordFormat::Hash => hash_script.prepare_invoke(),
            RecordFormat::Packed => {
                let mut invocation = self.record.prepare_invoke();
                invocation.arg(op).arg(key_id);
                invocation
            }
        };
        invocation
            .key(self.key_key(key_id))
            .key(self.events_key(self.partition_of(key_id)));
        invocation
    }

    /// The command that reads `key_id`'s record (as `decode_raw` reads its answer).
    fn read_cmd(&self, key_id: &str) -> redis::Cmd {
        let key = self.key_key(key_id);
        match self.format() {
            RecordFormat::Hash => {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(key).arg(&RECORD_FIELDS[..]);
                cmd
            }
            RecordFormat::Packed => {
                let mut cmd = redis::cmd("HGET");
                cmd.arg(key).arg(key_id);
                cmd
            }
        }
    }

    /// A record as Redis answered it (`read_cmd`, or a script returning the record), and
    /// what an update compares to know nobody wrote in between. `None`: no such key.
    fn decode_raw(
        &self,
        key_id: &str,
        raw: redis::Value,
    ) -> Result<Option<(KeyRecord, Vec<u8>)>, StoreError> {
        let corrupt = |e: redis::RedisError| StoreError::Corrupt(e.to_string());
        match self.format() {
            RecordFormat::Hash => {
                if raw == redis::Value::Nil {
                    return Ok(None);
                }
                let fields: RecordFields = redis::from_redis_value(&raw).map_err(corrupt)?;
                let data = fields.0.clone().unwrap_or_default().into_bytes();
                Ok(decode(fields)?.map(|record| (record, data)))
            }
            RecordFormat::Packed => {
                let Some(bytes): Option<Vec<u8>> =
                    redis::from_redis_value(&raw).map_err(corrupt)?
                else {
                    return Ok(None);
                };
                decode_packed(key_id, &bytes).map(Some)
            }
        }
    }
}

/// A packed record string, `<revoked_at_ms>|<allowed>|<denied>|<last_used_ms>|<packed>`.
fn decode_packed(key_id: &str, bytes: &[u8]) -> Result<(KeyRecord, Vec<u8>), StoreError> {
    let corrupt = || StoreError::Corrupt(format!("key {key_id}: malformed record"));
    let mut parts = bytes.splitn(5, |b| *b == b'|');
    let mut number = || -> Result<Option<u64>, StoreError> {
        let field = parts.next().ok_or_else(corrupt)?;
        if field.is_empty() {
            return Ok(None);
        }
        std::str::from_utf8(field)
            .ok()
            .and_then(|t| t.parse().ok())
            .map(Some)
            .ok_or_else(corrupt)
    };
    let (revoked, allowed, denied, last_used) = (number()?, number()?, number()?, number()?);
    let packed = parts.next().ok_or_else(corrupt)?;
    let mut record = super::packed::decode(key_id, packed)?;
    record.revoked_at_ms = revoked;
    record.usage = KeyUsage {
        allowed: allowed.unwrap_or(0),
        denied: denied.unwrap_or(0),
        last_used_at_ms: last_used,
    };
    Ok((record, packed.to_vec()))
}

impl RedisStore {
    /// `None` when the partition's stream does not exist.
    async fn stream_info(&self, partition: usize) -> Result<Option<StreamInfo>, StoreError> {
        let mut conn = self.conn().await?;
        let events = self.events_key(partition);
        let exists: bool = self.run(conn.exists(&events)).await?;
        if !exists {
            return Ok(None);
        }
        let info: Vec<redis::Value> = self
            .run(
                redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(&events)
                    .query_async(&mut conn),
            )
            .await?;
        let mut last_generated = EventId::START;
        let mut length: u64 = 0;
        let mut entries_added = None;
        let mut first_entry = None;
        for pair in info.chunks(2) {
            let [name, value] = pair else { continue };
            let name: String = redis::from_redis_value(name).unwrap_or_default();
            match name.as_str() {
                "last-generated-id" => {
                    let id: String = redis::from_redis_value(value).unwrap_or_default();
                    last_generated = event_id(&id)?;
                }
                "length" => length = redis::from_redis_value(value).unwrap_or(0),
                "entries-added" => entries_added = redis::from_redis_value(value).ok(),
                "first-entry" => {
                    // [id, [field, value, …]] or nil when the stream is empty.
                    if let redis::Value::Array(entry) = value {
                        if let Some(id) = entry.first() {
                            let id: String = redis::from_redis_value(id).unwrap_or_default();
                            first_entry = Some(event_id(&id)?);
                        }
                    }
                }
                _ => {}
            }
        }
        let Some(entries_added) = entries_added else {
            // Redis before 7.0 does not say how much it trimmed.
            return Err(StoreError::Corrupt(
                "XINFO STREAM has no entries-added: keygate needs Redis 7.0 or newer".into(),
            ));
        };
        Ok(Some(StreamInfo {
            last_generated,
            length,
            entries_added,
            first_entry,
        }))
    }
}

fn event_id(s: &str) -> Result<EventId, StoreError> {
    EventId::parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad stream id {s}")))
}

/// A stream entry from XREAD: an event, or what keygate cannot read of it (a newer
/// version's kind, a missing field), never an error that would stop the reader there.
fn decode_entry(entry: &redis::streams::StreamId) -> Result<StreamEntry, StoreError> {
    let id = event_id(&entry.id)?;
    let text = |name: &str| entry.get::<String>(name);
    let key_id = text("key_id").filter(|k| crate::apikey::token::valid_key_id(k));
    let unreadable = |detail: String| StreamEntry::Unreadable {
        id,
        key_id: key_id.clone(),
        detail,
    };
    let kind_name = text("kind");
    if let Some(granted) = match kind_name.as_deref() {
        Some(DELEGATED) => Some(true),
        Some(UNDELEGATED) => Some(false),
        _ => None,
    } {
        return Ok(match (text("partner_id"), text("tenant_id")) {
            (Some(partner_id), Some(tenant_id)) => StreamEntry::Delegation(DelegationEvent {
                id,
                partner_id,
                tenant_id,
                granted,
                at_ms: text("at_ms").and_then(|t| t.parse().ok()).unwrap_or(0),
            }),
            _ => unreadable("delegation change without its partner and tenant".into()),
        });
    }
    if kind_name.as_deref() == Some(TOKENS_REVOKED) {
        return Ok(
            match text("rule").map(|r| serde_json::from_str::<TokenRevocation>(&r)) {
                Some(Ok(revocation)) => {
                    StreamEntry::Tokens(TokenRevocationEvent { id, revocation })
                }
                Some(Err(e)) => unreadable(format!("token revocation cannot be read: {e}")),
                None => unreadable("token revocation without its rule".into()),
            },
        );
    }
    let kind = match text("kind") {
        Some(name) => match EventKind::parse(&name) {
            Some(kind) => kind,
            None => return Ok(unreadable(format!("unknown event kind {name:?}"))),
        },
        None => return Ok(unreadable("no event kind".into())),
    };
    let Some(key) = key_id.clone() else {
        return Ok(unreadable("no readable key id".into()));
    };
    Ok(StreamEntry::Event(RevocationEvent {
        id: entry.id.clone(),
        key_id: key,
        kind,
        at_ms: text("at_ms").and_then(|t| t.parse().ok()).unwrap_or(0),
    }))
}

/// A record from its hash fields (`data`, `revoked_at_ms`).
fn decode(fields: RecordFields) -> Result<Option<KeyRecord>, StoreError> {
    let (Some(data), revoked, allowed, denied, last_used) = fields else {
        return Ok(None);
    };
    let mut rec: KeyRecord =
        serde_json::from_str(&data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if revoked.is_some() {
        rec.revoked_at_ms = revoked;
    }
    rec.usage = KeyUsage {
        allowed: allowed.unwrap_or(0),
        denied: denied.unwrap_or(0),
        last_used_at_ms: last_used,
    };
    Ok(Some(rec))
}

#[async_trait]
impl DelegationSource for RedisStore {
    async fn is_delegated(&self, partner_id: &str, tenant_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.delegation_key(
            self.layout.partition_of(partner_id),
            &DelegationsOf::Partner(partner_id.to_owned()),
        );
        self.run(conn.sismember(key, tenant_id)).await
    }
}

#[async_trait]
impl super::RateLedger for RedisStore {
    async fn reserve(&self, key_id: &str, req: &RateRequest) -> Result<RateGrant, StoreError> {
        let key = |name: &str| format!("{}:{{{key_id}}}:{name}", self.layout.ns);
        let (rule, a, b) = match req.rule {
            RateRule::Gcra { interval_ms, burst } => ("gcra", interval_ms, u64::from(burst)),
            RateRule::Window { limit, window_ms } => ("window", u64::from(limit), window_ms),
        };
        let mut invocation = self.reserve.prepare_invoke();
        invocation
            .key(key("rate"))
            .key(key("reservations"))
            .key(key("window"))
            .arg(rule)
            .arg(a)
            .arg(b)
            .arg(&req.id)
            .arg(req.want)
            .arg(req.spend_ms)
            .arg(super::RESERVATION_RECORD_MS)
            .arg(req.give_back.len());
        for g in &req.give_back {
            invocation.arg(&g.id).arg(g.unspent.map_or(-1, i64::from));
        }
        // A grant is spent only once `replica_acks` replicas have it, strictly: a
        // failover that rolled it back would grant the same admissions again, and a
        // replica merely disconnected for a moment can still be promoted. With none to
        // wait for, the request path's connection; else one of the reservations' own.
        let mut conn = if self.replica_acks == 0 {
            self.conn().await?
        } else {
            self.waiting_conn(&self.reservations).await?
        };
        let (granted, remaining, retry_after_ms, full_in_ms): (u32, u32, u64, u64) =
            self.run(invocation.invoke_async(&mut conn)).await?;
        if granted > 0 {
            self.await_replicas(&mut conn, slot_of_tag(key_id), Acks::Strict)
                .await?;
        }
        Ok(RateGrant {
            granted,
            remaining,
            retry_after_ms,
            full_in_ms,
        })
    }

    async fn lease(
        &self,
        key_id: &str,
        lease_id: &str,
        op: LeaseOp,
    ) -> Result<LeaseResult, StoreError> {
        let (name, ttl_ms, limit) = match op {
            LeaseOp::Acquire { ttl_ms, limit } => ("acquire", ttl_ms, limit),
            LeaseOp::Renew { ttl_ms } => ("renew", ttl_ms, 0),
            LeaseOp::Release => ("release", 0, 0),
        };
        let mut conn = self.conn().await?;
        let (done, held): (i64, u32) = self
            .run(
                self.lease
                    .key(format!("{}:{{{key_id}}}:leases", self.layout.ns))
                    .arg(name)
                    .arg(lease_id)
                    .arg(ttl_ms)
                    .arg(limit)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(LeaseResult {
            done: done == 1,
            held,
        })
    }
}

#[async_trait]
impl KeyRecords for RedisStore {
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut stored = record.clone();
        stored.revoked_at_ms = None;
        let p = self.partition_of(&record.key_id);
        let index = self.index_key(self.index_partition(&record.owner()), &record.owner());
        let created: bool = match self.format() {
            RecordFormat::Hash => {
                let json = serde_json::to_string(&stored)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let created: i64 = self
                    .write(
                        p,
                        Change::Script(
                            self.create
                                .key(self.key_key(&record.key_id))
                                .key(index)
                                .arg(json)
                                .arg(&record.key_id),
                        ),
                    )
                    .await?;
                created == 1
            }
            RecordFormat::Packed => {
                // The index entry first, in the owner's partition: a record is never
                // without one, and an entry whose record is missing (a crash in between)
                // is skipped by `list`.
                let mut value = b"||||".to_vec();
                value.extend(super::packed::encode(&stored)?);
                let index_partition = self.index_partition(&record.owner());
                let added: i64 = self
                    .write(
                        index_partition,
                        Change::Command(redis::cmd("ZADD").arg(&index).arg(0).arg(&record.key_id)),
                    )
                    .await?;
                let set: i64 = self
                    .write(
                        p,
                        Change::Command(
                            redis::cmd("HSETNX")
                                .arg(self.key_key(&record.key_id))
                                .arg(&record.key_id)
                                .arg(value),
                        ),
                    )
                    .await?;
                if set == 0 && added == 1 {
                    // Another key has this id: its owner's index is not ours to add to.
                    let _: i64 = self
                        .write(
                            index_partition,
                            Change::Command(redis::cmd("ZREM").arg(&index).arg(&record.key_id)),
                        )
                        .await?;
                }
                set == 1
            }
        };
        if created {
            Ok(())
        } else {
            Err(StoreError::Conflict(record.key_id.clone()))
        }
    }

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn().await?;
        let raw: redis::Value = self
            .run(self.read_cmd(key_id).query_async(&mut conn))
            .await?;
        Ok(self.decode_raw(key_id, raw)?.map(|(record, _)| record))
    }

    async fn get_verifiable(
        &self,
        key_id: &str,
    ) -> Result<Option<(KeyRecord, Option<String>)>, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.key_key(key_id);
        let mut verifier = redis::cmd("HGET");
        match self.format() {
            RecordFormat::Hash => verifier.arg(&key).arg("verifier"),
            RecordFormat::Packed => verifier.arg(&key).arg(format!("{key_id}:v")),
        };
        // One round trip: both live under the record's own key (one slot).
        let (raw, verifier): (redis::Value, Option<String>) = self
            .run(
                redis::pipe()
                    .add_command(self.read_cmd(key_id))
                    .add_command(verifier)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(self
            .decode_raw(key_id, raw)?
            .map(|(record, _)| (record, verifier)))
    }

    async fn set_verifier(&self, key_id: &str, verifier: &str) -> Result<bool, StoreError> {
        let mut invocation = self.verifier.prepare_invoke();
        invocation.key(self.key_key(key_id));
        match self.format() {
            RecordFormat::Hash => invocation.arg("hash").arg(verifier),
            RecordFormat::Packed => invocation.arg("packed").arg(verifier).arg(key_id),
        };
        // Not waited on by replicas: a verifier lost in a failover costs one argon2 run.
        let mut conn = self.conn().await?;
        let written: i64 = self.run(invocation.invoke_async(&mut conn)).await?;
        Ok(written == 1)
    }

    async fn list(
        &self,
        owner: &Owner,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        if limit == 0 {
            return Ok(KeyPage {
                keys: Vec::new(),
                next_after: None,
            });
        }
        let mut conn = self.conn().await?;
        let min = match after {
            Some(a) => format!("({a}"),
            None => "-".to_owned(),
        };
        let index = self.index_key(self.index_partition(owner), owner);
        let mut ids: Vec<String> = self
            .run(conn.zrangebylex_limit(index, min, "+", 0, limit as isize + 1))
            .await?;
        let more = ids.len() > limit;
        ids.truncate(limit);
        // The records, one pipeline per partition (a pipeline stays in one slot).
        let mut by_partition: std::collections::BTreeMap<usize, Vec<&String>> =
            std::collections::BTreeMap::new();
        for id in &ids {
            by_partition
                .entry(self.partition_of(id))
                .or_default()
                .push(id);
        }
        let fetched = futures::future::try_join_all(by_partition.into_values().map(|group| {
            let mut conn = conn.clone();
            let mut pipe = redis::pipe();
            for id in &group {
                pipe.add_command(self.read_cmd(id));
            }
            async move {
                let rows: Vec<redis::Value> = self.run(pipe.query_async(&mut conn)).await?;
                Ok::<_, StoreError>(group.into_iter().zip(rows).collect::<Vec<_>>())
            }
        }))
        .await?;
        let mut keys = Vec::with_capacity(ids.len());
        for (id, row) in fetched.into_iter().flatten() {
            // An index entry whose record is gone, or is another owner's, is not listed.
            if let Some((record, _)) = self.decode_raw(id, row)? {
                if record.owner() == *owner {
                    keys.push(record);
                }
            }
        }
        keys.sort_unstable_by(|a, b| a.key_id.cmp(&b.key_id));
        let next_after = if more { ids.last().cloned() } else { None };
        Ok(KeyPage { keys, next_after })
    }

    async fn revoke(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        let mut revoke = self.record_change(&self.revoke, "revoke", key_id);
        revoke
            .arg(at_ms)
            .arg(key_id)
            .arg(STREAM_MAX_LEN)
            .arg(EventKind::Revoked.as_str());
        let raw: redis::Value = self
            .write(self.partition_of(key_id), Change::Script(&revoke))
            .await?;
        Ok(self.decode_raw(key_id, raw)?.map(|(record, _)| record))
    }

    async fn update(
        &self,
        key_id: &str,
        change: &KeyChange,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        // Read, change, and write back only if nobody wrote in between; a concurrent
        // update makes us read again. Records are written by keygate alone, so the change
        // is made here rather than in Lua.
        let p = self.partition_of(key_id);
        for _ in 0..8 {
            let mut conn = self.conn().await?;
            let raw: redis::Value = self
                .run(self.read_cmd(key_id).query_async(&mut conn))
                .await?;
            let Some((mut record, as_read)) = self.decode_raw(key_id, raw)? else {
                return Ok(None);
            };
            change.apply(&mut record);
            let mut stored = record.clone();
            stored.revoked_at_ms = None;
            let new_value = match self.format() {
                RecordFormat::Hash => {
                    serde_json::to_vec(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))?
                }
                RecordFormat::Packed => super::packed::encode(&stored)?,
            };
            let mut update = self.record_change(&self.update, "update", key_id);
            update
                .arg(as_read)
                .arg(new_value)
                .arg(at_ms)
                .arg(key_id)
                .arg(STREAM_MAX_LEN)
                .arg(EventKind::Updated.as_str());
            let written: i64 = self.write(p, Change::Script(&update)).await?;
            match written {
                1 => return Ok(Some(record)),
                -1 => return Ok(None),
                _ => continue,
            }
        }
        Err(StoreError::Unavailable(format!(
            "key {key_id} kept changing while being updated"
        )))
    }

    async fn delete(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        let Some(existing) = self.get(key_id).await? else {
            return Ok(None);
        };
        let p = self.partition_of(key_id);
        let owner = existing.owner();
        let index = self.index_key(self.index_partition(&owner), &owner);
        let mut delete = self.record_change(&self.delete, "delete", key_id);
        if self.format() == RecordFormat::Hash {
            // One partition: the index entry goes in the same step.
            delete.key(&index);
        }
        delete
            .arg(at_ms)
            .arg(key_id)
            .arg(STREAM_MAX_LEN)
            .arg(EventKind::Deleted.as_str());
        let raw: redis::Value = self.write(p, Change::Script(&delete)).await?;
        if self.format() == RecordFormat::Packed {
            // The record went first: an index entry left by a crash here is skipped.
            let _: i64 = self
                .write(
                    self.index_partition(&owner),
                    Change::Command(redis::cmd("ZREM").arg(&index).arg(key_id)),
                )
                .await?;
        }
        Ok(self.decode_raw(key_id, raw)?.map(|(record, _)| record))
    }
}

#[async_trait]
impl DelegationRecords for RedisStore {
    async fn set_delegation(
        &self,
        d: &Delegation,
        granted: bool,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        let p = self.layout.partition_of(&d.partner_id);
        let changed: i64 = self
            .write(
                p,
                Change::Script(
                    self.delegation
                        .key(self.delegation_key(p, &DelegationsOf::Partner(d.partner_id.clone())))
                        .key(self.delegation_key(p, &DelegationsOf::Tenant(d.tenant_id.clone())))
                        .key(self.events_key(p))
                        .arg(&d.partner_id)
                        .arg(&d.tenant_id)
                        .arg(if granted { "1" } else { "0" })
                        .arg(at_ms)
                        .arg(STREAM_MAX_LEN)
                        .arg(if granted { DELEGATED } else { UNDELEGATED }),
                ),
            )
            .await?;
        Ok(changed == 1)
    }

    async fn delegations(&self, of: &DelegationsOf) -> Result<Vec<Delegation>, StoreError> {
        let conn = self.conn().await?;
        // A partner's tenants are in its partition; a tenant's partners in each of theirs.
        let partitions = match of {
            DelegationsOf::Partner(p) => vec![self.layout.partition_of(p)],
            DelegationsOf::Tenant(_) => (0..self.layout.partitions()).collect(),
        };
        let sets = futures::future::try_join_all(partitions.into_iter().map(|p| {
            let mut conn = conn.clone();
            let key = self.delegation_key(p, of);
            async move { self.run(conn.smembers::<_, Vec<String>>(key)).await }
        }))
        .await?;
        let mut others: Vec<String> = sets.into_iter().flatten().collect();
        others.sort();
        others.dedup();
        Ok(others.into_iter().map(|other| of.with(other)).collect())
    }
}

#[async_trait]
impl AuditLog for RedisStore {
    async fn append_audit(&self, entry: &super::audit::AuditEntry) -> Result<(), StoreError> {
        let json = serde_json::to_string(entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut conn = self.conn().await?;
        let _: String = self
            .run(
                redis::cmd("XADD")
                    .arg(self.audit_key())
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_MAX_LEN)
                    .arg("*")
                    .arg("entry")
                    .arg(json)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    async fn audit(
        &self,
        q: &super::audit::AuditQuery,
    ) -> Result<Vec<super::audit::AuditEntry>, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.audit_key();
        let mut out = Vec::new();
        let mut start = format!("{}-0", q.since_ms);
        // Pages of the stream, filtered here: the trail is bounded, the filters are few.
        loop {
            let reply: redis::streams::StreamRangeReply =
                self.run(conn.xrange_count(&key, &start, "+", 500)).await?;
            let Some(last) = reply.ids.last().map(|e| e.id.clone()) else {
                break;
            };
            for e in &reply.ids {
                let Some(json) = e.get::<String>("entry") else {
                    continue;
                };
                let mut entry: super::audit::AuditEntry = serde_json::from_str(&json)
                    .map_err(|err| StoreError::Corrupt(err.to_string()))?;
                entry.id = e.id.clone();
                if q.matches(&entry) {
                    out.push(entry);
                    if out.len() >= q.limit {
                        return Ok(out);
                    }
                }
            }
            if reply.ids.len() < 500 {
                break;
            }
            start = format!("({last}");
        }
        Ok(out)
    }
}

#[async_trait]
impl UsageSink for RedisStore {
    async fn add_usage(&self, batch: &[UsageDelta]) -> Result<(), UsageNotWritten> {
        use futures::StreamExt;
        if batch.is_empty() {
            return Ok(());
        }
        let conn = match self.conn().await {
            Ok(conn) => conn,
            Err(error) => {
                return Err(UsageNotWritten {
                    unwritten: batch.to_vec(),
                    error,
                })
            }
        };
        // One script call per part: a script's keys stay in one slot (one partition), and
        // a part of at most USAGE_KEYS_PER_CALL keys holds Redis only briefly. Each part
        // succeeds or fails alone, and only the failed ones are reported.
        let mut by_partition: std::collections::BTreeMap<usize, Vec<&UsageDelta>> =
            std::collections::BTreeMap::new();
        for d in batch {
            by_partition
                .entry(self.partition_of(&d.key_id))
                .or_default()
                .push(d);
        }
        let mut calls = Vec::new();
        for part in by_partition
            .values()
            .flat_map(|group| group.chunks(USAGE_KEYS_PER_CALL))
        {
            let mut conn = conn.clone();
            let mut invocation = match self.format() {
                RecordFormat::Hash => self.usage.prepare_invoke(),
                RecordFormat::Packed => {
                    let mut invocation = self.record.prepare_invoke();
                    invocation.arg("usage");
                    invocation
                }
            };
            for d in part {
                if self.format() == RecordFormat::Packed {
                    invocation.arg(&d.key_id);
                }
                invocation
                    .key(self.key_key(&d.key_id))
                    .arg(d.allowed)
                    .arg(d.denied)
                    .arg(d.last_used_at_ms);
            }
            calls.push(async move {
                let written: Result<i64, _> = self.run(invocation.invoke_async(&mut conn)).await;
                (part, written.map(drop))
            });
        }
        // A few calls at a time: each waits only for those ahead of it, never for a whole
        // large batch, within the store's timeout.
        let outcomes: Vec<(&[&UsageDelta], Result<(), StoreError>)> = futures::stream::iter(calls)
            .buffer_unordered(USAGE_CALLS_IN_FLIGHT)
            .collect()
            .await;
        let mut failed: Option<UsageNotWritten> = None;
        for (part, outcome) in outcomes {
            if let Err(error) = outcome {
                let f = failed.get_or_insert(UsageNotWritten {
                    unwritten: Vec::new(),
                    error,
                });
                f.unwritten.extend(part.iter().map(|d| (*d).clone()));
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl TokenRevocations for RedisStore {
    async fn revoke_tokens(
        &self,
        revocation: &TokenRevocation,
    ) -> Result<TokenRevocation, StoreError> {
        let key = revocation.rule_key();
        let p = self.layout.partition_of(&key);
        let corrupt = |e: serde_json::Error| StoreError::Corrupt(e.to_string());
        // Read, merge, and write only if the rule is still what was read (as `update`).
        for _ in 0..8 {
            let mut conn = self.conn().await?;
            let current: Option<String> = self.run(conn.hget(self.tokens_key(p), &key)).await?;
            let old = match &current {
                Some(json) => Some(serde_json::from_str::<TokenRevocation>(json).map_err(corrupt)?),
                None => None,
            };
            let stored = match old.filter(|o| !o.expired(revocation.at_ms)) {
                None => revocation.clone(),
                Some(old) => match old.merged_with(revocation) {
                    Some(merged) => merged,
                    None => return Ok(old),
                },
            };
            let json = serde_json::to_string(&stored).map_err(corrupt)?;
            let written: i64 = self
                .write(
                    p,
                    Change::Script(
                        self.revoke_tokens
                            .key(self.tokens_key(p))
                            .key(self.tokens_expiry_key(p))
                            .key(self.events_key(p))
                            .arg(&key)
                            .arg(current.as_deref().unwrap_or(""))
                            .arg(json)
                            .arg(stored.expires_at_ms)
                            .arg(revocation.at_ms)
                            .arg(STREAM_MAX_LEN)
                            .arg(TOKENS_REVOKED),
                    ),
                )
                .await?;
            if written == 1 {
                return Ok(stored);
            }
        }
        Err(StoreError::Unavailable(format!(
            "token revocation {} kept changing while being written",
            revocation.issuer
        )))
    }

    async fn token_revocations(&self, now_ms: u64) -> Result<Vec<TokenRevocation>, StoreError> {
        let conn = self.conn().await?;
        let all = futures::future::try_join_all((0..self.layout.partitions()).map(|p| {
            let mut conn = conn.clone();
            let key = self.tokens_key(p);
            async move { self.run(conn.hvals::<_, Vec<String>>(key)).await }
        }))
        .await?;
        let all: Vec<String> = all.into_iter().flatten().collect();
        let mut live = Vec::with_capacity(all.len());
        for json in all {
            let r: TokenRevocation =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if !r.expired(now_ms) {
                live.push(r);
            }
        }
        Ok(live)
    }
}

#[async_trait]
impl EventLog for RedisStore {
    fn partitions(&self) -> usize {
        self.layout.partitions()
    }

    fn key_partition(&self, key_id: &str) -> usize {
        self.partition_of(key_id)
    }

    async fn latest_event_id(&self, partition: usize) -> Result<EventId, StoreError> {
        // The last id ever generated, even if trimming has emptied the stream since.
        Ok(self
            .stream_info(partition)
            .await?
            .map_or(EventId::START, |i| i.last_generated))
    }

    async fn read_events(
        &self,
        partition: usize,
        after: EventId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let mut opts = redis::streams::StreamReadOptions::default().count(count);
        let (mut conn, limit) = match block {
            Some(b) => {
                opts = opts.block(b.as_millis().max(1) as usize);
                let limit = b + self.timeout;
                (self.blocking_conn(partition, limit).await?, limit)
            }
            None => (self.conn().await?, self.timeout),
        };
        let reply: Option<redis::streams::StreamReadReply> = self
            .run_for(
                limit,
                conn.xread_options(&[self.events_key(partition)], &[after.to_string()], &opts),
            )
            .await?;
        let mut events = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in &key.ids {
                events.push(decode_entry(entry)?);
            }
        }
        Ok(events)
    }

    async fn events_lost_after(
        &self,
        partition: usize,
        after: EventId,
    ) -> Result<bool, StoreError> {
        let Some(info) = self.stream_info(partition).await? else {
            // No stream at all: either nothing was ever revoked (we are at the start),
            // or Redis lost it (a restart without persistence).
            return Ok(after != EventId::START);
        };
        let StreamInfo {
            last_generated,
            length,
            entries_added,
            first_entry,
        } = info;
        if last_generated < after {
            // The stream went backwards: it was reset.
            return Ok(true);
        }
        if entries_added <= length || last_generated == after {
            // Nothing was ever trimmed, or nothing came after `after`.
            return Ok(false);
        }
        // Something was trimmed (XTRIM and MAXLEN do not move `max-deleted-entry-id`, so
        // it cannot say what). Events after `after` are intact only if the oldest one
        // kept is not newer than `after`. When the trim stopped exactly at `after` this
        // flushes once more than needed: the price of never missing one.
        Ok(first_entry.is_none_or(|first| first > after))
    }
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: String = self.run(redis::cmd("PING").query_async(&mut conn)).await?;
        Ok(())
    }
}

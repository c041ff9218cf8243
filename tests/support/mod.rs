//! What the integration tests share: a `redis-server` of their own, a test
//! configuration, test secrets, realistic Envoy `CheckRequest`s, and a reading of
//! Envoy's `CheckResponse` that checks the invariants Envoy relies on.
//!
//! The Redis harness never touches a Redis it did not start: each server gets a free
//! loopback port and a temporary directory, and is killed when dropped.

// Each test binary (and a bench) uses a different part of this module, so some items are
// unused in each. `unused` rather than `dead_code`: the bench that includes this file
// allows `dead_code` itself, and clippy refuses the duplicate. The other `unused` lints
// stay on.
#![allow(unused)]
#![warn(unused_imports, unused_variables, unused_mut, unused_must_use)]

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, HeaderMap, HeaderValue, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    check_response::HttpResponse,
    AttributeContext, CheckRequest, CheckResponse,
};
use keygate::config::{Config, Secrets};
use keygate::keys::NewKey;
use keygate::secret::Secret;
use keygate::store::memory::MemoryStore;
use keygate::store::{
    AuditLog, DelegationRecords, EventId, EventLog, KeyPage, KeyRecord, KeyRecords, KeyStore,
    StoreError, StreamEntry, TokenRevocations, UsageSink,
};
use tokio::sync::{Notify, Semaphore};

mod cluster;
pub mod logs;
pub use cluster::*;

/// One Redis Cluster for the tests of a binary that leave it whole (each in a namespace of
/// its own, `fresh_namespace`); tests that kill nodes start their own. Its servers go with
/// the test process (the watchdogs).
pub async fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: tokio::sync::OnceCell<RedisCluster> = tokio::sync::OnceCell::const_new();
    CLUSTER.get_or_init(RedisCluster::start).await
}

/// A store namespace no other test of this process uses.
pub fn fresh_namespace() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("kgtest{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The tenant test keys belong to.
pub const TENANT: &str = "9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11";
/// Another tenant, whose keys must never show up in `TENANT`'s answers.
pub const OTHER_TENANT: &str = "0b3f6a2e-8c11-4c1e-9d55-9f1c7d4e2b7a";

/// A route that needs `contacts:read` (see `config`).
pub const READ_PATH: &str = "/v1/contacts/42?fields=name";

/// How long a test waits for something that should happen "soon".
pub const PATIENCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// How a test Redis keeps (or loses) its data.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only file, fsynced on every write: the data survives a SIGKILL, as a
    /// production Redis with persistence would. Off by default (`--appendonly no`).
    pub append_only: bool,
    /// `--requirepass`.
    pub password: Option<String>,
}

/// A `redis-server` process owned by one test.
pub struct RedisServer {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    opts: RedisOptions,
    child: Option<Child>,
    /// Kills `child` if this test process dies without dropping us (a killed test run
    /// must not leave Redis servers behind).
    watchdog: Option<Child>,
}

impl RedisServer {
    /// A throw-away Redis: no persistence.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(RedisOptions::default()).await
    }

    pub async fn start_with(opts: RedisOptions) -> RedisServer {
        let bin = redis_server_bin();
        let mut last_error = String::new();
        // A free port can be taken between our probe and Redis binding it: try again.
        for _ in 0..5 {
            let mut server = RedisServer {
                bin: bin.clone(),
                port: free_port(),
                dir: tempfile::tempdir().expect("temporary directory for redis-server"),
                opts: opts.clone(),
                child: None,
                watchdog: None,
            };
            match server.launch().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!(
            "could not start redis-server ({}): {last_error}",
            bin.display()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>` (no credentials: those come from `Secrets`).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no shutdown, no save. Returns once the process is gone and its port closed.
    pub fn kill(&mut self) {
        for mut process in [self.child.take(), self.watchdog.take()]
            .into_iter()
            .flatten()
        {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts Redis again on the same port (and directory) and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch().await {
            panic!("redis-server did not come back on port {}: {e}", self.port);
        }
    }

    /// A direct connection, for tests that inspect what keygate wrote.
    /// Trims the test namespace's revocation stream to nothing, as MAXLEN would after
    /// many events.
    pub async fn trim_all_events(&self) {
        let mut conn = self.connection().await;
        let _: i64 = redis::cmd("XTRIM")
            .arg("kgtest:{keys}:events") // the one partition's stream
            .arg("MAXLEN")
            .arg(0)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.connection_info()).expect("valid redis url");
        tokio::time::timeout(PATIENCE, client.get_multiplexed_async_connection())
            .await
            .expect("redis connection in time")
            .expect("redis connection")
    }

    fn connection_info(&self) -> redis::ConnectionInfo {
        let mut info: redis::ConnectionInfo = self.url().parse().expect("valid redis url");
        info.redis.password = self.opts.password.clone();
        info
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn launch(&mut self) -> Result<(), String> {
        let mut args = vec!["--appendonly"];
        if self.opts.append_only {
            args.extend(["yes", "--appendfsync", "always"]);
        } else {
            args.push("no");
        }
        if let Some(p) = &self.opts.password {
            args.extend(["--requirepass", p]);
        }
        let (child, watchdog) = spawn_redis(&self.bin, self.port, self.dir.path(), &args)?;
        self.watchdog = watchdog;
        self.child = Some(child);

        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.kill();
                return Err(format!("redis-server exited ({status}): {}", self.log()));
            }
            if self.ping().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("no PONG within {PATIENCE:?}: {}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether Redis answers PING with PONG (not LOADING, not an error).
    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.connection_info()) else {
            return false;
        };
        let attempt = async {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), attempt).await,
            Ok(Some(pong)) if pong == "PONG"
        )
    }
}

/// `REDIS_SERVER`, else `redis-server` from PATH.
fn redis_server_bin() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// `redis-server` on `port` of the loopback, its files in `dir` (its log `redis.log`), no
/// snapshots, and `args`; with a `watchdog`.
fn spawn_redis(
    bin: &std::path::Path,
    port: u16,
    dir: &std::path::Path,
    args: &[&str],
) -> Result<(Child, Option<Child>), String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .map_err(|e| format!("cannot open redis log: {e}"))?;
    let child = Command::new(bin)
        .arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run {} (set REDIS_SERVER or put redis-server on PATH): {e}",
                bin.display()
            )
        })?;
    let watchdog = watchdog(child.id());
    Ok((child, watchdog))
}

/// A shell that SIGKILLs `redis_pid` once this test process is gone.
fn watchdog(redis_pid: u32) -> Option<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(r#"while kill -0 "$1" 2>/dev/null; do sleep 0.5; done; kill -9 "$2" 2>/dev/null"#)
        .arg("redis-watchdog")
        .arg(std::process::id().to_string())
        .arg(redis_pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Every key and value in the Redis, as text: strings, hashes (field and value), sets,
/// sorted sets, lists and streams. For "a dump must not give a key away".
pub async fn dump(conn: &mut redis::aio::MultiplexedConnection) -> String {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    let mut out = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(conn)
            .await
            .expect("TYPE");
        let values: Vec<String> = match kind.as_str() {
            "string" => vec![redis::cmd("GET")
                .arg(&key)
                .query_async(conn)
                .await
                .expect("GET")],
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(conn)
                .await
                .expect("HGETALL"),
            "set" => redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(conn)
                .await
                .expect("SMEMBERS"),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(conn)
                .await
                .expect("ZRANGE"),
            "list" => redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(conn)
                .await
                .expect("LRANGE"),
            "stream" => stream_entries(conn, &key)
                .await
                .into_iter()
                .flat_map(|(id, fields)| {
                    std::iter::once(id).chain(fields.into_iter().flat_map(|(k, v)| [k, v]))
                })
                .collect(),
            other => panic!("key {key} has a type the dump does not read: {other}"),
        };
        out.push_str(&format!("{key} ({kind}):"));
        for v in values {
            out.push(' ');
            out.push_str(&v);
        }
        out.push('\n');
    }
    out
}

/// A stream's entries (XRANGE - +): id and field/value pairs.
pub async fn stream_entries(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> Vec<(String, Vec<(String, String)>)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|entry| {
            let mut fields: Vec<(String, String)> = entry
                .map
                .iter()
                .map(|(k, v)| {
                    let v: String = redis::from_redis_value(v).expect("stream field is text");
                    (k.clone(), v)
                })
                .collect();
            fields.sort();
            (entry.id, fields)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// An observable store
// ---------------------------------------------------------------------------------------

/// A `MemoryStore` that counts its calls, and can hold `get` answers back: it reads the
/// record, then waits until `resume` before answering with what it read (a slow store
/// racing a revocation).
#[derive(Default)]
pub struct CountingStore {
    inner: MemoryStore,
    gets: AtomicUsize,
    writes: AtomicUsize,
    gate: Mutex<Option<Arc<Semaphore>>>,
    held: Notify,
    hash: Mutex<Option<String>>,
    positions: Mutex<Option<Arc<Semaphore>>>,
}

impl CountingStore {
    pub fn new() -> Arc<CountingStore> {
        Arc::new(CountingStore::default())
    }

    /// `get` calls so far.
    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// Write calls so far (`create`, `revoke`, `update`, `delete`, `add_usage`, …).
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// From now on, `get` answers only after `resume`.
    pub fn hold_gets(&self) {
        *self.gate.lock().unwrap() = Some(Arc::new(Semaphore::new(0)));
    }

    /// Returns once a `get` has read its record and is being held.
    pub async fn a_get_is_held(&self) {
        tokio::time::timeout(PATIENCE, self.held.notified())
            .await
            .expect("a held get within the patience");
    }

    /// From now on, `get` answers with this stored hash instead of the record's own (as
    /// after the secret was hashed again).
    pub fn replace_hash(&self, phc: String) {
        *self.hash.lock().unwrap() = Some(phc);
    }

    /// Lets one held `get` answer, and goes on holding the others and new ones.
    pub fn release_one(&self) {
        if let Some(gate) = self.gate.lock().unwrap().as_ref() {
            gate.add_permits(1);
        }
    }

    /// From now on, `latest_event_id` (where a revocation follower starts) does not
    /// answer until `answer_positions`.
    pub fn hold_positions(&self) {
        *self.positions.lock().unwrap() = Some(Arc::new(Semaphore::new(0)));
    }

    pub fn answer_positions(&self) {
        if let Some(gate) = self.positions.lock().unwrap().take() {
            gate.add_permits(Semaphore::MAX_PERMITS / 2);
        }
    }

    /// Lets held `get`s answer, and stops holding new ones.
    pub fn resume(&self) {
        if let Some(gate) = self.gate.lock().unwrap().take() {
            gate.add_permits(Semaphore::MAX_PERMITS / 2);
        }
    }
}

#[async_trait::async_trait]
impl keygate::store::DelegationSource for CountingStore {
    async fn is_delegated(&self, partner_id: &str, tenant_id: &str) -> Result<bool, StoreError> {
        self.inner.is_delegated(partner_id, tenant_id).await
    }
}

#[async_trait::async_trait]
impl keygate::store::RateLedger for CountingStore {
    async fn reserve(
        &self,
        key_id: &str,
        req: &keygate::store::RateRequest,
    ) -> Result<keygate::store::RateGrant, StoreError> {
        self.inner.reserve(key_id, req).await
    }

    async fn lease(
        &self,
        key_id: &str,
        lease_id: &str,
        op: keygate::store::LeaseOp,
    ) -> Result<keygate::store::LeaseResult, StoreError> {
        self.inner.lease(key_id, lease_id, op).await
    }
}

#[async_trait::async_trait]
impl KeyRecords for CountingStore {
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.create(record).await
    }

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let mut answer = self.inner.get(key_id).await;
        if let (Ok(Some(record)), Some(phc)) = (&mut answer, self.hash.lock().unwrap().as_ref()) {
            record.hash = phc.clone();
        }
        let gate = self.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            self.held.notify_one();
            // Each permit lets exactly one held `get` answer (`release_one`).
            gate.acquire()
                .await
                .expect("the gate is never closed")
                .forget();
        }
        answer
    }

    /// Counted and held as `get`; while the hash is replaced, no verifier (it vouches for
    /// the secret of the record as stored).
    async fn get_verifiable(
        &self,
        key_id: &str,
    ) -> Result<Option<(KeyRecord, Option<String>)>, StoreError> {
        let replaced = self.hash.lock().unwrap().is_some();
        let verifier = match replaced {
            true => None,
            false => self
                .inner
                .get_verifiable(key_id)
                .await?
                .and_then(|(_, v)| v),
        };
        Ok(self.get(key_id).await?.map(|record| (record, verifier)))
    }

    /// Not counted in `writes`: those are the record writes the tests count.
    async fn set_verifier(&self, key_id: &str, verifier: &str) -> Result<bool, StoreError> {
        self.inner.set_verifier(key_id, verifier).await
    }

    async fn list(
        &self,
        owner: &keygate::store::Owner,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        self.inner.list(owner, after, limit).await
    }

    async fn revoke(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.revoke(key_id, at_ms).await
    }

    async fn update(
        &self,
        key_id: &str,
        change: &keygate::store::KeyChange,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.update(key_id, change, at_ms).await
    }

    async fn delete(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.delete(key_id, at_ms).await
    }
}

#[async_trait::async_trait]
impl DelegationRecords for CountingStore {
    async fn set_delegation(
        &self,
        d: &keygate::store::Delegation,
        granted: bool,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.set_delegation(d, granted, at_ms).await
    }

    async fn delegations(
        &self,
        of: &keygate::store::DelegationsOf,
    ) -> Result<Vec<keygate::store::Delegation>, StoreError> {
        self.inner.delegations(of).await
    }
}

#[async_trait::async_trait]
impl AuditLog for CountingStore {
    async fn append_audit(&self, entry: &keygate::audit::AuditEntry) -> Result<(), StoreError> {
        // The audit trail is not a write these tests count.
        self.inner.append_audit(entry).await
    }

    async fn audit(
        &self,
        q: &keygate::audit::AuditQuery,
    ) -> Result<Vec<keygate::audit::AuditEntry>, StoreError> {
        self.inner.audit(q).await
    }
}

#[async_trait::async_trait]
impl UsageSink for CountingStore {
    async fn add_usage(
        &self,
        batch: &[keygate::store::UsageDelta],
    ) -> Result<(), keygate::store::UsageNotWritten> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.add_usage(batch).await
    }
}

#[async_trait::async_trait]
impl TokenRevocations for CountingStore {
    async fn revoke_tokens(
        &self,
        revocation: &keygate::store::TokenRevocation,
    ) -> Result<keygate::store::TokenRevocation, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.revoke_tokens(revocation).await
    }

    async fn token_revocations(
        &self,
        now_ms: u64,
    ) -> Result<Vec<keygate::store::TokenRevocation>, StoreError> {
        self.inner.token_revocations(now_ms).await
    }
}

#[async_trait::async_trait]
impl EventLog for CountingStore {
    fn partitions(&self) -> usize {
        self.inner.partitions()
    }

    fn key_partition(&self, key_id: &str) -> usize {
        self.inner.key_partition(key_id)
    }

    async fn latest_event_id(&self, partition: usize) -> Result<EventId, StoreError> {
        let gate = self.positions.lock().unwrap().clone();
        if let Some(gate) = gate {
            let _permit = gate.acquire().await.expect("the gate is never closed");
        }
        self.inner.latest_event_id(partition).await
    }

    async fn read_events(
        &self,
        partition: usize,
        after: EventId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        self.inner.read_events(partition, after, count, block).await
    }

    async fn events_lost_after(
        &self,
        partition: usize,
        after: EventId,
    ) -> Result<bool, StoreError> {
        self.inner.events_lost_after(partition, after).await
    }
}

#[async_trait::async_trait]
impl KeyStore for CountingStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

/// A feed that can be cut off on demand, to make "while disconnected" deterministic.
pub struct SwitchableFeed {
    inner: keygate::revocation::StoreFeed,
    pub down: Arc<std::sync::atomic::AtomicBool>,
    /// Only the loading of JWT revocations fails.
    pub revocations_down: Arc<std::sync::atomic::AtomicBool>,
}

impl SwitchableFeed {
    pub fn new(inner: keygate::revocation::StoreFeed) -> SwitchableFeed {
        SwitchableFeed {
            inner,
            down: Arc::default(),
            revocations_down: Arc::default(),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("switched off by the test".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl keygate::revocation::EventFeed for SwitchableFeed {
    async fn start_position(&self) -> Result<keygate::store::Cursor, StoreError> {
        self.inner.start_position().await
    }

    async fn read(
        &self,
        after: &keygate::store::Cursor,
        resync: bool,
    ) -> Result<Vec<keygate::revocation::FeedEntry>, StoreError> {
        if let Err(e) = self.check() {
            // As a real feed would, take a moment to fail.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(e);
        }
        self.inner.read(after, resync).await
    }

    async fn token_revocations(&self) -> Result<Vec<keygate::store::TokenRevocation>, StoreError> {
        self.check()?;
        if self.revocations_down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("switched off by the test".into()));
        }
        self.inner.token_revocations().await
    }
}

/// One keygate replica, serving on ephemeral ports. Replicas of one deployment share
/// their `secrets` (pepper, admin and watch tokens).
pub struct Replica {
    pub app: Arc<keygate::server::App>,
    pub running: keygate::server::Running,
    pub secrets: Secrets,
}

/// `n` replicas on `backend` with argon2 at its production cost (what the benchmarks
/// measure), once each follows its revocation stream.
pub async fn replicas_at_production_cost(
    backend: Backend<'_>,
    secrets: &Secrets,
    n: usize,
) -> Vec<(Arc<keygate::server::App>, keygate::server::Running)> {
    let mut replicas = Vec::new();
    for _ in 0..n {
        let mut cfg = config(backend);
        cfg.api_keys.argon2 = keygate::config::Argon2Config::default();
        let app = Arc::new(keygate::server::App::build(cfg, secrets.clone()).expect("builds"));
        let running = keygate::server::start(app.clone()).await.expect("starts");
        replicas.push((app, running));
    }
    for (app, _) in &replicas {
        eventually(PATIENCE, "replica follows the stream", || async {
            (app.bus.has_position() && app.bus.is_connected()).then_some(())
        })
        .await;
    }
    replicas
}

impl Replica {
    pub async fn start(config: Config, secrets: &Secrets) -> Replica {
        let app =
            Arc::new(keygate::server::App::build(config, secrets.clone()).expect("replica builds"));
        let running = keygate::server::start(app.clone())
            .await
            .expect("replica starts");
        Replica {
            app,
            running,
            secrets: secrets.clone(),
        }
    }

    /// `start`, then wait until it answers checks (its follower has its position).
    pub async fn serving(config: Config, secrets: &Secrets) -> Replica {
        let replica = Replica::start(config, secrets).await;
        positioned(&replica.app).await;
        replica
    }

    /// A replica on `redis`, with fresh secrets, once it follows the stream.
    pub async fn following_on(redis: &RedisServer) -> Replica {
        let replica = Replica::start(config(Backend::Redis(redis)), &secrets()).await;
        replica.following().await;
        replica
    }

    /// Waits until this replica follows its revocation feed.
    pub async fn following(&self) {
        eventually(
            PATIENCE,
            "replica follows the revocation stream",
            || async { self.app.bus.is_connected().then_some(()) },
        )
        .await;
    }

    /// A `contacts:read` request with `token` as a Bearer credential.
    pub async fn check(&self, token: &str) -> Outcome {
        outcome(&self.app.envoy_service().decide(read_with(token)).await)
    }

    pub fn watch_token(&self) -> String {
        self.secrets
            .watch_token
            .as_ref()
            .expect("the test secrets have a watch token")
            .expose()
            .to_owned()
    }

    /// A channel to the admin listener (calls still need `with_admin`).
    pub async fn admin_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.running.admin))
            .unwrap()
            .connect()
            .await
            .expect("admin listener answers")
    }

    pub async fn admin(
        &self,
    ) -> keygate::api::proto::keys_client::KeysClient<tonic::transport::Channel> {
        keygate::api::proto::keys_client::KeysClient::new(self.admin_channel().await)
    }
}

// ---------------------------------------------------------------------------------------
// Configuration and secrets
// ---------------------------------------------------------------------------------------

/// Where a test keeps its keys.
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    Memory,
    Redis(&'a RedisServer),
    /// A Redis Cluster, in the namespace given (replicas of one deployment share it).
    Cluster(&'a RedisCluster, &'a str),
}

/// The policy every test runs on: a public family, a read family, a write family that
/// requires the tenant header.
const POLICY: &str = r#"
policy:
  credential_headers:
    - { header: authorization, scheme: Bearer }
    - { header: x-api-key }
  strip_credential_headers: true
  unmatched: deny
  opt_in_scopes: ["billing:partner:allocate"]
  routes:
    - { name: public, methods: [GET], path: "/public/**", public: true }
    - { name: contacts-read, methods: [GET, HEAD], path: "/v1/contacts/**", scope: "contacts:read" }
    - { name: contacts-write, methods: [POST, PUT, PATCH, DELETE], path: "/v1/contacts/**", scope: "contacts:write", tenant: required }
"#;

/// A configuration for one test: listeners on ephemeral loopback ports, cheap argon2
/// (the tests measure keygate, not argon2; set `api_keys.argon2` back to the default where
/// the cost matters), and the small policy above.
pub fn config(backend: Backend<'_>) -> Config {
    let store = format!("store: {}\n", store_yaml(backend));
    let yaml = format!(
        "listen: {{ grpc: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", http: \"127.0.0.1:0\" }}\n\
         {store}\
         api_keys:\n  prefix: sk\n  argon2: {{ memory_kib: 64, iterations: 1, parallelism: 1 }}\n\
         {POLICY}"
    );
    Config::load(Some(&yaml), Vec::new()).expect("the test configuration is valid")
}

/// The `store` section for `backend`, as a YAML flow mapping.
pub fn store_yaml(backend: Backend<'_>) -> String {
    match backend {
        Backend::Memory => "{ backend: memory }".to_owned(),
        Backend::Redis(r) => format!(
            "{{ backend: redis, redis_url: \"{}\", namespace: kgtest, timeout: 300ms }}",
            r.url()
        ),
        // Six Redis servers and the replicas share two cores while the suite runs: a
        // longer bound keeps a busy moment from reading as an outage.
        Backend::Cluster(c, ns) => format!(
            "{{ backend: redis, cluster_nodes: [{}], namespace: {ns}, timeout: 2s }}",
            c.urls().join(", ")
        ),
    }
}

/// Fresh random secrets, distinct per test so that a leak can be searched for.
pub fn secrets() -> Secrets {
    Secrets {
        pepper: Secret::random(43),
        admin_token: Secret::random(32),
        redis_password: None,
        watch_token: Some(Secret::random(32)),
        named: Default::default(),
    }
}

/// A fresh Ed25519 private key in PKCS#8 PEM (what `openssl genpkey -algorithm ed25519`
/// writes): the RFC 8410 prefix and a random seed. For `sessions.signing_keys`.
pub fn ed25519_pem() -> String {
    use base64::Engine;
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend(rand::random::<[u8; 32]>());
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
}

/// A key of `TENANT` that may read contacts.
pub fn reader_key() -> NewKey {
    NewKey {
        tenant_id: TENANT.into(),
        name: "test reader".into(),
        scopes: vec!["contacts:read".into()],
        ..NewKey::default()
    }
}

// ---------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A token of the documented shape with a *correct* checksum for any parts, written from
/// the documented format rather than with keygate's code: `<prefix>_<env>_<key_id>_<secret><crc>`,
/// the CRC-32 of everything before it in six base62 characters.
pub fn forge_token(prefix: &str, env: &str, key_id: &str, secret: &str) -> String {
    let body = format!("{prefix}_{env}_{key_id}_{secret}");
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut checksum = [b'0'; 6];
    for slot in checksum.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    body + std::str::from_utf8(&checksum).expect("ASCII")
}

/// The parts of a token: (prefix, env, key_id, secret, checksum).
pub fn token_parts(token: &str) -> (&str, &str, &str, &str, &str) {
    let parts: Vec<&str> = token.split('_').collect();
    assert_eq!(parts.len(), 4, "token shape: {token}");
    let (secret, checksum) = parts[3].split_at(parts[3].len() - 6);
    (parts[0], parts[1], parts[2], secret, checksum)
}

/// The secret part of a token (what argon2 hashes).
pub fn secret_of(token: &str) -> &str {
    token_parts(token).3
}

/// The same key id with another secret, correctly checksummed: a guess at a real key.
pub fn wrong_secret_for(token: &str) -> String {
    wrong_secret_at(token, 0)
}

/// Like `wrong_secret_for`, changing the secret's character at `pos`: guesses made at
/// different positions never turn back into the original.
pub fn wrong_secret_at(token: &str, pos: usize) -> String {
    let (prefix, env, key_id, secret, _) = token_parts(token);
    let mut other: Vec<u8> = secret.bytes().collect();
    other[pos] = if other[pos] == b'A' { b'B' } else { b'A' };
    forge_token(
        prefix,
        env,
        key_id,
        std::str::from_utf8(&other).expect("ASCII"),
    )
}

/// `n` characters of base62, from a cheap deterministic generator (tests need variety,
/// not secrecy).
pub fn base62(seed: u64, n: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            BASE62[(x % 62) as usize] as char
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Envoy CheckRequest / CheckResponse
// ---------------------------------------------------------------------------------------

/// A CheckRequest as Envoy sends it (without `encode_raw_headers`): lower-cased headers
/// in `headers`, pseudo-headers included, method and path also in their own fields.
pub fn check_request(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let mut map: std::collections::HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", method),
        (":path", path),
        (":scheme", "https"),
        ("user-agent", "keygate-tests/1.0"),
        ("x-request-id", "6f1c2a9e-1d2b-4c3d-8e4f-5a6b7c8d9e0f"),
        ("x-forwarded-proto", "https"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in headers {
        map.insert(k.to_ascii_lowercase(), (*v).to_owned());
    }
    envelope(HttpRequest {
        id: "1234567890123456789".into(),
        method: method.into(),
        headers: map,
        path: path.into(),
        host: "api.example.com".into(),
        scheme: "https".into(),
        size: -1,
        protocol: "HTTP/2".into(),
        ..Default::default()
    })
}

/// A CheckRequest as Envoy sends it with `encode_raw_headers: true`: `headers` empty,
/// every header (pseudo-headers too) in `header_map` as raw bytes.
pub fn raw_check_request(method: &str, path: &str, headers: &[(&str, &[u8])]) -> CheckRequest {
    let mut raw: Vec<HeaderValue> = [
        (":authority", b"api.example.com".as_slice()),
        (":method", method.as_bytes()),
        (":path", path.as_bytes()),
        (":scheme", b"https".as_slice()),
        ("user-agent", b"keygate-tests/1.0".as_slice()),
    ]
    .into_iter()
    .map(|(k, v)| HeaderValue {
        key: k.to_owned(),
        raw_value: v.to_vec(),
        ..Default::default()
    })
    .collect();
    for (k, v) in headers {
        raw.push(HeaderValue {
            key: k.to_ascii_lowercase(),
            raw_value: v.to_vec(),
            ..Default::default()
        });
    }
    envelope(HttpRequest {
        id: "1234567890123456789".into(),
        method: method.into(),
        header_map: Some(HeaderMap { headers: raw }),
        path: path.into(),
        host: "api.example.com".into(),
        scheme: "https".into(),
        size: -1,
        protocol: "HTTP/2".into(),
        ..Default::default()
    })
}

fn envelope(http: HttpRequest) -> CheckRequest {
    let peer = |ip: &str, port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.1.2.3", 53124)),
            destination: Some(peer("10.9.8.7", 8443)),
            request: Some(Request {
                time: None,
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

/// Waits until the replica's revocation follower has its position: a served replica
/// answers checks only from then on.
pub async fn positioned(app: &keygate::server::App) {
    eventually(PATIENCE, "the follower has its position", || async {
        app.bus.has_position().then_some(())
    })
    .await;
}

/// An Envoy ext_authz client of the gRPC listener at `addr`.
pub async fn envoy_client(
    addr: std::net::SocketAddr,
) -> envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<
    tonic::transport::Channel,
> {
    envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(
        format!("http://{addr}"),
    )
    .await
    .expect("the gRPC listener answers")
}

/// `authorization: Bearer <token>`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An admin API request carrying the admin credential.
pub fn with_admin<T>(secrets: &Secrets, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        bearer(secrets.admin_token.expose()).parse().unwrap(),
    );
    req
}

/// A GET on the read route carrying `token` the usual way.
pub fn read_with(token: &str) -> CheckRequest {
    check_request("GET", READ_PATH, &[("authorization", &bearer(token))])
}

/// What Envoy makes of keygate's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied {
        code: String,
        http: i32,
    },
    /// A gRPC error: Envoy applies `failure_mode_allow` / `status_on_error`.
    Error(tonic::Code),
}

impl Outcome {
    pub fn denied(code: &str, http: i32) -> Outcome {
        Outcome::Denied {
            code: code.to_owned(),
            http,
        }
    }
}

/// Reads a `decide` result the way Envoy would, and fails the test on any answer Envoy
/// could misread: a missing `status` (reads as allow), an allow without an OK response,
/// a deny with code 0, or a deny without a JSON error body.
pub fn outcome(result: &Result<CheckResponse, tonic::Status>) -> Outcome {
    let resp = match result {
        Ok(r) => r,
        Err(status) => return Outcome::Error(status.code()),
    };
    let status = resp
        .status
        .as_ref()
        .expect("CheckResponse.status must always be set (unset reads as allow)");
    match &resp.http_response {
        Some(HttpResponse::OkResponse(_)) => {
            assert_eq!(status.code, 0, "an OK response must carry status code 0");
            Outcome::Allowed
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            assert_ne!(status.code, 0, "a denial must carry a non-zero status code");
            let http = denied
                .status
                .as_ref()
                .expect("a denial names its HTTP status")
                .code;
            let body: serde_json::Value =
                serde_json::from_str(&denied.body).expect("the denial body is JSON");
            let code = body["error"]["code"]
                .as_str()
                .expect("the denial body has error.code")
                .to_owned();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "the denial body has error.message: {}",
                denied.body
            );
            let content_type = denied
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "content-type")
                .map(|h| h.value.as_str());
            assert_eq!(content_type, Some("application/json"));
            Outcome::Denied { code, http }
        }
        other => panic!("a CheckResponse without an http_response: {other:?}"),
    }
}

/// Asks `envoy` and reads the answer with `outcome`.
pub async fn outcome_of(
    envoy: &keygate::api::envoy::EnvoyAuthorization,
    req: CheckRequest,
) -> Outcome {
    outcome(&envoy.decide(req).await)
}

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

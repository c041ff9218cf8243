//! A Redis Cluster of the tests' own: three masters and three replicas (one each), on
//! free loopback ports, each node in its own temporary directory, killed when dropped.
//! Built the way `RedisServer` in `redis_server.rs` starts a single server (same retry on a port
//! taken under us, same watchdog), then joined with `redis-cli --cluster create`.
//!
//! What was checked by hand with Redis 7.0.15 (`--cluster-node-timeout 1000`), and what
//! the waits below are built on:
//!
//! - Before `--cluster create` every node answers PING but says `cluster_state:fail`,
//!   `cluster_slots_assigned:0`, and lists only itself (`:port@busport myself,master`).
//! - `redis-cli --cluster create ... --cluster-yes` takes about 1 s (it waits for the join
//!   itself) and exits 0. Which node becomes master, and which replica follows which
//!   master, is redis-cli's choice (it reshuffles replicas for "anti-affinity", and the
//!   master of slot 0 need not be the first port given): always ask the cluster.
//! - When it returns, `cluster_state:ok` and 16384 slots are already reported on every
//!   node, but that is not "usable": some nodes still list the replicas as slot-less
//!   `master`s for a moment (the roles travel by gossip), and the replicas report
//!   `master_link_status:down`. With the default `repl-diskless-sync-delay` (5 s) a
//!   master waits 5 s before the initial full sync; with `--repl-diskless-sync-delay 0`
//!   (below) every replica is `up` about 0.3 s after `create` returns.
//! - SIGKILL of a master: the others flag it `master,fail?` after ~1.1–1.3 s, then
//!   `master,fail` (~1.2–1.7 s). From then on *every* node says `cluster_state:fail` and
//!   answers any command that touches a key with `CLUSTERDOWN The cluster is down` —
//!   even for slots on healthy masters (`cluster-require-full-coverage` is yes by
//!   default). The failed master keeps its slots in `CLUSTER NODES` for another ~0.9 s
//!   until its replica wins the election; the promoted replica says `ok` some 70 ms
//!   before the others. Every live node said `ok` again ~2.2–2.4 s after the kill.
//! - After the failover `CLUSTER NODES` shows the dead node as
//!   `<id> 127.0.0.1:p@bus master,fail - <ping> <pong> <epoch> disconnected` with no
//!   slots, and the promoted replica as `master` with the old range and a new epoch.
//!   A killed replica shows `slave,fail <master-id> ... disconnected` (~1.5 s), and
//!   `cluster_state` stays `ok` throughout.
//! - `cluster_state:ok` right after a kill proves nothing: it stays `ok` until the node
//!   is flagged `fail`. `await_failover` therefore waits for the `fail` flag *and* for
//!   the dead node to own no slot, on every live node.
//! - A `--port` above 55535 makes redis-server exit at start ("Redis port number too
//!   high", the bus is port+10000); a bus port already taken makes it exit too ("Failed
//!   listening on port ... (cluster), aborting"). Both end in the retry below.
//! - Through this harness: `start` took ~2.1 s (6 nodes, create, sync); `await_failover`
//!   returned ~2.6 s after the kill of a master (~1.2 s for a replica); keys written
//!   through a cluster client were all on the new master afterwards. Replicas write the
//!   initial sync to `dump.rdb` in their `--dir` despite `--save ""` (a temp dir).

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::redis_server::{kill_and_reap, redis_server_bin, start_redis};

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

/// How long the cluster harness waits for the cluster to form or to heal (a failover
/// takes ~2.5 s here; the bound is generous for a loaded machine).
const CLUSTER_PATIENCE: Duration = Duration::from_secs(30);
/// How long a single node gets to answer PING after it is started.
const NODE_START_PATIENCE: Duration = Duration::from_secs(10);
/// Polling interval for everything the harness waits for.
const CLUSTER_POLL: Duration = Duration::from_millis(20);
/// A bound on one command to one node (connect and answer), while polling.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// `--cluster-node-timeout`: how long a node may be unreachable before it is failed.
const NODE_TIMEOUT_MS: u32 = 1000;
const CLUSTER_SLOTS: u32 = 16384;
const CLUSTER_MASTERS: usize = 3;
const CLUSTER_NODES: usize = 6;
/// The cluster bus listens on the client port + 10000 (Redis's default `cluster-port`).
const BUS_OFFSET: u16 = 10000;

/// One `redis-server --cluster-enabled yes` process.
struct ClusterNode {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Kills `child` if the test process dies without dropping us.
    watchdog: Option<Child>,
}

/// A Redis Cluster owned by one test: 3 masters, 3 replicas.
pub struct RedisCluster {
    cli: PathBuf,
    nodes: Vec<ClusterNode>,
}

impl RedisCluster {
    /// Three masters and three replicas, ready to use: `cluster_state:ok` and all 16384
    /// slots on every node, every node agreeing on 3 masters with one replica each, and
    /// every replica through its initial sync (`master_link_status:up`).
    pub async fn start() -> RedisCluster {
        let server = redis_server_bin();
        let cli = cluster_cli_bin(&server);
        // Built before the nodes start, so that a panic part way kills those started.
        let mut cluster = RedisCluster {
            cli,
            nodes: Vec::with_capacity(CLUSTER_NODES),
        };
        for _ in 0..CLUSTER_NODES {
            let node = start_cluster_node(&server).await;
            cluster.nodes.push(node);
        }
        cluster.create().await;
        cluster.await_formed().await;
        cluster
    }

    /// Seed URLs of every node, `redis://127.0.0.1:<port>` (killed nodes included).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The ports of every node, in the order they were started (killed nodes included).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The ports of the masters that own slots, as `CLUSTER NODES` on a live node says,
    /// the master of slot 0 first. Between a kill and the end of `await_failover` this
    /// can still name the dead master: the cluster keeps its slots on it until a replica
    /// is promoted (~1 s after it is flagged `fail`).
    pub async fn masters(&self) -> Vec<u16> {
        let (_, view) = self.cluster_view().await;
        let mut masters: Vec<&NodeEntry> = view
            .iter()
            .filter(|n| n.is_master() && !n.slots.is_empty())
            .collect();
        masters.sort_by_key(|n| n.first_slot());
        masters.iter().map(|n| n.port).collect()
    }

    /// The port of the master that owns `slot`, as `CLUSTER NODES` on a live node says
    /// (see `masters` about the moments after a kill).
    pub async fn master_of_slot(&self, slot: u16) -> u16 {
        assert!(u32::from(slot) < CLUSTER_SLOTS, "slot {slot} out of range");
        let (asked, view) = self.cluster_view().await;
        view.iter()
            .find(|n| n.is_master() && n.owns(slot))
            .map(|n| n.port)
            .unwrap_or_else(|| {
                panic!(
                    "no master owns slot {slot} in CLUSTER NODES of {asked}:\n{}",
                    describe(&view)
                )
            })
    }

    /// A plain (non-cluster) connection to one node: it answers only for its own slots
    /// (MOVED otherwise).
    pub async fn node_connection(&self, port: u16) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}").as_str())
            .expect("valid redis url");
        tokio::time::timeout(
            NODE_START_PATIENCE,
            client.get_multiplexed_async_connection(),
        )
        .await
        .unwrap_or_else(|_| panic!("connection to cluster node {port} in time"))
        .unwrap_or_else(|e| panic!("connection to cluster node {port}: {e}"))
    }

    /// SIGKILL the node on `port`: no shutdown, no save. Returns once the process is gone.
    /// The rest of the cluster notices only after the node timeout (see the module notes).
    pub fn kill(&mut self, port: u16) {
        let ports = self.ports();
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port} (nodes: {ports:?})"));
        node.stop();
    }

    /// Waits until every live node flags `killed` as `fail`, sees no slot on it, sees all
    /// 16384 slots served by masters not failed, and says `cluster_state:ok`: a replica
    /// has taken over whatever `killed` served (nothing, if it was a replica). ~2.5 s after
    /// the kill of a master here. `masters`/`master_of_slot` then name the new owners.
    pub async fn await_failover(&self, killed: u16) {
        let live: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some() && n.port != killed)
            .map(|n| n.port)
            .collect();
        assert!(!live.is_empty(), "no live node left to heal the cluster");
        let deadline = Instant::now() + CLUSTER_PATIENCE;
        loop {
            let seen = match failed_over(killed, &live).await {
                Ok(()) => return,
                Err(seen) => seen,
            };
            if Instant::now() > deadline {
                panic!(
                    "the cluster did not fail over from {killed} within {CLUSTER_PATIENCE:?}; \
                     last seen: {seen}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(CLUSTER_POLL).await;
        }
    }

    /// `(port, fields)` for each master (as `masters`): the fields of the hashes whose
    /// names match `pattern` there (SCAN MATCH … COUNT 1000, then HLEN of each).
    pub async fn hash_fields_per_master(&self, pattern: &str) -> Vec<(u16, usize)> {
        let mut counts = Vec::new();
        for port in self.masters().await {
            let mut conn = self.node_connection(port).await;
            // SCAN never misses a key that stays, but may return one twice.
            let mut keys: HashSet<Vec<u8>> = HashSet::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("SCAN on cluster node {port}: {e}"));
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            let mut fields = 0;
            for key in keys {
                let n: usize = redis::cmd("HLEN")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("HLEN on cluster node {port}: {e}"));
                fields += n;
            }
            counts.push((port, fields));
        }
        counts
    }

    /// Starts moving `slot` to the master on `to`, as `redis-cli --cluster reshard` does:
    /// the slot is then importing there and migrating on its owner, which answers ASK for
    /// keys already moved. Move keys with `migrate_keys`, end with `finish_migration`.
    pub async fn begin_migration(&self, slot: u16, to: u16) -> Migration {
        let from = self.master_of_slot(slot).await;
        assert_ne!(from, to, "slot {slot} is on {to} already");
        let id = |port: u16| async move {
            cluster_ask(port, &["CLUSTER", "MYID"])
                .await
                .unwrap_or_else(|e| panic!("CLUSTER MYID on {port}: {e}"))
        };
        let m = Migration {
            slot,
            from,
            to,
            from_id: id(from).await,
            to_id: id(to).await,
        };
        let slot_arg = slot.to_string();
        for (port, state, other) in [(to, "IMPORTING", &m.from_id), (from, "MIGRATING", &m.to_id)] {
            cluster_ask(port, &["CLUSTER", "SETSLOT", &slot_arg, state, other])
                .await
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {state} on {port}: {e}"));
        }
        m
    }

    /// Moves up to `n` of the slot's keys; returns how many it moved (0: none left).
    pub async fn migrate_keys(&self, m: &Migration, n: usize) -> usize {
        let mut conn = self.node_connection(m.from).await;
        let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(m.slot)
            .arg(n)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER GETKEYSINSLOT on {}: {e}", m.from));
        if keys.is_empty() {
            return 0;
        }
        let _: redis::Value = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(m.to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("MIGRATE from {} to {}: {e}", m.from, m.to));
        keys.len()
    }

    /// Moves the rest of the slot's keys and gives the slot to its new master on every
    /// master; returns once every live node says so.
    pub async fn finish_migration(&self, m: Migration) {
        while self.migrate_keys(&m, 100).await > 0 {}
        let slot_arg = m.slot.to_string();
        let others: Vec<u16> = self
            .masters()
            .await
            .into_iter()
            .filter(|p| *p != m.to && *p != m.from)
            .collect();
        let order = [vec![m.to, m.from], others].concat();
        for port in order {
            cluster_ask(port, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &m.to_id])
                .await
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT NODE on {port}: {e}"));
        }
        let deadline = Instant::now() + CLUSTER_PATIENCE;
        loop {
            let mut agreed = true;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let view = match cluster_ask(node.port, &["CLUSTER", "NODES"]).await {
                    Ok(text) => parse_cluster_nodes(&text),
                    Err(_) => {
                        agreed = false;
                        break;
                    }
                };
                agreed &= view
                    .iter()
                    .any(|e| e.port == m.to && e.is_master() && e.owns(m.slot));
            }
            if agreed {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not agree that slot {} is on {}",
                m.slot,
                m.to
            );
            tokio::time::sleep(CLUSTER_POLL).await;
        }
    }

    /// `redis-cli --cluster create <all nodes> --cluster-replicas 1 --cluster-yes`.
    async fn create(&self) {
        let mut cmd = tokio::process::Command::new(&self.cli);
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port));
        }
        cmd.args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(CLUSTER_PATIENCE, cmd.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => panic!(
                "cannot run {} (set REDIS_CLI, or put redis-cli beside redis-server or on \
                 PATH): {e}",
                self.cli.display()
            ),
            Err(_) => panic!(
                "redis-cli --cluster create did not finish within {CLUSTER_PATIENCE:?}\n{}",
                self.logs()
            ),
        };
        if !output.status.success() {
            panic!(
                "redis-cli --cluster create failed ({}):\n{}\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.logs()
            );
        }
    }

    /// Polls until the cluster is usable (see `start`).
    async fn await_formed(&self) {
        let deadline = Instant::now() + CLUSTER_PATIENCE;
        loop {
            let seen = match self.formed().await {
                Ok(()) => return,
                Err(seen) => seen,
            };
            if Instant::now() > deadline {
                panic!(
                    "the Redis Cluster on {:?} was not ready within {CLUSTER_PATIENCE:?}; \
                     last seen: {seen}\n{}",
                    self.ports(),
                    self.logs()
                );
            }
            tokio::time::sleep(CLUSTER_POLL).await;
        }
    }

    /// `Ok` once every node reports the full, agreed, synced cluster; else what is missing.
    async fn formed(&self) -> Result<(), String> {
        for node in &self.nodes {
            let port = node.port;
            let info = cluster_ask(port, &["CLUSTER", "INFO"])
                .await
                .map_err(|e| format!("{port}: CLUSTER INFO: {e}"))?;
            let slots = CLUSTER_SLOTS.to_string();
            let known = CLUSTER_NODES.to_string();
            for (key, want) in [
                ("cluster_state", "ok"),
                ("cluster_slots_assigned", slots.as_str()),
                ("cluster_slots_ok", slots.as_str()),
                ("cluster_known_nodes", known.as_str()),
            ] {
                let got = info_field(&info, key);
                if got != Some(want) {
                    return Err(format!("{port}: {key} is {got:?}, not {want}"));
                }
            }

            let text = cluster_ask(port, &["CLUSTER", "NODES"])
                .await
                .map_err(|e| format!("{port}: CLUSTER NODES: {e}"))?;
            let view = parse_cluster_nodes(&text);
            agreed_view(&view).map_err(|e| format!("{port}: {e}; CLUSTER NODES:\n{text}"))?;

            let replication = cluster_ask(port, &["INFO", "replication"])
                .await
                .map_err(|e| format!("{port}: INFO replication: {e}"))?;
            if info_field(&replication, "role") == Some("slave") {
                let link = info_field(&replication, "master_link_status");
                let syncing = info_field(&replication, "master_sync_in_progress");
                if link != Some("up") || syncing != Some("0") {
                    return Err(format!(
                        "{port}: replica not synced yet (master_link_status {link:?}, \
                         master_sync_in_progress {syncing:?})"
                    ));
                }
            }
        }
        Ok(())
    }

    /// `CLUSTER NODES` from the first live node that answers: (that node, its view).
    async fn cluster_view(&self) -> (u16, Vec<NodeEntry>) {
        let mut errors = Vec::new();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            match cluster_ask(node.port, &["CLUSTER", "NODES"]).await {
                Ok(text) => return (node.port, parse_cluster_nodes(&text)),
                Err(e) => errors.push(format!("{}: {e}", node.port)),
            }
        }
        panic!("no live cluster node answered CLUSTER NODES: {errors:?}");
    }

    /// The last lines of every node's log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let log = node.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!("--- redis-server {} log (tail) ---\n", node.port));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ClusterNode {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// SIGKILL the server and its watchdog, and reap both.
    fn stop(&mut self) {
        kill_and_reap([self.child.take(), self.watchdog.take()]);
    }

    /// Starts the server (as `RedisServer::launch` does) and waits until it answers PING.
    async fn launch(&mut self, bin: &Path) -> Result<(), String> {
        let node_timeout = NODE_TIMEOUT_MS.to_string();
        let args = [
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            // Relative to --dir (redis-server chdirs there).
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &node_timeout,
            // Without this a master waits 5 s (the default) for more replicas before
            // the initial full sync of a replica, and `start` would wait with it.
            "--repl-diskless-sync-delay",
            "0",
        ];
        let port = self.port;
        let pong = || async move {
            matches!(cluster_ask(port, &["PING"]).await, Ok(pong) if pong == "PONG")
        };
        let within = NODE_START_PATIENCE;
        let (child, watchdog) =
            start_redis(bin, port, self.dir.path(), &args, within, pong).await?;
        self.watchdog = watchdog;
        self.child = Some(child);
        Ok(())
    }
}

/// One cluster node on a fresh port; a port (or its bus port) can be taken between our
/// probe and Redis binding it: try again on another.
async fn start_cluster_node(bin: &Path) -> ClusterNode {
    let mut last_error = String::new();
    for _ in 0..5 {
        let mut node = ClusterNode {
            port: free_cluster_port(),
            dir: tempfile::tempdir().expect("temporary directory for redis-server"),
            child: None,
            watchdog: None,
        };
        match node.launch(bin).await {
            Ok(()) => return node,
            Err(e) => last_error = e,
        }
    }
    panic!(
        "could not start a cluster redis-server ({}): {last_error}",
        bin.display()
    );
}

/// A free loopback port whose bus port (port + 10000) is free too; so at most 55535.
fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let Some(bus) = port.checked_add(BUS_OFFSET) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port p with p+{BUS_OFFSET} free too");
}

/// `REDIS_CLI`, else a `redis-cli` beside the redis-server binary (its directory, or the
/// PATH entry it is found in), else `redis-cli` from PATH.
fn cluster_cli_bin(server: &Path) -> PathBuf {
    if let Some(cli) = std::env::var_os("REDIS_CLI") {
        return PathBuf::from(cli);
    }
    let dir = match server.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => Some(dir.to_path_buf()),
        _ => std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).find(|d| d.join(server).is_file())),
    };
    dir.map(|d| d.join("redis-cli"))
        .filter(|cli| cli.is_file())
        .unwrap_or_else(|| PathBuf::from("redis-cli"))
}

/// One command to one node on a fresh connection, its reply as text; errors (refused,
/// timed out, error reply) as text. Bounded by `ASK_TIMEOUT`.
async fn cluster_ask(port: u16, args: &[&str]) -> Result<String, String> {
    let attempt = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}").as_str())
            .map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let reply = cmd
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<String, String>(reply)
    };
    match tokio::time::timeout(ASK_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer from {port} within {ASK_TIMEOUT:?}")),
    }
}

/// `Ok` once every live node flags `killed` as failed, sees no slot on it, sees every slot
/// on a master not failed, and says `cluster_state:ok`.
async fn failed_over(killed: u16, live: &[u16]) -> Result<(), String> {
    for &port in live {
        let info = cluster_ask(port, &["CLUSTER", "INFO"])
            .await
            .map_err(|e| format!("{port}: CLUSTER INFO: {e}"))?;
        let text = cluster_ask(port, &["CLUSTER", "NODES"])
            .await
            .map_err(|e| format!("{port}: CLUSTER NODES: {e}"))?;
        let view = parse_cluster_nodes(&text);
        let dead = view
            .iter()
            .find(|n| n.port == killed)
            .ok_or_else(|| format!("{port} does not know {killed}; CLUSTER NODES:\n{text}"))?;
        // `fail?` (PFAIL) is this node's suspicion only; `fail` is the cluster's verdict.
        if !dead.has("fail") {
            return Err(format!(
                "{port} does not flag {killed} as failed yet; CLUSTER NODES:\n{text}"
            ));
        }
        if !dead.slots.is_empty() {
            return Err(format!(
                "{port} still sees slots on {killed} (no replica promoted yet); \
                 CLUSTER NODES:\n{text}"
            ));
        }
        let served: u32 = view
            .iter()
            .filter(|n| n.is_master() && !n.has("fail") && !n.has("fail?"))
            .map(NodeEntry::slot_count)
            .sum();
        if served != CLUSTER_SLOTS {
            return Err(format!(
                "{port} sees {served} slots on healthy masters, not {CLUSTER_SLOTS}; \
                 CLUSTER NODES:\n{text}"
            ));
        }
        let state = info_field(&info, "cluster_state");
        if state != Some("ok") {
            return Err(format!("{port}: cluster_state is {state:?}"));
        }
    }
    Ok(())
}

/// A freshly created cluster as one node should see it: 6 healthy nodes, 3 masters
/// owning all slots, each with exactly one replica.
fn agreed_view(view: &[NodeEntry]) -> Result<(), String> {
    if view.len() != CLUSTER_NODES {
        return Err(format!("knows {} nodes, not {CLUSTER_NODES}", view.len()));
    }
    if let Some(bad) = view.iter().find(|n| {
        ["fail", "fail?", "handshake", "noaddr"]
            .iter()
            .any(|f| n.has(f))
    }) {
        return Err(format!("node {} is flagged {:?}", bad.port, bad.flags));
    }
    let masters: Vec<&NodeEntry> = view
        .iter()
        .filter(|n| n.is_master() && !n.slots.is_empty())
        .collect();
    if masters.len() != CLUSTER_MASTERS {
        return Err(format!(
            "sees {} masters with slots, not {CLUSTER_MASTERS}",
            masters.len()
        ));
    }
    let slots: u32 = masters.iter().map(|m| m.slot_count()).sum();
    if slots != CLUSTER_SLOTS {
        return Err(format!(
            "sees {slots} slots on masters, not {CLUSTER_SLOTS}"
        ));
    }
    for master in &masters {
        let replicas = view
            .iter()
            .filter(|n| n.has("slave") && n.master_id.as_deref() == Some(master.id.as_str()))
            .count();
        if replicas != 1 {
            return Err(format!(
                "sees {replicas} replicas of master {}, not 1",
                master.port
            ));
        }
    }
    Ok(())
}

/// One line of `CLUSTER NODES`:
/// `<id> <ip:port@cport[,hostname]> <flags> <master-id|-> <ping-sent> <pong-recv>
/// <config-epoch> <link-state> <slot> <slot> ...`
#[derive(Debug, Clone)]
/// A slot on its way from one master to another (`RedisCluster::begin_migration`).
pub struct Migration {
    pub slot: u16,
    pub from: u16,
    pub to: u16,
    from_id: String,
    to_id: String,
}

struct NodeEntry {
    id: String,
    port: u16,
    flags: Vec<String>,
    master_id: Option<String>,
    /// Inclusive ranges; a single slot is `(n, n)`. Importing/migrating markers
    /// (`[slot->-id]`) are left out.
    slots: Vec<(u16, u16)>,
}

impl NodeEntry {
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn is_master(&self) -> bool {
        self.has("master")
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    fn first_slot(&self) -> Option<u16> {
        self.slots.iter().map(|&(a, _)| a).min()
    }

    fn slot_count(&self) -> u32 {
        self.slots
            .iter()
            .map(|&(a, b)| u32::from(b) - u32::from(a) + 1)
            .sum()
    }
}

fn parse_cluster_nodes(text: &str) -> Vec<NodeEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // "127.0.0.1:7000@17000", ":7000@17000" before the node knows its address,
            // "127.0.0.1:7000@17000,host" with a hostname.
            let addr = fields[1].split('@').next()?;
            let port: u16 = addr.rsplit_once(':')?.1.parse().ok()?;
            let slots: Vec<(u16, u16)> = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)),
                    None => {
                        let n = s.parse::<u16>().ok()?;
                        Some((n, n))
                    }
                })
                .collect();
            Some(NodeEntry {
                id: fields[0].to_owned(),
                port,
                flags: fields[2].split(',').map(str::to_owned).collect(),
                master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            })
        })
        .collect()
}

/// The value of `key` in `key:value` lines (CLUSTER INFO, INFO).
fn info_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// A view, one node a line, for failure messages.
fn describe(view: &[NodeEntry]) -> String {
    view.iter()
        .map(|n| format!("{} {} {:?}\n", n.port, n.flags.join(","), n.slots))
        .collect()
}

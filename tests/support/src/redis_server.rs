//! A `redis-server` of the test's own, and readings of what keygate wrote in it.
//!
//! The harness never touches a Redis it did not start: each server gets a free loopback
//! port and a temporary directory, is watched by a shell that kills it if the test process
//! dies, and is killed when dropped.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::PATIENCE;

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
        kill_and_reap([self.child.take(), self.watchdog.take()]);
    }

    /// Starts Redis again on the same port (and directory) and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch().await {
            panic!("redis-server did not come back on port {}: {e}", self.port);
        }
    }

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

    /// A direct connection, for tests that inspect what keygate wrote.
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
        let info = self.connection_info();
        let pong = || pongs(info.clone());
        let (child, watchdog) =
            start_redis(&self.bin, self.port, self.dir.path(), &args, PATIENCE, pong).await?;
        self.watchdog = watchdog;
        self.child = Some(child);
        Ok(())
    }
}

/// Whether the Redis at `info` answers PING with PONG (not LOADING, not an error).
async fn pongs(info: redis::ConnectionInfo) -> bool {
    let Ok(client) = redis::Client::open(info) else {
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

/// `redis-server` started as `spawn_redis` does, once it `pong`s: the server and its
/// watchdog. If it exits first or stays silent `within`, both are killed and the error
/// carries its log.
pub(crate) async fn start_redis<Fut>(
    bin: &Path,
    port: u16,
    dir: &Path,
    args: &[&str],
    within: Duration,
    pong: impl FnMut() -> Fut,
) -> Result<(Child, Option<Child>), String>
where
    Fut: Future<Output = bool>,
{
    let (mut server, watchdog) = spawn_redis(bin, port, dir, args)?;
    match answering(&mut server, port, dir, within, pong).await {
        Ok(()) => Ok((server, watchdog)),
        Err(e) => {
            kill_and_reap([Some(server), watchdog]);
            Err(e)
        }
    }
}

/// Waits until `server` (on `port`, its files in `dir`) `pong`s; an error, with its log,
/// if it exits first or stays silent `within`.
async fn answering<Fut>(
    server: &mut Child,
    port: u16,
    dir: &Path,
    within: Duration,
    mut pong: impl FnMut() -> Fut,
) -> Result<(), String>
where
    Fut: Future<Output = bool>,
{
    let log = || std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = server.try_wait().ok().flatten() {
            return Err(format!(
                "redis-server on {port} exited ({status}): {}",
                log()
            ));
        }
        if pong().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no PONG from {port} within {within:?}: {}", log()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGKILLs a server and its watchdog, and reaps both: no shutdown, no save.
pub(crate) fn kill_and_reap(processes: [Option<Child>; 2]) {
    for mut process in processes.into_iter().flatten() {
        let _ = process.kill();
        let _ = process.wait();
    }
}

/// `REDIS_SERVER`, else `redis-server` from PATH.
pub(crate) fn redis_server_bin() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// `redis-server` on `port` of the loopback, its files in `dir` (its log `redis.log`), no
/// snapshots, and `args`; with a `watchdog`.
fn spawn_redis(
    bin: &Path,
    port: u16,
    dir: &Path,
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
            // Every field and value, member, or element (a range from the first to the last).
            "hash" | "set" | "zset" | "list" => {
                let (read, whole): (&str, &[i64]) = match kind.as_str() {
                    "hash" => ("HGETALL", &[]),
                    "set" => ("SMEMBERS", &[]),
                    "zset" => ("ZRANGE", &[0, -1]),
                    _ => ("LRANGE", &[0, -1]),
                };
                redis::cmd(read)
                    .arg(&key)
                    .arg(whole)
                    .query_async(conn)
                    .await
                    .expect(read)
            }
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

//! The processes a scenario runs against — keygate, the no-op baseline, redis-server,
//! Envoy — each on free loopback ports, each awaited until it answers, each killed when
//! its handle is dropped (so a failed scenario leaves nothing running).

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{stream, StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

use keygate::api::proto::{keys_client::KeysClient, CreateKeyRequest};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The keygate configuration the scenarios run on (policy as in config/dev.yaml).
pub const BENCH_CONFIG: &str = include_str!("../../../benches/keygate.yaml");

/// The tenant every benchmark key belongs to.
pub const TENANT: &str = "5a0c6f0e-8c1b-4f6e-9a57-3d2b1c0e9f11";

/// A free loopback port (bound, read, released: another process could take it in
/// between, which a benchmark on a quiet machine can live with).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A scratch directory for configs and logs, removed on drop unless KEYGATE_LOAD_KEEP.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(what: &str) -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "keygate-load-{what}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("KEYGATE_LOAD_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process, killed and reaped on drop.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
        // Appended to: a restarted replica's log goes on in the same file.
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // A child starts on its parent thread's CPUs: with `--pin`, the servers' CPU.
        let child = match PINNING.get() {
            Some(&(servers, generator)) => {
                run_on_cpu(servers)?;
                let child = cmd.spawn();
                run_on_cpu(generator)?;
                child
            }
            None => cmd.spawn(),
        }
        .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.into(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the process the way Kubernetes does (SIGTERM), and waits up to `timeout` for
    /// it to exit; past that it is killed and the stop reported as failed.
    pub async fn terminate(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} had already exited ({status})", self.name);
        }
        let pid = rustix::process::Pid::from_raw(self.pid() as i32)
            .context("a child's pid is positive")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .with_context(|| format!("cannot send SIGTERM to {}", self.name))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every address accepts connections; fails early if the process exits.
    pub async fn wait_listening(&mut self, addrs: &[SocketAddr]) -> anyhow::Result<()> {
        self.wait_listening_within(addrs, START_TIMEOUT).await
    }

    /// `wait_listening`, for a process that takes longer than most to start.
    pub async fn wait_listening_within(
        &mut self,
        addrs: &[SocketAddr],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for addr in addrs {
            loop {
                if let Some(status) = self.child.try_wait()? {
                    bail!(
                        "{} exited ({status}) before listening on {addr}:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} did not listen on {addr} within {timeout:?}:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Resident memory, from /proc/<pid>/status (VmRSS), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/<pid>/status")
    }
}

/// `--pin`: the CPU of every server this process starts, and the generator's own.
static PINNING: OnceLock<(usize, usize)> = OnceLock::new();

/// Gives the servers started from now on CPU `servers` and the generator (this thread,
/// and the threads and programs it starts, `wrk` included) CPU `generator`.
pub fn pin(servers: usize, generator: usize) -> anyhow::Result<()> {
    if let Some(&pinned) = PINNING.get() {
        anyhow::ensure!(pinned == (servers, generator), "pinned otherwise already");
        return Ok(());
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    anyhow::ensure!(
        servers.max(generator) < cpus && servers != generator,
        "--pin needs two CPUs ({cpus} available)"
    );
    let _ = PINNING.set((servers, generator));
    run_on_cpu(generator)
}

/// Moves the calling thread to one CPU.
fn run_on_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
        .with_context(|| format!("cannot move to CPU {cpu}"))
}

/// User + system CPU time a process used so far, from /proc/<pid>/stat, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    stat_cpu_seconds(pid, false)
}

/// `utime + stime`, and with `reaped` also `cutime + cstime`: the CPU of the children
/// the process has waited for (here, each finished `wrk`).
fn stat_cpu_seconds(pid: u32, reaped: bool) -> anyhow::Result<f64> {
    stat_cpu_of(&fs::read_to_string(format!("/proc/{pid}/stat"))?, reaped)
}

/// The CPU seconds in the text of a process's or a thread's `stat`.
fn stat_cpu_of(stat: &str, reaped: bool) -> anyhow::Result<f64> {
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let fields = if reaped { &f[11..15] } else { &f[11..13] };
    let ticks = fields
        .iter()
        .map(|t| t.parse::<f64>())
        .sum::<Result<f64, _>>()?;
    Ok(ticks / 100.0)
}

/// The threads of `pid` named `name` (their `comm`), and the CPU time they used so far,
/// in seconds.
pub fn threads_cpu_seconds(pid: u32, name: &str) -> anyhow::Result<(usize, f64)> {
    let mut threads = 0;
    let mut seconds = 0.0;
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = entry?.path();
        if fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim() == name) {
            threads += 1;
            seconds += stat_cpu_of(&fs::read_to_string(task.join("stat"))?, false)?;
        }
    }
    Ok((threads, seconds))
}

/// CPU time used by the whole machine so far (all cores, idle and iowait excluded), from
/// /proc/stat, in seconds.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f[0]
        + f[1]
        + f[2]
        + f.get(5).unwrap_or(&0.0)
        + f.get(6).unwrap_or(&0.0)
        + f.get(7).unwrap_or(&0.0);
    Ok(busy / 100.0)
}

/// CPU used by everything except the benchmark's own processes, over a run.
pub struct ForeignCpu {
    pids: Vec<u32>,
    machine: f64,
    ours: f64,
    at: Instant,
}

impl ForeignCpu {
    /// Starts counting; `pids` are the benchmark's processes. This one is added, with
    /// the children it has waited for (`wrk`, which the `envoy` scenario runs to the end).
    pub fn start(pids: &[u32]) -> anyhow::Result<ForeignCpu> {
        Ok(ForeignCpu {
            pids: pids.to_vec(),
            machine: machine_busy_seconds()?,
            ours: Self::ours(pids),
            at: Instant::now(),
        })
    }

    fn ours(pids: &[u32]) -> f64 {
        let own = stat_cpu_seconds(std::process::id(), true).unwrap_or(0.0);
        own + pids
            .iter()
            .map(|p| cpu_seconds(*p).unwrap_or(0.0))
            .sum::<f64>()
    }

    /// Cores' worth of CPU that other processes (other builds and tests on a shared
    /// machine, the hypervisor's steal) took while the run went on.
    pub fn cores(&self) -> anyhow::Result<f64> {
        let ours = Self::ours(&self.pids);
        let foreign = (machine_busy_seconds()? - self.machine) - (ours - self.ours);
        Ok((foreign / self.at.elapsed().as_secs_f64()).max(0.0))
    }
}

/// The kernel's TCP counters of trouble below the processes measured: segments sent
/// again, segments that arrived out of order, and probes for acknowledgements that came
/// late. On loopback nothing is lost, yet all three happen under load on a 2-core VM; they
/// come in most runs and do not tell the runs with a long tail apart (BENCHMARKS.md,
/// section 13), so they are a record of the machine's state, not a filter. The counters
/// are machine-wide: on a quiet machine, a run's difference is the run's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TcpTrouble {
    /// `Tcp: RetransSegs`.
    pub retransmitted: u64,
    /// `TcpExt: TCPOFOQueue`: segments queued behind a gap.
    pub out_of_order: u64,
    /// `TcpExt: TCPLossProbes`: probes sent because an answer was late.
    pub loss_probes: u64,
}

impl TcpTrouble {
    /// The counters now (since boot).
    pub fn read() -> anyhow::Result<TcpTrouble> {
        let snmp = fs::read_to_string("/proc/net/snmp")?;
        let netstat = fs::read_to_string("/proc/net/netstat")?;
        let get = |text: &str, group: &str, name: &str| {
            snmp_counter(text, group, name)
                .with_context(|| format!("no {group} {name} in /proc/net"))
        };
        Ok(TcpTrouble {
            retransmitted: get(&snmp, "Tcp", "RetransSegs")?,
            out_of_order: get(&netstat, "TcpExt", "TCPOFOQueue")?,
            loss_probes: get(&netstat, "TcpExt", "TCPLossProbes")?,
        })
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &TcpTrouble) -> TcpTrouble {
        TcpTrouble {
            retransmitted: self.retransmitted.saturating_sub(earlier.retransmitted),
            out_of_order: self.out_of_order.saturating_sub(earlier.out_of_order),
            loss_probes: self.loss_probes.saturating_sub(earlier.loss_probes),
        }
    }

    pub fn any(&self) -> bool {
        *self != TcpTrouble::default()
    }
}

/// One counter of /proc/net/snmp or /proc/net/netstat, where each group is a line of
/// names followed by a line of values, both starting with `group:`.
fn snmp_counter(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let at = names.split_whitespace().position(|n| n == name);
        if let Some(at) = at {
            return values.split_whitespace().nth(at)?.parse().ok();
        }
    }
    None
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The no-op baseline, started from this very binary; `response_bytes` pads its answer.
pub async fn noop_server(
    scratch: &Scratch,
    response_bytes: u64,
) -> anyhow::Result<(Proc, SocketAddr)> {
    noop_server_with(scratch, &["--response-bytes", &response_bytes.to_string()]).await
}

/// The no-op on keygate's own server code that decodes only the outer request
/// (`noop-server --outer-decode-only`), padded to `response_bytes`.
pub async fn noop_server_outer_decode_only(
    scratch: &Scratch,
    response_bytes: u64,
) -> anyhow::Result<(Proc, SocketAddr)> {
    noop_server_with(
        scratch,
        &[
            "--outer-decode-only",
            "--response-bytes",
            &response_bytes.to_string(),
        ],
    )
    .await
}

/// The no-op as a user would write it (`noop-server --plain`), answering 4 bytes.
pub async fn noop_server_plain(scratch: &Scratch) -> anyhow::Result<(Proc, SocketAddr)> {
    noop_server_with(scratch, &["--plain"]).await
}

/// The no-op baseline answering with the encoded CheckResponse in `answer`.
pub async fn noop_server_answering(
    scratch: &Scratch,
    answer: &Path,
) -> anyhow::Result<(Proc, SocketAddr)> {
    noop_server_with(scratch, &["--answer-file", &answer.display().to_string()]).await
}

async fn noop_server_with(scratch: &Scratch, args: &[&str]) -> anyhow::Result<(Proc, SocketAddr)> {
    own_server(scratch, "noop-server", args).await
}

/// keygate-load's minimal HTTP/1.1 upstream (`upstream-server`).
pub async fn upstream_server(scratch: &Scratch) -> anyhow::Result<(Proc, SocketAddr)> {
    own_server(scratch, "upstream-server", &[]).await
}

/// The no-op HTTP authorizer on keygate's HTTP stack (`noop-http-server`).
pub async fn noop_http_server(scratch: &Scratch) -> anyhow::Result<(Proc, SocketAddr)> {
    own_server(scratch, "noop-http-server", &[]).await
}

/// This binary's `subcommand --listen <free port> args…`, once it listens.
async fn own_server(
    scratch: &Scratch,
    subcommand: &str,
    args: &[&str],
) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_port()?;
    let exe = std::env::current_exe()?;
    let mut p = Proc::spawn(
        subcommand,
        Command::new(exe)
            .args([subcommand, "--listen", &addr.to_string()])
            .args(args),
        scratch
            .path()
            .join(format!("{subcommand}-{}.log", addr.port())),
    )?;
    p.wait_listening(&[addr]).await?;
    Ok((p, addr))
}

/// A private redis-server on a free port, without persistence.
pub async fn redis_server(scratch: &Scratch) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_port()?;
    let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let mut p = Proc::spawn(
        "redis-server",
        Command::new(bin).args([
            "--port",
            &addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &scratch.path().display().to_string(),
        ]),
        scratch.path().join("redis.log"),
    )?;
    p.wait_listening(&[addr]).await?;
    Ok((p, addr))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Default)]
pub struct KeygateOptions {
    pub bin: PathBuf,
    /// Redis address when the store is Redis.
    pub redis: Option<SocketAddr>,
    /// Use argon2's default (production) parameters instead of the bench config's
    /// cheap ones.
    pub default_argon2: bool,
    /// Further `KEYGATE_…` configuration, applied last.
    pub env: Vec<(String, String)>,
    /// `keygate serve --dev`: the sample policy built into keygate (config/dev.yaml as
    /// shipped, argon2 defaults, `cache.ttl` 30 s) instead of `benches/keygate.yaml`.
    pub dev: bool,
    /// The secrets of the deployment the replica belongs to; a deployment of its own when
    /// `None`.
    pub deployment: Option<Deployment>,
    /// The replica's listeners (a restarted replica keeps its own); free ports when `None`.
    pub addrs: Option<Addrs>,
    /// Names its log file (`<name>.log` in the scratch directory); `keygate` when empty.
    pub name: String,
}

/// What the replicas of one deployment share: the pepper and the admin credential.
#[derive(Clone)]
pub struct Deployment {
    pepper: String,
    admin_token: String,
}

impl Deployment {
    pub fn new() -> Deployment {
        Deployment {
            pepper: keygate::secret::Secret::random(43).expose().to_owned(),
            admin_token: keygate::secret::Secret::random(32).expose().to_owned(),
        }
    }
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deployment { .. }")
    }
}

/// A replica's listeners.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub http: SocketAddr,
}

impl Addrs {
    pub fn free() -> anyhow::Result<Addrs> {
        Ok(Addrs {
            grpc: free_port()?,
            admin: free_port()?,
            http: free_port()?,
        })
    }
}

/// A running keygate (release build), with its addresses and admin credential.
pub struct Keygate {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub http: SocketAddr,
    admin_token: String,
}

impl Keygate {
    pub async fn start(opts: &KeygateOptions, scratch: &Scratch) -> anyhow::Result<Keygate> {
        let Addrs { grpc, admin, http } = match opts.addrs {
            Some(a) => a,
            None => Addrs::free()?,
        };
        let deployment = opts.deployment.clone().unwrap_or_else(Deployment::new);
        let name = if opts.name.is_empty() {
            "keygate"
        } else {
            &opts.name
        };
        let mut cmd = Command::new(&opts.bin);
        cmd.arg("serve");
        if opts.dev {
            cmd.arg("--dev");
        } else {
            let config = scratch.path().join("keygate.yaml");
            fs::write(&config, BENCH_CONFIG)?;
            cmd.arg("--config").arg(&config);
        }
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KEYGATE_PEPPER", &deployment.pepper)
            .env("KEYGATE_ADMIN_TOKEN", &deployment.admin_token)
            .env("KEYGATE_LISTEN__GRPC", grpc.to_string())
            .env("KEYGATE_LISTEN__ADMIN", admin.to_string())
            .env("KEYGATE_LISTEN__HTTP", http.to_string());
        if opts.dev {
            // The state file `serve --dev` writes for the CLI goes to the scratch
            // directory, not over the user's own.
            cmd.env(
                "KEYGATE_STATE_DIR",
                scratch.path().join(format!("{name}-state")),
            );
        }
        if let Some(redis) = opts.redis {
            cmd.env("KEYGATE_STORE__BACKEND", "redis")
                .env("KEYGATE_STORE__REDIS_URL", format!("redis://{redis}"));
        }
        if opts.default_argon2 && !opts.dev {
            // An empty mapping: every argon2 field at its default (19 MiB, 2 passes, 1 lane).
            cmd.env("KEYGATE_API_KEYS__ARGON2", "{}");
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn(name, &mut cmd, scratch.path().join(format!("{name}.log")))?;
        proc.wait_listening(&[grpc, admin, http]).await?;
        Ok(Keygate {
            proc,
            grpc,
            admin,
            http,
            admin_token: deployment.admin_token,
        })
    }

    pub fn addrs(&self) -> Addrs {
        Addrs {
            grpc: self.grpc,
            admin: self.admin,
            http: self.http,
        }
    }

    /// Whether `/readyz` answers 200 (what a load balancer's readiness probe asks).
    pub async fn is_ready(&self) -> bool {
        is_ready(self.http).await
    }

    /// Waits (up to 30 s) until `/readyz` answers 200; fails early if the process exits.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.proc.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.proc.name,
                    self.proc.log_tail()
                );
            }
            if self.is_ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} was not ready within {START_TIMEOUT:?}:\n{}",
                    self.proc.name,
                    self.proc.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates `n` keys with `scopes` through `keygate.v1.Keys/CreateKey`, `parallel` at
    /// a time, and returns their tokens.
    pub async fn create_keys(
        &self,
        n: usize,
        scopes: &[&str],
        parallel: usize,
    ) -> anyhow::Result<Vec<String>> {
        self.create_keys_on_plan(n, scopes, "", parallel).await
    }

    /// `create_keys`, each key on `plan` (one of `policy.plans`; none when empty).
    pub async fn create_keys_on_plan(
        &self,
        n: usize,
        scopes: &[&str],
        plan: &str,
        parallel: usize,
    ) -> anyhow::Result<Vec<String>> {
        let channel = Endpoint::from_shared(format!("http://{}", self.admin))?
            .connect()
            .await
            .context("cannot connect to keygate's admin listener")?;
        let bearer: MetadataValue<_> = format!("Bearer {}", self.admin_token).parse()?;
        let client = KeysClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        stream::iter(0..n)
            .map(|i| {
                let mut client = client.clone();
                let scopes = scopes.clone();
                async move {
                    let resp = client
                        .create_key(CreateKeyRequest {
                            tenant_id: TENANT.into(),
                            name: format!("bench-{i}"),
                            scopes,
                            plan: plan.to_owned(),
                            ..Default::default()
                        })
                        .await
                        .context("CreateKey failed")?;
                    anyhow::Ok(resp.into_inner().token)
                }
            })
            .buffer_unordered(parallel.max(1))
            .try_collect()
            .await
    }

    /// One sample from keygate's /metrics (the sum over label sets when `labels` is
    /// empty; otherwise the series whose labels contain `labels`, e.g. `result="miss"`).
    pub async fn metric(&self, name: &str, labels: &str) -> anyhow::Result<f64> {
        let text = http_get(self.http, "/metrics").await?;
        Ok(metric_value(&text, name, labels))
    }
}

/// The value of a Prometheus sample in a text exposition; 0 when absent.
pub fn metric_value(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, series_labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (series, ""),
            };
            (metric == name && series_labels.contains(labels))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Whether `/readyz` on `http` answers 200.
pub async fn is_ready(http: SocketAddr) -> bool {
    http_get(http, "/readyz").await.is_ok()
}

/// A minimal HTTP/1.1 GET (the benchmark reads /metrics and Envoy's admin page).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .with_context(|| format!("GET {path} on {addr} timed out"))??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {path} on {addr}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_counters_are_read_by_name() {
        let text = "Tcp: RtoAlgorithm RtoMin RetransSegs InErrs\n\
                    Tcp: 1 200 94 0\n\
                    Udp: InDatagrams RetransSegs\n\
                    Udp: 5 6\n";
        assert_eq!(snmp_counter(text, "Tcp", "RetransSegs"), Some(94));
        assert_eq!(snmp_counter(text, "Udp", "RetransSegs"), Some(6));
        assert_eq!(snmp_counter(text, "Tcp", "Absent"), None);
        assert_eq!(snmp_counter(text, "Ip", "RetransSegs"), None);
        let now = TcpTrouble::read().expect("this machine has /proc/net");
        assert!(!now.since(&now).any());
        let before = TcpTrouble {
            retransmitted: now.retransmitted.saturating_sub(2),
            ..now
        };
        assert_eq!(
            now.since(&before).retransmitted,
            now.retransmitted - before.retransmitted
        );
    }

    /// A graceful stop is SIGTERM, and the process's exit is awaited.
    #[tokio::test]
    async fn terminate_sends_sigterm_and_waits_for_the_exit() {
        use std::os::unix::process::ExitStatusExt;
        let scratch = Scratch::new("terminate-test").unwrap();
        let mut p = Proc::spawn(
            "sleep",
            Command::new("sleep").arg("600"),
            scratch.path().join("sleep.log"),
        )
        .unwrap();
        let status = p.terminate(Duration::from_secs(30)).await.unwrap();
        assert_eq!(status.signal(), Some(15), "{status}");
        let err = p.terminate(Duration::from_secs(1)).await.unwrap_err();
        assert!(err.to_string().contains("already exited"), "{err}");
    }

    #[test]
    fn samples_are_read_from_the_exposition() {
        let text = "# HELP x\n# TYPE keygate_argon2_verifications_total counter\n\
                    keygate_argon2_verifications_total 3\n\
                    keygate_credential_cache_requests_total{result=\"hit\"} 10\n\
                    keygate_credential_cache_requests_total{result=\"miss\"} 2\n";
        assert_eq!(
            metric_value(text, "keygate_argon2_verifications_total", ""),
            3.0
        );
        assert_eq!(
            metric_value(
                text,
                "keygate_credential_cache_requests_total",
                "result=\"miss\""
            ),
            2.0
        );
        assert_eq!(
            metric_value(text, "keygate_credential_cache_requests_total", ""),
            12.0
        );
        assert_eq!(metric_value(text, "absent", ""), 0.0);
    }
}

//! Scenarios over several keygate replicas on one Redis, as a deployment runs them:
//!
//! - `scale-out`: N active keys, verified by a first replica; a second replica started
//!   while the first is under load; every key's first check on the new replica sent at
//!   once (bounded concurrency), each with Envoy's ext_authz timeout.
//! - `rolling-restart`: three replicas over N keys under steady load, each stopped
//!   gracefully (SIGTERM), started again and put back in rotation in turn.
//!
//! The generator plays the load balancer: a replica gets traffic while its `/readyz`
//! passes, as with Kubernetes' readiness probe or Envoy's active health checks; a check
//! not answered within the deadline counts as failed, as Envoy fails it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{stream, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::client::{Connection, Outcome};
use crate::procs::{self, Addrs, Deployment, Keygate, KeygateOptions, Proc, Scratch};
use crate::report::ScenarioReport;
use crate::shape::{Ids, Shape, Template};

/// What both fleet scenarios take.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// The keygate binary (default: `keygate` next to this binary, the release build).
    #[arg(long)]
    pub keygate_bin: Option<PathBuf>,
    /// Extra configuration for every replica, as `KEYGATE_…` variables (repeatable).
    #[arg(long, value_parser = crate::scenarios::parse_env)]
    pub keygate_env: Vec<(String, String)>,
    /// Active keys (created through the admin API, argon2 at its default cost).
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Envoy's ext_authz timeout: sent as `grpc-timeout`, and a check not answered
    /// within it counts as failed (Envoy fails it).
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// The steady load, checks per second (open loop), all keys in rotation.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// HTTP/2 connections to each replica.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// How often the balancer asks each replica's `/readyz`.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,
    /// Print one JSON object instead of Markdown.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleOutArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// First checks in flight at once on the new replica.
    #[arg(long, default_value_t = 256)]
    pub first_touch_concurrency: usize,
    /// Gives up retrying keys that were not served after this long.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// A retrying client's pause between rounds of retries.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub retry_pause: Duration,
    /// Skip replica 1's verification of the keys: their first check anywhere is then on
    /// the new replica (what argon2 alone costs a cold start).
    #[arg(long)]
    pub unverified: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RollingArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Replicas.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Steady load before the first restart, and after each replica is back in rotation.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// A replica that has not exited this long after SIGTERM is killed, and the run fails.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stop_timeout: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Replicas, all reading one configuration file.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Steady load before the reloads and after them.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Rewrites of the file (each a real change: a route's scope) in the reloading phase.
    #[arg(long, default_value_t = 20)]
    pub reloads: usize,
    /// Pause between one rewrite being applied on every replica and the next.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub every: Duration,
}

/// How one check ended, as a user behind Envoy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Allowed within the deadline.
    Served,
    /// `UNAVAILABLE` (e.g. the argon2 queue was full).
    Unavailable,
    /// No answer within the deadline, or keygate's own `DEADLINE_EXCEEDED`.
    OverDeadline,
    /// A valid key denied (with the reason).
    Denied(String),
    /// The connection failed (refused, reset, closed).
    Connection(String),
    /// Any other gRPC error.
    Other(String),
    /// No replica was in rotation.
    NoReplica,
}

/// Classifies the answer to one check (`None`: none came within the deadline).
pub fn classify(answer: Option<Outcome>) -> Class {
    match answer {
        None => Class::OverDeadline,
        Some(Outcome::Allow) => Class::Served,
        Some(Outcome::Deny(reason)) => Class::Denied(reason),
        Some(Outcome::Error(e)) => {
            if e.starts_with("grpc-status 14 ") || e == "grpc-status 14" {
                Class::Unavailable
            } else if e.starts_with("grpc-status 4 ") || e == "grpc-status 4" {
                Class::OverDeadline
            } else if ["connection:", "send:", "response:", "body:", "trailers:"]
                .iter()
                .any(|p| e.starts_with(p))
            {
                Class::Connection(e)
            } else {
                Class::Other(e)
            }
        }
    }
}

/// Sends one check over `conn` and classifies what came back within `deadline`.
async fn check(conn: &Connection, frame: bytes::Bytes, deadline: Duration) -> Class {
    classify(
        tokio::time::timeout(deadline, conn.check(frame))
            .await
            .ok()
            .map(|(outcome, _)| outcome),
    )
}

/// The counts of a phase (or of a wave of checks).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    pub sent: u64,
    pub served: u64,
    pub unavailable: u64,
    pub over_deadline: u64,
    pub denied: u64,
    pub connection_errors: u64,
    pub other_errors: u64,
    pub no_replica: u64,
    /// Checks the generator could not send (too many in flight: the targets stalled).
    pub not_sent: u64,
    /// Every reason for a failure, with its count.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, u64>,
}

impl Tally {
    pub fn add(&mut self, class: &Class) {
        self.sent += 1;
        let reason = match class {
            Class::Served => {
                self.served += 1;
                return;
            }
            Class::Unavailable => {
                self.unavailable += 1;
                "UNAVAILABLE".to_owned()
            }
            Class::OverDeadline => {
                self.over_deadline += 1;
                "over the deadline".to_owned()
            }
            Class::Denied(r) => {
                self.denied += 1;
                format!("denied: {r}")
            }
            Class::Connection(e) => {
                self.connection_errors += 1;
                e.clone()
            }
            Class::Other(e) => {
                self.other_errors += 1;
                e.clone()
            }
            Class::NoReplica => {
                self.no_replica += 1;
                "no replica in rotation".to_owned()
            }
        };
        *self.failures.entry(reason).or_default() += 1;
    }

    /// Checks that did not get an allow within the deadline.
    pub fn failed(&self) -> u64 {
        self.sent - self.served + self.not_sent
    }
}

/// One replica as the balancer sees it.
struct Member {
    grpc: SocketAddr,
    http: SocketAddr,
    conns: Mutex<Arc<Vec<Connection>>>,
    in_rotation: AtomicBool,
    next: AtomicUsize,
}

/// Spreads checks over the replicas in rotation, round robin, over `connections`
/// connections each; `probe` keeps the rotation in step with each replica's `/readyz`.
pub struct Balancer {
    members: Vec<Member>,
    connections: usize,
    deadline: Duration,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(replicas: &[Addrs], connections: usize, deadline: Duration) -> Arc<Balancer> {
        Arc::new(Balancer {
            members: replicas
                .iter()
                .map(|a| Member {
                    grpc: a.grpc,
                    http: a.http,
                    conns: Mutex::new(Arc::new(Vec::new())),
                    in_rotation: AtomicBool::new(false),
                    next: AtomicUsize::new(0),
                })
                .collect(),
            connections: connections.max(1),
            deadline,
            next: AtomicUsize::new(0),
        })
    }

    /// One round of readiness probes: a replica whose `/readyz` passes is put in rotation
    /// (on new connections if it was out), one whose probe fails is taken out.
    pub async fn probe(&self) {
        for m in &self.members {
            let ready = tokio::time::timeout(Duration::from_secs(1), procs::is_ready(m.http))
                .await
                .unwrap_or(false);
            if !ready {
                m.in_rotation.store(false, Ordering::SeqCst);
            } else if !m.in_rotation.load(Ordering::SeqCst) {
                if let Ok(conns) = open(m.grpc, self.connections, self.deadline).await {
                    *m.conns.lock().expect("connections") = Arc::new(conns);
                    m.in_rotation.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Probes every `interval` until `stop`.
    pub fn spawn_prober(
        self: &Arc<Self>,
        interval: Duration,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                me.probe().await;
                tokio::time::sleep(interval).await;
            }
        })
    }

    pub fn in_rotation(&self, i: usize) -> bool {
        self.members[i].in_rotation.load(Ordering::SeqCst)
    }

    /// The next replica in rotation (its index) and one of its connections: the
    /// replicas in rotation take turns, whichever are out.
    fn pick(&self) -> Option<(usize, Connection)> {
        let up: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].in_rotation.load(Ordering::Relaxed))
            .collect();
        if up.is_empty() {
            return None;
        }
        let i = up[self.next.fetch_add(1, Ordering::Relaxed) % up.len()];
        let m = &self.members[i];
        let conns = m.conns.lock().expect("connections").clone();
        let c = m.next.fetch_add(1, Ordering::Relaxed);
        conns.get(c % conns.len().max(1)).cloned().map(|c| (i, c))
    }

    /// Waits (bounded) until replica `i` is in rotation.
    pub async fn wait_in_rotation(&self, i: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !self.in_rotation(i) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "replica {} was not put back in rotation within {within:?}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// `n` HTTP/2 connections to `addr`, sending `timeout` as `grpc-timeout`.
async fn open(addr: SocketAddr, n: usize, timeout: Duration) -> anyhow::Result<Vec<Connection>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        conns.push(Connection::open(addr, Some(timeout)).await?);
    }
    Ok(conns)
}

/// A phase's counts and the latency of its served checks.
struct Phase {
    name: String,
    started: Instant,
    ended: Option<Instant>,
    tally: Tally,
    served_latency: Histogram<u64>,
}

impl Phase {
    fn new(name: &str) -> Phase {
        Phase {
            name: name.into(),
            started: Instant::now(),
            ended: None,
            tally: Tally::default(),
            served_latency: Histogram::new_with_bounds(1_000, 120_000_000_000, 3)
                .expect("valid bounds"),
        }
    }
}

/// One phase as reported.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: String,
    pub seconds: f64,
    #[serde(flatten)]
    pub tally: Tally,
    pub served_p50_ms: f64,
    pub served_p99_ms: f64,
    pub served_max_ms: f64,
}

/// Steady open-loop load over a balancer, counted per phase: a check counts in the
/// phase it was sent in.
pub struct Steady {
    stop: Arc<AtomicBool>,
    phases: Arc<Mutex<Vec<Phase>>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Checks a steady load may have in flight before the rest count as not sent.
const MAX_IN_FLIGHT: usize = 20_000;

impl Steady {
    pub fn start(
        balancer: Arc<Balancer>,
        template: Arc<Template>,
        tokens: Arc<Vec<String>>,
        rate: f64,
        first_phase: &str,
    ) -> Steady {
        let stop = Arc::new(AtomicBool::new(false));
        let phases = Arc::new(Mutex::new(vec![Phase::new(first_phase)]));
        let (stop2, phases2) = (stop.clone(), phases.clone());
        let task = tokio::spawn(async move {
            anyhow::ensure!(rate > 0.0, "--rate must be above zero");
            let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            let salt = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            let deadline = balancer.deadline;
            let start = Instant::now();
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stop2.load(Ordering::SeqCst) {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                while sent < due {
                    let seq = sent;
                    sent += 1;
                    let phase = phases2.lock().expect("phases").len() - 1;
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        phases2.lock().expect("phases")[phase].tally.not_sent += 1;
                        continue;
                    };
                    let token = &tokens[(seq % tokens.len() as u64) as usize];
                    let frame = template.frame(token.as_bytes(), &Ids::for_sequence(seq, salt));
                    let (balancer, phases) = (balancer.clone(), phases2.clone());
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let class = match balancer.pick() {
                            Some((_, conn)) => check(&conn, frame, deadline).await,
                            None => Class::NoReplica,
                        };
                        let took = t.elapsed();
                        let mut phases = phases.lock().expect("phases");
                        let p = &mut phases[phase];
                        if class == Class::Served {
                            p.served_latency
                                .saturating_record(took.as_nanos().max(1000) as u64);
                        }
                        p.tally.add(&class);
                        drop(phases);
                        drop(permit);
                    });
                }
            }
            // Every check sent gets its answer or its deadline.
            let _ = tokio::time::timeout(
                deadline + Duration::from_secs(5),
                in_flight.acquire_many(MAX_IN_FLIGHT as u32),
            )
            .await;
            Ok(())
        });
        Steady { stop, phases, task }
    }

    /// Starts the next phase.
    pub fn phase(&self, name: &str) {
        let mut phases = self.phases.lock().expect("phases");
        let now = Instant::now();
        if let Some(last) = phases.last_mut() {
            last.ended = Some(now);
        }
        phases.push(Phase::new(name));
    }

    /// Stops sending, waits for the checks in flight, and reports every phase.
    pub async fn stop(self) -> anyhow::Result<Vec<PhaseReport>> {
        {
            let mut phases = self.phases.lock().expect("phases");
            if let Some(last) = phases.last_mut() {
                last.ended = Some(Instant::now());
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.context("the steady load panicked")??;
        let phases = self.phases.lock().expect("phases");
        Ok(phases
            .iter()
            .map(|p| {
                let ms = |q: f64| {
                    if p.served_latency.is_empty() {
                        f64::NAN
                    } else {
                        p.served_latency.value_at_quantile(q) as f64 / 1e6
                    }
                };
                PhaseReport {
                    phase: p.name.clone(),
                    seconds: p
                        .ended
                        .unwrap_or_else(Instant::now)
                        .duration_since(p.started)
                        .as_secs_f64(),
                    tally: p.tally.clone(),
                    served_p50_ms: ms(0.5),
                    served_p99_ms: ms(0.99),
                    served_max_ms: ms(1.0),
                }
            })
            .collect())
    }
}

/// One check per key in `which` (indices into `tokens`), at most `concurrency` in
/// flight over `conns`, each with `deadline`: every key's class and latency.
async fn wave(
    conns: &[Connection],
    template: &Template,
    tokens: &[String],
    which: &[usize],
    concurrency: usize,
    deadline: Duration,
    salt: &AtomicU64,
) -> Vec<(usize, Class, Duration)> {
    stream::iter(which.iter().copied())
        .map(|k| {
            let seq = salt.fetch_add(1, Ordering::Relaxed);
            let frame = template.frame(tokens[k].as_bytes(), &Ids::for_sequence(seq, 0x5ca1e));
            let conn = conns[k % conns.len()].clone();
            async move {
                let t = Instant::now();
                let class = check(&conn, frame, deadline).await;
                (k, class, t.elapsed())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

/// How long a warming check may take: long enough for the argon2 queue.
const WARM_DEADLINE: Duration = Duration::from_secs(30);

/// Checks every key once on `replica` (its first verification there), at most 32 in
/// flight (below the argon2 queue's default depth of 64); fails unless all are allowed.
async fn warm(
    replica: &Keygate,
    template: &Template,
    tokens: &[String],
    salt: &AtomicU64,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let conns = open(replica.grpc, 4, WARM_DEADLINE).await?;
    let all: Vec<usize> = (0..tokens.len()).collect();
    let mut tally = Tally::default();
    for (_, class, _) in wave(&conns, template, tokens, &all, 32, WARM_DEADLINE, salt).await {
        tally.add(&class);
    }
    if tally.served != tokens.len() as u64 {
        bail!(
            "warming {} keys on {} failed: {} allowed; {:?}",
            tokens.len(),
            replica.grpc,
            tally.served,
            tally.failures
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

/// What the fleet scenarios start: redis-server and the deployment's secrets.
struct Fleet {
    args: FleetArgs,
    bin: PathBuf,
    redis: SocketAddr,
    deployment: Deployment,
    _redis: Proc,
    scratch: Scratch,
}

impl Fleet {
    async fn start(args: &FleetArgs) -> anyhow::Result<Fleet> {
        let bin = crate::scenarios::keygate_bin(args.keygate_bin.as_ref())?;
        let scratch = Scratch::new("fleet")?;
        let (redis_proc, redis) = procs::redis_server(&scratch).await?;
        Ok(Fleet {
            args: args.clone(),
            bin,
            redis,
            deployment: Deployment::new(),
            _redis: redis_proc,
            scratch,
        })
    }

    /// Replica `name` of the deployment, on `addrs` (free ports when `None`), ready.
    async fn replica(&self, name: &str, addrs: Option<Addrs>) -> anyhow::Result<Keygate> {
        let mut k = Keygate::start(
            &KeygateOptions {
                bin: self.bin.clone(),
                redis: Some(self.redis),
                default_argon2: true,
                env: self.args.keygate_env.clone(),
                deployment: Some(self.deployment.clone()),
                addrs,
                name: name.into(),
                ..Default::default()
            },
            &self.scratch,
        )
        .await?;
        k.wait_ready().await?;
        Ok(k)
    }

    fn template(&self, tokens: &[String]) -> anyhow::Result<Arc<Template>> {
        let len = tokens.first().context("no keys")?.len();
        Ok(Arc::new(Template::new(
            &Shape::new("GET", "/v1/contacts/42?include=notes"),
            len,
        )))
    }
}

async fn argon2_runs(k: &Keygate) -> anyhow::Result<f64> {
    k.metric("keygate_argon2_verifications_total", "").await
}

fn phase_table(title: &str, phases: &[PhaseReport]) -> String {
    let mut out = format!("{title}\n\n");
    out += "| phase | s | checks | served | failed | UNAVAILABLE | over deadline | denied | \
            connection | other | no replica | not sent | served p50 / p99 / max ms |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for p in phases {
        let t = &p.tally;
        out += &format!(
            "| {} | {:.1} | {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {} | {:.2} / {:.2} / {:.2} |\n",
            p.phase,
            p.seconds,
            t.sent + t.not_sent,
            t.served,
            t.failed(),
            t.unavailable,
            t.over_deadline,
            t.denied,
            t.connection_errors,
            t.other_errors,
            t.no_replica,
            t.not_sent,
            p.served_p50_ms,
            p.served_p99_ms,
            p.served_max_ms
        );
    }
    out
}

/// ` (reason: n, …)`, or nothing when nothing failed.
fn reasons(t: &Tally) -> String {
    if t.failures.is_empty() {
        return String::new();
    }
    let list: Vec<String> = t
        .failures
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    format!(" ({})", list.join(", "))
}

fn finish(report: &ScenarioReport, a: &FleetArgs) -> anyhow::Result<()> {
    crate::scenarios::emit(report, a.json, a.out.as_deref())
}

/// scale-out: a second replica started under load; every key's first check on it at
/// once, each with the deadline.
pub async fn scale_out(s: &ScaleOutArgs) -> anyhow::Result<()> {
    let a = &s.fleet;
    let fleet = Fleet::start(a).await?;
    let mut report = ScenarioReport::new(&format!(
        "scale-out: {} active keys, a new replica under load, every first check at once",
        a.keys
    ));
    let salt = AtomicU64::new(0);
    let first = fleet.replica("replica-1", None).await?;
    let t = Instant::now();
    let tokens = first.create_keys(a.keys, &["contacts:read"], 8).await?;
    report.fact(
        "keys created (admin API, argon2 defaults)",
        format!("{} in {:.1} s", a.keys, t.elapsed().as_secs_f64()),
    );
    let template = fleet.template(&tokens)?;
    if s.unverified {
        report.fact(
            "keys verified by replica 1",
            "none (`--unverified`): the load on replica 1 and the first checks on replica 2 \
             are each key's first verification",
        );
    } else {
        let warm_s = warm(&first, &template, &tokens, &salt).await?;
        report.fact(
            "every key verified by replica 1 (one check each)",
            format!(
                "{} in {warm_s:.1} s, {} argon2 runs",
                a.keys,
                argon2_runs(&first).await?
            ),
        );
    }

    // Replica 1 under steady load from here on.
    let tokens = Arc::new(tokens);
    let balancer = Balancer::new(&[first.addrs()], a.connections, a.deadline);
    balancer.probe().await;
    anyhow::ensure!(balancer.in_rotation(0), "replica 1 is not ready");
    let stop_probing = Arc::new(AtomicBool::new(false));
    let prober = balancer.spawn_prober(a.probe_interval, stop_probing.clone());
    let load = Steady::start(
        balancer,
        template.clone(),
        tokens.clone(),
        a.rate,
        "replica 1 alone",
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    load.phase("replica 2 starting");
    let t = Instant::now();
    let second = fleet.replica("replica-2", None).await;
    let ready_s = t.elapsed().as_secs_f64();
    let second = match second {
        Ok(k) => k,
        Err(e) => {
            let _ = load.stop().await;
            return Err(e);
        }
    };
    report.fact("replica 2: start to /readyz 200", format!("{ready_s:.2} s"));
    let argon2_0 = argon2_runs(&second).await?;
    let queue_full0 = second.metric("keygate_argon2_queue_full_total", "").await?;

    load.phase("first checks on replica 2");
    let conns = open(second.grpc, a.connections, a.deadline).await?;
    let started = Instant::now();
    let all: Vec<usize> = (0..tokens.len()).collect();
    let mut first_touch = Tally::default();
    let mut served_at: Vec<Option<Duration>> = vec![None; tokens.len()];
    let mut first_latency =
        Histogram::<u64>::new_with_bounds(1_000, 120_000_000_000, 3).expect("valid bounds");
    let mut remaining = Vec::new();
    for (k, class, took) in wave(
        &conns,
        &template,
        &tokens,
        &all,
        s.first_touch_concurrency,
        a.deadline,
        &salt,
    )
    .await
    {
        first_latency.saturating_record(took.as_nanos().max(1000) as u64);
        first_touch.add(&class);
        if class == Class::Served {
            served_at[k] = Some(started.elapsed());
        } else {
            remaining.push(k);
        }
    }
    // Retried as a client would, until every key was served or `max_wait`.
    let mut retries = Tally::default();
    let mut rounds = 0;
    while !remaining.is_empty() && started.elapsed() < s.max_wait {
        tokio::time::sleep(s.retry_pause).await;
        rounds += 1;
        let round = wave(
            &conns,
            &template,
            &tokens,
            &remaining,
            s.first_touch_concurrency,
            a.deadline,
            &salt,
        )
        .await;
        remaining.clear();
        for (k, class, _) in round {
            retries.add(&class);
            if class == Class::Served {
                served_at[k] = Some(started.elapsed());
            } else {
                remaining.push(k);
            }
        }
    }
    load.phase("after");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_probing.store(true, Ordering::SeqCst);
    let phases = load.stop().await?;
    let _ = prober.await;
    let argon2 = argon2_runs(&second).await? - argon2_0;
    let queue_full = second.metric("keygate_argon2_queue_full_total", "").await? - queue_full0;

    let n = tokens.len() as u64;
    let ms = |q: f64| first_latency.value_at_quantile(q) as f64 / 1e6;
    report.fact(
        &format!(
            "first checks on replica 2: all {n} sent at once, {} in flight, {} connections, \
             deadline {:?}",
            s.first_touch_concurrency, a.connections, a.deadline
        ),
        format!(
            "{} served in time, {} UNAVAILABLE, {} over {:?}, {} denied, {} other; latency \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            first_touch.served,
            first_touch.unavailable,
            first_touch.over_deadline,
            a.deadline,
            first_touch.denied,
            first_touch.connection_errors + first_touch.other_errors,
            ms(0.5),
            ms(0.99),
            ms(1.0)
        ),
    );
    let all_served = served_at.iter().all(Option::is_some);
    let until_all = served_at
        .iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or_default();
    report.fact(
        &format!(
            "time until every key was served on replica 2 (failed keys retried in rounds, {:?} \
             apart)",
            s.retry_pause
        ),
        if all_served {
            format!(
                "{:.2} s ({rounds} rounds of retries: {} checks, {} failed)",
                until_all.as_secs_f64(),
                retries.sent,
                retries.failed()
            )
        } else {
            format!(
                "not within {:?}: {} of {n} keys never served",
                s.max_wait,
                served_at.iter().filter(|t| t.is_none()).count()
            )
        },
    );
    report.fact(
        "argon2 runs on replica 2 (keygate_argon2_verifications_total), queue full \
         (keygate_argon2_queue_full_total)",
        format!("{argon2} runs, {queue_full} refusals"),
    );
    report.fact(
        &format!(
            "steady load on replica 1 ({} checks/s, all keys in rotation)",
            a.rate
        ),
        phases
            .iter()
            .map(|p| {
                format!(
                    "{}: {} of {} failed{}",
                    p.phase,
                    p.tally.failed(),
                    p.tally.sent,
                    reasons(&p.tally)
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
    report.sections.push(phase_table(
        &format!("Steady load on replica 1, {} checks/s", a.rate),
        &phases,
    ));
    report.phases = phases;
    report.target(
        "every key served on first touch (0 UNAVAILABLE, 0 over the deadline)",
        format!("{} of {n}", first_touch.served),
        first_touch.served == n,
    );
    if !s.unverified {
        report.target(
            "argon2 runs on the new replica for keys verified before by another: 0",
            argon2,
            argon2 == 0.0,
        );
    }
    finish(&report, a)
}

/// rolling-restart: replicas over N keys under steady load, each stopped gracefully,
/// started again and put back in rotation in turn; failed checks per phase.
pub async fn rolling_restart(r: &RollingArgs) -> anyhow::Result<()> {
    let a = &r.fleet;
    anyhow::ensure!(r.replicas >= 2, "--replicas: at least 2");
    let fleet = Fleet::start(a).await?;
    let mut report = ScenarioReport::new(&format!(
        "rolling restart: {} replicas, {} active keys, {} checks/s",
        r.replicas, a.keys, a.rate
    ));
    let salt = AtomicU64::new(0);
    let mut replicas: Vec<Option<Keygate>> = Vec::new();
    for i in 0..r.replicas {
        replicas.push(Some(
            fleet.replica(&format!("replica-{}", i + 1), None).await?,
        ));
    }
    let addrs: Vec<Addrs> = replicas.iter().flatten().map(Keygate::addrs).collect();
    let t = Instant::now();
    let tokens = replicas[0]
        .as_ref()
        .expect("started")
        .create_keys(a.keys, &["contacts:read"], 8)
        .await?;
    report.fact(
        "keys created (admin API, argon2 defaults)",
        format!("{} in {:.1} s", a.keys, t.elapsed().as_secs_f64()),
    );
    let template = fleet.template(&tokens)?;
    // Every replica warm before the load starts: the steady state a restart breaks. The
    // first replica verifies every key before the others check them.
    let t = Instant::now();
    let first = replicas[0].as_ref().expect("started");
    warm(first, &template, &tokens, &salt).await?;
    let warmed = futures::future::join_all(
        replicas[1..]
            .iter()
            .flatten()
            .map(|k| warm(k, &template, &tokens, &salt)),
    )
    .await;
    for w in warmed {
        w?;
    }
    let mut runs = Vec::new();
    for k in replicas.iter().flatten() {
        runs.push(argon2_runs(k).await?.to_string());
    }
    report.fact(
        "every key checked once on every replica before the load",
        format!(
            "in {:.1} s; argon2 runs per replica: {}",
            t.elapsed().as_secs_f64(),
            runs.join(", ")
        ),
    );

    let tokens = Arc::new(tokens);
    let balancer = Balancer::new(&addrs, a.connections, a.deadline);
    balancer.probe().await;
    for i in 0..r.replicas {
        anyhow::ensure!(balancer.in_rotation(i), "replica {} is not ready", i + 1);
    }
    let stop_probing = Arc::new(AtomicBool::new(false));
    let prober = balancer.spawn_prober(a.probe_interval, stop_probing.clone());
    let load = Steady::start(
        balancer.clone(),
        template.clone(),
        tokens.clone(),
        a.rate,
        "all replicas in rotation, before restarts",
    );
    let outcome = async {
        tokio::time::sleep(r.settle).await;
        let mut argon2_after = Vec::new();
        for i in 0..r.replicas {
            let name = format!("replica-{}", i + 1);
            load.phase(&format!("{name}: SIGTERM until it exited"));
            let mut old = replicas[i].take().expect("running");
            let status = old.proc.terminate(r.stop_timeout).await?;
            anyhow::ensure!(status.success(), "{name} exited with {status}");
            drop(old);
            load.phase(&format!("{name}: started until back in rotation"));
            let new = fleet.replica(&name, Some(addrs[i])).await?;
            balancer
                .wait_in_rotation(i, a.probe_interval * 4 + Duration::from_secs(5))
                .await?;
            load.phase(&format!("{name}: back in rotation, {:?}", r.settle));
            tokio::time::sleep(r.settle).await;
            // The counter starts with the process: every run since the restart.
            argon2_after.push(format!("{name}: {}", argon2_runs(&new).await?));
            replicas[i] = Some(new);
        }
        anyhow::Ok(argon2_after)
    }
    .await;
    stop_probing.store(true, Ordering::SeqCst);
    let phases = load.stop().await?;
    let _ = prober.await;
    let argon2_after = outcome?;

    let total = phases.iter().fold(Tally::default(), |mut t, p| {
        t.sent += p.tally.sent;
        t.served += p.tally.served;
        t.not_sent += p.tally.not_sent;
        for (k, v) in &p.tally.failures {
            *t.failures.entry(k.clone()).or_default() += v;
        }
        t
    });
    report.fact(
        "argon2 runs on each restarted replica, from its start to the end of its settle phase",
        argon2_after.join(", "),
    );
    report.fact(
        "failures over the whole run, by reason",
        if total.failures.is_empty() {
            "none".to_owned()
        } else {
            total
                .failures
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        },
    );
    report.sections.push(phase_table(
        &format!(
            "Steady load, {} checks/s over {} keys, {} connections per replica, deadline {:?}, \
             readiness probed every {:?}",
            a.rate, a.keys, a.connections, a.deadline, a.probe_interval
        ),
        &phases,
    ));
    report.phases = phases;
    report.target(
        "0 failed checks (UNAVAILABLE, over the deadline, denials of valid keys, errors)",
        format!("{} of {}", total.failed(), total.sent + total.not_sent),
        total.failed() == 0,
    );
    finish(&report, a)
}

/// reload: replicas under steady load while their configuration file changes a route
/// (not the one the load uses) again and again; failed checks and latency per phase.
pub async fn reload(r: &ReloadArgs) -> anyhow::Result<()> {
    let a = &r.fleet;
    let fleet = Fleet::start(a).await?;
    let mut report = ScenarioReport::new(&format!(
        "live reload under load: {} replicas, {} active keys, {} checks/s, {} reloads",
        r.replicas, a.keys, a.rate, r.reloads
    ));
    let salt = AtomicU64::new(0);
    let mut replicas = Vec::new();
    for i in 0..r.replicas {
        replicas.push(fleet.replica(&format!("replica-{}", i + 1), None).await?);
    }
    let tokens = replicas[0]
        .create_keys(a.keys, &["contacts:read"], 8)
        .await?;
    let template = fleet.template(&tokens)?;
    for k in &replicas {
        warm(k, &template, &tokens, &salt).await?;
    }
    let addrs: Vec<Addrs> = replicas.iter().map(Keygate::addrs).collect();
    let balancer = Balancer::new(&addrs, a.connections, a.deadline);
    balancer.probe().await;
    // Every replica reads the file Keygate::start wrote into the fleet's scratch directory.
    let file = fleet.scratch.path().join("keygate.yaml");
    let original = std::fs::read_to_string(&file)?;
    let changed = original.replace(r#"scope: "contacts:write""#, r#"scope: "contacts:admin""#);
    anyhow::ensure!(
        changed != original,
        "benches/keygate.yaml has no contacts:write route"
    );
    let load = Steady::start(
        balancer.clone(),
        template,
        Arc::new(tokens),
        a.rate,
        "before the reloads",
    );
    let outcome = async {
        tokio::time::sleep(r.settle).await;
        load.phase(&format!("{} reloads, {:?} apart", r.reloads, r.every));
        let t = Instant::now();
        for n in 0..r.reloads {
            let before = applied(&replicas).await?;
            std::fs::write(&file, if n % 2 == 0 { &changed } else { &original })?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while applied(&replicas).await? <= before + r.replicas as f64 - 1.0 {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "reload {n} was not applied everywhere within 10 s"
                );
                // Seldom: each look renders both replicas' metrics, load of its own.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(r.every).await;
        }
        let took = t.elapsed();
        load.phase("after the reloads");
        tokio::time::sleep(r.settle).await;
        anyhow::Ok(took)
    }
    .await;
    let phases = load.stop().await?;
    let took = outcome?;
    report.fact(
        "reloads applied on every replica",
        format!("{} in {:.1} s", r.reloads, took.as_secs_f64()),
    );
    report.sections.push(phase_table(
        &format!(
            "Steady load, {} checks/s over {} keys, {} connections per replica, deadline {:?}",
            a.rate, a.keys, a.connections, a.deadline
        ),
        &phases,
    ));
    let failed: u64 = phases.iter().map(|p| p.tally.failed()).sum();
    let (quiet, reloading) = ([&phases[0], &phases[2]], &phases[1]);
    let quiet_max = quiet.iter().map(|p| p.served_p99_ms).fold(0.0, f64::max);
    let spread = (quiet[0].served_p99_ms - quiet[1].served_p99_ms).abs();
    report.phases = phases.clone();
    report.target(
        "0 failed checks",
        format!(
            "{failed} of {}",
            phases
                .iter()
                .map(|p| p.tally.sent + p.tally.not_sent)
                .sum::<u64>()
        ),
        failed == 0,
    );
    report.target(
        "p99 while reloading ≤ the larger p99 before or after + their difference (the run's spread)",
        format!(
            "{:.2} ms vs {:.2} ms + {:.2} ms",
            reloading.served_p99_ms, quiet_max, spread
        ),
        reloading.served_p99_ms <= quiet_max + spread,
    );
    finish(&report, a)
}

/// Reloads applied so far, summed over `replicas`.
async fn applied(replicas: &[Keygate]) -> anyhow::Result<f64> {
    let mut n = 0.0;
    for k in replicas {
        n += k
            .metric("keygate_config_reloads_total", r#"result="applied""#)
            .await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classed_as_a_user_behind_envoy_sees_them() {
        assert_eq!(classify(Some(Outcome::Allow)), Class::Served);
        assert_eq!(classify(None), Class::OverDeadline);
        assert_eq!(
            classify(Some(Outcome::Error(
                "grpc-status 14 The service is currently unavailable: argon2 queue full".into()
            ))),
            Class::Unavailable
        );
        assert_eq!(
            classify(Some(Outcome::Error(
                "grpc-status 4 Deadline expired".into()
            ))),
            Class::OverDeadline
        );
        // grpc-status 4x is not 4.
        assert!(matches!(
            classify(Some(Outcome::Error("grpc-status 40 x".into()))),
            Class::Other(_)
        ));
        assert!(matches!(
            classify(Some(Outcome::Error("connection: broken pipe".into()))),
            Class::Connection(_)
        ));
        assert_eq!(
            classify(Some(Outcome::Deny("invalid_api_key".into()))),
            Class::Denied("invalid_api_key".into())
        );
    }

    /// The balancer sends to replicas in rotation only, in turn, and to none when none is.
    #[tokio::test]
    async fn checks_go_round_robin_to_the_replicas_in_rotation() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(crate::noop::serve_on(
            listener,
            false,
            crate::noop::ok_response(0),
            Duration::ZERO,
            crate::noop::Flavour::Generated,
        ));
        let addrs = Addrs {
            grpc: addr,
            admin: addr,
            http: addr,
        };
        let b = Balancer::new(&[addrs, addrs, addrs], 2, Duration::from_secs(5));
        assert!(b.pick().is_none(), "no replica in rotation yet");
        for i in [0, 2] {
            *b.members[i].conns.lock().unwrap() =
                Arc::new(open(addr, 2, b.deadline).await.unwrap());
            b.members[i].in_rotation.store(true, Ordering::SeqCst);
        }
        let picked: Vec<usize> = (0..6).map(|_| b.pick().unwrap().0).collect();
        assert_eq!(picked.iter().filter(|&&i| i == 0).count(), 3, "{picked:?}");
        assert_eq!(picked.iter().filter(|&&i| i == 2).count(), 3, "{picked:?}");
        // A picked connection reaches its replica.
        let template = Template::new(&Shape::new("GET", "/v1/contacts/1"), 20);
        let (_, conn) = b.pick().unwrap();
        let frame = template.frame(&[b'k'; 20], &Ids::for_sequence(0, 0));
        assert_eq!(check(&conn, frame, b.deadline).await, Class::Served);
        b.members[0].in_rotation.store(false, Ordering::SeqCst);
        assert!((0..4).all(|_| b.pick().unwrap().0 == 2));
        server.abort();
    }

    #[test]
    fn a_tally_counts_every_failure_by_reason() {
        let mut t = Tally::default();
        for c in [
            Class::Served,
            Class::Unavailable,
            Class::Unavailable,
            Class::OverDeadline,
            Class::NoReplica,
            Class::Denied("revoked_api_key".into()),
        ] {
            t.add(&c);
        }
        t.not_sent = 2;
        assert_eq!((t.sent, t.served, t.failed()), (6, 1, 7));
        assert_eq!(t.failures["UNAVAILABLE"], 2);
        assert_eq!(t.failures["denied: revoked_api_key"], 1);
        assert_eq!(t.failures["no replica in rotation"], 1);
    }
}

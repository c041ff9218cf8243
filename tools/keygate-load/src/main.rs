//! `keygate-load`: a load generator for Envoy's ext_authz `Check`, the no-op baseline
//! server it is compared with, and the benchmark scenarios of BENCHMARKS.md.
//!
//! ```text
//! keygate-load cache-hit | cache-hit-user | warm-keys | cold-keys | single-flight | memory | envoy
//! keygate-load envoy-module
//! keygate-load scale-out | rolling-restart
//! keygate-load run --target 127.0.0.1:50051 --token sk_live_… [--rate 5000] [--json]
//! keygate-load noop-server --listen 127.0.0.1:50061
//! ```
//!
//! The generator runs on one thread unless told otherwise (`--generator-threads`; a
//! current-thread runtime; in open loop a timerfd in its reactor keeps the schedule): on a
//! small machine, every core it takes is taken from the target. `cache-hit-user` runs it
//! on two, as a user's load comes from many clients.

#![forbid(unsafe_code)]

mod client;
mod envoy;
mod envoy_module;
mod fleet;
mod load;
mod noop;
mod procs;
mod report;
mod scenarios;
use keygate_load::shape;
mod timer;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use load::{Expect, Mode, Plan, Tokens};
use scenarios::Common;
use shape::{Shape, Template};

/// The allocator keygate runs on, so that the no-op baseline is measured on keygate's own
/// stack; the generator's allocations get as cheap as keygate's too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "keygate-load",
    about = "Load generator and benchmark scenarios for keygate's Envoy ext_authz Check."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// One cached API key: closed loop (max req/s), then open loop at 50% of the
    /// baseline's max (latency), keygate vs the no-op baseline.
    CacheHit(Common),
    /// The cache hit as a user's load looks: `keygate serve --dev` (config/dev.yaml as
    /// shipped), 64 connections, 256 in flight, a generator on two threads, no pinning;
    /// one credential and `--keys` in rotation, each against the no-op baselines.
    #[command(
        mut_arg("connections", |a| a.default_value("64")),
        mut_arg("concurrency", |a| a.default_value("256")),
        mut_arg("generator_threads", |a| a.default_value("2")),
    )]
    CacheHitUser(scenarios::UserShaped),
    /// N active keys verified by one replica; a second replica started under load and
    /// every key's first check on it sent at once, each with Envoy's 250 ms timeout.
    ScaleOut(fleet::ScaleOutArgs),
    /// Three replicas over N keys under steady load, restarted one by one (SIGTERM,
    /// start, ready): failed checks per phase.
    RollingRestart(fleet::RollingArgs),
    /// Replicas under steady load while their configuration file changes again and again:
    /// failed checks and latency before, during and after the reloads.
    Reload(fleet::ReloadArgs),
    /// Many distinct cached keys in rotation (closed loop), keygate vs the baseline.
    WarmKeys {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10_000)]
        keys: usize,
    },
    /// Every request a new valid key (argon2 defaults) beside warm-key traffic.
    ColdKeys {
        #[command(flatten)]
        common: Common,
        /// Cold requests in flight.
        #[arg(long, default_value_t = 8)]
        cold_concurrency: usize,
        /// Rate of the warm-key traffic (open loop), requests per second.
        #[arg(long, default_value_t = 1000.0)]
        warm_rate: f64,
    },
    /// One new key from many concurrent requests: exactly one argon2 verification.
    SingleFlight {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// Connections the burst is spread over (servers cap streams per connection).
        #[arg(long, default_value_t = 8)]
        burst_connections: usize,
    },
    /// Resident memory per cached principal (RSS of keygate before/after warming).
    Memory {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
    },
    /// wrk through real Envoy: no ext_authz vs ext_authz → no-op vs ext_authz → keygate.
    Envoy(envoy::EnvoyArgs),
    /// wrk through real Envoy with keygate's module (envoy-module/) in front of ext_authz:
    /// a learned key against Envoy alone, ext_authz → keygate and Envoy's api_key_auth;
    /// a key the module hands over against ext_authz alone.
    EnvoyModule(envoy_module::ModuleArgs),
    /// One cached RS256 JWT, closed loop and open loop, against the no-op baselines.
    Jwt(Common),
    /// A cached key under a plan it never reaches (Redis store), against the no-op
    /// baselines, and the limiter's store calls per 1,000 admissions.
    RateLimited(Common),
    /// Load any ext_authz server with Envoy-shaped Check requests.
    Run(RunArgs),
    /// The baseline: an ext_authz server that allows everything at once.
    NoopServer {
        #[arg(long, default_value = "127.0.0.1:50061")]
        listen: SocketAddr,
        /// Print the first request received.
        #[arg(long)]
        dump_first: bool,
        /// Pad the OK answer to about this many bytes (keygate's is ~400).
        #[arg(long, default_value_t = 0, conflicts_with = "answer_file")]
        response_bytes: usize,
        /// Answer with this encoded CheckResponse (e.g. one of keygate's allows).
        #[arg(long)]
        answer_file: Option<PathBuf>,
        /// Burn this much CPU per request before answering (e.g. 7us): a no-op that costs
        /// what keygate's deciding costs.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        busy: Duration,
        /// On keygate's own server code: decode only the outer CheckRequest, keeping its
        /// attributes undecoded, as keygate does before reading them.
        #[arg(long, conflicts_with_all = ["dump_first", "busy"])]
        outer_decode_only: bool,
        /// envoy-types' generated server as a user would write it: tonic's own accept
        /// loop and defaults, none of keygate's transport or builder settings.
        #[arg(long, conflicts_with = "outer_decode_only")]
        plain: bool,
    },
    /// A minimal HTTP/1.1 service answering every request `200 ok` (the upstream of
    /// `envoy --upstream`).
    UpstreamServer {
        #[arg(long, default_value = "127.0.0.1:50071")]
        listen: SocketAddr,
    },
    /// The HTTP authorization baseline on keygate's own HTTP stack (axum on hyper, served
    /// as keygate serves `listen.http_authz`): every request allowed, 200, no headers.
    NoopHttpServer {
        #[arg(long, default_value = "127.0.0.1:50072")]
        listen: SocketAddr,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The ext_authz server (host:port).
    #[arg(long)]
    target: SocketAddr,
    /// A token to send (repeat for several, used in rotation).
    #[arg(long = "token", env = "KEYGATE_LOAD_TOKEN", hide_env_values = true)]
    tokens: Vec<String>,
    /// A file with one token per line.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Requests in flight (closed loop).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop at this many requests per second (closed loop when absent).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many measured requests.
    #[arg(long)]
    requests: Option<u64>,
    #[arg(long, value_enum, default_value = "allow")]
    expect: Expect,
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    grpc_timeout: Duration,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/v1/contacts/42?include=notes")]
    path: String,
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::NoopServer {
            listen,
            dump_first,
            response_bytes,
            answer_file,
            busy,
            outer_decode_only,
            plain,
        } => answer_file
            .map_or_else(
                || Ok(noop::ok_response(response_bytes)),
                |path| noop::answer_from_file(&path),
            )
            .and_then(|response| {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?;
                let flavour = if plain {
                    noop::Flavour::Plain
                } else if outer_decode_only {
                    noop::Flavour::OuterDecodeOnly
                } else {
                    noop::Flavour::Generated
                };
                rt.block_on(noop::serve(listen, dump_first, response, busy, flavour))
            }),
        Cmd::UpstreamServer { listen } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(upstream::serve(listen))),
        Cmd::NoopHttpServer { listen } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(upstream::serve_noop_authz(listen))),
        other => match generator_threads(&other) {
            1 => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            n => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .enable_all()
                .build(),
        }
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(dispatch(other))),
    };
    if let Err(e) = result {
        eprintln!("keygate-load: {e:#}");
        std::process::exit(1);
    }
}

/// The generator's threads (`--generator-threads`; 1 where the command has no such option).
fn generator_threads(cmd: &Cmd) -> usize {
    let common = match cmd {
        Cmd::CacheHit(c) | Cmd::Jwt(c) | Cmd::RateLimited(c) => c,
        Cmd::CacheHitUser(u) => &u.common,
        Cmd::WarmKeys { common, .. }
        | Cmd::ColdKeys { common, .. }
        | Cmd::SingleFlight { common, .. }
        | Cmd::Memory { common, .. } => common,
        _ => return 1,
    };
    common.generator_threads.max(1)
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::CacheHit(c) => scenarios::cache_hit(&c).await,
        Cmd::CacheHitUser(u) => scenarios::cache_hit_user(&u).await,
        Cmd::ScaleOut(a) => fleet::scale_out(&a).await,
        Cmd::RollingRestart(a) => fleet::rolling_restart(&a).await,
        Cmd::Reload(a) => fleet::reload(&a).await,
        Cmd::WarmKeys { common, keys } => scenarios::warm_keys(&common, keys).await,
        Cmd::ColdKeys {
            common,
            cold_concurrency,
            warm_rate,
        } => scenarios::cold_keys(&common, cold_concurrency, warm_rate).await,
        Cmd::SingleFlight {
            common,
            requests,
            burst_connections,
        } => scenarios::single_flight(&common, requests, burst_connections).await,
        Cmd::Memory { common, keys } => scenarios::memory(&common, keys).await,
        Cmd::Envoy(args) => envoy::through_envoy(&args).await,
        Cmd::EnvoyModule(args) => envoy_module::envoy_module(&args).await,
        Cmd::Jwt(c) => scenarios::jwt(&c).await,
        Cmd::RateLimited(c) => scenarios::rate_limited(&c).await,
        Cmd::Run(args) => run(args).await,
        Cmd::NoopServer { .. } | Cmd::UpstreamServer { .. } | Cmd::NoopHttpServer { .. } => {
            unreachable!("served on its own runtime")
        }
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let mut tokens = a.tokens;
    if let Some(path) = &a.tokens_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    anyhow::ensure!(!tokens.is_empty(), "give --token or --tokens-file");
    let tokens = Tokens::rotate(tokens);
    let template = Arc::new(Template::new(
        &Shape::new(&a.method, &a.path),
        tokens.uniform_len()?,
    ));
    let plan = Plan {
        label: a.target.to_string(),
        target: a.target,
        connections: a.connections,
        mode: match a.rate {
            Some(rate) => Mode::Open { rate },
            None => Mode::Closed {
                concurrency: a.concurrency,
            },
        },
        warmup: a.warmup,
        duration: a.duration,
        max_requests: a.requests,
        grpc_timeout: Some(a.grpc_timeout),
        expect: a.expect,
        max_in_flight: 20_000,
        repeatable: false,
    };
    let r = load::run(&plan, template, tokens).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let l = r.latency_us;
        println!(
            "{} {} loop: {} requests in {:.2} s = {:.0} req/s; latency µs p50 {:.0} p90 {:.0} \
             p99 {:.0} p99.9 {:.0} max {:.0}; allow {} deny {} errors {}",
            r.target,
            r.mode,
            r.requests,
            r.seconds,
            r.rps,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            r.allow,
            r.deny,
            r.errors
        );
        if let Some(lag) = r.send_lag_us {
            println!("send lag µs p50 {:.0} p99 {:.0}", lag.p50, lag.p99);
        }
        for (k, v) in r.deny_reasons.iter().chain(r.error_kinds.iter()) {
            println!("  {k}: {v}");
        }
    }
    anyhow::ensure!(r.valid, "the run is invalid: {}", r.problems.join("; "));
    Ok(())
}

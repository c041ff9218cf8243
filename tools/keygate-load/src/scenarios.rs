//! The scenarios of issue 3, one function each. Every scenario starts what it needs
//! (keygate from the release build, the no-op baseline, redis-server when asked), creates
//! its keys through the admin API, measures keygate and the baseline alternately in the
//! same run, and checks its outcome: a run that was not what the scenario meant (denies in
//! a cache-hit run, cache misses in a warm run, more than one argon2 verification in the
//! single-flight run) is reported as invalid and fails the command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::load::{self, Expect, Mode, Plan, RunReport, Tokens};
use crate::procs::{self, Keygate, KeygateOptions, Proc, Scratch, StoreKind};
use crate::report::{median, ScenarioReport, Summary, Table};
use crate::shape::{Shape, Template};

const SIZED_LABEL: &str = "no-op, keygate-sized answer";
const OUTER_LABEL: &str = "no-op, keygate-sized, outer decode only";
const PLAIN_LABEL: &str = "no-op, plain tonic (tonic's accept loop and defaults)";

#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// The keygate binary (default: `keygate` next to this binary, the release build).
    #[arg(long)]
    pub keygate_bin: Option<PathBuf>,
    /// Extra configuration for keygate, as `KEYGATE_…` variables (repeatable), e.g.
    /// `--keygate-env KEYGATE_API_KEYS__ARGON2__VERIFY_CONCURRENCY=1`.
    #[arg(long, value_parser = parse_env)]
    pub keygate_env: Vec<(String, String)>,
    /// keygate's store: memory, or a private redis-server started for the run.
    #[arg(long, value_enum, default_value = "memory")]
    pub store: StoreKind,
    /// Repetitions of each measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Warm-up before each measurement (not recorded).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Length of each measurement.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// HTTP/2 connections to the target (Envoy opens one per worker thread).
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Requests in flight in closed-loop runs.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Sent as `grpc-timeout`, as Envoy sends its ext_authz timeout.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub grpc_timeout: Duration,
    /// The request's method and path (with query, as Envoy sends it).
    #[arg(long, default_value = "GET")]
    pub method: String,
    #[arg(long, default_value = "/v1/contacts/42?include=notes")]
    pub path: String,
    /// On a shared machine: a run during which other processes used more than this many
    /// cores is repeated (up to twice), and each run first waits (up to 60 s) for the
    /// machine to be this quiet. 0 turns both off.
    #[arg(long, default_value_t = 0.25)]
    pub max_other_load: f64,
    /// Give the servers (keygate, the baselines, Envoy) CPU 0 and the generator (and
    /// wrk) CPU 1, so that each side has a core of its own. keygate then runs one worker.
    #[arg(long)]
    pub pin: bool,
    /// Run keygate as `keygate serve --dev`: the policy built into keygate
    /// (config/dev.yaml as shipped: argon2 defaults, `cache.ttl` 30 s) instead of
    /// benches/keygate.yaml.
    #[arg(long)]
    pub dev: bool,
    /// Threads of the generator. With one, the generator can use at most one core: on 2
    /// cores it then sets the pace of a target cheaper than itself (BENCHMARKS.md).
    #[arg(long, default_value_t = 1)]
    pub generator_threads: usize,
    /// Print one JSON object instead of Markdown.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The keygate binary: `given`, or `keygate` next to this binary (the release build).
pub fn keygate_bin(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .join("keygate"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build it (cargo build --release) or pass --keygate-bin",
        bin.display()
    );
    Ok(bin)
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if k.starts_with("KEYGATE_") && k.contains("__") => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err("expected KEYGATE_SECTION__FIELD=value".into()),
    }
}

/// What a scenario has started: the baseline, keygate, maybe redis.
pub struct Bench {
    pub common: Common,
    pub noop: Option<(Proc, SocketAddr)>,
    /// The no-op server padded to keygate's answer size (see `start_sized_baseline`).
    pub sized: Option<(Proc, SocketAddr)>,
    /// The same, on keygate's server code, decoding only the outer request (see
    /// `start_sized_baseline`).
    pub outer: Option<(Proc, SocketAddr)>,
    /// envoy-types' generated server on tonic's own transport and defaults (as an
    /// independent harness would write its no-op), when a scenario starts it.
    pub plain: Option<(Proc, SocketAddr)>,
    pub keygate: Keygate,
    _redis: Option<Proc>,
    /// Dropped last: the processes above write their logs into it.
    pub scratch: Scratch,
}

impl Bench {
    pub async fn start(common: &Common, default_argon2: bool, noop: bool) -> anyhow::Result<Bench> {
        if common.pin {
            procs::pin(0, 1)?;
        }
        let scratch = Scratch::new("scenario")?;
        let bin = keygate_bin(common.keygate_bin.as_ref())?;
        let (redis_proc, redis) = match common.store {
            StoreKind::Memory => (None, None),
            StoreKind::Redis => {
                let (p, a) = procs::redis_server(&scratch).await?;
                (Some(p), Some(a))
            }
        };
        let keygate = Keygate::start(
            &KeygateOptions {
                bin,
                redis,
                default_argon2,
                env: common.keygate_env.clone(),
                dev: common.dev,
                ..Default::default()
            },
            &scratch,
        )
        .await?;
        let noop = if noop {
            Some(procs::noop_server(&scratch, 0).await?)
        } else {
            None
        };
        Ok(Bench {
            common: common.clone(),
            scratch,
            noop,
            sized: None,
            outer: None,
            plain: None,
            keygate,
            _redis: redis_proc,
        })
    }

    pub fn template(&self, token_len: usize) -> Arc<Template> {
        Arc::new(Template::new(
            &Shape::new(&self.common.method, &self.common.path),
            token_len,
        ))
    }

    pub fn plan(&self, label: &str, target: SocketAddr, mode: Mode) -> Plan {
        Plan {
            label: label.into(),
            target,
            connections: self.common.connections,
            mode,
            warmup: self.common.warmup,
            duration: self.common.duration,
            max_requests: None,
            grpc_timeout: Some(self.common.grpc_timeout),
            expect: Expect::Allow,
            max_in_flight: 20_000,
            repeatable: true,
        }
    }

    /// Waits (up to 60 s) until other processes use at most `max_other_load` cores.
    pub async fn wait_quiet(&self) -> anyhow::Result<()> {
        wait_quiet(self.common.max_other_load, &self.pids()).await
    }

    /// The benchmark's own processes (besides this one).
    pub fn pids(&self) -> Vec<u32> {
        let mut p = vec![self.keygate.proc.pid()];
        p.extend(self.noop.as_ref().map(|n| n.0.pid()));
        p.extend(self.sized.as_ref().map(|n| n.0.pid()));
        p.extend(self.outer.as_ref().map(|n| n.0.pid()));
        p.extend(self.plain.as_ref().map(|n| n.0.pid()));
        p.extend(self._redis.as_ref().map(Proc::pid));
        p
    }

    fn noop_addr(&self) -> SocketAddr {
        self.noop.as_ref().expect("scenario started the baseline").1
    }

    fn noop_pid(&self) -> u32 {
        self.noop
            .as_ref()
            .expect("scenario started the baseline")
            .0
            .pid()
    }

    /// Runs `plan` on a quiet machine and notes the target's CPU per request and the CPU
    /// other processes took meanwhile; repeats a run the machine disturbed.
    pub async fn measure(
        &self,
        plan: &Plan,
        pid: u32,
        template: &Arc<Template>,
        tokens: &Tokens,
    ) -> anyhow::Result<RunReport> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.wait_quiet().await?;
            let mut r = self.measure_once(plan, pid, template, tokens).await?;
            r.attempts = attempt;
            let noisy = self.common.max_other_load > 0.0
                && r.foreign_cpu_cores.unwrap_or(0.0) > self.common.max_other_load;
            // A run that consumes single-use keys cannot be repeated.
            if noisy && attempt < 3 && plan.repeatable {
                eprintln!(
                    "  {:<28} repeated: other processes used {:.2} cores during the run",
                    r.label,
                    r.foreign_cpu_cores.unwrap_or(0.0)
                );
                continue;
            }
            return Ok(r);
        }
    }

    /// One run, as it comes.
    pub async fn measure_once(
        &self,
        plan: &Plan,
        pid: u32,
        template: &Arc<Template>,
        tokens: &Tokens,
    ) -> anyhow::Result<RunReport> {
        let foreign = procs::ForeignCpu::start(&self.pids())?;
        let tcp0 = procs::TcpTrouble::read().ok();
        let cpu0 = procs::cpu_seconds(pid)?;
        let (own0, at0) = (procs::cpu_seconds(std::process::id())?, Instant::now());
        let mut r = load::run(plan, template.clone(), tokens.clone()).await?;
        let own = procs::cpu_seconds(std::process::id())? - own0;
        r.generator_cpu_cores = Some(own / at0.elapsed().as_secs_f64());
        let cpu1 = procs::cpu_seconds(pid)?;
        r.foreign_cpu_cores = foreign.cores().ok();
        r.tcp_trouble = tcp0.and_then(|t0| Some(procs::TcpTrouble::read().ok()?.since(&t0)));
        if r.completed_all > 0 {
            r.target_cpu_us_per_request = Some((cpu1 - cpu0) * 1e6 / r.completed_all as f64);
        }
        eprintln!(
            "  {:<28} {:>6} {:>9.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  generator {:.2} cores  other load {:.2} cores  {}{}",
            r.label,
            r.mode,
            r.rps,
            r.latency_us.p50,
            r.latency_us.p99,
            r.generator_cpu_cores.unwrap_or(f64::NAN),
            r.foreign_cpu_cores.unwrap_or(f64::NAN),
            match r.tcp_trouble {
                Some(t) if t.any() => format!(
                    "tcp: {} retransmitted, {} out of order, {} loss probes  ",
                    t.retransmitted, t.out_of_order, t.loss_probes
                ),
                _ => String::new(),
            },
            if r.valid {
                "ok".to_owned()
            } else {
                format!("INVALID: {}", r.problems.join("; "))
            }
        );
        Ok(r)
    }

    /// Baseline and keygate alternately, `reps` times each: drift on the machine
    /// (thermal, neighbours) then hits both alike.
    pub async fn compare(
        &self,
        report: &mut ScenarioReport,
        title: &str,
        mode: Mode,
        template: &Arc<Template>,
        tokens: &Tokens,
    ) -> anyhow::Result<(Summary, Summary)> {
        let mut targets = vec![("no-op baseline", self.noop_addr(), self.noop_pid())];
        if let Some((p, addr)) = &self.sized {
            targets.push((SIZED_LABEL, *addr, p.pid()));
        }
        if let Some((p, addr)) = &self.outer {
            targets.push((OUTER_LABEL, *addr, p.pid()));
        }
        if let Some((p, addr)) = &self.plain {
            targets.push((PLAIN_LABEL, *addr, p.pid()));
        }
        targets.push(("keygate", self.keygate.grpc, self.keygate.proc.pid()));
        let mut runs: Vec<Vec<RunReport>> = vec![Vec::new(); targets.len()];
        for _ in 0..self.common.reps.max(1) {
            for (i, (label, addr, pid)) in targets.iter().enumerate() {
                let p = self.plan(label, *addr, mode);
                runs[i].push(self.measure(&p, *pid, template, tokens).await?);
            }
        }
        let rows: Vec<Summary> = targets
            .iter()
            .zip(&runs)
            .map(|((label, _, _), r)| Summary::of(label, &r.iter().collect::<Vec<_>>()))
            .collect();
        let (b, k) = (rows[0].clone(), rows[rows.len() - 1].clone());
        report.tables.push(Table::new(title, rows));
        report.runs.extend(runs.into_iter().flatten());
        Ok((b, k))
    }

    /// Adds two baselines: the no-op server answering with as many bytes as keygate
    /// does, which tells the transport cost of keygate's bigger answer apart from the
    /// cost of deciding; and the same answer from keygate's own server code decoding only
    /// the outer request, which leaves exactly keygate's own work (reading what it uses,
    /// deciding, writing its answer) as the difference.
    pub async fn start_sized_baseline(&mut self, response_bytes: u64) -> anyhow::Result<()> {
        self.sized = Some(procs::noop_server(&self.scratch, response_bytes).await?);
        self.outer =
            Some(procs::noop_server_outer_decode_only(&self.scratch, response_bytes).await?);
        Ok(())
    }

    /// Sends one request per token (each key verified once, so it is cached), checking
    /// that every one is allowed.
    /// Returns how long it took and the size of keygate's (allow) answer.
    pub async fn warm(
        &self,
        tokens: &[String],
        template: &Arc<Template>,
    ) -> anyhow::Result<(f64, u64)> {
        self.warm_with(tokens, template, self.common.concurrency)
            .await
    }

    /// `warm` with `concurrency` checks in flight.
    pub async fn warm_with(
        &self,
        tokens: &[String],
        template: &Arc<Template>,
        concurrency: usize,
    ) -> anyhow::Result<(f64, u64)> {
        let started = Instant::now();
        let mut plan = self.plan("warm-up", self.keygate.grpc, Mode::Closed { concurrency });
        plan.warmup = Duration::ZERO;
        plan.duration = Duration::from_secs(3600);
        plan.max_requests = Some(tokens.len() as u64);
        // A first sight of a key runs argon2; do not let Envoy's timeout fail it.
        plan.grpc_timeout = Some(Duration::from_secs(30));
        let r = load::run(&plan, template.clone(), Tokens::once(tokens.to_vec())).await?;
        if !r.valid || r.requests != tokens.len() as u64 {
            bail!(
                "warming {} keys failed: {} allowed, {:?} denied, {:?} errors",
                tokens.len(),
                r.allow,
                r.deny_reasons,
                r.error_kinds
            );
        }
        Ok((started.elapsed().as_secs_f64(), r.response_bytes))
    }

    /// Creates `n` keys for the scenarios' route, `parallel` at a time, and notes under
    /// `fact` how long that took.
    pub async fn create_keys_timed(
        &self,
        report: &mut ScenarioReport,
        fact: &str,
        n: usize,
        parallel: usize,
    ) -> anyhow::Result<Vec<String>> {
        let t = Instant::now();
        let tokens = self
            .keygate
            .create_keys(n, &["contacts:read"], parallel)
            .await?;
        report.fact(fact, format!("{n} in {:.1} s", t.elapsed().as_secs_f64()));
        Ok(tokens)
    }

    pub async fn cache_misses(&self) -> anyhow::Result<f64> {
        self.keygate
            .metric("keygate_credential_cache_requests_total", "result=\"miss\"")
            .await
    }

    /// Notes the cache misses since `misses0`; any at all make keygate's runs invalid, as
    /// the scenario (`kind`, e.g. "warm-key") measures cached keys only.
    pub async fn expect_no_cache_misses(
        &self,
        report: &mut ScenarioReport,
        misses0: f64,
        kind: &str,
    ) -> anyhow::Result<()> {
        let misses = self.cache_misses().await? - misses0;
        report.fact("cache misses during the measurements", misses);
        if misses > 0.0 {
            for r in report.runs.iter_mut().filter(|r| r.label == "keygate") {
                r.valid = false;
                r.problems
                    .push(format!("{misses} cache misses in a {kind} run"));
            }
        }
        Ok(())
    }

    pub async fn argon2_verifications(&self) -> anyhow::Result<f64> {
        self.keygate
            .metric("keygate_argon2_verifications_total", "")
            .await
    }
}

/// Prints the report (Markdown or JSON) and writes the JSON to `--out` if given.
pub fn print_report(report: &ScenarioReport, c: &Common) -> anyhow::Result<()> {
    emit(report, c.json, c.out.as_deref())
}

/// Prints the report (Markdown, or JSON with `json`) and writes the JSON to `out`.
pub fn emit(
    report: &ScenarioReport,
    json_out: bool,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    if let Some(path) = out {
        std::fs::write(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if json_out {
        println!("{json}");
    } else {
        println!("{}", report.markdown());
    }
    Ok(())
}

/// Waits (up to 60 s, in half-second looks) for a quiet machine; goes on regardless.
pub async fn wait_quiet(max_other_load: f64, pids: &[u32]) -> anyhow::Result<()> {
    if max_other_load <= 0.0 {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut said = false;
    loop {
        let f = procs::ForeignCpu::start(pids)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let load = f.cores()?;
        if load <= max_other_load || Instant::now() > deadline {
            return Ok(());
        }
        if !said {
            eprintln!("  waiting for other processes to quiet down ({load:.2} cores busy)…");
            said = true;
        }
    }
}

fn finish(report: &mut ScenarioReport, c: &Common) -> anyhow::Result<()> {
    let foreign: Vec<f64> = report
        .runs
        .iter()
        .filter_map(|r| r.foreign_cpu_cores)
        .collect();
    if !foreign.is_empty() {
        let max = foreign.iter().cloned().fold(0.0, f64::max);
        report.fact(
            "CPU taken by other processes during the runs (median / max)",
            format!("{:.2} / {max:.2} cores", median(foreign)),
        );
    }
    for mode in ["closed", "open"] {
        let generator: Vec<f64> = report
            .runs
            .iter()
            .filter(|r| r.mode == mode)
            .filter_map(|r| r.generator_cpu_cores)
            .collect();
        if !generator.is_empty() {
            let max = generator.iter().cloned().fold(0.0, f64::max);
            report.fact(
                &format!("generator's own CPU in {mode}-loop runs (median / max)"),
                format!("{:.2} / {max:.2} cores", median(generator)),
            );
        }
    }
    print_report(report, c)?;
    let invalid = report.invalid_runs();
    if !invalid.is_empty() {
        bail!(
            "{} run(s) of scenario {} were invalid — their outcomes were not what the \
             scenario expects, so their figures mean nothing: {}",
            invalid.len(),
            report.scenario,
            invalid
                .iter()
                .map(|r| format!("{}: {}", r.label, r.problems.join("; ")))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(())
}

fn ratio_text(a: f64, b: f64) -> String {
    format!("{:.2}× ({a:.0} vs {b:.0})", a / b)
}

/// The median p99 send lag of the open-loop runs among `runs`: the generator's own delay.
fn send_lag_p99(runs: &[RunReport]) -> f64 {
    median(
        runs.iter()
            .filter_map(|r| r.send_lag_us.map(|l| l.p99))
            .collect(),
    )
}

/// cache-hit: one key, cached; closed loop for throughput, then open loop at half the
/// baseline's maximum for latency.
pub async fn cache_hit(c: &Common) -> anyhow::Result<()> {
    let bench = Bench::start(c, false, true).await?;
    let tokens = bench.keygate.create_keys(1, &["contacts:read"], 1).await?;
    cached(c, bench, "cache-hit API key", tokens, false).await
}

/// rate-limited: a cached key under a plan it never reaches, on the Redis store (the
/// limit's state lives there), against the same baselines as cache-hit; and how many
/// store calls the limiter made per 1,000 admissions.
pub async fn rate_limited(c: &Common) -> anyhow::Result<()> {
    let mut c = c.clone();
    c.store = StoreKind::Redis;
    push_unreached_plan(&mut c);
    let bench = Bench::start(&c, false, true).await?;
    let tokens = bench.keygate.create_keys(1, &["contacts:read"], 1).await?;
    cached(
        &c,
        bench,
        "rate-limited API key (a plan it never reaches, Redis store)",
        tokens,
        true,
    )
    .await
}

/// An RS256 issuer made for the run: its JWKS in a scratch directory (removed on drop),
/// the `KEYGATE_JWT__ISSUERS` entry that configures it, and its signing key.
struct JwtIssuer {
    dir: PathBuf,
    env: (String, String),
    key: jsonwebtoken::EncodingKey,
}

impl JwtIssuer {
    fn new() -> anyhow::Result<JwtIssuer> {
        use jsonwebtoken::jwk::{Jwk, JwkSet};
        use jsonwebtoken::{Algorithm, EncodingKey};
        let pem = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/jwt/rsa.pem"
        ))
        .context("the RS256 test key (tests/fixtures/jwt/rsa.pem)")?;
        let key = EncodingKey::from_rsa_pem(&pem)?;
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256)?;
        jwk.common.key_id = Some("load".into());
        let dir = std::env::temp_dir().join(format!(
            "keygate-load-jwt-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, serde_json::to_string(&JwkSet { keys: vec![jwk] })?)?;
        let env = (
            "KEYGATE_JWT__ISSUERS".into(),
            format!(
                "[{{name: load, issuer: 'https://load.keygate.test/', audiences: [load], \
                 algorithms: [RS256], jwks_file: '{}'}}]",
                jwks.display()
            ),
        );
        Ok(JwtIssuer { dir, env, key })
    }

    /// A JWT for `sub` of the benchmark tenant with scope `contacts:read`, valid a day.
    fn mint(&self, sub: &str) -> anyhow::Result<String> {
        use jsonwebtoken::{Algorithm, Header};
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 86_400;
        let claims = serde_json::json!({
            "iss": "https://load.keygate.test/", "aud": "load", "sub": sub,
            "tenant_id": procs::TENANT, "scope": "contacts:read", "exp": exp,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("load".into());
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}

impl Drop for JwtIssuer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// jwt: one RS256 JWT of an issuer configured for the run (its JWKS written to a scratch
/// file), cached after its first validation, against the same baselines as cache-hit.
pub async fn jwt(c: &Common) -> anyhow::Result<()> {
    let issuer = JwtIssuer::new()?;
    let mut c = c.clone();
    c.keygate_env.push(issuer.env.clone());
    let bench = Bench::start(&c, false, true).await?;
    let token = issuer.mint("load-user")?;
    cached(&c, bench, "cache-hit JWT (RS256)", vec![token], false).await
}

/// The plan `rate-limited` and `cache-hit-user --credential plan` put every live key on:
/// 10,000,000 requests a minute, never reached.
fn push_unreached_plan(c: &mut Common) {
    c.keygate_env.push((
        "KEYGATE_POLICY__PLANS".into(),
        "{unreached: {requests_per_minute: 10000000}}".into(),
    ));
    c.keygate_env.push((
        "KEYGATE_POLICY__DEFAULT_PLANS".into(),
        "{live: unreached}".into(),
    ));
}

/// The credential of `cache-hit-user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Credential {
    /// API keys.
    ApiKey,
    /// API keys on a plan they never reach (Redis store).
    Plan,
    /// RS256 JWTs.
    Jwt,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UserShaped {
    #[command(flatten)]
    pub common: Common,
    /// Credentials in rotation in the many-keys measurement.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    #[arg(long, value_enum, default_value = "api-key")]
    pub credential: Credential,
}

/// Warming in `--dev`: below the argon2 queue's default depth (64), so that no first
/// verification is refused.
const DEV_WARM_CONCURRENCY: usize = 32;

/// cache-hit-user: the cache hit as a user's load looks — keygate as `keygate serve
/// --dev` runs it (config/dev.yaml as shipped), many connections, a multi-threaded
/// generator, no pinning — one credential and many in rotation, each against the no-op
/// baselines in the same run, alternating.
pub async fn cache_hit_user(u: &UserShaped) -> anyhow::Result<()> {
    let mut c = u.common.clone();
    c.dev = true;
    let mut issuer = None;
    let (what, floor) = match u.credential {
        Credential::ApiKey => ("API key", 0.9),
        Credential::Plan => {
            c.store = StoreKind::Redis;
            push_unreached_plan(&mut c);
            ("API key on a plan it never reaches (Redis store)", 0.85)
        }
        Credential::Jwt => {
            let i = JwtIssuer::new()?;
            c.keygate_env.push(i.env.clone());
            issuer = Some(i);
            ("RS256 JWT", 0.9)
        }
    };
    let mut bench = Bench::start(&c, false, true).await?;
    let mut report = ScenarioReport::new(&format!(
        "cache hit, user-shaped: {what}, `keygate serve --dev`"
    ));
    let t = Instant::now();
    let (one, many) = match &issuer {
        Some(i) => (
            vec![i.mint("load-user")?],
            (0..u.keys)
                .map(|k| i.mint(&format!("load-user-{k:07}")))
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
        None => {
            let mut all = bench
                .keygate
                .create_keys(u.keys + 1, &["contacts:read"], 8)
                .await?;
            let one = all.split_off(u.keys);
            (one, all)
        }
    };
    report.fact(
        "credentials made (keys through the admin API, argon2 defaults as `--dev` has them)",
        format!("{} in {:.1} s", u.keys + 1, t.elapsed().as_secs_f64()),
    );
    let (t_one, t_many) = (bench.template(one[0].len()), bench.template(many[0].len()));
    let (_, answer) = bench.warm_with(&one, &t_one, DEV_WARM_CONCURRENCY).await?;
    let (warm_s, _) = bench
        .warm_with(&many, &t_many, DEV_WARM_CONCURRENCY)
        .await?;
    report.fact(
        "warmed (one check each)",
        format!("{} in {warm_s:.1} s", u.keys),
    );
    report.fact(
        "keygate's allow answer (CheckResponse)",
        format!("{answer} bytes"),
    );
    bench.start_sized_baseline(answer).await?;
    bench.plain = Some(procs::noop_server_plain(&bench.scratch).await?);
    let misses0 = bench.cache_misses().await?;
    let argon2_0 = bench.argon2_verifications().await?;
    let limiter0 = limiter_counts(&bench).await?;
    let closed = Mode::Closed {
        concurrency: c.concurrency,
    };
    let shape = format!(
        "closed loop, {} connections, {} in flight, generator on {} thread(s), {:?} per run",
        c.connections, c.concurrency, c.generator_threads, c.duration
    );
    let (b1, k1) = bench
        .compare(
            &mut report,
            &format!("One {what}, {shape}"),
            closed,
            &t_one,
            &Tokens::rotate(one),
        )
        .await?;
    let (b2, k2) = bench
        .compare(
            &mut report,
            &format!("{} of them in rotation, {shape}", u.keys),
            closed,
            &t_many,
            &Tokens::rotate(many),
        )
        .await?;
    // `--dev` caches for 30 s: an entry that expires is read again from the store (no
    // argon2 while its hash is unchanged). That is part of a user's load, so it is
    // reported, not refused.
    report.fact(
        "cache misses / argon2 runs during the measurements (`cache.ttl` 30 s in --dev)",
        format!(
            "{} / {}",
            bench.cache_misses().await? - misses0,
            bench.argon2_verifications().await? - argon2_0
        ),
    );
    if u.credential == Credential::Plan {
        report_limiter(&bench, &mut report, limiter0).await?;
    }
    for (label, b, k) in [("one", &b1, &k1), ("many", &b2, &k2)] {
        report.target(
            &format!("{label}: closed loop ≥ {floor} × the no-op's req/s"),
            ratio_text(k.rps, b.rps),
            k.rps / b.rps >= floor,
        );
    }
    let result = finish(&mut report, &c);
    drop(issuer);
    result
}

/// The cache-hit measurement for `tokens` (one credential, cached after its first use);
/// with `limited`, also the limiter's store calls per 1,000 admissions.
async fn cached(
    c: &Common,
    mut bench: Bench,
    name: &str,
    tokens: Vec<String>,
    limited: bool,
) -> anyhow::Result<()> {
    let mut report = ScenarioReport::new(name);
    let template = bench.template(tokens[0].len());
    report.fact(
        "Check request size (protobuf, as Envoy would send it)",
        format!("{} bytes", template.encoded_len()),
    );
    let (_, answer) = bench.warm(&tokens, &template).await?;
    report.fact(
        "keygate's allow answer (CheckResponse)",
        format!("{answer} bytes"),
    );
    bench.start_sized_baseline(answer).await?;
    let tokens = Tokens::rotate(tokens);
    let misses0 = bench.cache_misses().await?;
    let limiter0 = limiter_counts(&bench).await?;
    let closed = Mode::Closed {
        concurrency: c.concurrency,
    };
    let (b, k) = bench
        .compare(
            &mut report,
            &format!(
                "Closed loop, {} connections, {} in flight, {:?} per run",
                c.connections, c.concurrency, c.duration
            ),
            closed,
            &template,
            &tokens,
        )
        .await?;
    let rate = (b.rps * 0.5).round();
    let (ob, ok) = bench
        .compare(
            &mut report,
            &format!(
                "Open loop at {rate:.0} req/s (50% of the baseline's closed-loop maximum), \
                 {} connections, latency from the intended send time",
                c.connections
            ),
            Mode::Open { rate },
            &template,
            &tokens,
        )
        .await?;
    bench
        .expect_no_cache_misses(&mut report, misses0, "cache-hit")
        .await?;
    if limited {
        report_limiter(&bench, &mut report, limiter0).await?;
    }
    report.fact(
        "generator send lag p99 in open loop (instrument floor)",
        format!("{:.0} µs", send_lag_p99(&report.runs)),
    );
    // A limited key pays for its plan (issue 16's target: 0.8×), a plain one does not.
    let (floor, floor_text) = if limited {
        (0.8, "closed loop ≥ 0.8 × baseline req/s")
    } else {
        (0.85, "closed loop ≥ 0.85 × baseline req/s")
    };
    let r = k.rps / b.rps;
    report.target(floor_text, ratio_text(k.rps, b.rps), r >= floor);
    let r = ok.p99_us / ob.p99_us;
    report.target(
        "open loop at 50%: p99 ≤ 1.5 × baseline p99",
        format!("{r:.2}× ({:.0} µs vs {:.0} µs)", ok.p99_us, ob.p99_us),
        r <= 1.5,
    );
    finish(&mut report, c)
}

/// The limiter's counters: reservations, admissions, rate-limited requests.
/// Checks that a plan applied and was never reached since `before` (the limiter's counts
/// then), and reports the limiter's store calls per 1,000 admissions.
async fn report_limiter(
    bench: &Bench,
    report: &mut ScenarioReport,
    before: (f64, f64, f64),
) -> anyhow::Result<()> {
    let (r, a, l) = limiter_counts(bench).await?;
    let (r, a, l) = (r - before.0, a - before.1, l - before.2);
    anyhow::ensure!(
        a > 0.0,
        "the limiter admitted nothing: the plan did not apply"
    );
    anyhow::ensure!(
        l == 0.0,
        "{l} requests were rate-limited: the plan was reached"
    );
    report.fact(
        "store calls by the limiter per 1,000 admissions",
        format!(
            "{:.1} ({r:.0} reservations for {a:.0} admissions)",
            r / a * 1000.0
        ),
    );
    Ok(())
}

async fn limiter_counts(bench: &Bench) -> anyhow::Result<(f64, f64, f64)> {
    let k = &bench.keygate;
    Ok((
        k.metric("keygate_rate_limit_reservations_total", "")
            .await?,
        k.metric("keygate_rate_limit_decisions_total", "result=\"admitted\"")
            .await?,
        k.metric("keygate_rate_limit_decisions_total", "result=\"limited\"")
            .await?,
    ))
}

/// warm-keys: 10,000 distinct keys, all cached, in rotation.
pub async fn warm_keys(c: &Common, keys: usize) -> anyhow::Result<()> {
    let mut bench = Bench::start(c, false, true).await?;
    let mut report = ScenarioReport::new(&format!("{keys} warm keys in rotation"));
    let tokens = bench
        .create_keys_timed(
            &mut report,
            "keys created (admin API, cheap argon2)",
            keys,
            16,
        )
        .await?;
    let template = bench.template(tokens[0].len());
    let (warm_s, answer) = bench.warm(&tokens, &template).await?;
    report.fact(
        "keys warmed (one request each)",
        format!("{keys} in {warm_s:.1} s"),
    );
    bench.start_sized_baseline(answer).await?;
    let tokens = Tokens::rotate(tokens);
    let misses0 = bench.cache_misses().await?;
    let (b, k) = bench
        .compare(
            &mut report,
            &format!(
                "Closed loop over {keys} keys in rotation, {} connections, {} in flight, {:?} per run",
                c.connections, c.concurrency, c.duration
            ),
            Mode::Closed {
                concurrency: c.concurrency,
            },
            &template,
            &tokens,
        )
        .await?;
    bench
        .expect_no_cache_misses(&mut report, misses0, "warm-key")
        .await?;
    report.target(
        "≥ 0.8 × baseline req/s",
        ratio_text(k.rps, b.rps),
        k.rps / b.rps >= 0.8,
    );
    finish(&mut report, c)
}

/// cold-keys: every request a new valid key (argon2 defaults), in a closed loop, while
/// warm-key traffic runs in an open loop; the warm traffic's latency is compared with the
/// same traffic without the cold flood.
pub async fn cold_keys(c: &Common, cold_concurrency: usize, warm_rate: f64) -> anyhow::Result<()> {
    let bench = Bench::start(c, true, true).await?;
    let mut report = ScenarioReport::new("cold keys (argon2 defaults) beside warm traffic");
    let warm_tokens = bench.keygate.create_keys(1, &["contacts:read"], 1).await?;
    let template = bench.template(warm_tokens[0].len());
    bench.warm(&warm_tokens, &template).await?;
    let warm = Tokens::rotate(warm_tokens);

    // The pool's bound: `verify_concurrency` verifications at a time, each taking what
    // one argon2 verification takes on this machine (measured here, on a quiet machine,
    // with the same parameters and code).
    bench.wait_quiet().await?;
    let t_verify = argon2_verify_seconds(7).await?;
    let pool = c
        .keygate_env
        .iter()
        .find(|(k, _)| k == "KEYGATE_API_KEYS__ARGON2__VERIFY_CONCURRENCY")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(keygate::config::Argon2Config::default().verify_concurrency);
    let capacity = pool as f64 / t_verify;
    report.fact(
        "one argon2 verification (defaults: 19456 KiB, 2 passes, 1 lane; fastest of 7 after 3 warm-up runs)",
        format!("{:.1} ms", t_verify * 1e3),
    );
    report.fact(
        "argon2 pool bound (verify_concurrency / verification time)",
        format!(
            "{pool} / {:.1} ms = {capacity:.0} verifications/s",
            t_verify * 1e3
        ),
    );
    let span = (c.warmup + c.duration).as_secs_f64();
    let per_rep = (capacity * span * 1.5).ceil() as usize + cold_concurrency;
    let reps = c.reps.max(1);
    eprintln!(
        "  creating {} cold keys (argon2 defaults, ~{:.0} s)…",
        per_rep * reps,
        per_rep as f64 * reps as f64 / capacity
    );
    let cold_tokens = bench
        .keygate
        .create_keys(per_rep * reps, &["contacts:read"], 4)
        .await?;

    let open = Mode::Open { rate: warm_rate };
    let mut base = Vec::new();
    let mut alone = Vec::new();
    let mut during = Vec::new();
    let mut cold_runs = Vec::new();
    let mut verifications = 0.0;
    // Where keygate's CPU went during each cold phase: its argon2 threads, and the rest.
    let (mut argon2_cores, mut rest_cores, mut argon2_ms, mut argon2_threads) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    let pid = bench.keygate.proc.pid();
    for rep in 0..reps {
        let p = bench.plan("no-op baseline", bench.noop_addr(), open);
        base.push(
            bench
                .measure(&p, bench.noop_pid(), &template, &warm)
                .await?,
        );
        let p = bench.plan("keygate, warm only", bench.keygate.grpc, open);
        alone.push(
            bench
                .measure(&p, bench.keygate.proc.pid(), &template, &warm)
                .await?,
        );
        let mut cold_plan = bench.plan(
            "keygate, cold keys",
            bench.keygate.grpc,
            Mode::Closed {
                concurrency: cold_concurrency,
            },
        );
        // Cold requests wait for the argon2 pool; this scenario measures the warm
        // traffic beside them, so they are given time rather than failed by a timeout.
        cold_plan.grpc_timeout = Some(Duration::from_secs(30));
        cold_plan.repeatable = false;
        let cold = Tokens::once(cold_tokens[rep * per_rep..(rep + 1) * per_rep].to_vec());
        let warm_plan = bench.plan("keygate, warm beside cold", bench.keygate.grpc, open);
        let v0 = bench.argon2_verifications().await?;
        bench.wait_quiet().await?;
        let (cpu0, (_, a0), t0) = (
            procs::cpu_seconds(pid)?,
            procs::threads_cpu_seconds(pid, ARGON2_THREAD)?,
            Instant::now(),
        );
        let (w, k) = tokio::join!(
            bench.measure_once(&warm_plan, pid, &template, &warm),
            load::run(&cold_plan, template.clone(), cold),
        );
        let (w, k) = (w?, k?);
        let (cpu1, (threads, a1), wall) = (
            procs::cpu_seconds(pid)?,
            procs::threads_cpu_seconds(pid, ARGON2_THREAD)?,
            t0.elapsed().as_secs_f64(),
        );
        let v = bench.argon2_verifications().await? - v0;
        argon2_cores.push((a1 - a0) / wall);
        rest_cores.push(((cpu1 - cpu0) - (a1 - a0)) / wall);
        argon2_ms.push((a1 - a0) * 1e3 / v.max(1.0));
        argon2_threads = argon2_threads.max(threads);
        eprintln!(
            "  {:<28} closed {:>9.1} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  ({v} argon2 verifications)",
            k.label, k.rps, k.latency_us.p50, k.latency_us.p99
        );
        verifications += v;
        during.push(w);
        cold_runs.push(k);
    }
    let b = Summary::of("no-op baseline", &base.iter().collect::<Vec<_>>());
    let a = Summary::of("keygate, warm key only", &alone.iter().collect::<Vec<_>>());
    let d = Summary::of(
        "keygate, warm key beside the cold flood",
        &during.iter().collect::<Vec<_>>(),
    );
    let k = Summary::of("keygate, cold keys", &cold_runs.iter().collect::<Vec<_>>());
    report.fact(
        "generator send lag p99, warm only → beside the cold flood (the instrument's own delay, \
         included in the latencies above)",
        format!(
            "{:.0} µs → {:.0} µs",
            send_lag_p99(&alone),
            send_lag_p99(&during)
        ),
    );
    report.tables.push(Table::new(
        format!(
            "Warm-key traffic, open loop at {warm_rate:.0} req/s, {} connections",
            c.connections
        ),
        vec![b, a.clone(), d.clone()],
    ));
    report.tables.push(Table::new(
        format!("Cold keys, closed loop, {cold_concurrency} in flight (each request a new key)"),
        vec![k.clone()],
    ));
    report.runs.extend(base);
    report.runs.extend(alone);
    report.runs.extend(during);
    report.runs.extend(cold_runs);
    let answered: u64 = report
        .runs
        .iter()
        .filter(|r| r.label == "keygate, cold keys")
        .map(|r| r.completed_all)
        .sum();
    let (argon2, rest) = (median(argon2_cores), median(rest_cores));
    report.fact(
        "CPU of keygate's argon2 threads per verification during the cold flood (median)",
        format!("{:.1} ms", median(argon2_ms)),
    );
    // Bounded: one verification per cold request, all of them on the pool's threads. Had
    // argon2 run anywhere else in keygate, the rest of keygate would take cores too; the
    // warm traffic and the cold requests' own handling take a tenth of one.
    report.target(
        "cold keys bounded by the argon2 pool (one verification per cold request, all on \
         the pool's verify_concurrency threads)",
        format!(
            "{verifications} verifications for {answered} cold requests; {argon2_threads} \
             {ARGON2_THREAD} threads (verify_concurrency {pool}) busy {argon2:.2} cores, the \
             rest of keygate {rest:.2} cores (≤ {MAX_REST_CORES}); {:.1} cold req/s",
            k.rps
        ),
        verifications as u64 == answered && argon2_threads == pool && rest <= MAX_REST_CORES,
    );
    report.target(
        "warm-key p99 ≤ 2 × while cold keys run",
        format!(
            "{:.2}× ({:.0} µs vs {:.0} µs)",
            d.p99_us / a.p99_us,
            d.p99_us,
            a.p99_us
        ),
        d.p99_us <= 2.0 * a.p99_us,
    );
    finish(&mut report, c)
}

/// The name of keygate's argon2 threads.
const ARGON2_THREAD: &str = keygate::apikey::hash::THREAD_NAME;

/// What keygate may use besides its argon2 threads during the cold flood, in cores.
const MAX_REST_CORES: f64 = 0.5;

/// The time of one argon2 verification (fastest of `samples`) with the default parameters, through
/// keygate's own `SecretHasher` (blocking pool, pepper), in seconds.
pub async fn argon2_verify_seconds(samples: usize) -> anyhow::Result<f64> {
    let hasher = keygate::apikey::SecretHasher::new(
        keygate::secret::Secret::random(43),
        &keygate::config::Argon2Config::default(),
    )?;
    let secret = keygate::apikey::token::random_base62(keygate::apikey::token::SECRET_LEN);
    let phc = hasher.hash(&secret).await?;
    let mut times = Vec::with_capacity(samples);
    // The first runs pay for fresh memory (19 MiB of page faults); a busy server reuses it.
    for _ in 0..3 {
        hasher.verify(&secret, &phc).await?;
    }
    for _ in 0..samples {
        let t = Instant::now();
        anyhow::ensure!(hasher.verify(&secret, &phc).await?, "argon2 did not verify");
        times.push(t.elapsed().as_secs_f64());
    }
    // The fastest: the others lost time to the machine, not to argon2.
    Ok(times.into_iter().fold(f64::MAX, f64::min))
}

/// single-flight: one new key, `n` requests at once; exactly one argon2 verification.
pub async fn single_flight(c: &Common, n: usize, connections: usize) -> anyhow::Result<()> {
    let bench = Bench::start(c, true, true).await?;
    let mut report = ScenarioReport::new(&format!(
        "single flight: one new key, {n} concurrent requests"
    ));
    let mut base = Vec::new();
    let mut kg = Vec::new();
    for _ in 0..c.reps.max(1) {
        let tokens = bench.keygate.create_keys(1, &["contacts:read"], 1).await?;
        let template = bench.template(tokens[0].len());
        let tokens = Tokens::rotate(tokens);
        let mut plan = bench.plan(
            "no-op baseline",
            bench.noop_addr(),
            Mode::Burst { requests: n },
        );
        plan.connections = connections;
        plan.warmup = Duration::ZERO;
        plan.grpc_timeout = Some(Duration::from_secs(30));
        base.push(
            bench
                .measure(&plan, bench.noop_pid(), &template, &tokens)
                .await?,
        );
        let v0 = bench.argon2_verifications().await?;
        let m0 = bench.cache_misses().await?;
        plan.label = "keygate".into();
        plan.target = bench.keygate.grpc;
        // Once the key is verified it is cached: a repeat would measure something else.
        plan.repeatable = false;
        let mut r = bench
            .measure(&plan, bench.keygate.proc.pid(), &template, &tokens)
            .await?;
        let v = bench.argon2_verifications().await? - v0;
        let m = bench.cache_misses().await? - m0;
        eprintln!("    argon2 verifications: {v}, requests that missed the cache (and waited on the one verification): {m}");
        if v != 1.0 {
            r.valid = false;
            r.problems.push(format!(
                "{v} argon2 verifications for one key (single flight wants exactly 1)"
            ));
        }
        report.fact(
            &format!(
                "rep {}: argon2 verifications / cache misses / allowed",
                kg.len() + 1
            ),
            format!("{v} / {m} / {}", r.allow),
        );
        kg.push(r);
    }
    let ones = kg.iter().filter(|r| r.valid).count();
    let b = Summary::of("no-op baseline", &base.iter().collect::<Vec<_>>());
    let k = Summary::of("keygate", &kg.iter().collect::<Vec<_>>());
    report.tables.push(Table::new(
        format!(
            "{n} requests sent at once over {connections} connections (latency from send; \
             req/s is n over the time to the last answer)"
        ),
        vec![b, k],
    ));
    let all_one = kg.iter().all(|r| r.valid);
    report.target(
        &format!("{n} concurrent requests for one new key: exactly 1 argon2 verification"),
        format!("{ones} of {} repetitions had exactly 1", kg.len()),
        all_one,
    );
    report.runs.extend(base);
    report.runs.extend(kg);
    finish(&mut report, c)
}

/// memory: resident memory per cached principal, warming `keys` keys.
pub async fn memory(c: &Common, keys: usize) -> anyhow::Result<()> {
    let bench = Bench::start(c, false, false).await?;
    let mut report = ScenarioReport::new(&format!("memory per cached principal ({keys} keys)"));
    let tokens = bench
        .create_keys_timed(&mut report, "keys created", keys, 32)
        .await?;
    let template = bench.template(tokens[0].len());
    // One warm key first, so that connection buffers, the runtime and the cache's own
    // structures exist before the "before" reading.
    bench.warm(&tokens[..1], &template).await?;
    let entries0 = bench
        .keygate
        .metric("keygate_credential_cache_entries", "")
        .await?;
    let rss0 = bench.keygate.proc.rss_kib()?;
    let (warm_s, _) = bench.warm(&tokens[1..], &template).await?;
    // Let moka apply its pending inserts, then read.
    let entries = bench
        .keygate
        .metric("keygate_credential_cache_entries", "")
        .await?;
    let rss1 = bench.keygate.proc.rss_kib()?;
    let added = (keys - 1) as f64;
    let per = (rss1 as f64 - rss0 as f64) * 1024.0 / added;
    report.fact(
        "store",
        match c.store {
            StoreKind::Memory => "memory (records were created before the first reading)",
            StoreKind::Redis => "redis (records live outside keygate)",
        },
    );
    report.fact("warming", format!("{} keys in {warm_s:.1} s", keys - 1));
    report.fact(
        "cache entries (keygate_credential_cache_entries) before → after",
        format!("{entries0} → {entries}"),
    );
    report.fact(
        "keygate RSS before → after (VmRSS)",
        format!("{rss0} KiB → {rss1} KiB"),
    );
    report.fact("resident bytes per cached principal", format!("{per:.0}"));
    report.target(
        "≤ 1 KiB resident per cached principal",
        format!("{per:.0} bytes"),
        per <= 1024.0,
    );
    finish(&mut report, c)
}

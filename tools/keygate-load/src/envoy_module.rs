//! `envoy-module`: keygate's module inside Envoy (envoy-module/, examples/envoy-module.yaml)
//! measured with wrk on one Envoy (benches/envoy-module.yaml), beside what it replaces
//! and what it is weighed against, every listener answered the same way:
//!
//! - a. Envoy alone, no authorization (the baseline of every ratio);
//! - b. Envoy + ext_authz → keygate, one cached API key (what users run today);
//! - c. the module in front of ext_authz → the same keygate, the same key, learned: the
//!   module answers it in Envoy's worker, without the ext_authz hop;
//! - d. Envoy's own `api_key_auth` filter with the key in plaintext in Envoy's
//!   configuration (for scale: the cheapest check Envoy has);
//! - e. the module with a key it cannot answer itself (a key on a plan: rate limits are
//!   keygate's), which it hands over to ext_authz, beside
//! - f. Envoy + ext_authz → keygate with that same key: the hand-over must cost no more
//!   than ext_authz alone;
//! - a2 and c2: a and c again with many keys (`--keys`, 1,000 by default) sent in turn,
//!   each learned by the module: a client population rather than one client.
//!
//! With `--floor`, the parts of c's cost (g–j, below), and k and l: c and e again with
//! ext_authz inside Envoy's `composite` filter, which builds it only where the module
//! did not decide. With `--callgrind` (`EnvoyArgs`), each listener's cost is counted in
//! Envoy's instructions rather than timed.
//!
//! keygate runs as a user starts it, `keygate serve --dev` (config/dev.yaml as shipped),
//! with only what the scenario needs added: the watch token the module follows keygate's
//! `Watch` stream with, and the plan of e and f. The module reads the same file and the
//! same `KEYGATE_…` overrides from Envoy's environment. Which door answered is read off
//! Envoy's counters over each measured run: the module's allows skip ext_authz
//! (`ext_authz.disabled`), its hand-overs reach it (`ext_authz.ok`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::envoy::{self, Answer, EnvoyArgs, Listener, Measured, Wrk};
use crate::procs;
use crate::report::{ScenarioReport, Summary};
use crate::scenarios::{print_report, Bench};

const ENVOY_CONFIG: &str = include_str!("../../../benches/envoy-module.yaml");

/// The module as Envoy loads it (`dynamic_module_config: {name: keygate_envoy}`).
const MODULE_FILE: &str = "libkeygate_envoy.so";

/// The plan of the key the module hands over: a rate limit it never reaches (the most
/// `policy.plans` allows; the burst is the same), which only keygate counts.
const PLANS: &str = "{big: {requests_per_minute: 10000000}}";

/// Envoy's counters of the module's listener (stat_prefix `module`): requests the module
/// decided, which skip ext_authz, and requests ext_authz had keygate allow.
const DECIDED_BY_MODULE: &str = "http.module.ext_authz.disabled";
const ALLOWED_BY_KEYGATE: &str = "http.module.ext_authz.ok";
/// The same counter on the `--floor` listeners that decide (stat_prefix `floor_decide`)
/// and that write a learned allow (`floor_write`).
const DECIDED_BY_FLOOR: &str = "http.floor_decide.ext_authz.disabled";
const WRITTEN_BY_FLOOR: &str = "http.floor_write.ext_authz.disabled";
/// Requests ext_authz had keygate allow on the composite listener (stat_prefix
/// `module_composite`), where a request the module decided never builds ext_authz.
const ALLOWED_BY_KEYGATE_COMPOSITE: &str = "http.module_composite.ext_authz.ok";

/// The least share of a learned key's requests the module must answer itself: a learned
/// entry lives `cache.ttl` (30 s in config/dev.yaml), and the requests that arrive while
/// the module learns it again go to keygate.
const MIN_MODULE_SHARE: f64 = 0.99;

#[derive(Debug, Clone, clap::Args)]
pub struct ModuleArgs {
    #[command(flatten)]
    pub envoy: EnvoyArgs,
    /// The directory holding libkeygate_envoy.so (given to Envoy as
    /// ENVOY_DYNAMIC_MODULES_SEARCH_PATH); default: this binary's (the release build).
    #[arg(long, env = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH")]
    pub module_dir: Option<PathBuf>,
    /// Also measure the parts of the learned key's cost, on three more listeners of a
    /// module built with its `bench-floor` feature (`scripts/bench envoy-module --floor`
    /// builds it): g. the module only marks each request decided (Envoy's module
    /// machinery and the skipped ext_authz); h. it decides as it does, but carries out
    /// none of the allow's headers or metadata; i. it carries out the allow it gave
    /// first on every request, reading and deciding none; and, with no module, j. Envoy's
    /// own filters (header_mutation, set_metadata) write the same headers and metadata.
    #[arg(long)]
    pub floor: bool,
    /// The keys sent in turn on the many-keys listeners (a2, c2): each learned by the
    /// module, as a client population's keys are.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(2..))]
    pub keys: u32,
}

/// The module's listener again, named `name` on `@<port>@`, its configuration prefixed
/// with `floor:<mode>;` (`Floor` in envoy-module/src/filter.rs).
fn floor_listener(name: &str, port: &str, mode: &str) -> String {
    let start = ENVOY_CONFIG
        .find("  - name: module\n")
        .expect("the module's listener");
    let end = start
        + ENVOY_CONFIG[start..]
            .find("@FLOOR_LISTENERS@")
            .expect("the place of the floor's listeners, after the module's");
    ENVOY_CONFIG[start..end]
        .replace("  - name: module\n", &format!("  - name: {name}\n"))
        .replace("@MODULE_PORT@", &format!("@{port}@"))
        .replace("stat_prefix: module", &format!("stat_prefix: {name}"))
        .replace(
            "\"file:@MODULE_CONFIG@\"",
            &format!("\"floor:{mode};file:@MODULE_CONFIG@\""),
        )
}

fn module_dir(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .to_owned(),
    };
    anyhow::ensure!(
        dir.join(MODULE_FILE).is_file(),
        "{MODULE_FILE} not found in {}: cargo build --release -p keygate-envoy-module, or \
         pass --module-dir",
        dir.display()
    );
    Ok(std::fs::canonicalize(dir)?)
}

/// The lowest and highest of `x[i] / y[i]` over the repetitions (each pair measured in
/// the same round).
fn per_repetition(x: &[Measured], y: &[Measured], f: fn(&Wrk) -> f64) -> (f64, f64) {
    x.iter()
        .zip(y)
        .map(|(a, b)| f(&a.wrk) / f(&b.wrk))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
            (lo.min(r), hi.max(r))
        })
}

/// The module's listener answers the learned key itself (its allow skips ext_authz):
/// asked until it does, once its follower follows keygate's Watch stream and it has
/// learned the key from one of keygate's answers. Returns how long that took.
async fn until_module_answers(
    envoy: &procs::Proc,
    admin: std::net::SocketAddr,
    (module, counter): (std::net::SocketAddr, &str),
    path: &str,
    auth: &[(&str, &str)],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let decided = [counter.to_owned()];
    loop {
        envoy::expect_statuses(envoy, path, &[(module, auth, 200)]).await?;
        if envoy::envoy_counters(admin, &decided).await?[0] > 0.0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the module answered none of the learned key's requests in 30 s (does it \
                 follow keygate's Watch stream?):\n{}",
                envoy.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn envoy_module(m: &ModuleArgs) -> anyhow::Result<()> {
    let modules = module_dir(m.module_dir.as_ref())?;
    let mut args = m.envoy.clone();
    let c = &mut args.common;
    c.dev = true;
    c.keygate_env.extend([
        (
            "KEYGATE_WATCH_TOKEN".to_owned(),
            keygate::secret::Secret::random(32).expose().to_owned(),
        ),
        ("KEYGATE_POLICY__PLANS".to_owned(), PLANS.to_owned()),
    ]);
    let args = args;
    let c = &args.common;
    let bench = Bench::start(c, false, false).await?;
    let mut report = ScenarioReport::new(if args.upstream {
        "keygate's module inside Envoy (wrk), in front of an upstream"
    } else {
        "keygate's module inside Envoy (wrk)"
    });
    let warm = bench.keygate.create_keys(1, &["contacts:read"], 1).await?;
    let cold = bench
        .keygate
        .create_keys_on_plan(1, &["contacts:read"], "big", 1)
        .await?;
    let many = bench
        .keygate
        .create_keys(m.keys as usize, &["contacts:read"], 8)
        .await?;
    for key in [&warm, &cold, &many] {
        bench.warm(key, &bench.template(key[0].len())).await?;
    }
    let many_keys = envoy::tokens_script(&bench.scratch.path().join("keys.lua"), &many)?;
    let (warm, cold) = (warm[0].clone(), cold[0].clone());

    // The module reads the configuration keygate runs on (`serve --dev`'s, built in) and,
    // from Envoy's environment, the same overrides.
    let config = bench.scratch.path().join("keygate-dev.yaml");
    std::fs::write(&config, keygate::config::DEV_CONFIG)?;
    let mut env = c.keygate_env.clone();
    env.extend([
        (
            "KEYGATE_REVOCATION__WATCH_URL".to_owned(),
            format!("http://{}", bench.keygate.grpc),
        ),
        (
            "ENVOY_DYNAMIC_MODULES_SEARCH_PATH".to_owned(),
            modules.display().to_string(),
        ),
    ]);
    let answer = Answer::start(&args, &bench.scratch).await?;
    let (off, ext_authz, module, api_key_auth) = (
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
    );
    let (floor_mark, floor_decide, floor_write, native_writes, composite) = (
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
    );
    let template = ENVOY_CONFIG.replace(
        "@FLOOR_LISTENERS@\n",
        &if m.floor {
            floor_listener("floor_mark", "FLOOR_MARK_PORT", "mark")
                + &floor_listener("floor_decide", "FLOOR_DECIDE_PORT", "decide")
                + &floor_listener("floor_write", "FLOOR_WRITE_PORT", "write")
        } else {
            String::new()
        },
    );
    let mut listening = vec![
        off,
        ext_authz,
        module,
        api_key_auth,
        native_writes,
        composite,
    ];
    if m.floor {
        listening.extend([floor_mark, floor_decide, floor_write]);
    }
    let (envoy, admin) = envoy::start_envoy(
        &args,
        &bench.scratch,
        &template,
        &answer,
        &[
            ("OFF_PORT", off.port().to_string()),
            ("EXT_AUTHZ_PORT", ext_authz.port().to_string()),
            ("MODULE_PORT", module.port().to_string()),
            ("API_KEY_AUTH_PORT", api_key_auth.port().to_string()),
            ("FLOOR_MARK_PORT", floor_mark.port().to_string()),
            ("FLOOR_DECIDE_PORT", floor_decide.port().to_string()),
            ("FLOOR_WRITE_PORT", floor_write.port().to_string()),
            ("NATIVE_WRITES_PORT", native_writes.port().to_string()),
            ("MODULE_COMPOSITE_PORT", composite.port().to_string()),
            ("API_KEY", warm.clone()),
            ("MODULE_CONFIG", config.display().to_string()),
            ("KEYGATE_GRPC_PORT", bench.keygate.grpc.port().to_string()),
        ],
        &env,
        &listening,
    )
    .await?;

    // Every filter is there: a request without a credential is refused.
    let (warm_bearer, cold_bearer) = (format!("Bearer {warm}"), format!("Bearer {cold}"));
    let warm_auth = [("authorization", warm_bearer.as_str())];
    let cold_auth = [("authorization", cold_bearer.as_str())];
    envoy::expect_statuses(
        &envoy,
        &c.path,
        &[
            (off, &warm_auth[..], 200),
            (ext_authz, &warm_auth[..], 200),
            (ext_authz, &cold_auth[..], 200),
            (ext_authz, &[][..], 401),
            (module, &cold_auth[..], 200),
            (module, &[][..], 401),
            (api_key_auth, &warm_auth[..], 200),
            (api_key_auth, &[][..], 401),
            (native_writes, &[][..], 200),
            (composite, &cold_auth[..], 200),
            (composite, &[][..], 401),
            // The module on the composite listener learns the key from this answer.
            (composite, &warm_auth[..], 200),
        ],
    )
    .await?;
    let learned_in = until_module_answers(
        &envoy,
        admin,
        (module, DECIDED_BY_MODULE),
        &c.path,
        &warm_auth,
    )
    .await?;
    if m.floor {
        for floor in [
            (floor_decide, DECIDED_BY_FLOOR),
            (floor_write, WRITTEN_BY_FLOOR),
        ] {
            until_module_answers(&envoy, admin, floor, &c.path, &warm_auth).await?;
        }
    }
    report.fact(
        "Envoy started → the module answers the learned key itself",
        format!("{:.2} s", learned_in.as_secs_f64()),
    );

    let kg = Some(bench.keygate.proc.pid());
    let module_counters = vec![DECIDED_BY_MODULE.to_owned(), ALLOWED_BY_KEYGATE.to_owned()];
    let listener = |label: &str, port: std::net::SocketAddr, token: &str, authz_pid| Listener {
        label: label.to_owned(),
        port: port.port(),
        token: token.to_owned(),
        script: None,
        authz_pid,
        counters: if port == module {
            module_counters.clone()
        } else if port == composite {
            vec![ALLOWED_BY_KEYGATE_COMPOSITE.to_owned()]
        } else {
            Vec::new()
        },
        // Where the module learns the warm keys from keygate's answers: warmed up until
        // it has learned every one the listener sends.
        learning: match port {
            _ if token != warm => None,
            p if p == module => Some(ALLOWED_BY_KEYGATE.to_owned()),
            p if p == composite => Some(ALLOWED_BY_KEYGATE_COMPOSITE.to_owned()),
            _ => None,
        },
    };
    // Where k and l (`--floor`) stand among the listeners.
    let mut composite_rows = None;
    let mut listeners = vec![
        listener("a. Envoy, no authorization", off, &warm, None),
        listener("b. Envoy + ext_authz → keygate", ext_authz, &warm, kg),
        listener("c. Envoy + module, learned key", module, &warm, kg),
        listener("d. Envoy + api_key_auth", api_key_auth, &warm, None),
        listener(
            "e. Envoy + module → ext_authz, key on a plan",
            module,
            &cold,
            kg,
        ),
        listener(
            "f. Envoy + ext_authz → keygate, key on a plan",
            ext_authz,
            &cold,
            kg,
        ),
    ];
    let keys = m.keys;
    for (label, port, authz_pid) in [
        (
            format!("a2. Envoy, no authorization, {keys} keys"),
            off,
            None,
        ),
        (
            format!("c2. Envoy + module, {keys} learned keys"),
            module,
            kg,
        ),
    ] {
        listeners.push(Listener {
            script: Some(many_keys.clone()),
            ..listener(&label, port, &warm, authz_pid)
        });
    }
    if m.floor {
        listeners.extend([
            listener(
                "g. floor: the module only marks the request decided",
                floor_mark,
                &warm,
                None,
            ),
            listener(
                "h. floor: the module decides, carries out nothing",
                floor_decide,
                &warm,
                kg,
            ),
            listener(
                "i. floor: the module carries out a learned allow, decides nothing",
                floor_write,
                &warm,
                None,
            ),
            listener(
                "j. Envoy's own filters write the allow's headers and metadata",
                native_writes,
                &warm,
                None,
            ),
        ]);
        composite_rows = Some(listeners.len());
        listeners.extend([
            listener(
                "k. as c, ext_authz inside Envoy's composite filter",
                composite,
                &warm,
                kg,
            ),
            listener(
                "l. as e, ext_authz inside Envoy's composite filter",
                composite,
                &cold,
                kg,
            ),
        ]);
    }
    let runs = envoy::measure_listeners(
        &args,
        &bench.scratch,
        &envoy,
        admin,
        &answer,
        &bench.pids(),
        &listeners,
    )
    .await?;
    let rows = envoy::summarize(&mut report, &listeners, &runs);
    let [a, b, learned, d, e, f, a2, c2] =
        <[_; 8]>::try_from(rows[..8].to_vec()).expect("eight listeners");
    // With `--floor`: g–j, then k and l (composite).
    let floors = rows[8..].to_vec();
    report.tables.push(envoy::table(&args, &answer, rows));
    let r = &runs.runs;

    // Which door answered, from Envoy's counters over each measured run.
    let share = |m: &Measured| m.counters[0] / (m.counters[0] + m.counters[1]).max(1.0);
    let mut least = 1.0_f64;
    for (what, runs) in [("c", &r[2]), ("c2", &r[7])] {
        let share = runs.iter().map(share).fold(1.0, f64::min);
        let handed_over: f64 = runs.iter().map(|m| m.counters[1]).sum();
        report.fact(
            &format!(
                "{what}: requests the module answered itself (least over the repetitions); \
                 handed to keygate"
            ),
            format!("{share:.4}; {handed_over:.0}"),
        );
        least = least.min(share);
    }
    // k and l: ext_authz runs on the composite listener only for what the module hands
    // over, so keygate's allows there are the requests the module did not answer.
    let mut composite_ok = true;
    if let Some(at) = composite_rows {
        let (k, l) = (&r[at], &r[at + 1]);
        let share = k
            .iter()
            .map(|m| 1.0 - m.counters[0] / (m.wrk.requests.max(1) as f64))
            .fold(1.0, f64::min);
        let handed: f64 = l.iter().map(|m| m.counters[0]).sum();
        let sent: u64 = l.iter().map(|m| m.wrk.requests).sum();
        report.fact(
            "k: requests the module answered itself (least); l: allowed by keygate / sent",
            format!("{share:.4}; {handed:.0} / {sent}"),
        );
        least = least.min(share);
        composite_ok = handed >= sent as f64;
    }
    let answered_cold: f64 = r[4].iter().map(|m| m.counters[0]).sum();
    let checked_cold: f64 = r[4].iter().map(|m| m.counters[1]).sum();
    report.fact(
        "e: requests the module answered itself; allowed by keygate through ext_authz",
        format!("{answered_cold:.0}; {checked_cold:.0}"),
    );

    let cost = |s: &Summary| s.cpu_us_per_request.unwrap_or(f64::NAN);
    if args.callgrind {
        // Valgrind's time is not Envoy's: the targets are not judged, the costs are shown.
        report.fact(
            "c/a, e/f: Envoy instructions per request (callgrind), the targets' times not judged",
            format!(
                "{:.2}× ({:.0} vs {:.0}); {:.2}× ({:.0} vs {:.0})",
                cost(&learned) / cost(&a),
                cost(&learned),
                cost(&a),
                cost(&e) / cost(&f),
                cost(&e),
                cost(&f)
            ),
        );
    } else {
        time_targets(&mut report, r, [&a, &learned, &e, &f]);
    }
    let others = [
        ("b/a", &b, &a),
        ("d/a", &d, &a),
        ("c/b", &learned, &b),
        ("c2/a2", &c2, &a2),
    ];
    let floors = [
        ("g/a", &a),
        ("h/a", &a),
        ("i/a", &a),
        ("j/a", &a),
        ("k/c", &learned),
        ("l/e", &e),
    ]
    .into_iter()
    .zip(&floors)
    .map(|((what, base), x)| (what, x, base));
    for (what, x, base) in others.into_iter().chain(floors) {
        report.fact(
            &format!("{what}: median; throughput; {}", args.cost_name()),
            format!(
                "{:.2}×; {:.2}×; {:.2}× ({})",
                x.p50_us / base.p50_us,
                x.rps / base.rps,
                cost(x) / cost(base),
                x.label
            ),
        );
    }
    report.notes.push(format!(
        "keygate: `keygate serve --dev` (config/dev.yaml as shipped) with \
         KEYGATE_POLICY__PLANS={PLANS} and KEYGATE_WATCH_TOKEN; the module reads the same \
         file and overrides from Envoy's environment and follows keygate's Watch stream."
    ));
    envoy::queueing_note(&args, &mut report);
    print_report(&report, c)?;
    if !composite_ok {
        bail!(
            "the run is invalid: on the composite listener, keygate allowed fewer of the plan \
             key's requests than were sent"
        );
    }
    if least < MIN_MODULE_SHARE || answered_cold > 0.0 {
        bail!(
            "the run is invalid: the module answered {least:.4} of the learned keys' requests \
             (at least {MIN_MODULE_SHARE} expected) and {answered_cold:.0} of the plan key's \
             (none expected)"
        );
    }
    Ok(())
}

/// The time targets, judged on the medians of a, c (`learned`), e and f and on each
/// repetition (`r`: every listener's runs, in the listeners' order).
fn time_targets(
    report: &mut ScenarioReport,
    r: &[Vec<Measured>],
    [a, learned, e, f]: [&Summary; 4],
) {
    let spread = |x: (f64, f64)| format!("{:.2}–{:.2}×", x.0, x.1);
    let ratio = learned.p50_us / a.p50_us;
    report.target(
        "c/a: median with the module (learned key) ≤ 1.3 × Envoy alone",
        format!(
            "{ratio:.2}× ({:.0} vs {:.0} µs; repetitions {})",
            learned.p50_us,
            a.p50_us,
            spread(per_repetition(&r[2], &r[0], |w| w.p50_us))
        ),
        ratio <= 1.3,
    );
    let ratio = learned.rps / a.rps;
    report.target(
        "c/a: throughput with the module (learned key) ≥ 0.8 × Envoy alone",
        format!(
            "{ratio:.2}× ({:.0} vs {:.0} req/s; repetitions {})",
            learned.rps,
            a.rps,
            spread(per_repetition(&r[2], &r[0], |w| w.rps))
        ),
        ratio >= 0.8,
    );
    // Within noise: the median misses, but a repetition (e and f measured in the same
    // round) does not.
    let ratio = e.p50_us / f.p50_us;
    let (lo, hi) = per_repetition(&r[4], &r[5], |w| w.p50_us);
    report.target(
        "e/f: median of a key the module hands over ≤ 1.0 × ext_authz alone (within the \
         repetitions' spread)",
        format!(
            "{ratio:.2}× ({:.0} vs {:.0} µs; repetitions {}){}",
            e.p50_us,
            f.p50_us,
            spread((lo, hi)),
            if ratio > 1.0 && lo <= 1.0 {
                ": above 1.0 within the spread"
            } else {
                ""
            }
        ),
        ratio <= 1.0 || lo <= 1.0,
    );
}

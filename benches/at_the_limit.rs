//! At the limit: three keygate replicas on one real `redis-server`, one key whose plan
//! the load exceeds several times over, requests spread across the replicas for
//! `--seconds` (default 20). GCRA allows at most `burst + elapsed / T` admissions (T the
//! plan's interval); the run counts what the three replicas admitted together.
//!
//! Reports over-admission (admitted beyond that bound: must be 0, the run fails
//! otherwise) and under-admission (the bound minus what was admitted, counting the
//! admissions the sustained rate allowed that the replicas did not use), with the Redis
//! calls the limiter made.
//!
//! Run: `scripts/bench at-the-limit` (or `cargo bench --bench at_the_limit -- --seconds 10`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::config::PlanConfig;
use keygate::keys::NewKey;
use keygate::server::App;
use keygate_test_support::*;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut seconds, mut clients) = (20u64, 12usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            "--clients" => {
                clients = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--clients N")
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    // 600 a minute (T = 100 ms), a burst of 20.
    let (per_minute, burst) = (600u32, 20u32);
    let interval_ms = 60_000u64.div_ceil(u64::from(per_minute));
    let redis = RedisServer::start().await;
    let secrets = secrets();
    let replicas: Vec<Arc<App>> = (0..3)
        .map(|_| {
            let mut cfg = config(Backend::Redis(&redis));
            cfg.policy.plans = [(
                "edge".to_owned(),
                PlanConfig {
                    requests_per_minute: per_minute,
                    algorithm: Default::default(),
                    burst: Some(burst),
                    concurrent_sessions: None,
                },
            )]
            .into();
            Arc::new(App::build(cfg, secrets.clone()).expect("replica builds"))
        })
        .collect();
    let token = replicas[0]
        .admin
        .create(NewKey {
            plan: "edge".into(),
            ..reader_key()
        })
        .await
        .expect("key")
        .token;
    // Warm the credential cache on every replica without spending the key's budget:
    // a second key on no plan.
    let warm = replicas[0].admin.create(reader_key()).await.unwrap().token;
    for r in &replicas {
        assert_eq!(
            outcome(&r.envoy_service().decide(read_with(&warm)).await),
            Outcome::Allowed
        );
    }
    let m = keygate::telemetry::metrics();
    let reservations0 = m.rate_limit_reservations.get();
    let (admitted, limited, other) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let app = replicas[c % replicas.len()].clone();
        let token = token.clone();
        let (admitted, limited, other) = (admitted.clone(), limited.clone(), other.clone());
        tasks.push(tokio::spawn(async move {
            let envoy = app.envoy_service();
            while Instant::now() < deadline {
                match outcome(&envoy.decide(read_with(&token)).await) {
                    Outcome::Allowed => admitted.fetch_add(1, Ordering::Relaxed),
                    o if o == Outcome::denied("rate_limited", 429) => {
                        limited.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let admitted = admitted.load(Ordering::Relaxed) as u64;
    let limited = limited.load(Ordering::Relaxed) as u64;
    let bound = u64::from(burst) + elapsed.as_millis() as u64 / interval_ms;
    let over = admitted.saturating_sub(bound);
    let under = bound.saturating_sub(admitted);
    let calls = m.rate_limit_reservations.get() - reservations0;
    println!("### at the limit: 3 replicas, one key, plan {per_minute}/min burst {burst}\n");
    println!("| | |\n| --- | ---: |");
    println!(
        "| run | {:.1} s, {clients} clients |",
        elapsed.as_secs_f64()
    );
    println!("| requests | {} |", admitted + limited);
    println!("| admitted | {admitted} |");
    println!("| GCRA's bound (burst + elapsed / T) | {bound} |");
    println!("| over-admission | {over} |");
    println!(
        "| under-admission | {under} ({:.2}% of the bound) |",
        under as f64 * 100.0 / bound as f64
    );
    println!("| rate-limited (429) | {limited} |");
    println!(
        "| Redis calls by the limiter | {calls} ({:.0} per 1,000 requests) |",
        calls as f64 * 1000.0 / (admitted + limited) as f64
    );
    println!("| other answers | {} |", other.load(Ordering::Relaxed));
    assert_eq!(
        over, 0,
        "replicas together admitted more than the plan allows"
    );
    assert_eq!(
        other.load(Ordering::Relaxed),
        0,
        "answers other than allow and 429"
    );
}

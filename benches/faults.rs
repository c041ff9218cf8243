//! The fault run: two keygate replicas on one real `redis-server` (append-only, so keys
//! survive a SIGKILL) under steady Check load over gRPC, while Redis is killed and
//! restarted and keys are revoked before, during and after the outage.
//!
//! Load: `--clients` tasks (default 8), each sending Checks back to back, alternately to
//! the two replicas, for `--seconds` (default 24): warm keys (checked on both replicas
//! before the run), cold keys (never seen before, each used once; a third of them for
//! each phase: before, during and after the outage), and keys revoked during the run. Schedule (fractions of the run): revoke a third of the revocable keys
//! at 0.2; kill Redis at 0.3; try to revoke a third at 0.4 (refused: no store); restart
//! Redis at 0.55; revoke the rest at 0.65.
//!
//! It reports the answers by kind; the allows of revoked keys by a replica that had
//! already applied the revocation when the Check was sent (must be 0: the run fails
//! otherwise); the allows sent after the revoke call returned but before that replica
//! applied it (the propagation window, under this load), with the slowest propagation;
//! the UNAVAILABLE answers to cold keys while Redis was down; and the time from Redis
//! answering again to full service (a cold key allowed on both replicas).
//!
//! Run: `scripts/bench faults` (or `cargo bench --bench faults -- --seconds 12`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keygate::server::{self, App};
use keygate_test_support::*;

#[derive(Default)]
struct Tally {
    allowed: AtomicUsize,
    denied: AtomicUsize,
    unavailable: AtomicUsize,
    other_errors: AtomicUsize,
    /// Allows of a key whose revocation had returned before the Check was sent.
    /// Allows by a replica that had applied the key's revocation before the Check was sent.
    revoked_allowed: AtomicUsize,
    /// Allows of a Check sent after the revoke call returned, before the replica applied it.
    allowed_in_propagation: AtomicUsize,
    cold_unavailable_while_down: AtomicUsize,
    cold_while_down: AtomicUsize,
    /// UNAVAILABLE answers to a cold key sent while Redis was up (killed as it was sent,
    /// or back but not yet reconnected), and to a warm or revocable key.
    cold_unavailable_while_up: AtomicUsize,
    warm_unavailable: AtomicUsize,
}

/// Revocable keys, and when each one's revoke call returned.
struct Revocable {
    tokens: Vec<(String, String)>,
    revoked_at: Mutex<HashMap<String, Instant>>,
    /// Per replica: key id → when that replica applied its revocation.
    applied_at: Vec<Mutex<HashMap<String, Instant>>>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut seconds, mut clients) = (24u64, 8usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("N"),
            "--clients" => clients = args.next().and_then(|v| v.parse().ok()).expect("N"),
            _ => {}
        }
    }
    let run = Duration::from_secs(seconds);
    let mut redis = RedisServer::start_with(RedisOptions {
        append_only: true,
        ..RedisOptions::default()
    })
    .await;
    let secrets = secrets();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut cfg = config(Backend::Redis(&redis));
        // Cheap argon2: this run is about answers under faults, not argon2's cost.
        cfg.api_keys.argon2.memory_kib = 1024;
        let app = Arc::new(App::build(cfg, secrets.clone()).unwrap());
        let running = server::start(app.clone()).await.unwrap();
        positioned(&app).await;
        replicas.push((app, running));
    }
    let admin = replicas[0].0.admin.clone();
    let mut warm = Vec::new();
    for _ in 0..200 {
        warm.push(admin.create(reader_key()).await.unwrap().token);
    }
    let mut revocable = Vec::new();
    for _ in 0..60 {
        let k = admin.create(reader_key()).await.unwrap();
        revocable.push((k.record.key_id, k.token));
    }
    let mut cold = Vec::new();
    for _ in 0..12_000 {
        cold.push(admin.create(reader_key()).await.unwrap().token);
    }
    for (app, _) in &replicas {
        for t in warm.iter().chain(revocable.iter().map(|(_, t)| t)) {
            let o = outcome(&app.envoy_service().decide(read_with(t)).await);
            assert_eq!(o, Outcome::Allowed, "warming");
        }
    }
    let clients_of: Vec<_> = {
        let mut v = Vec::new();
        for (_, running) in &replicas {
            v.push(
                AuthorizationClient::connect(format!("http://{}", running.grpc))
                    .await
                    .unwrap(),
            );
        }
        v
    };
    let warm = Arc::new(warm);
    let cold = Arc::new(cold);
    let next_cold: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    // 0 before the outage, 1 during it, 2 after it.
    let phase = Arc::new(AtomicUsize::new(0));
    let revocable = Arc::new(Revocable {
        tokens: revocable,
        revoked_at: Mutex::new(HashMap::new()),
        applied_at: replicas.iter().map(|_| Mutex::default()).collect(),
    });
    for (r, (app, _)) in replicas.iter().enumerate() {
        let (mut feed, revocable) = (app.bus.subscribe(), revocable.clone());
        tokio::spawn(async move {
            while let Ok(item) = feed.recv().await {
                if let keygate::revocation::FeedItem::Event(e) = item.item {
                    revocable.applied_at[r]
                        .lock()
                        .unwrap()
                        .entry(e.key_id)
                        .or_insert_with(Instant::now);
                }
            }
        });
    }
    let tally = Arc::new(Tally::default());
    let redis_down = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + run;

    let mut load = Vec::new();
    for c in 0..clients {
        let (warm, cold, next_cold, revocable, tally, redis_down, phase) = (
            warm.clone(),
            cold.clone(),
            next_cold.clone(),
            revocable.clone(),
            tally.clone(),
            redis_down.clone(),
            phase.clone(),
        );
        let replicas = clients_of.clone();
        load.push(tokio::spawn(async move {
            let mut i = c;
            while Instant::now() < deadline {
                i += 1;
                let r = i % replicas.len();
                let mut client = replicas[r].clone();
                // Per 16 requests: 13 warm, 2 revocable, 1 cold.
                let (token, key_id, is_cold) = match i % 16 {
                    0 => {
                        // Each phase (before, during, after the outage) has its own third
                        // of the cold keys, so that none runs out of them early.
                        let phase = match phase.load(Ordering::Acquire) {
                            p @ 0..=2 => p,
                            _ => 2,
                        };
                        let n = next_cold[phase].fetch_add(1, Ordering::Relaxed);
                        let third = (cold.len() - 64) / 3;
                        match (n < third).then(|| &cold[phase * third + n]) {
                            Some(t) => (t.clone(), None, true),
                            None => (warm[i % warm.len()].clone(), None, false),
                        }
                    }
                    1 | 2 => {
                        let (id, t) = &revocable.tokens[(i / 16) % revocable.tokens.len()];
                        (t.clone(), Some(id.clone()), false)
                    }
                    _ => (warm[i % warm.len()].clone(), None, false),
                };
                let down = redis_down.load(Ordering::Acquire);
                let sent = Instant::now();
                let revoked_at = key_id.as_ref().and_then(|id| {
                    revocable
                        .revoked_at
                        .lock()
                        .unwrap()
                        .get(id)
                        .copied()
                        .filter(|at| *at <= sent)
                });
                let applied_here = key_id.as_ref().is_some_and(|id| {
                    revocable.applied_at[r]
                        .lock()
                        .unwrap()
                        .get(id)
                        .is_some_and(|at| *at <= sent)
                });
                let answer = client
                    .check(read_with(&token))
                    .await
                    .map(|r| r.into_inner());
                match outcome(&answer) {
                    Outcome::Allowed => {
                        tally.allowed.fetch_add(1, Ordering::Relaxed);
                        if applied_here {
                            tally.revoked_allowed.fetch_add(1, Ordering::Relaxed);
                        } else if revoked_at.is_some() {
                            tally.allowed_in_propagation.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Outcome::Denied { .. } => {
                        tally.denied.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Error(tonic::Code::Unavailable) => {
                        tally.unavailable.fetch_add(1, Ordering::Relaxed);
                        let which = match (is_cold, down) {
                            (true, true) => &tally.cold_unavailable_while_down,
                            (true, false) => &tally.cold_unavailable_while_up,
                            (false, _) => &tally.warm_unavailable,
                        };
                        which.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Error(_) => {
                        tally.other_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if is_cold && down {
                    tally.cold_while_down.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    let at = |fraction: f64| started + run.mul_f64(fraction);
    let revoke_third = |third: usize| {
        let revocable = revocable.clone();
        let admin = admin.clone();
        async move {
            let n = revocable.tokens.len() / 3;
            let (mut done, mut refused) = (0, 0);
            for (id, _) in &revocable.tokens[third * n..(third + 1) * n] {
                match admin.revoke(id).await {
                    Ok(_) => {
                        revocable
                            .revoked_at
                            .lock()
                            .unwrap()
                            .insert(id.clone(), Instant::now());
                        done += 1;
                    }
                    Err(_) => refused += 1,
                }
            }
            (done, refused)
        }
    };
    tokio::time::sleep_until(at(0.2).into()).await;
    let first = revoke_third(0).await;
    tokio::time::sleep_until(at(0.3).into()).await;
    phase.store(1, Ordering::Release);
    redis_down.store(true, Ordering::Release);
    redis.kill();
    let killed = Instant::now();
    tokio::time::sleep_until(at(0.4).into()).await;
    let during = revoke_third(1).await;
    tokio::time::sleep_until(at(0.55).into()).await;
    redis.restart().await;
    let back = Instant::now();
    redis_down.store(false, Ordering::Release);
    phase.store(2, Ordering::Release);
    // Full service: a key never seen before is allowed on both replicas.
    let mut full_service = None;
    // The probes' keys are the last 64 cold ones, which the load never reaches (each
    // phase takes from its own third, which ends before them).
    let probe_cold: Vec<String> = cold[cold.len() - 64..].to_vec();
    let mut probes = probe_cold.into_iter();
    while full_service.is_none() && Instant::now() < deadline {
        let mut all = true;
        for client in &clients_of {
            let Some(t) = probes.next() else { break };
            let answer = client
                .clone()
                .check(read_with(&t))
                .await
                .map(|r| r.into_inner());
            all &= outcome(&answer) == Outcome::Allowed;
        }
        if all {
            full_service = Some(back.elapsed());
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep_until(at(0.65).into()).await;
    let after = revoke_third(2).await;
    for l in load {
        l.await.unwrap();
    }
    let n = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    let total =
        n(&tally.allowed) + n(&tally.denied) + n(&tally.unavailable) + n(&tally.other_errors);
    println!(
        "fault run: 2 replicas, one redis-server (append-only), {clients} clients, {seconds} s; \
         Redis down for {:.2} s",
        (back - killed).as_secs_f64()
    );
    println!("checks answered            {total}");
    println!("  allowed                  {}", n(&tally.allowed));
    println!("  denied                   {}", n(&tally.denied));
    println!(
        "  unavailable              {} (cold keys while Redis was down {}, cold keys while \
         it was up {}, warm or revocable keys {})",
        n(&tally.unavailable),
        n(&tally.cold_unavailable_while_down),
        n(&tally.cold_unavailable_while_up),
        n(&tally.warm_unavailable)
    );
    println!("  other gRPC errors        {}", n(&tally.other_errors));
    println!(
        "allows of revoked keys, after the replica applied the revocation: {}",
        n(&tally.revoked_allowed)
    );
    let revoked_at = revocable.revoked_at.lock().unwrap().clone();
    let slowest = revocable
        .applied_at
        .iter()
        .flat_map(|m| {
            let m = m.lock().unwrap().clone();
            revoked_at
                .iter()
                .filter_map(move |(id, at)| m.get(id).map(|a| a.saturating_duration_since(*at)))
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or_default();
    println!(
        "allows of revoked keys, sent after the revoke returned but before the replica \
         applied it: {} (slowest propagation {:.1} ms)",
        n(&tally.allowed_in_propagation),
        slowest.as_secs_f64() * 1e3
    );
    println!(
        "cold keys while Redis down {} checks, {} answered UNAVAILABLE",
        n(&tally.cold_while_down),
        n(&tally.cold_unavailable_while_down)
    );
    for (r, (app, _)) in replicas.iter().enumerate() {
        println!(
            "replica {r}: {} reconnects, {} flushes, following: {}",
            app.bus.reconnects(),
            app.bus.flushes(),
            app.bus.is_connected()
        );
    }
    println!(
        "revocations: before the outage {} done; during it {} done, {} refused; after it {} done",
        first.0, during.0, during.1, after.0
    );
    match full_service {
        Some(d) => println!(
            "full service after Redis answered again: {:.1} ms",
            d.as_secs_f64() * 1000.0
        ),
        None => println!("full service after Redis answered again: not within the run"),
    }
    for (_, running) in replicas {
        running.shutdown().await.unwrap();
    }
    assert_eq!(n(&tally.revoked_allowed), 0, "a revoked key was allowed");
    assert_eq!(
        n(&tally.other_errors),
        0,
        "answers other than allow, deny or UNAVAILABLE"
    );
}

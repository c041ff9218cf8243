//! Revocation propagation: how long after the admin call returns does each replica deny
//! the key? Three keygate replicas (in this process, each with its own cache, follower
//! and Redis connections) share one real `redis-server` started here.
//!
//! For each of N keys (default 1,000): warm it on every replica, revoke it through replica
//! 0's admin gRPC API, then time from the call's return until each replica has applied the
//! event (the moment after which its cache no longer holds the key), and confirm the deny.
//!
//! Run: `cargo bench --bench revocation_propagation` (`-- --revocations 200` for fewer).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use keygate::api::proto::{self, keys_client::KeysClient};
use keygate::revocation::FeedItem;
use keygate::server::{self, App};
use support::*;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut n: usize = 1000;
    while let Some(a) = args.next() {
        if a == "--revocations" {
            n = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--revocations N");
        }
    }
    let redis = RedisServer::start().await;
    let secrets = secrets();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let app = Arc::new(App::build(config(Backend::Redis(&redis)), secrets.clone()).unwrap());
        let running = server::start(app.clone()).await.unwrap();
        replicas.push((app, running));
    }
    for (app, _) in &replicas {
        eventually(PATIENCE, "replica follows the stream", || async {
            app.bus.is_connected().then_some(())
        })
        .await;
    }
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", replicas[0].1.admin))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut admin = KeysClient::new(channel);
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", secrets.admin_token.expose())
            .parse()
            .unwrap();

    let mut per_replica: Vec<Histogram<u64>> = (0..3)
        .map(|_| Histogram::new_with_bounds(1, 60_000_000, 3).unwrap())
        .collect();
    let mut slowest_all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    // The admin call itself, for scale: an event applied before the call returned counts
    // as zero above.
    let mut call = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for i in 0..n {
        let created = replicas[0].0.admin.create(reader_key()).await.unwrap();
        let (key_id, token) = (created.record.key_id, created.token);
        for (app, _) in &replicas {
            let allowed = outcome(&app.envoy_service().decide(read_with(&token)).await);
            assert_eq!(allowed, Outcome::Allowed, "key {i} warm");
        }
        let mut feeds: Vec<_> = replicas
            .iter()
            .map(|(app, _)| app.bus.subscribe())
            .collect();
        let mut req = tonic::Request::new(proto::RevokeKeyRequest {
            key_id: key_id.clone(),
        });
        req.metadata_mut().insert("authorization", bearer.clone());
        let sent = Instant::now();
        admin.revoke_key(req).await.unwrap();
        let returned = Instant::now();
        call.record((returned - sent).as_micros().max(1) as u64)
            .unwrap();
        let mut slowest = Duration::ZERO;
        for (r, feed) in feeds.iter_mut().enumerate() {
            // Replica 0 drops the key itself before answering; the others learn it from
            // the stream. Either way, wait for the event to be applied here.
            let applied = loop {
                match tokio::time::timeout(PATIENCE, feed.recv()).await {
                    Ok(Ok(FeedItem::Event(e))) if e.key_id == key_id => break Instant::now(),
                    Ok(Ok(_)) => continue,
                    other => panic!("replica {r} did not apply revocation {i}: {other:?}"),
                }
            };
            let took = applied.saturating_duration_since(returned);
            slowest = slowest.max(took);
            per_replica[r]
                .record(took.as_micros().max(1) as u64)
                .unwrap();
        }
        slowest_all
            .record(slowest.as_micros().max(1) as u64)
            .unwrap();
        for (r, (app, _)) in replicas.iter().enumerate() {
            let denied = outcome(&app.envoy_service().decide(read_with(&token)).await);
            assert_eq!(
                denied,
                Outcome::denied("revoked_api_key", 401),
                "replica {r}, key {i}"
            );
        }
    }
    println!("revocation propagation: {n} revocations, 3 replicas, one redis-server, loopback");
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p99 ms", "max ms", "mean ms"
    );
    let row = |name: &str, h: &Histogram<u64>| {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "{:<22} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            name,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            h.mean() / 1000.0
        );
    };
    for (r, h) in per_replica.iter().enumerate() {
        row(&format!("replica {r}"), h);
    }
    row("all replicas (slowest)", &slowest_all);
    row("admin revoke call", &call);
    for (_, running) in replicas {
        running.shutdown().await.unwrap();
    }
}

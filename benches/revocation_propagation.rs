//! Revocation propagation: how long after the admin call returns does each replica deny
//! the key? Three keygate replicas (in this process, each with its own cache, follower
//! and Redis connections, argon2 at its production cost) share one real `redis-server`
//! started here.
//!
//! For each of N keys (default 200): warm it on every replica, revoke it through replica
//! 0's admin gRPC API, then time from the call's return until each replica *denies* it:
//! every replica checks the token over and over (yielding between checks) until the
//! answer is `revoked_api_key`. Also times the event's arrival, and counts the argon2
//! runs the denials cost (a revocation leaves a tombstone, so: none).
//!
//! Run: `cargo bench --bench revocation_propagation` (`-- --revocations 50` for fewer).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use keygate::api::proto::{self, keys_client::KeysClient};
use keygate::revocation::FeedItem;

use keygate_test_support::*;

/// A duration in a microsecond histogram (at least 1 µs: the histogram's lowest bound).
fn record(h: &mut Histogram<u64>, d: Duration) {
    h.record(d.as_micros().max(1) as u64)
        .expect("within the histogram's bounds");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut n: usize = 200;
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
    let replicas = replicas_at_production_cost(Backend::Redis(&redis), &secrets, 3).await;
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
    let mut deny_per_replica: Vec<Histogram<u64>> = (0..3)
        .map(|_| Histogram::new_with_bounds(1, 60_000_000, 3).unwrap())
        .collect();
    let mut deny_slowest = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut argon2_for_denials = 0;
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
        let verifications: Vec<u64> = replicas
            .iter()
            .map(|(app, _)| app.hasher.verifications())
            .collect();
        let mut req = tonic::Request::new(proto::RevokeKeyRequest {
            key_id: key_id.clone(),
        });
        req.metadata_mut().insert("authorization", bearer.clone());
        // Each replica checks the token until it is denied, from just before the call.
        let (go, _) = tokio::sync::broadcast::channel::<Instant>(1);
        let deniers: Vec<_> = replicas
            .iter()
            .map(|(app, _)| {
                let (app, token, mut go) = (app.clone(), token.clone(), go.subscribe());
                tokio::spawn(async move {
                    let returned = go.recv().await.expect("the call returns");
                    loop {
                        let o = outcome(&app.envoy_service().decide(read_with(&token)).await);
                        if o == Outcome::denied("revoked_api_key", 401) {
                            return Instant::now().saturating_duration_since(returned);
                        }
                        assert_eq!(o, Outcome::Allowed, "before the deny, the key is allowed");
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let sent = Instant::now();
        admin.revoke_key(req).await.unwrap();
        let returned = Instant::now();
        go.send(returned).unwrap();
        record(&mut call, returned - sent);
        let mut slowest = Duration::ZERO;
        for (r, feed) in feeds.iter_mut().enumerate() {
            // Replica 0 drops the key itself before answering; the others learn it from
            // the stream. Either way, wait for the event to be applied here.
            let applied = loop {
                match tokio::time::timeout(PATIENCE, feed.recv())
                    .await
                    .map(|r| r.map(|e| e.item))
                {
                    Ok(Ok(FeedItem::Event(e))) if e.key_id == key_id => break Instant::now(),
                    Ok(Ok(_)) => continue,
                    other => panic!("replica {r} did not apply revocation {i}: {other:?}"),
                }
            };
            let took = applied.saturating_duration_since(returned);
            slowest = slowest.max(took);
            record(&mut per_replica[r], took);
        }
        record(&mut slowest_all, slowest);
        let mut slowest_deny = Duration::ZERO;
        for (r, denier) in deniers.into_iter().enumerate() {
            let took = tokio::time::timeout(PATIENCE, denier)
                .await
                .unwrap_or_else(|_| panic!("replica {r} denies revoked key {i}"))
                .unwrap();
            slowest_deny = slowest_deny.max(took);
            record(&mut deny_per_replica[r], took);
        }
        record(&mut deny_slowest, slowest_deny);
        for (r, (app, _)) in replicas.iter().enumerate() {
            argon2_for_denials += app.hasher.verifications() - verifications[r];
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
    println!("from the admin call's return to the first deny:");
    for (r, h) in deny_per_replica.iter().enumerate() {
        row(&format!("deny, replica {r}"), h);
    }
    row("deny, slowest replica", &deny_slowest);
    println!("from the admin call's return to the event being applied:");
    for (r, h) in per_replica.iter().enumerate() {
        row(&format!("event, replica {r}"), h);
    }
    row("event, slowest replica", &slowest_all);
    row("admin revoke call", &call);
    println!("argon2 verifications spent on the denials: {argon2_for_denials}");
    for (_, running) in replicas {
        running.shutdown().await.unwrap();
    }
}

//! Revocation reaches every replica: through the shared Redis stream, after a lost
//! stream connection or a Redis restart, after the stream was trimmed, and through the
//! `keygate.v1.Revocations/Watch` stream that other services and remote replicas follow.
//!
//! Every wait is for an event with a generous bound; the tests assert order and
//! completeness, never speed (speed is in BENCHMARKS.md).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keygate::api::proto::{self, revocation_event::Kind, revocations_client::RevocationsClient};
use keygate::config::RevocationSource;
use keygate::revocation::{EventFeed, FeedEntry, FeedItem, StoreFeed};
use keygate::server::{self, App};
use keygate::store::{Cursor, EventId};
use keygate_test_support::*;
use tokio::sync::watch;

const EVENTS: &str = "kgtest:{keys}:events";

/// A test of `$body` (an `async fn(Backend)`) for each backend named: `redis`, a Redis of
/// the test's own; `cluster`, the shared Redis Cluster in a namespace of the test's own;
/// `memory`.
macro_rules! tests_of {
    ($body:ident { $($backend:ident: $test:ident),+ $(,)? }) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                tests_of!(@on $backend, $body);
            }
        )+
    };
    (@on redis, $body:ident) => {
        let redis = RedisServer::start().await;
        $body(Backend::Redis(&redis)).await;
    };
    (@on cluster, $body:ident) => {
        let ns = fresh_namespace();
        $body(Backend::Cluster(shared_cluster().await, &ns)).await;
    };
    (@on memory, $body:ident) => {
        $body(Backend::Memory).await;
    };
}

/// Waits for `feed` (a replica's bus, subscribed before the change was made) to apply
/// an event for `key_id`: the cache's own signal, not a poll of its answers.
async fn applied(feed: &mut tokio::sync::broadcast::Receiver<FeedEntry>, key_id: &str) {
    loop {
        let item = tokio::time::timeout(PATIENCE, feed.recv())
            .await
            .unwrap_or_else(|_| panic!("an event for {key_id} in time"))
            .expect("the bus is open");
        match item.item {
            FeedItem::Event(e) if e.key_id == key_id => return,
            FeedItem::Unknown { key_id: k, .. } if k == key_id => return,
            _ => continue,
        }
    }
}

async fn create_key(app: &App) -> (String, String) {
    let created = app.admin.create(reader_key()).await.expect("key created");
    (created.record.key_id, created.token)
}

/// A Watch client on the public port, presenting the watch token.
async fn watch_client(replica: &Replica) -> WatchClient {
    watch_client_with(replica, None).await
}

/// The same, with the HTTP/2 receive windows set (small ones make a client that does
/// not read fall behind quickly).
async fn watch_client_with(replica: &Replica, window: Option<u32>) -> WatchClient {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", replica.running.grpc))
            .unwrap()
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .connect()
            .await
            .expect("grpc listener answers");
    let token = replica.watch_token();
    let authorize: WatchAuth = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", bearer(&token).parse().unwrap());
        Ok(req)
    });
    RevocationsClient::with_interceptor(channel, authorize)
}

type WatchAuth =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type WatchClient = RevocationsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, WatchAuth>,
>;

/// Three replicas, ten warm keys revoked through the first: every replica applies each
/// revocation once, in the order they were made within each stream partition (all of
/// them on one Redis), and denies every key.
async fn revoked_keys_reach_every_replica(backend: Backend<'_>) {
    let secrets = secrets();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(config(backend), &secrets).await);
    }
    for r in &replicas {
        r.following().await;
    }
    let mut keys = Vec::new();
    for _ in 0..10 {
        keys.push(create_key(&replicas[0].app).await);
    }
    for r in &replicas {
        for (_, token) in &keys {
            assert_eq!(
                r.check(token).await,
                Outcome::Allowed,
                "warm on every replica"
            );
        }
    }
    let mut feeds: Vec<_> = replicas.iter().map(|r| r.app.bus.subscribe()).collect();

    let mut admin = replicas[0].admin().await;
    for (key_id, _) in &keys {
        let revoked = admin
            .revoke_key(with_admin(
                &secrets,
                proto::RevokeKeyRequest {
                    key_id: key_id.clone(),
                },
            ))
            .await
            .expect("revoke through the admin API")
            .into_inner();
        assert_eq!(revoked.status, "revoked");
    }

    for (i, r) in replicas.iter().enumerate() {
        // Every event arrived, once, in the order the revocations were made (per
        // partition)…
        let mut seen = Vec::new();
        while seen.len() < keys.len() {
            let item = tokio::time::timeout(PATIENCE, feeds[i].recv())
                .await
                .expect("event in time")
                .expect("bus open");
            match item.item {
                FeedItem::Event(e) => seen.push(e.key_id),
                other => panic!("replica {i} did not apply an event: {other:?}"),
            }
        }
        let store = &r.app.store;
        for p in 0..store.partitions() {
            let of = |ids: Vec<String>| -> Vec<String> {
                ids.into_iter()
                    .filter(|id| store.key_partition(id) == p)
                    .collect()
            };
            let expected = of(keys.iter().map(|(id, _)| id.clone()).collect());
            assert_eq!(
                of(seen.clone()),
                expected,
                "replica {i} applied every revocation of partition {p} in order"
            );
        }
        assert_eq!(seen.len(), keys.len());
        // …and once applied, every revoked key is denied there.
        for (_, token) in &keys {
            assert_eq!(r.check(token).await, Outcome::revoked_key());
        }
        assert_eq!(r.app.bus.flushes(), 0);
    }
    shut_down(replicas).await;
}

tests_of!(revoked_keys_reach_every_replica {
    redis: revoked_key_is_denied_on_every_replica_in_order_and_completely,
    cluster: revoked_key_is_denied_on_every_replica_through_the_cluster,
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_whose_stream_connection_is_killed_denies_keys_revoked_meanwhile() {
    let deployment = Deployment::start(config).await;
    let writer = deployment.started().await;
    let reader = deployment.started().await;
    reader.following().await;
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(create_key(&writer.app).await);
    }
    for (_, token) in &keys {
        assert_eq!(reader.check(token).await, Outcome::Allowed);
    }
    // Wait until the follower's blocking read is on the server, then cut it.
    let mut conn = deployment.redis.connection().await;
    let xread_ids = eventually(PATIENCE, "a blocked XREAD on the server", || {
        let mut conn = conn.clone();
        async move {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut conn)
                .await
                .ok()?;
            let ids: Vec<String> = list
                .lines()
                .filter(|l| l.contains("cmd=xread"))
                .filter_map(|l| {
                    l.split_whitespace()
                        .next()?
                        .strip_prefix("id=")
                        .map(str::to_owned)
                })
                .collect();
            // Both replicas follow the stream: two blocked readers.
            (ids.len() == 2).then_some(ids)
        }
    })
    .await;
    let reconnects_before = reader.app.bus.reconnects();
    for id in &xread_ids {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for (key_id, _) in &keys {
        writer.app.admin.revoke(key_id).await.unwrap();
    }
    // Once the reader denies a key, it never allows it again.
    let mut denied: HashSet<usize> = HashSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while denied.len() < keys.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "keys revoked meanwhile were not all denied"
        );
        for (i, (_, token)) in keys.iter().enumerate() {
            match reader.check(token).await {
                Outcome::Allowed => {
                    assert!(!denied.contains(&i), "key {i} allowed again after a deny")
                }
                Outcome::Denied { code, .. } => {
                    assert_eq!(code, "revoked_api_key");
                    denied.insert(i);
                }
                Outcome::Error(c) => panic!("unexpected gRPC error {c:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And stays so.
    for (_, token) in &keys {
        assert_eq!(reader.check(token).await, Outcome::revoked_key());
    }
    assert!(
        reader.app.bus.reconnects() > reconnects_before,
        "the follower saw its connection die"
    );
    assert_eq!(
        reader.app.bus.flushes(),
        0,
        "nothing was lost, so nothing was flushed"
    );
    writer.running.shutdown().await.unwrap();
    reader.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_resumes_after_a_redis_restart_and_flushes_when_the_stream_was_lost() {
    // With persistence: the stream survives the restart, the follower resumes from its
    // last id, and a revocation made after the restart reaches it.
    let mut redis = RedisServer::start_with(RedisOptions {
        append_only: true,
        ..RedisOptions::default()
    })
    .await;
    let secrets = secrets();
    let writer = Replica::start(config(Backend::Redis(&redis)), &secrets).await;
    let reader = Replica::start(config(Backend::Redis(&redis)), &secrets).await;
    reader.following().await;
    let (revoked_id, revoked_token) = create_key(&writer.app).await;
    let (_, kept_token) = create_key(&writer.app).await;
    assert_eq!(reader.check(&revoked_token).await, Outcome::Allowed);
    assert_eq!(reader.check(&kept_token).await, Outcome::Allowed);
    // A first revocation, so the stream exists and the follower has a position in it.
    let (first_id, first_token) = create_key(&writer.app).await;
    let mut feed = reader.app.bus.subscribe();
    writer.app.admin.revoke(&first_id).await.unwrap();
    applied(&mut feed, &first_id).await;
    assert_eq!(reader.check(&first_token).await, Outcome::revoked_key());

    redis.restart().await;
    eventually(PATIENCE, "writer reaches Redis again", || async {
        writer.app.admin.revoke(&revoked_id).await.ok()
    })
    .await;
    applied(&mut feed, &revoked_id).await;
    assert_eq!(
        reader.check(&revoked_token).await,
        Outcome::revoked_key(),
        "the revocation after the restart reached the reader"
    );
    assert_eq!(reader.app.bus.flushes(), 0, "the stream survived: no flush");
    assert_eq!(reader.check(&kept_token).await, Outcome::Allowed);

    // Without persistence: Redis comes back empty, the stream is gone, so the follower
    // cannot know what it missed and must flush its whole cache.
    let mut volatile = RedisServer::start().await;
    let reader2 = Replica::start(config(Backend::Redis(&volatile)), &secrets).await;
    reader2.following().await;
    let (_, token) = create_key(&reader2.app).await;
    let (other_id, _) = create_key(&reader2.app).await;
    assert_eq!(reader2.check(&token).await, Outcome::Allowed);
    reader2.app.admin.revoke(&other_id).await.unwrap();
    eventually(
        PATIENCE,
        "the follower has a position in the stream",
        || async { (reader2.app.bus.last_applied() != Cursor::start(1)).then_some(()) },
    )
    .await;
    volatile.restart().await;
    eventually(PATIENCE, "the lost stream forces a flush", || async {
        (reader2.app.bus.flushes() == 1).then_some(())
    })
    .await;
    // The key's record went with the data, and the cache no longer vouches for it.
    assert_eq!(
        reader2.check(&token).await,
        Outcome::denied("invalid_api_key", 401)
    );
    shut_down([writer, reader, reader2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_trimmed_past_the_last_applied_id_flushes_the_whole_cache() {
    let deployment = Deployment::start(config).await;
    // The writer serves normally; the reader runs its follower on a switchable feed.
    let writer = deployment.started().await;
    let reader = deployment.app();
    let feed = Arc::new(SwitchableFeed::new(StoreFeed::new(
        reader.store.clone(),
        Duration::from_millis(200),
    )));
    let down = feed.down.clone();
    let (stop, stop_rx) = watch::channel(false);
    let follower = tokio::spawn(reader.bus.clone().follow(feed, stop_rx));

    let (id, token) = create_key(&writer.app).await;
    let (_, bystander) = create_key(&writer.app).await;
    let check = |t: String| {
        let reader = reader.clone();
        async move { outcome(&reader.envoy_service().decide(read_with(&t)).await) }
    };
    assert_eq!(check(token.clone()).await, Outcome::Allowed);
    assert_eq!(check(bystander.clone()).await, Outcome::Allowed);
    let warm_verifications = reader.hasher.verifications();

    down.store(true, Ordering::SeqCst);
    eventually(PATIENCE, "the reader notices it is cut off", || async {
        (!reader.bus.is_connected()).then_some(())
    })
    .await;
    writer.app.admin.revoke(&id).await.unwrap();
    // Trim everything: the revocation event is gone before the reader could see it.
    deployment.redis.trim_all_events().await;
    // While cut off, the stale entry is still served: TTL is the bound on staleness.
    assert_eq!(check(token.clone()).await, Outcome::Allowed);

    down.store(false, Ordering::SeqCst);
    eventually(PATIENCE, "the reader flushes", || async {
        (reader.bus.flushes() == 1).then_some(())
    })
    .await;
    assert_eq!(check(token.clone()).await, Outcome::revoked_key());
    // The flush dropped every entry, so the untouched key is read from the store again,
    // without argon2: what its secret hashes to is still known.
    assert_eq!(check(bystander.clone()).await, Outcome::Allowed);
    assert_eq!(reader.hasher.verifications(), warm_verifications);

    stop.send(true).unwrap();
    follower.await.unwrap();
    writer.running.shutdown().await.unwrap();
}

async fn collect(
    stream: &mut tonic::Streaming<proto::RevocationEvent>,
    n: usize,
) -> Vec<proto::RevocationEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("Watch message in time")
            .expect("Watch stream healthy")
            .expect("Watch stream open");
        out.push(msg);
    }
    out
}

async fn watch_resumes_without_a_gap(backend: Backend<'_>) {
    let secrets = secrets();
    let replica = Replica::start(config(backend), &secrets).await;
    replica.following().await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        let (id, _) = create_key(&replica.app).await;
        ids.push(id);
    }
    for id in &ids[..4] {
        replica.app.admin.revoke(id).await.unwrap();
    }
    let mut client = watch_client(&replica).await;
    // Everything from the start.
    let mut all = client
        .watch(proto::WatchRequest {
            after_id: "0-0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = collect(&mut all, 4).await;
    assert_eq!(
        first.iter().map(|e| e.key_id.clone()).collect::<Vec<_>>(),
        ids[..4].to_vec()
    );
    assert!(first.iter().all(|e| e.kind == Kind::Revoked as i32));

    // Resume after the second event: the third and fourth come again (replay), then the
    // live ones, with no gap between the two.
    let mut resumed = client
        .watch(proto::WatchRequest {
            after_id: first[1].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    replica.app.admin.revoke(&ids[4]).await.unwrap();
    replica.app.admin.delete(&ids[5]).await.unwrap();
    let rest = collect(&mut resumed, 4).await;
    assert_eq!(
        rest.iter().map(|e| e.key_id.clone()).collect::<Vec<_>>(),
        ids[2..6].to_vec()
    );
    assert_eq!(rest[3].kind, Kind::Deleted as i32);
    let live = collect(&mut all, 2).await;
    assert_eq!(live[0].id, rest[2].id, "both watchers see the same ids");
    // Ids strictly increase: a client can drop anything at or below what it applied.
    let positions: Vec<EventId> = rest
        .iter()
        .map(|e| EventId::parse(&e.id).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));

    // From now: nothing old, only what happens next.
    let mut now = client
        .watch(proto::WatchRequest {
            after_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (late, _) = create_key(&replica.app).await;
    replica.app.admin.revoke(&late).await.unwrap();
    let next = collect(&mut now, 1).await;
    assert_eq!(next[0].key_id, late);
    replica.running.shutdown().await.unwrap();
}

tests_of!(watch_resumes_without_a_gap {
    redis: watch_resumes_from_an_id_with_no_gap_on_redis,
    memory: watch_resumes_from_an_id_with_no_gap_in_memory,
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_after_a_trimmed_id_starts_with_reset() {
    let deployment = Deployment::start(config).await;
    let replica = deployment.started().await;
    let (a, _) = create_key(&replica.app).await;
    let (b, _) = create_key(&replica.app).await;
    replica.app.admin.revoke(&a).await.unwrap();
    let old = replica.app.store.latest_event_id(0).await.unwrap();
    replica.app.admin.revoke(&b).await.unwrap();
    deployment.redis.trim_all_events().await;
    let mut client = watch_client(&replica).await;
    let mut stream = client
        .watch(proto::WatchRequest {
            after_id: "0-0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = collect(&mut stream, 1).await;
    assert_eq!(first[0].kind, Kind::Reset as i32);
    assert!(EventId::parse(&first[0].id).unwrap() > old);
    replica.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_rejects_malformed_and_unknown_ids() {
    let secrets = secrets();
    let replica = Replica::start(config(Backend::Memory), &secrets).await;
    let mut client = watch_client(&replica).await;
    for bad in ["abc", "12-x", "-1", "1-2-3", "１２-0"] {
        let err = client
            .watch(proto::WatchRequest {
                after_id: bad.into(),
            })
            .await
            .expect_err(bad);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        assert!(err.message().starts_with("after_id"), "{}", err.message());
    }
    let future = format!("{}-0", u64::MAX / 2);
    let err = client
        .watch(proto::WatchRequest { after_id: future })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    replica.running.shutdown().await.unwrap();
}

/// On a cluster, the remote's Watch carries a cursor over 16 partitions, which the
/// follower resumes.
async fn follow_another_keygates_watch(backend: Backend<'_>) {
    let secrets = secrets();
    let primary = Replica::start(config(backend), &secrets).await;
    let mut remote_cfg = config(backend);
    remote_cfg.revocation.source = RevocationSource::Watch;
    remote_cfg.revocation.watch_url = format!("http://{}", primary.running.grpc);
    let remote = Replica::start(remote_cfg, &secrets).await;
    remote.following().await;
    let mut keys = Vec::new();
    for _ in 0..8 {
        keys.push(create_key(&primary.app).await);
    }
    for (_, token) in &keys {
        assert_eq!(remote.check(token).await, Outcome::Allowed);
    }
    let mut feed = remote.app.bus.subscribe();
    for (id, _) in &keys {
        primary.app.admin.revoke(id).await.unwrap();
        applied(&mut feed, id).await;
    }
    for (_, token) in &keys {
        assert_eq!(remote.check(token).await, Outcome::revoked_key());
    }
    // The follower's cursor is the primary's, over all of its partitions.
    assert_eq!(
        remote.app.bus.last_applied(),
        keygate::store::latest_cursor(primary.app.store.as_ref())
            .await
            .unwrap()
    );
    remote.running.shutdown().await.unwrap();
    primary.running.shutdown().await.unwrap();
}

tests_of!(follow_another_keygates_watch {
    redis: replica_can_follow_another_keygates_watch_stream,
    cluster: replica_can_follow_the_watch_of_a_keygate_on_a_cluster,
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_idempotent_when_delivered_twice() {
    let secrets = secrets();
    let replica = Replica::start(config(Backend::Memory), &secrets).await;
    let (id, token) = create_key(&replica.app).await;
    let (_, bystander) = create_key(&replica.app).await;
    assert_eq!(replica.check(&token).await, Outcome::Allowed);
    assert_eq!(replica.check(&bystander).await, Outcome::Allowed);
    let event = |kind| {
        FeedEntry::after(
            &Cursor::start(1),
            0,
            FeedItem::Event(keygate::store::RevocationEvent {
                id: "1-0".into(),
                key_id: id.clone(),
                kind,
                at_ms: 1,
            }),
        )
    };
    // The first delivery of a revocation denies the key, and a second changes nothing:
    // the same answer, no argon2, nothing else touched.
    let verifications = replica.app.hasher.verifications();
    for delivery in 1..=2 {
        replica
            .app
            .bus
            .apply(event(keygate::store::EventKind::Revoked))
            .await;
        assert_eq!(
            replica.check(&token).await,
            Outcome::revoked_key(),
            "after delivery {delivery}"
        );
    }
    assert_eq!(replica.app.hasher.verifications(), verifications);
    assert_eq!(replica.check(&bystander).await, Outcome::Allowed);
    assert_eq!(replica.app.bus.flushes(), 0);
    replica.running.shutdown().await.unwrap();
}

/// An event this version cannot read (a newer keygate's kind during a rolling upgrade,
/// or a corrupt entry) never stops the bus: its key is dropped (or, without a readable
/// key id, the whole cache), and the revocations after it are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_event_is_passed_safely_and_later_revocations_still_apply() {
    let redis = RedisServer::start().await;
    let replica = Replica::following_on(&redis).await;
    let (odd, odd_token) = create_key(&replica.app).await;
    let (later, later_token) = create_key(&replica.app).await;
    assert_eq!(replica.check(&odd_token).await, Outcome::Allowed);
    assert_eq!(replica.check(&later_token).await, Outcome::Allowed);
    let unreadable = keygate::telemetry::metrics().revocation_unreadable.get();
    let mut feed = replica.app.bus.subscribe();

    let mut conn = redis.connection().await;
    let _: String = redis::cmd("XADD")
        .arg(EVENTS)
        .arg("*")
        .arg("key_id")
        .arg(&odd)
        .arg("kind")
        .arg("suspended")
        .arg("at_ms")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(EVENTS)
        .arg("*")
        .arg("garbage")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Written by another replica, through Redis: this one learns of it from the stream.
    replica
        .app
        .store
        .revoke(&later, keygate::store::now_ms())
        .await
        .unwrap();
    applied(&mut feed, &later).await;
    assert_eq!(replica.check(&later_token).await, Outcome::revoked_key());
    assert_eq!(
        replica.app.bus.flushes(),
        1,
        "the entry without a key id flushed"
    );
    assert!(keygate::telemetry::metrics().revocation_unreadable.get() > unreadable);
    assert!(replica.app.bus.is_connected());
    // The key named by the unknown kind was only dropped: it is read again, and valid.
    assert_eq!(replica.check(&odd_token).await, Outcome::Allowed);
    replica.running.shutdown().await.unwrap();
}

/// A reader that fell behind while connected, and had events trimmed from under it,
/// flushes rather than silently skip them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_trimmed_while_connected_flushes() {
    let deployment = Deployment::start(config).await;
    let app = deployment.app();
    let feed = StoreFeed::new(app.store.clone(), Duration::from_millis(200));
    let (a, _) = create_key(&app).await;
    let (b, _) = create_key(&app).await;
    let (c, _) = create_key(&app).await;
    let start = feed.start_position().await.unwrap();
    let now = keygate::store::now_ms();
    app.store.revoke(&a, now).await.unwrap();
    app.store.revoke(&b, now).await.unwrap();
    // Both revocations are trimmed before the reader reads; then one more arrives.
    deployment.redis.trim_all_events().await;
    app.store.revoke(&c, now).await.unwrap();
    let items = feed.read(&start, false).await.unwrap();
    assert!(
        matches!(
            items.as_slice(),
            [FeedEntry {
                item: FeedItem::Reset(_),
                ..
            }]
        ),
        "{items:?}"
    );
    // Nothing was lost after the reset's position.
    let resumed = items[0].cursor.clone();
    assert!(feed.read(&resumed, false).await.unwrap().is_empty());
}

/// The follower takes its position before the first check is answered: until then a
/// check is UNAVAILABLE, so nothing can be verified and cached in a window whose
/// revocations the follower would never see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_wait_for_the_followers_position() {
    let store = CountingStore::new();
    let secrets = secrets();
    let app = Arc::new(App::with_store(config(Backend::Memory), secrets, store.clone()).unwrap());
    let (_, token) = create_key(&app).await;
    store.hold_positions();
    let running = server::start(app.clone()).await.unwrap();
    let mut client = envoy_client(running.grpc).await;
    let answer = client.check(read_with(&token)).await;
    assert_eq!(
        answer.map(|_| ()).unwrap_err().code(),
        tonic::Code::Unavailable
    );
    store.answer_positions();
    eventually(PATIENCE, "the replica answers once positioned", || async {
        let answer = client.clone().check(read_with(&token)).await;
        (outcome(&answer.map(|r| r.into_inner())) == Outcome::Allowed).then_some(())
    })
    .await;
    running.shutdown().await.unwrap();
}

/// A client following another keygate's Watch learns where "now" is when it connects,
/// so reconnecting before any event neither replays the stream nor flushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_follower_starts_at_the_remotes_newest_event() {
    let secrets = secrets();
    let primary = Replica::start(config(Backend::Memory), &secrets).await;
    for _ in 0..3 {
        let (id, _) = create_key(&primary.app).await;
        primary.app.admin.revoke(&id).await.unwrap();
    }
    let newest = keygate::store::latest_cursor(primary.app.store.as_ref())
        .await
        .unwrap();
    let feed = keygate::api::revocations::WatchFeed::new(
        format!("http://{}", primary.running.grpc),
        secrets.watch_token.clone().unwrap(),
        Duration::from_millis(200),
    );
    assert_eq!(feed.start_position().await.unwrap(), newest);
    // Reconnecting from there (as after a lost connection): nothing to replay, no reset.
    assert!(feed.read(&newest, true).await.unwrap().is_empty());
    primary.running.shutdown().await.unwrap();
}

/// Two replicas on one store, and a key warm on the second.
async fn two_replicas_with_a_warm_key(backend: Backend<'_>) -> (Replica, Replica, String, String) {
    let secrets = secrets();
    let a = Replica::start(config(backend), &secrets).await;
    let b = Replica::start(config(backend), &secrets).await;
    b.following().await;
    let (id, token) = create_key(&a.app).await;
    assert_eq!(b.check(&token).await, Outcome::Allowed);
    (a, b, id, token)
}

async fn removing_a_scope_reaches_every_replica(backend: Backend<'_>) {
    let (a, b, id, token) = two_replicas_with_a_warm_key(backend).await;
    let mut feed = b.app.bus.subscribe();
    let change = keygate::keys::KeyUpdate {
        scopes: Some(vec!["contacts:write".into()]),
        ..Default::default()
    };
    let updated = a.app.admin.update(&id, change).await.unwrap();
    assert_eq!(updated.scopes, vec!["contacts:write".to_string()]);
    match tokio::time::timeout(PATIENCE, feed.recv())
        .await
        .map(|r| r.map(|e| e.item))
    {
        Ok(Ok(FeedItem::Event(e))) => {
            assert_eq!(e.key_id, id);
            assert_eq!(e.kind, keygate::store::EventKind::Updated);
        }
        other => panic!("no update event: {other:?}"),
    }
    assert_eq!(
        b.check(&token).await,
        Outcome::denied("insufficient_permissions", 403),
        "the removed scope no longer grants the route on the other replica"
    );
    a.running.shutdown().await.unwrap();
    b.running.shutdown().await.unwrap();
}

tests_of!(removing_a_scope_reaches_every_replica {
    redis: removing_a_scope_reaches_every_replica_through_redis,
    cluster: removing_a_scope_reaches_every_replica_through_the_cluster,
});

async fn moving_expiry_earlier_takes_effect(backend: Backend<'_>) {
    let (a, b, id, token) = two_replicas_with_a_warm_key(backend).await;
    let change = keygate::keys::KeyUpdate {
        expires_in: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    a.app.admin.update(&id, change).await.unwrap();
    eventually(
        PATIENCE,
        "the other replica sees the earlier expiry",
        || async {
            (b.check(&token).await == Outcome::denied("expired_api_key", 401)).then_some(())
        },
    )
    .await;
    // Bad arguments change nothing and name the field.
    let bad = keygate::keys::KeyUpdate {
        scopes: Some(vec!["Not A Scope".into()]),
        ..Default::default()
    };
    let err = a.app.admin.update(&id, bad).await.unwrap_err();
    assert!(err.to_string().starts_with("scopes:"), "{err}");
    assert_eq!(
        a.app.admin.get(&id).await.unwrap().scopes,
        vec!["contacts:read".to_string()]
    );
    a.running.shutdown().await.unwrap();
    b.running.shutdown().await.unwrap();
}

tests_of!(moving_expiry_earlier_takes_effect {
    redis: moving_expiry_earlier_takes_effect_on_every_replica,
    cluster: moving_expiry_earlier_takes_effect_on_every_replica_of_the_cluster,
});

/// A Watch subscriber that falls behind the live feed is caught up from the store; if
/// what it missed was trimmed meanwhile, it is told so with a RESET, not handed the
/// events after the gap as if nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watch_subscriber_whose_events_were_trimmed_gets_a_reset() {
    let redis = RedisServer::start().await;
    let replica = Replica::following_on(&redis).await;
    let app = replica.app.clone();
    let mut client = watch_client_with(&replica, Some(65_535)).await;
    let mut stream = client
        .watch(proto::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    // More events than the live feed and the transport's windows hold for a subscriber
    // that does not read. The follower itself keeps up (nothing is trimmed yet).
    let (id, _) = create_key(&app).await;
    let mut pipe = redis::pipe();
    for _ in 0..40_000 {
        pipe.cmd("XADD")
            .arg(EVENTS)
            .arg("*")
            .arg("key_id")
            .arg(&id)
            .arg("kind")
            .arg("updated")
            .arg("at_ms")
            .arg(1)
            .ignore();
    }
    let mut conn = redis.connection().await;
    let () = pipe.query_async(&mut conn).await.unwrap();
    eventually(PATIENCE, "the follower applied every event", || async {
        (app.bus.last_applied()
            == keygate::store::latest_cursor(app.store.as_ref())
                .await
                .unwrap())
        .then_some(())
    })
    .await;
    assert_eq!(app.bus.flushes(), 0, "the follower kept up");
    // Now what the subscriber has not been sent yet is trimmed away, all but the newest
    // event (the follower's position, so the follower itself has lost nothing); one
    // more event marks the end.
    let _: i64 = redis::cmd("XTRIM")
        .arg(EVENTS)
        .arg("MAXLEN")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (last, _) = create_key(&app).await;
    app.admin.revoke(&last).await.unwrap();
    let mut received = 0;
    let reset = loop {
        let msg = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("Watch message in time")
            .expect("Watch stream healthy")
            .expect("Watch stream open");
        received += 1;
        // A RESET covers everything up to its id, the last revocation included.
        let reset = msg.kind == Kind::Reset as i32;
        if reset || msg.key_id == last {
            break reset;
        }
    };
    assert!(
        reset,
        "the subscriber was told that events were lost ({received} messages)"
    );
    assert_eq!(app.bus.flushes(), 0, "the RESET was the subscriber's alone");
    replica.running.shutdown().await.unwrap();
}

fn key_usage(key_id: &str, allowed: u64, denied: u64, last_used_at_ms: u64) -> proto::KeyUsage {
    proto::KeyUsage {
        key_id: key_id.into(),
        allowed,
        denied,
        last_used_at: Some(prost_types::Timestamp {
            seconds: (last_used_at_ms / 1000) as i64,
            nanos: 0,
        }),
    }
}

/// What a follower that answers requests itself (keygate's module inside Envoy) reports
/// is counted with the replica's own usage, at its next flush; a time after the
/// replica's clock is taken as its now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_a_follower_reports_is_written_with_the_replicas_own() {
    let secrets = secrets();
    let replica = Replica::start(config(Backend::Memory), &secrets).await;
    let (key_id, token) = create_key(&replica.app).await;
    assert_eq!(replica.check(&token).await, Outcome::Allowed);
    let mut client = watch_client(&replica).await;
    let an_hour_ago = keygate::store::now_ms() - 3_600_000;
    client
        .report_usage(proto::ReportUsageRequest {
            usage: vec![key_usage(&key_id, 5, 2, an_hour_ago)],
        })
        .await
        .expect("the report is taken");
    replica.app.usage.flush().await.expect("flushed");
    let usage = replica.app.store.get(&key_id).await.unwrap().unwrap().usage;
    assert_eq!(
        (usage.allowed, usage.denied),
        (6, 2),
        "the replica's own check and the report's"
    );
    let replicas_own = usage.last_used_at_ms.expect("a last use");
    assert!(replicas_own > an_hour_ago, "the later of the two");

    let tomorrow = keygate::store::now_ms() + 86_400_000;
    client
        .report_usage(proto::ReportUsageRequest {
            usage: vec![key_usage(&key_id, 1, 0, tomorrow)],
        })
        .await
        .expect("the report is taken");
    replica.app.usage.flush().await.expect("flushed");
    let usage = replica.app.store.get(&key_id).await.unwrap().unwrap().usage;
    assert_eq!(usage.allowed, 7);
    assert!(
        usage.last_used_at_ms.expect("a last use") <= keygate::store::now_ms(),
        "never a use in the future"
    );
    replica.running.shutdown().await.unwrap();
}

/// A report with a bad entry is refused whole, naming the entry and field; and the
/// report needs the watch token, as Watch does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_report_with_a_bad_entry_changes_nothing_and_says_which() {
    let secrets = secrets();
    let replica = Replica::start(config(Backend::Memory), &secrets).await;
    let (key_id, _) = create_key(&replica.app).await;
    let mut client = watch_client(&replica).await;
    let now = keygate::store::now_ms();
    let good = key_usage(&key_id, 1, 0, now);
    let no_time = proto::KeyUsage {
        last_used_at: None,
        ..good.clone()
    };
    let cases = [
        (key_usage("not-a-key-id", 1, 0, now), "usage[1].key_id"),
        (key_usage(&key_id, 0, 0, now), "usage[1].allowed"),
        (key_usage(&key_id, 1 << 41, 0, now), "usage[1].allowed"),
        (key_usage(&key_id, 0, 1 << 41, now), "usage[1].denied"),
        (no_time, "usage[1].last_used_at"),
    ];
    for (bad, field) in cases {
        let err = client
            .report_usage(proto::ReportUsageRequest {
                usage: vec![good.clone(), bad],
            })
            .await
            .expect_err(field);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let too_many = vec![good.clone(); 10_001];
    let err = client
        .report_usage(proto::ReportUsageRequest { usage: too_many })
        .await
        .expect_err("too many keys");
    assert!(
        err.message().starts_with("usage: at most 10000"),
        "{}",
        err.message()
    );

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", replica.running.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let err = RevocationsClient::new(channel)
        .report_usage(proto::ReportUsageRequest {
            usage: vec![good.clone()],
        })
        .await
        .expect_err("no watch token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    assert_eq!(
        replica.app.usage.flush().await.unwrap(),
        0,
        "nothing was counted"
    );
    let usage = replica.app.store.get(&key_id).await.unwrap().unwrap().usage;
    assert_eq!((usage.allowed, usage.denied), (0, 0));
    replica.running.shutdown().await.unwrap();
}

/// The module's reporter sends a batch larger than one call may carry in parts, each
/// counted; one it cannot deliver is handed back whole, to be sent with the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_reporter_splits_a_large_batch_and_keeps_what_it_could_not_send() {
    use keygate::api::revocations::{UsageReporter, USAGE_KEYS_PER_REPORT};
    use keygate::store::{UsageDelta, UsageSink};

    let secrets = secrets();
    let replica = Replica::start(config(Backend::Memory), &secrets).await;
    let (first, _) = create_key(&replica.app).await;
    let (last, _) = create_key(&replica.app).await;
    let now = keygate::store::now_ms();
    let delta = |key_id: String| UsageDelta {
        key_id,
        allowed: 2,
        denied: 1,
        last_used_at_ms: now,
    };
    // The two keys at either end; unknown (well-formed) ids between them are dropped by
    // the store, as a deleted key's usage is.
    let mut batch = vec![delta(first.clone())];
    batch.extend((1..USAGE_KEYS_PER_REPORT).map(|_| delta(keygate::apikey::token::new_key_id())));
    batch.push(delta(last.clone()));

    let token = keygate::secret::Secret::new(replica.watch_token());
    let reporter = UsageReporter::new(format!("http://{}", replica.running.grpc), token.clone());
    reporter
        .add_usage(&batch)
        .await
        .expect("both parts are taken");
    replica.app.usage.flush().await.expect("flushed");
    for key_id in [&first, &last] {
        let usage = replica.app.store.get(key_id).await.unwrap().unwrap().usage;
        assert_eq!(
            (usage.allowed, usage.denied),
            (2, 1),
            "{key_id}'s part was counted"
        );
    }

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nowhere = UsageReporter::new(format!("http://{closed}"), token);
    let kept = nowhere
        .add_usage(&batch)
        .await
        .expect_err("nobody listens there");
    assert_eq!(
        kept.unwritten, batch,
        "all of it is kept for the next report"
    );
    replica.running.shutdown().await.unwrap();
}

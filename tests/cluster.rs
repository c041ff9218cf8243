//! keygate on a real Redis Cluster (three masters, three replicas, on loopback): key
//! records spread over the masters, revocations reach every replica through every stream
//! partition, `Watch` gives one resumable cursor over all of them, and a master killed
//! under load fails over without a revocation lost, a revoked key allowed, or keygate
//! restarted.
//!
//! The store's own behaviour on the Cluster is `store_conformance`'s `cluster` cases.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use keygate::api::proto::{self, revocations_client::RevocationsClient};
use keygate::config::Secrets;
use keygate::revocation::{FeedEntry, FeedItem};
use keygate::store::Cursor;
use keygate_test_support as support;
use keygate_test_support::*;

/// Creates `n` keys through the admin path, a few at a time.
async fn create_keys(app: &keygate::server::App, n: usize) -> Vec<(String, String)> {
    futures::stream::iter(0..n)
        .map(|_| async {
            let created = app.admin.create(reader_key()).await.expect("key created");
            (created.record.key_id, created.token)
        })
        .buffer_unordered(32)
        .collect()
        .await
}

/// The next message of a Watch stream.
async fn next(stream: &mut tonic::Streaming<proto::RevocationEvent>) -> proto::RevocationEvent {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a message in time")
        .unwrap()
        .expect("the stream stays open")
}

/// Waits until `feed` has carried an event for each of `keys`.
async fn all_applied(feed: &mut tokio::sync::broadcast::Receiver<FeedEntry>, keys: &[String]) {
    let mut missing: HashSet<&str> = keys.iter().map(String::as_str).collect();
    tokio::time::timeout(PATIENCE, async {
        while !missing.is_empty() {
            if let FeedItem::Event(e) = feed.recv().await.expect("the bus is open").item {
                missing.remove(e.key_id.as_str());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} revocation(s) never arrived", missing.len()));
}

async fn cluster_replica(cluster: &RedisCluster, ns: &str, secrets: &Secrets) -> Replica {
    let replica = Replica::serving(config(Backend::Cluster(cluster, ns)), secrets).await;
    replica.following().await;
    replica
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_spread_over_every_master() {
    let cluster = shared_cluster().await;
    let ns = fresh_namespace();
    let replica = cluster_replica(cluster, &ns, &secrets()).await;
    let keys = create_keys(&replica.app, 10_000).await;
    assert_eq!(keys.len(), 10_000);

    // Records are fields of their partition's record hashes.
    let per_master = cluster
        .hash_fields_per_master(&format!("{ns}:*:keys:*"))
        .await;
    assert_eq!(per_master.len(), 3, "{per_master:?}");
    let total: usize = per_master.iter().map(|(_, n)| n).sum();
    assert_eq!(
        total, 10_000,
        "every record is on some master: {per_master:?}"
    );
    for (port, n) in &per_master {
        let share = *n as f64 / total as f64;
        assert!(
            (0.25..=0.42).contains(&share),
            "master {port} holds {:.1}% of the keys: {per_master:?}",
            share * 100.0
        );
    }
    // Each tenant index entry sits beside its record: listing the tenant finds them all.
    let mut listed = 0;
    let mut after = None;
    loop {
        let page = replica
            .app
            .store
            .list(
                &keygate::store::Owner::Tenant(TENANT.into()),
                after.as_deref(),
                1000,
            )
            .await
            .unwrap();
        listed += page.keys.len();
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(listed, 10_000);
    replica.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_every_replica_through_every_partition() {
    let cluster = shared_cluster().await;
    let ns = fresh_namespace();
    let secrets = secrets();
    let writer = cluster_replica(cluster, &ns, &secrets).await;
    let reader = cluster_replica(cluster, &ns, &secrets).await;
    let store = writer.app.store.clone();
    assert_eq!(store.partitions(), 16);

    let keys = create_keys(&writer.app, 64).await;
    let partitions: HashSet<usize> = keys.iter().map(|(id, _)| store.key_partition(id)).collect();
    assert!(
        partitions.len() >= 8,
        "keys in {} partitions",
        partitions.len()
    );
    for (_, token) in &keys {
        assert_eq!(reader.check(token).await, Outcome::Allowed, "warm");
    }
    let mut feed = reader.app.bus.subscribe();
    for (id, _) in &keys {
        writer.app.admin.revoke(id).await.unwrap();
    }
    let ids: Vec<String> = keys.iter().map(|(id, _)| id.clone()).collect();
    all_applied(&mut feed, &ids).await;
    for (_, token) in &keys {
        assert_eq!(reader.check(token).await, Outcome::revoked_key());
    }
    // The follower's cursor is where every partition's stream now ends.
    assert_eq!(
        reader.app.bus.last_applied(),
        keygate::store::latest_cursor(store.as_ref()).await.unwrap()
    );
    writer.running.shutdown().await.unwrap();
    reader.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gives_one_resumable_cursor_over_every_partition() {
    let cluster = shared_cluster().await;
    let ns = fresh_namespace();
    let secrets = secrets();
    let replica = cluster_replica(cluster, &ns, &secrets).await;
    let channel = replica.grpc_channel().await;
    let watch = |after: String| {
        let mut client = RevocationsClient::new(channel.clone());
        let token = replica.watch_token();
        async move {
            let mut req = tonic::Request::new(proto::WatchRequest { after_id: after });
            req.metadata_mut()
                .insert("authorization", bearer(&token).parse().unwrap());
            client.watch(req).await.unwrap().into_inner()
        }
    };

    let keys = create_keys(&replica.app, 12).await;
    let mut live = watch(String::new()).await;
    for (id, _) in &keys {
        replica.app.admin.revoke(id).await.unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..keys.len() {
        seen.push(next(&mut live).await);
    }
    let store = replica.app.store.clone();
    for m in &seen {
        let cursor = Cursor::parse(&m.id).expect("each id is a cursor");
        assert_eq!(cursor.partitions(), 16, "{}", m.id);
        assert_eq!(m.partition as usize, store.key_partition(&m.key_id));
    }
    let by_partition: BTreeMap<u32, usize> = seen.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.partition).or_default() += 1;
        m
    });
    assert!(by_partition.len() > 1, "{by_partition:?}");

    // Resuming from the cursor of the fifth message replays exactly the ones after it.
    let mut resumed = watch(seen[4].id.clone()).await;
    let mut replayed = HashSet::new();
    for _ in 5..seen.len() {
        replayed.insert(next(&mut resumed).await.key_id);
    }
    let expected: HashSet<String> = seen[5..].iter().map(|m| m.key_id.clone()).collect();
    assert_eq!(replayed, expected);
    // …and nothing more: one new revocation is the next message.
    let extra = create_keys(&replica.app, 1).await;
    replica.app.admin.revoke(&extra[0].0).await.unwrap();
    assert_eq!(next(&mut resumed).await.key_id, extra[0].0);

    // A single-stream id does not name this stream's partitions.
    let mut client = RevocationsClient::new(channel.clone());
    let mut req = tonic::Request::new(proto::WatchRequest {
        after_id: "0-0".into(),
    });
    req.metadata_mut().insert(
        "authorization",
        bearer(&replica.watch_token()).parse().unwrap(),
    );
    let refused = client.watch(req).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("16"), "{}", refused.message());
    replica.running.shutdown().await.unwrap();
}

/// A master is killed while a replica answers checks; its replica takes over. Revocations
/// acknowledged before the kill are not lost, no revoked key is allowed at any moment,
/// cold keys are UNAVAILABLE (never denied, never allowed unverified) only until the
/// failover is over, and keygate serves again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_fails_over_without_losing_a_revocation() {
    let mut cluster = RedisCluster::start().await;
    let ns = fresh_namespace();
    let secrets = secrets();
    let admin = cluster_replica(&cluster, &ns, &secrets).await;
    let checker = cluster_replica(&cluster, &ns, &secrets).await;
    let store = admin.app.store.clone();

    let keys = create_keys(&admin.app, 90).await;
    let (revoked, rest) = keys.split_at(30);
    let (warm, cold) = rest.split_at(30);
    for (_, token) in revoked.iter().chain(warm) {
        assert_eq!(checker.check(token).await, Outcome::Allowed);
    }
    let mut feed = checker.app.bus.subscribe();
    for (id, _) in revoked {
        admin.app.admin.revoke(id).await.unwrap();
    }
    let revoked_ids: Vec<String> = revoked.iter().map(|(id, _)| id.clone()).collect();
    all_applied(&mut feed, &revoked_ids).await;

    // The master that holds the first revoked key's partition.
    let tag = keygate::store::redis::partition_tag(
        store.partitions(),
        store.key_partition(&revoked[0].0),
    );
    let victim = cluster
        .master_of_slot(keygate::store::redis::slot_of_tag(&tag))
        .await;

    // Load: the checker answers for revoked and warm keys all the time and, from the kill
    // on, for cold keys (never checked before, so each needs Redis) until each is allowed.
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(&'static str, Outcome)>>> = Arc::default();
    let load = {
        let checker_app = checker.app.clone();
        let (stop, killed, seen) = (stop.clone(), killed.clone(), seen.clone());
        let known: Vec<(&'static str, String)> = revoked
            .iter()
            .map(|(_, t)| ("revoked", t.clone()))
            .chain(warm.iter().map(|(_, t)| ("warm", t.clone())))
            .collect();
        let mut pending: Vec<String> = cold.iter().map(|(_, t)| t.clone()).collect();
        tokio::spawn(async move {
            let answer = |token: &str| {
                let request = read_with(token);
                let app = checker_app.clone();
                async move { outcome(&app.envoy_service().decide(request).await) }
            };
            while !stop.load(Ordering::SeqCst) {
                for (kind, token) in &known {
                    let a = answer(token).await;
                    seen.lock().unwrap().push((*kind, a));
                }
                if killed.load(Ordering::SeqCst) {
                    let mut still = Vec::new();
                    for token in pending {
                        let a = answer(&token).await;
                        if a != Outcome::Allowed {
                            still.push(token);
                        }
                        seen.lock().unwrap().push(("cold", a));
                    }
                    pending = still;
                }
            }
            pending.len()
        })
    };
    eventually(PATIENCE, "the load is running", || async {
        (seen.lock().unwrap().len() > 60).then_some(())
    })
    .await;
    cluster.kill(victim);
    killed.store(true, Ordering::SeqCst);
    cluster.await_failover(victim).await;

    // Service returns on its own, in the same keygate: every cold key is allowed.
    eventually(
        PATIENCE,
        "every cold key is allowed after the failover",
        || async {
            let s = seen.lock().unwrap();
            let allowed = s
                .iter()
                .filter(|(k, a)| *k == "cold" && *a == Outcome::Allowed)
                .count();
            (allowed == cold.len()).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    assert_eq!(load.await.unwrap(), 0, "cold keys left unanswered");

    let seen = seen.lock().unwrap().clone();
    let unavailable = seen
        .iter()
        .filter(|(_, a)| *a == Outcome::Error(tonic::Code::Unavailable))
        .count();
    assert!(
        unavailable > 0,
        "cold keys on the killed master's slots were UNAVAILABLE while it failed over"
    );
    for (kind, answer) in &seen {
        match *kind {
            "revoked" => assert_eq!(
                *answer,
                Outcome::revoked_key(),
                "a revoked key, at any moment"
            ),
            "warm" => assert_eq!(*answer, Outcome::Allowed, "a warm key needs no Redis"),
            _ => assert!(
                matches!(
                    answer,
                    Outcome::Allowed | Outcome::Error(tonic::Code::Unavailable)
                ),
                "a cold key is allowed or UNAVAILABLE, never denied: {answer:?}"
            ),
        }
    }

    // Nothing acknowledged before the kill was lost: the promoted replica has every
    // revocation, and a replica that starts now (nothing cached) denies each key.
    for id in &revoked_ids {
        let record = store.get(id).await.unwrap().expect("the key survived");
        assert!(record.revoked_at_ms.is_some(), "{id} lost its revocation");
    }
    let fresh = cluster_replica(&cluster, &ns, &secrets).await;
    for (_, token) in revoked {
        assert_eq!(fresh.check(token).await, Outcome::revoked_key());
    }
    // The followers found the promoted master: a new revocation still reaches the checker.
    let mut feed = checker.app.bus.subscribe();
    let (late, late_token) = &warm[0];
    admin.app.admin.revoke(late).await.unwrap();
    all_applied(&mut feed, std::slice::from_ref(late)).await;
    assert_eq!(checker.check(late_token).await, Outcome::revoked_key());
    shut_down([admin, checker, fresh]).await;
}

/// The partitions are part of where data lives: a keygate configured with another number
/// than its store was written with refuses to start and names the setting, also for data
/// an earlier keygate wrote before the number was recorded. Nothing is written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_with_other_partitions_is_refused_at_startup() {
    let deployment = Deployment::start(config).await;
    let one = deployment.serving().await;
    let (id, token) = {
        let created = one.app.admin.create(reader_key()).await.unwrap();
        (created.record.key_id, created.token)
    };
    one.app.admin.revoke(&id).await.unwrap();
    one.running.shutdown().await.unwrap();

    let refused = |forget_marker: bool| {
        let redis = &deployment.redis;
        let secrets = deployment.secrets.clone();
        async move {
            let mut conn = redis.connection().await;
            if forget_marker {
                // As an earlier keygate left it: data, and no record of the layout.
                let _: i64 = redis::cmd("DEL")
                    .arg("kgtest:{keys}:layout")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            let before = support::dump(&mut conn).await;
            let mut cfg = config(Backend::Redis(redis));
            cfg.store.stream_partitions = Some(16);
            let app = std::sync::Arc::new(keygate::server::App::build(cfg, secrets).unwrap());
            let err = keygate::server::start(app)
                .await
                .err()
                .expect("refused at startup")
                .to_string();
            assert!(err.contains("store.stream_partitions"), "{err}");
            assert!(err.contains("written with 1 stream partition"), "{err}");
            assert_eq!(support::dump(&mut conn).await, before, "nothing written");
        }
    };
    refused(false).await;
    refused(true).await;

    // With the number it was written with, the data is all there.
    let again = deployment.serving().await;
    assert_eq!(again.check(&token).await, Outcome::revoked_key());
    again.running.shutdown().await.unwrap();
}

/// A partition's slot moves to another master while a replica answers (resharding): keys
/// already moved are read through ASK, the rest where they were, so a cold key is allowed
/// or UNAVAILABLE, never denied; once the slot has moved, every key is read at its new
/// master (MOVED) and a revocation in that partition reaches the other replica, whose
/// blocking read of the partition followed the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_resharded_to_another_master_keeps_serving_and_revoking() {
    let cluster = RedisCluster::start().await;
    let ns = fresh_namespace();
    let secrets = secrets();
    let admin = cluster_replica(&cluster, &ns, &secrets).await;
    let checker = cluster_replica(&cluster, &ns, &secrets).await;
    let store = admin.app.store.clone();
    let keys = create_keys(&admin.app, 160).await;
    // The partition with the most keys, and its slot.
    let mut by_partition: BTreeMap<usize, Vec<(String, String)>> = BTreeMap::new();
    for key in &keys {
        by_partition
            .entry(store.key_partition(&key.0))
            .or_default()
            .push(key.clone());
    }
    let (p, mine) = by_partition
        .into_iter()
        .max_by_key(|(_, k)| k.len())
        .unwrap();
    assert!(mine.len() >= 6, "{} keys in partition {p}", mine.len());
    let slot = keygate::store::redis::slot_of_tag(&keygate::store::redis::partition_tag(
        store.partitions(),
        p,
    ));
    let (warm, cold) = mine.split_at(mine.len() / 2);
    for (_, token) in warm {
        assert_eq!(checker.check(token).await, Outcome::Allowed);
    }
    let from = cluster.master_of_slot(slot).await;
    let to = *cluster
        .masters()
        .await
        .iter()
        .find(|m| **m != from)
        .unwrap();

    let migration = cluster.begin_migration(slot, to).await;
    assert!(
        cluster.migrate_keys(&migration, 3).await > 0,
        "some keys moved"
    );
    for (_, token) in cold {
        let answer = checker.check(token).await;
        assert!(
            matches!(
                answer,
                Outcome::Allowed | Outcome::Error(tonic::Code::Unavailable)
            ),
            "a cold key while its slot moves: {answer:?}"
        );
    }
    cluster.finish_migration(migration).await;
    assert_eq!(cluster.master_of_slot(slot).await, to);

    for (_, token) in cold {
        eventually(
            PATIENCE,
            "a cold key is allowed at its new master",
            || async { (checker.check(token).await == Outcome::Allowed).then_some(()) },
        )
        .await;
    }
    let mut feed = checker.app.bus.subscribe();
    let (id, token) = &warm[0];
    eventually(PATIENCE, "the revocation is written", || async {
        admin.app.admin.revoke(id).await.ok()
    })
    .await;
    all_applied(&mut feed, std::slice::from_ref(id)).await;
    assert_eq!(checker.check(token).await, Outcome::revoked_key());
    assert!(admin
        .app
        .store
        .get(id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at_ms
        .is_some());
    shut_down([admin, checker]).await;
}

/// `field:value` of an `INFO` section, on one node.
async fn info_field(cluster: &RedisCluster, port: u16, section: &str, field: &str) -> String {
    let mut conn = cluster.node_connection(port).await;
    let info: String = ::redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in INFO {section} of {port}:\n{info}"))
        .trim()
        .to_owned()
}

/// The store's clock (unix ms), as `port` says.
async fn store_ms(cluster: &RedisCluster, port: u16) -> u64 {
    let mut conn = cluster.node_connection(port).await;
    let (s, us): (u64, u64) = ::redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    s * 1000 + us / 1000
}

fn signal(pid: &str, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} {pid}");
}

/// Each replica sends checks of `token`, one after another, all replicas at once: `n` of
/// them, or fewer once `enough` says so of what that replica has seen. The outcomes.
async fn checks(
    apps: &[Arc<keygate::server::App>],
    token: &str,
    n: usize,
    enough: fn(&[Outcome]) -> bool,
) -> Vec<Outcome> {
    let calls = apps.iter().map(|app| {
        let app = app.clone();
        let token = token.to_owned();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(outcome(
                    &app.envoy_service().decide(read_with(&token)).await,
                ));
                if enough(&out) {
                    break;
                }
            }
            out
        })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect()
}

/// The master of a key's rate-limit state fails over while replicas spend its plan
/// (`rolling_window`: at most N in any minute). Its replica is stopped first, so what the
/// master grants meanwhile never reaches it: keygate waits for `store.replica_acks`
/// replicas before it spends a reservation, so those grants are not spent (UNAVAILABLE),
/// and the promoted replica, which never saw them, cannot make them count twice. Over the
/// whole test, what the replicas admitted together stays within the plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_load_never_admits_more_than_the_plan() {
    const N: usize = 30;
    let mut cluster = RedisCluster::start().await;
    let ns = fresh_namespace();
    let secrets = secrets();
    let replicas = |cluster: &RedisCluster| -> Vec<Arc<keygate::server::App>> {
        (0..3)
            .map(|_| {
                let mut cfg = config(Backend::Cluster(cluster, &ns));
                cfg.policy.plans = [(
                    "window".to_owned(),
                    keygate::config::PlanConfig {
                        requests_per_minute: N as u32,
                        algorithm: keygate::config::PlanAlgorithm::RollingWindow,
                        burst: None,
                        concurrent_sessions: None,
                    },
                )]
                .into();
                Arc::new(keygate::server::App::build(cfg, secrets.clone()).unwrap())
            })
            .collect()
    };
    let apps = replicas(&cluster);
    let created = apps[0]
        .admin
        .create(keygate::keys::NewKey {
            plan: "window".into(),
            ..reader_key()
        })
        .await
        .unwrap();
    let (key_id, token) = (created.record.key_id, created.token);
    // The master of the key's rate-limit state, and its replica.
    let victim = cluster
        .master_of_slot(keygate::store::redis::slot_of_tag(&key_id))
        .await;
    let replica_port: u16 = info_field(&cluster, victim, "replication", "slave0")
        .await
        .split(',')
        .find_map(|kv| kv.strip_prefix("port="))
        .expect("the master's replica")
        .parse()
        .unwrap();
    let replica_pid = info_field(&cluster, replica_port, "server", "process_id").await;
    let started_ms = store_ms(&cluster, replica_port).await;

    // A few admitted while all is well (each replica's first check also verifies the key).
    let mut seen = checks(&apps, &token, 2, |_| false).await;
    assert!(seen.iter().all(|o| *o == Outcome::Allowed), "{seen:?}");

    // The replica stops, and the master drops its link: what the master grants now,
    // nobody has but the master. Each keygate spends what it holds, then needs a
    // reservation.
    signal(&replica_pid, "-STOP");
    let _: i64 = ::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(&mut cluster.node_connection(victim).await)
        .await
        .unwrap();
    let refused = |seen: &[Outcome]| seen.last() != Some(&Outcome::Allowed);
    let stalled = checks(&apps, &token, N + 1, refused).await;
    seen.extend(stalled.iter().cloned());

    // The master dies; its replica, which never saw those grants, takes over.
    cluster.kill(victim);
    signal(&replica_pid, "-CONT");
    cluster.await_failover(victim).await;

    // The promoted master, which never saw the stalled grants, has no replica of its
    // own (its old master is dead): it grants, but nothing it grants can be spent. (The
    // first answers after a failover may be UNAVAILABLE whatever keygate does, while its
    // client finds the new master: three in a row, or a 429, end a replica's checks.)
    let settled = |seen: &[Outcome]| {
        seen.last() == Some(&Outcome::denied("rate_limited", 429))
            || (seen.len() >= 3
                && seen[seen.len() - 3..]
                    .iter()
                    .all(|o| *o == Outcome::Error(tonic::Code::Unavailable)))
    };
    // Replicas that start now: nothing remembered (a refusal is remembered until one fits
    // again, and would answer for the store).
    let after = checks(&replicas(&cluster), &token, 2 * N, settled).await;
    seen.extend(after.iter().cloned());
    let elapsed_ms = store_ms(&cluster, replica_port).await - started_ms;
    let admitted = seen.iter().filter(|o| **o == Outcome::Allowed).count();
    assert!(
        seen.iter().all(|o| matches!(
            o,
            Outcome::Allowed | Outcome::Error(tonic::Code::Unavailable)
        ) || *o == Outcome::denied("rate_limited", 429)),
        "{seen:?}"
    );
    // Every admission of the test lies within `elapsed_ms` of the store's clock (and the
    // 250 ms a reservation may be spent in): that many minutes' plans at most.
    let minutes = 1 + (elapsed_ms as usize + 250) / 60_000;
    assert!(
        admitted <= N * minutes,
        "{admitted} admitted over {elapsed_ms} ms, the plan is {N} a minute: {seen:?}"
    );
    for (when, outcomes) in [("stalled", &stalled), ("after", &after)] {
        assert!(
            outcomes.contains(&Outcome::Error(tonic::Code::Unavailable)),
            "{when}: a grant no replica has is not spent: {outcomes:?}"
        );
    }
}

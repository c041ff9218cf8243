//! A key's life: rotation with a grace on every replica, expiry that stays listed, usage
//! counted without a store write per request, and the audit trail.

use std::sync::Arc;
use std::time::Duration;

use keygate::audit::AuditQuery;
use keygate::keys::{AdminError, KeyOwner, NewKey, StatusFilter};
use keygate::revocation::FeedItem;
use keygate::server::App;
use keygate::store::{KeyRecords, KeyStatus, KeyStore};
use keygate_test_support as support;
use keygate_test_support::{
    arrives, config, eventually, outcome, read_with, reader_key, secrets, Backend, CountingStore,
    Deployment, Outcome, RedisServer, Replica, PATIENCE, TENANT,
};

fn tenant_keys() -> KeyOwner {
    KeyOwner {
        tenant_id: TENANT.into(),
        ..KeyOwner::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_works_through_its_grace_on_every_replica_then_expires() {
    let deployment = Deployment::start(config).await;
    let (a, b) = (deployment.serving().await, deployment.serving().await);
    let old = a.app.admin.create(reader_key()).await.unwrap();
    for r in [&a, &b] {
        assert_eq!(r.check(&old.token).await, Outcome::Allowed);
    }
    let mut b_events = b.app.bus.subscribe();
    let rotated = a
        .app
        .admin
        .rotate(&old.record.key_id, Duration::from_secs(1))
        .await
        .unwrap();
    let new = &rotated.successor;
    assert_ne!(new.record.key_id, old.record.key_id);
    assert_eq!(new.record.scopes, old.record.scopes);
    assert_eq!(new.record.tenant_id, old.record.tenant_id);
    assert_eq!(
        new.record.rotated_from.as_deref(),
        Some(old.record.key_id.as_str())
    );
    assert!(rotated.previous.expires_at_ms <= keygate::store::now_ms() + 1000);
    // B hears of the old key's new expiry.
    arrives(&mut b_events, "the rotation at B", |item| match item {
        FeedItem::Event(e) => (e.key_id == old.record.key_id).then_some(()),
        _ => None,
    })
    .await;
    for r in [&a, &b] {
        assert_eq!(r.check(&new.token).await, Outcome::Allowed, "the successor");
    }
    // Once the grace is over, the old key is expired on both; the new one goes on.
    for r in [&a, &b] {
        eventually(PATIENCE, "the old key's grace ends", || async {
            (r.check(&old.token).await == Outcome::denied("expired_api_key", 401)).then_some(())
        })
        .await;
        assert_eq!(r.check(&new.token).await, Outcome::Allowed);
    }
    // Only an active key rotates.
    let again = a.app.admin.rotate(&old.record.key_id, Duration::ZERO).await;
    assert!(matches!(
        again,
        Err(AdminError::InvalidArgument {
            field: "key_id",
            ..
        })
    ));
    support::shut_down([a, b]).await;
}

#[tokio::test]
async fn an_expired_key_stays_listed_until_deleted_and_a_revoked_one_leaves_the_list() {
    let app = App::build(config(Backend::Memory), secrets()).unwrap();
    let short = app
        .admin
        .create(NewKey {
            expires_in: Some(Duration::from_secs(1)),
            ..reader_key()
        })
        .await
        .unwrap();
    let active = app.admin.create(reader_key()).await.unwrap();
    let revoked = app.admin.create(reader_key()).await.unwrap();
    app.admin.revoke(&revoked.record.key_id).await.unwrap();
    let envoy = app.envoy_service();
    eventually(PATIENCE, "the short key expires", || async {
        (outcome(&envoy.decide(read_with(&short.token)).await)
            == Outcome::denied("expired_api_key", 401))
        .then_some(())
    })
    .await;
    let listed = |filter: StatusFilter| {
        let app = &app;
        async move {
            let mut page = app
                .admin
                .list_with(&tenant_keys(), filter, 100, None)
                .await
                .unwrap()
                .keys
                .into_iter()
                .map(|k| (k.key_id.clone(), k.status(keygate::store::now_ms())))
                .collect::<Vec<_>>();
            page.sort_by(|a, b| a.0.cmp(&b.0));
            page
        }
    };
    let mut expected = vec![
        (short.record.key_id.clone(), KeyStatus::Expired),
        (active.record.key_id.clone(), KeyStatus::Active),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed(StatusFilter::Listed).await, expected);
    assert_eq!(
        listed(StatusFilter::Only(KeyStatus::Expired)).await,
        vec![(short.record.key_id.clone(), KeyStatus::Expired)]
    );
    assert_eq!(
        listed(StatusFilter::Only(KeyStatus::Revoked)).await,
        vec![(revoked.record.key_id.clone(), KeyStatus::Revoked)]
    );
    assert_eq!(listed(StatusFilter::All).await.len(), 3);
    app.admin.delete(&short.record.key_id).await.unwrap();
    assert_eq!(
        listed(StatusFilter::Listed).await,
        vec![(active.record.key_id.clone(), KeyStatus::Active)]
    );
    assert!("bogus".parse::<StatusFilter>().is_err());
}

#[tokio::test]
async fn a_key_that_never_expires_needs_the_deployment_to_allow_it() {
    let never = || NewKey {
        never_expires: true,
        ..reader_key()
    };
    let strict = App::build(config(Backend::Memory), secrets()).unwrap();
    assert!(matches!(
        strict.admin.create(never()).await,
        Err(AdminError::InvalidArgument {
            field: "expires_in",
            ..
        })
    ));
    let mut cfg = config(Backend::Memory);
    cfg.api_keys.allow_non_expiring = true;
    let lenient = App::build(cfg, secrets()).unwrap();
    let key = lenient.admin.create(never()).await.unwrap();
    assert_eq!(key.record.expires_at_ms, keygate::store::NEVER);
    assert_eq!(
        outcome(&lenient.envoy_service().decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
    assert_eq!(
        keygate::api::keys::key_proto(&key.record).expires_at,
        None,
        "no expiry on the wire"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_counted_across_replicas_and_written_once_per_flush_not_per_request() {
    let store = CountingStore::new();
    let secrets = secrets();
    let replicas: Vec<App> = (0..2)
        .map(|_| App::with_store(config(Backend::Memory), secrets.clone(), store.clone()).unwrap())
        .collect();
    let key = replicas[0].admin.create(reader_key()).await.unwrap();
    let key_id = key.record.key_id.clone();
    for r in &replicas {
        assert_eq!(
            outcome(&r.envoy_service().decide(read_with(&key.token)).await),
            Outcome::Allowed
        );
    }
    let writes = store.writes();
    let write = support::check_request(
        "POST",
        "/v1/contacts",
        &[
            ("authorization", &support::bearer(&key.token)),
            ("x-tenant-id", TENANT),
        ],
    );
    for i in 0..40 {
        let r = &replicas[i % 2];
        assert_eq!(
            outcome(&r.envoy_service().decide(read_with(&key.token)).await),
            Outcome::Allowed
        );
    }
    for r in &replicas {
        assert_eq!(
            outcome(&r.envoy_service().decide(write.clone()).await),
            Outcome::denied("insufficient_permissions", 403)
        );
    }
    assert_eq!(store.writes(), writes, "no store write per request");
    assert_eq!(
        store.get(&key_id).await.unwrap().unwrap().usage.allowed,
        0,
        "not flushed yet"
    );
    for r in &replicas {
        assert_eq!(r.usage.flush().await.unwrap(), 1, "one key's counts");
    }
    assert_eq!(
        store.writes(),
        writes + 2,
        "one write per replica and flush"
    );
    let usage = store.get(&key_id).await.unwrap().unwrap().usage;
    assert_eq!(
        (usage.allowed, usage.denied),
        (42, 2),
        "both replicas' counts, warm-up included"
    );
    assert!(usage
        .last_used_at_ms
        .is_some_and(|t| t <= keygate::store::now_ms()));
    // Nothing new: nothing to write.
    assert_eq!(replicas[0].usage.flush().await.unwrap(), 0);
    assert_eq!(store.writes(), writes + 2);
}

#[tokio::test]
async fn usage_is_flushed_on_a_graceful_shutdown() {
    let redis = RedisServer::start().await;
    let replica = Replica::serving(config(Backend::Redis(&redis)), &secrets()).await;
    let key = replica.app.admin.create(reader_key()).await.unwrap();
    assert_eq!(replica.check(&key.token).await, Outcome::Allowed);
    let store: Arc<dyn KeyStore> = replica.app.store.clone();
    replica.running.shutdown().await.unwrap();
    let usage = store.get(&key.record.key_id).await.unwrap().unwrap().usage;
    assert_eq!(usage.allowed, 1);
}

#[tokio::test]
async fn the_audit_trail_says_who_did_what_in_order_and_never_holds_a_token() {
    let redis = RedisServer::start().await;
    let secrets = secrets();
    let app = App::build(config(Backend::Redis(&redis)), secrets.clone()).unwrap();
    let key = app.admin.create(reader_key()).await.unwrap();
    let id = key.record.key_id.clone();
    app.admin
        .update(
            &id,
            keygate::keys::KeyUpdate {
                name: Some("renamed".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rotated = app
        .admin
        .rotate(&id, Duration::from_secs(60))
        .await
        .unwrap();
    app.admin.revoke(&id).await.unwrap();
    let refused = app.admin.revoke("not-a-key-id").await;
    assert!(refused.is_err());
    app.partners.set("acme", TENANT, true).await.unwrap();
    // Guessing at the successor's secret: one entry when the failure budget runs out.
    let envoy = app.envoy_service();
    for i in 0..12 {
        let guess = support::wrong_secret_at(&rotated.successor.token, i);
        assert_eq!(
            outcome(&envoy.decide(read_with(&guess)).await),
            Outcome::denied("invalid_api_key", 401)
        );
    }
    let all = app
        .admin
        .audit_log(&AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<(&str, &str)> = all
        .iter()
        .map(|e| (e.action.as_str(), e.outcome.as_str()))
        .collect();
    let refused_outcome = all[4].outcome.as_str();
    assert_eq!(
        actions,
        vec![
            ("key.created", "ok"),
            ("key.updated", "ok"),
            ("key.rotated", "ok"),
            ("key.revoked", "ok"),
            ("key.revoked", refused_outcome),
            ("delegation.granted", "ok"),
            ("key.failures", all[6].outcome.as_str(),),
        ]
    );
    assert!(
        refused_outcome.starts_with("refused: key_id"),
        "{refused_outcome}"
    );
    assert_eq!(
        all[6].key_id.as_deref(),
        Some(rotated.successor.record.key_id.as_str())
    );
    assert_eq!(all[6].actor, "keygate");
    let admin_actor = &all[0].actor;
    assert!(admin_actor.starts_with("admin:") && admin_actor.len() == "admin:".len() + 16);
    assert!(!admin_actor.contains(secrets.admin_token.expose()));
    for e in &all[..6] {
        assert_eq!(&e.actor, admin_actor);
    }
    assert_eq!(all[0].tenant_id.as_deref(), Some(TENANT));
    let ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| keygate::store::EventId::parse(id));
    assert_eq!(ids, sorted, "oldest first");
    // Filters.
    let of_key = app
        .admin
        .audit_log(&AuditQuery {
            key_id: Some(id.clone()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(of_key.len(), 4);
    // No token, no secret, anywhere in the trail or the stream.
    let mut conn = redis.connection().await;
    let dump = support::dump(&mut conn).await;
    for token in [&key.token, &rotated.successor.token] {
        let secret = support::secret_of(token);
        assert!(!format!("{all:?}").contains(secret));
        assert!(!dump.contains(secret), "a secret in Redis");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reaches_redis_within_a_flush_interval_from_two_served_replicas() {
    let redis = RedisServer::start().await;
    let secrets = secrets();
    let cfg = || {
        let mut c = config(Backend::Redis(&redis));
        c.api_keys.usage_flush_interval = Duration::from_millis(200);
        c
    };
    let a = Replica::serving(cfg(), &secrets).await;
    let b = Replica::serving(cfg(), &secrets).await;
    let key = a.app.admin.create(reader_key()).await.unwrap();
    for i in 0..10 {
        let r = if i % 2 == 0 { &a } else { &b };
        assert_eq!(r.check(&key.token).await, Outcome::Allowed);
    }
    // No explicit flush: each replica's own task writes within its interval.
    let store = a.app.store.clone();
    let usage = eventually(PATIENCE, "both replicas' usage is flushed", || async {
        let u = store.get(&key.record.key_id).await.unwrap().unwrap().usage;
        (u.allowed == 10).then_some(u)
    })
    .await;
    assert!(usage.last_used_at_ms.is_some());
    support::shut_down([a, b]).await;
}

/// A flush whose write fails in one partition writes the other partitions once and keeps
/// only the failed partition's counts, which the next flush writes: every key ends with
/// its exact count, none counted twice. The failure is Redis's own: the flushing
/// replica's ACL user may not touch the failed partition's keys, so Redis refuses that
/// partition's script before it runs, and answers the others.
#[tokio::test]
async fn a_flush_failing_in_one_partition_counts_every_key_exactly_once_after_the_retry() {
    use keygate::store::redis::{partition_tag, RedisOptions, RedisStore};
    use keygate::usage::UsageCounter;
    const PARTITIONS: usize = 4;
    const VICTIM: usize = 2;
    let redis = RedisServer::start().await;
    let options = |user: Option<&str>| RedisOptions {
        username: user.map(str::to_owned),
        partitions: PARTITIONS,
        ..RedisOptions::default()
    };
    let timeout = Duration::from_secs(2);
    let admin_store: Arc<dyn KeyStore> = Arc::new(
        RedisStore::with_options(&redis.url(), None, "kgtest", timeout, &options(None)).unwrap(),
    );
    let app = App::with_store(config(Backend::Memory), secrets(), admin_store.clone()).unwrap();
    // Two keys in every partition (key ids are random: a bounded number of tries).
    let mut keys: Vec<String> = Vec::new();
    for _ in 0..400 {
        let per_partition = |p: usize| {
            keys.iter()
                .filter(|k| admin_store.key_partition(k) == p)
                .count()
        };
        if (0..PARTITIONS).all(|p| per_partition(p) >= 2) {
            break;
        }
        keys.push(app.admin.create(reader_key()).await.unwrap().record.key_id);
    }
    assert!((0..PARTITIONS).all(|p| keys.iter().any(|k| admin_store.key_partition(k) == p)));

    let mut raw = redis.connection().await;
    let allow = |partitions: &[usize]| {
        let mut cmd = ::redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg("flusher")
            .arg("on")
            .arg(">flusher-password")
            .arg("+@all")
            .arg("~kgtest:{keys}:*");
        for &p in partitions {
            cmd.arg(format!("~kgtest:{{{}}}:*", partition_tag(PARTITIONS, p)));
        }
        cmd
    };
    let all_but_victim: Vec<usize> = (0..PARTITIONS).filter(|&p| p != VICTIM).collect();
    let () = allow(&all_but_victim).query_async(&mut raw).await.unwrap();
    let flusher = Arc::new(
        RedisStore::with_options(
            &redis.url(),
            Some(&keygate::secret::Secret::new("flusher-password")),
            "kgtest",
            timeout,
            &options(Some("flusher")),
        )
        .unwrap(),
    );
    let usage = UsageCounter::new(flusher);
    // Key i: i + 1 requests allowed, one denied.
    for (i, k) in keys.iter().enumerate() {
        for _ in 0..=i {
            usage.record(k, true);
        }
        usage.record(k, false);
    }
    let in_victim = keys
        .iter()
        .filter(|k| admin_store.key_partition(k) == VICTIM)
        .count();
    let failed = usage
        .flush()
        .await
        .expect_err("the victim partition's script is refused");
    assert_eq!(
        (failed.written, failed.kept),
        (keys.len() - in_victim, in_victim)
    );
    let counts = || async {
        let mut counts = Vec::new();
        for k in &keys {
            let u = admin_store.get(k).await.unwrap().unwrap().usage;
            counts.push((u.allowed, u.denied));
        }
        counts
    };
    let exact: Vec<(u64, u64)> = (0..keys.len()).map(|i| (i as u64 + 1, 1)).collect();
    let written_first: Vec<(u64, u64)> = keys
        .iter()
        .zip(&exact)
        .map(|(k, &c)| {
            if admin_store.key_partition(k) == VICTIM {
                (0, 0)
            } else {
                c
            }
        })
        .collect();
    assert_eq!(
        counts().await,
        written_first,
        "every other partition written"
    );

    let () = allow(&(0..PARTITIONS).collect::<Vec<_>>())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(usage.flush().await.unwrap(), in_victim, "only what failed");
    assert_eq!(counts().await, exact, "every key counted exactly once");
    assert_eq!(usage.flush().await.unwrap(), 0);
}

/// Counts taken on many worker threads at once, with flushes running meanwhile, add up
/// exactly: each thread counts in its own shard and a flush merges them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn usage_counted_on_many_threads_while_flushing_adds_up_exactly() {
    let app = Arc::new(App::build(config(Backend::Memory), secrets()).unwrap());
    let mut keys = Vec::new();
    for _ in 0..4 {
        keys.push(app.admin.create(reader_key()).await.unwrap().record.key_id);
    }
    const TASKS: u64 = 16;
    const PER_TASK: u64 = 2_000;
    let mut counting = Vec::new();
    for t in 0..TASKS {
        let (app, keys) = (app.clone(), keys.clone());
        counting.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                // Every key gets allowed and denied requests from every task.
                let k = &keys[((t + i) % keys.len() as u64) as usize];
                app.usage.record(k, i % 5 != 0);
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let flusher = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut flushes = 0;
            for _ in 0..50 {
                app.usage.flush().await.unwrap();
                flushes += 1;
                tokio::task::yield_now().await;
            }
            flushes
        })
    };
    for c in counting {
        c.await.unwrap();
    }
    assert_eq!(flusher.await.unwrap(), 50);
    app.usage.flush().await.unwrap();
    let (mut allowed, mut denied) = (0, 0);
    for k in &keys {
        let usage = app.store.get(k).await.unwrap().unwrap().usage;
        allowed += usage.allowed;
        denied += usage.denied;
    }
    assert_eq!(allowed + denied, TASKS * PER_TASK);
    assert_eq!(denied, TASKS * PER_TASK / 5);
}

//! One suite of `KeyStore` behaviours, run against every backend (the Limitador habit):
//! the in-process `MemoryStore` and the `RedisStore` against a real `redis-server`.
//! A backend that passes here can replace the other without a caller noticing.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keygate::apikey::{self, SecretHasher};
use keygate::config::Argon2Config;
use keygate::principal::{Environment, KeyKind};
use keygate::secret::Secret;
use keygate::server::App;
use keygate::store::memory::MemoryStore;
use keygate::store::redis::RedisStore;
use keygate::store::{
    now_ms, Delegation, DelegationsOf, EventId, EventKind, KeyChange, KeyRecord, KeyStatus,
    KeyStore, Owner, StoreError, StreamEntry, TokenRevocation, TokenTarget,
};
use support::{Backend, RedisServer, OTHER_TENANT, TENANT};

/// A backend under test, and a way to read its revocation events.
struct Subject {
    store: Arc<dyn KeyStore>,
    events: EventSource,
}

enum EventSource {
    Memory(Arc<MemoryStore>),
    /// The store, a connection of the test's own to its Redis, and the server (or
    /// Cluster) it talks to, kept alive for the test.
    Redis(
        Arc<RedisStore>,
        Raw,
        #[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>,
    ),
}

/// The test's own connection, to read what keygate wrote.
enum Raw {
    Single(::redis::aio::MultiplexedConnection),
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl Raw {
    async fn stream_entries(&self, key: &str) -> Vec<(String, Vec<(String, String)>)> {
        match self {
            Raw::Single(c) => support::stream_entries(&mut c.clone(), key).await,
            Raw::Cluster(c) => support::stream_entries(&mut c.clone(), key).await,
        }
    }
}

impl Subject {
    async fn memory() -> Subject {
        let store = Arc::new(MemoryStore::new());
        Subject {
            store: store.clone(),
            events: EventSource::Memory(store),
        }
    }

    async fn redis() -> Subject {
        let server = RedisServer::start().await;
        let store = Arc::new(
            RedisStore::new(&server.url(), None, "kgtest", Duration::from_secs(2))
                .expect("redis store"),
        );
        let raw = Raw::Single(server.connection().await);
        Subject {
            store: store.clone(),
            events: EventSource::Redis(store, raw, Box::new(server)),
        }
    }

    /// The shared Redis Cluster (three masters, three replicas), in a namespace of the
    /// test's own, with the default partitions.
    async fn cluster() -> Subject {
        let cluster = support::shared_cluster().await;
        let store = Arc::new(
            RedisStore::with_options(
                "redis://unused",
                None,
                &support::fresh_namespace(),
                Duration::from_secs(2),
                &keygate::store::redis::RedisOptions {
                    cluster_nodes: cluster.urls(),
                    partitions: keygate::store::redis::CLUSTER_PARTITIONS,
                    ..Default::default()
                },
            )
            .expect("cluster store"),
        );
        let raw = Raw::Cluster(
            ::redis::cluster::ClusterClient::new(cluster.urls())
                .unwrap()
                .get_async_connection()
                .await
                .expect("a connection to the test cluster"),
        );
        Subject {
            store: store.clone(),
            events: EventSource::Redis(store, raw, Box::new(())),
        }
    }

    /// Every event on the revocation stream, oldest first: (key id, kind, at_ms). For
    /// Redis this reads the stream itself (XRANGE), not the store's view of it.
    async fn events(&self) -> Vec<(String, EventKind, u64)> {
        match &self.events {
            EventSource::Memory(m) => m
                .events()
                .await
                .into_iter()
                .map(|e| (e.key_id, e.kind, e.at_ms))
                .collect(),
            EventSource::Redis(store, raw, _) => {
                let mut entries = Vec::new();
                for p in 0..store.partitions() {
                    entries.extend(raw.stream_entries(&store.events_key(p)).await);
                }
                entries
                    .into_iter()
                    .map(|(id, fields)| {
                        let field = |name: &str| {
                            fields
                                .iter()
                                .find(|(k, _)| k == name)
                                .map(|(_, v)| v.clone())
                                .unwrap_or_else(|| panic!("event {id} has no {name}: {fields:?}"))
                        };
                        let kind = match field("kind").as_str() {
                            "revoked" => EventKind::Revoked,
                            "deleted" => EventKind::Deleted,
                            "updated" => EventKind::Updated,
                            other => panic!("event {id} has an unknown kind {other}"),
                        };
                        let at_ms = field("at_ms").parse().expect("at_ms is a number");
                        (field("key_id"), kind, at_ms)
                    })
                    .collect()
            }
        }
    }
}

fn hasher() -> SecretHasher {
    SecretHasher::new(
        Secret::new("conformance-pepper-".repeat(3)),
        &Argon2Config {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
            verify_concurrency: 2,
            ..Default::default()
        },
    )
    .expect("hasher")
}

/// Every entry of every partition: each partition oldest first, partitions in order.
async fn all_entries(store: &dyn KeyStore) -> Vec<StreamEntry> {
    let mut all = Vec::new();
    for p in 0..store.partitions() {
        all.extend(
            store
                .read_events(p, EventId::START, 1000, None)
                .await
                .unwrap(),
        );
    }
    all
}

/// A record as `KeyAdmin::create` would store it, and the token it stands for.
async fn new_record(tenant: &str, name: &str) -> (KeyRecord, String) {
    let generated = apikey::generate("sk", Environment::Live);
    let hash = hasher().hash(&generated.secret).await.expect("hash");
    let now = keygate::store::now_ms();
    let record = KeyRecord {
        token_prefix: apikey::token::public_prefix("sk", Environment::Live, &generated.key_id),
        key_id: generated.key_id,
        tenant_id: tenant.to_owned(),
        partner_id: None,
        service: None,
        name: name.to_owned(),
        kind: KeyKind::Tenant,
        environment: Environment::Live,
        scopes: vec!["contacts:read".into(), "contacts:write".into()],
        plan: Some("starter".into()),
        hash,
        created_at_ms: now,
        expires_at_ms: now + 86_400_000,
        revoked_at_ms: None,
        rotated_from: None,
        usage: Default::default(),
    };
    (record, generated.token)
}

async fn created(s: &Subject, tenant: &str, name: &str) -> KeyRecord {
    let (record, _) = new_record(tenant, name).await;
    s.store.create(&record).await.expect("create");
    record
}

/// A new key whose events go to `partition` (key ids are random: a few tries).
async fn created_in(s: &Subject, partition: usize, name: &str) -> KeyRecord {
    loop {
        let (record, _) = new_record(TENANT, name).await;
        if s.store.key_partition(&record.key_id) == partition {
            s.store.create(&record).await.expect("create");
            return record;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------

async fn created_key_reads_back_with_its_hash_and_never_its_secret(s: Subject) {
    let (record, token) = new_record(TENANT, "roundtrip").await;
    s.store.create(&record).await.expect("create");

    let got = s.store.get(&record.key_id).await.expect("get");
    assert_eq!(got.as_ref(), Some(&record));
    let got = got.unwrap();
    assert!(got.hash.starts_with("$argon2id$"), "stored: {}", got.hash);
    let secret = support::secret_of(&token);
    assert!(!got.hash.contains(secret));
    assert!(!format!("{got:?}").contains(secret));
    assert!(hasher().verify(secret, &got.hash).await.unwrap());
    assert_eq!(got.status(keygate::store::now_ms()), KeyStatus::Active);

    let unknown = apikey::token::new_key_id();
    assert_eq!(s.store.get(&unknown).await.expect("get unknown"), None);
}

async fn creating_an_existing_key_id_is_a_conflict_that_changes_nothing(s: Subject) {
    let original = created(&s, TENANT, "first").await;
    let (mut impostor, _) = new_record(OTHER_TENANT, "second").await;
    impostor.key_id = original.key_id.clone();

    match s.store.create(&impostor).await {
        Err(StoreError::Conflict(id)) => assert_eq!(id, original.key_id),
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(
        s.store.get(&original.key_id).await.unwrap(),
        Some(original.clone())
    );
    let other = s
        .store
        .list(&tenant(OTHER_TENANT), None, 100)
        .await
        .unwrap();
    assert!(other.keys.is_empty(), "{:?}", other.keys);
}

async fn listing_pages_through_one_tenant_without_gaps_or_duplicates(s: Subject) {
    let mut mine = Vec::new();
    for i in 0..7 {
        mine.push(created(&s, TENANT, &format!("mine {i}")).await);
    }
    let mut theirs = Vec::new();
    for i in 0..3 {
        theirs.push(created(&s, OTHER_TENANT, &format!("theirs {i}")).await);
    }
    let deleted = mine.remove(3);
    s.store
        .delete(&deleted.key_id, keygate::store::now_ms())
        .await
        .unwrap()
        .expect("deleted");
    let revoked_at = keygate::store::now_ms();
    let revoked = s
        .store
        .revoke(&mine[1].key_id, revoked_at)
        .await
        .unwrap()
        .expect("revoked");
    mine[1] = revoked;

    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s
            .store
            .list(&tenant(TENANT), after.as_deref(), 2)
            .await
            .unwrap();
        assert!(page.keys.len() <= 2, "page over its limit: {page:?}");
        assert!(pages.len() < 10, "pagination does not end");
        if let Some(next) = &page.next_after {
            assert_eq!(
                Some(next),
                page.keys.last().map(|k| &k.key_id),
                "next_after is the last id of the page"
            );
        }
        after = page.next_after.clone();
        pages.push(page.keys);
        if after.is_none() {
            break;
        }
    }
    assert_eq!(pages.len(), 3, "6 keys in pages of 2: {pages:?}");

    let listed: Vec<KeyRecord> = pages.into_iter().flatten().collect();
    let ids: Vec<&str> = listed.iter().map(|k| k.key_id.as_str()).collect();
    let mut expected: Vec<&str> = mine.iter().map(|k| k.key_id.as_str()).collect();
    expected.sort();
    assert_eq!(ids, expected, "every key once, in key-id order");
    assert!(!ids.contains(&deleted.key_id.as_str()));
    for t in &theirs {
        assert!(!ids.contains(&t.key_id.as_str()), "another tenant's key");
    }
    // Listed records are whole, revocation included.
    let listed_revoked = listed.iter().find(|k| k.key_id == mine[1].key_id).unwrap();
    assert_eq!(listed_revoked.revoked_at_ms, Some(revoked_at));
    for k in &listed {
        assert_eq!(Some(k), mine.iter().find(|m| m.key_id == k.key_id));
    }

    let all = s.store.list(&tenant(TENANT), None, 100).await.unwrap();
    assert_eq!(all.keys.len(), 6);
    assert_eq!(all.next_after, None);
    let theirs_listed = s
        .store
        .list(&tenant(OTHER_TENANT), None, 100)
        .await
        .unwrap();
    let theirs_ids: BTreeSet<&str> = theirs_listed
        .keys
        .iter()
        .map(|k| k.key_id.as_str())
        .collect();
    assert_eq!(
        theirs_ids,
        theirs.iter().map(|k| k.key_id.as_str()).collect()
    );
    let nobody = s
        .store
        .list(&tenant("5d1b8a9c-0000-4000-8000-000000000000"), None, 100)
        .await
        .unwrap();
    assert!(nobody.keys.is_empty());
    assert_eq!(nobody.next_after, None);
}

async fn revoking_marks_the_key_once_and_appends_one_event(s: Subject) {
    let record = created(&s, TENANT, "to revoke").await;
    let other = created(&s, TENANT, "bystander").await;
    let t1 = keygate::store::now_ms();

    let revoked = s
        .store
        .revoke(&record.key_id, t1)
        .await
        .unwrap()
        .expect("the key exists");
    assert_eq!(revoked.revoked_at_ms, Some(t1));
    assert_eq!(
        KeyRecord {
            revoked_at_ms: None,
            ..revoked.clone()
        },
        record,
        "revocation changes nothing else"
    );
    let stored = s.store.get(&record.key_id).await.unwrap().unwrap();
    assert_eq!(stored.revoked_at_ms, Some(t1));
    assert_eq!(stored.status(t1), KeyStatus::Revoked);

    let again = s
        .store
        .revoke(&record.key_id, t1 + 5_000)
        .await
        .unwrap()
        .expect("the key still exists");
    assert_eq!(
        again.revoked_at_ms,
        Some(t1),
        "a second revoke changes nothing"
    );
    assert_eq!(
        s.store
            .get(&record.key_id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at_ms,
        Some(t1)
    );
    assert_eq!(
        s.store.get(&other.key_id).await.unwrap(),
        Some(other),
        "only the revoked key changes"
    );
    assert_eq!(
        s.events().await,
        vec![(record.key_id.clone(), EventKind::Revoked, t1)],
        "exactly one event for two revokes"
    );
}

async fn revoking_or_deleting_an_unknown_key_finds_nothing(s: Subject) {
    let known = created(&s, TENANT, "known").await;
    let unknown = apikey::token::new_key_id();
    let now = keygate::store::now_ms();
    assert_eq!(s.store.revoke(&unknown, now).await.unwrap(), None);
    assert_eq!(s.store.delete(&unknown, now).await.unwrap(), None);
    assert_eq!(s.store.get(&unknown).await.unwrap(), None);
    assert_eq!(s.store.get(&known.key_id).await.unwrap(), Some(known));
    assert!(s.events().await.is_empty(), "no event for an unknown key");
}

async fn deleting_removes_the_key_and_its_index_entry(s: Subject) {
    let doomed = created(&s, TENANT, "doomed").await;
    let kept = created(&s, TENANT, "kept").await;
    let t_revoke = keygate::store::now_ms();
    s.store.revoke(&doomed.key_id, t_revoke).await.unwrap();
    let t_delete = t_revoke + 1;

    let removed = s
        .store
        .delete(&doomed.key_id, t_delete)
        .await
        .unwrap()
        .expect("the key existed");
    assert_eq!(removed.key_id, doomed.key_id);
    assert_eq!(removed.tenant_id, TENANT);
    assert_eq!(s.store.get(&doomed.key_id).await.unwrap(), None);
    let listed = s.store.list(&tenant(TENANT), None, 100).await.unwrap();
    assert_eq!(listed.keys, vec![kept.clone()]);
    assert_eq!(
        s.store.delete(&doomed.key_id, t_delete + 1).await.unwrap(),
        None
    );
    assert_eq!(
        s.store.revoke(&doomed.key_id, t_delete + 2).await.unwrap(),
        None
    );

    assert_eq!(
        s.events().await,
        vec![
            (doomed.key_id.clone(), EventKind::Revoked, t_revoke),
            (doomed.key_id.clone(), EventKind::Deleted, t_delete),
        ],
        "one event per revoke and per delete, none for no-ops"
    );

    // The last key of a tenant gone: the tenant lists empty.
    s.store
        .delete(&kept.key_id, t_delete + 3)
        .await
        .unwrap()
        .unwrap();
    let empty = s.store.list(&tenant(TENANT), None, 100).await.unwrap();
    assert!(empty.keys.is_empty());
    assert_eq!(empty.next_after, None);
}

async fn revocation_events_read_back_in_order_from_any_position(s: Subject) {
    let store = &s.store;
    for p in 0..store.partitions() {
        assert_eq!(store.latest_event_id(p).await.unwrap(), EventId::START);
        assert!(store
            .read_events(p, EventId::START, 100, None)
            .await
            .unwrap()
            .is_empty());
        assert!(!store.events_lost_after(p, EventId::START).await.unwrap());
    }

    // Order holds within a partition: two keys of the last one (partition 0 on one
    // partition).
    let part = store.partitions() - 1;
    let a = created_in(&s, part, "a").await;
    let b = created_in(&s, part, "b").await;
    let t = keygate::store::now_ms();
    store.revoke(&a.key_id, t).await.unwrap().unwrap();
    store.revoke(&b.key_id, t).await.unwrap().unwrap();
    store.delete(&a.key_id, t + 1).await.unwrap().unwrap();

    let all = store
        .read_events(part, EventId::START, 100, None)
        .await
        .unwrap();
    assert_eq!(all, all_entries(store.as_ref()).await, "nothing elsewhere");
    let summary: Vec<(&str, EventKind, u64)> = all
        .iter()
        .map(|e| e.event().expect("an event keygate wrote reads back"))
        .map(|e| (e.key_id.as_str(), e.kind, e.at_ms))
        .collect();
    assert_eq!(
        summary,
        vec![
            (a.key_id.as_str(), EventKind::Revoked, t),
            (b.key_id.as_str(), EventKind::Revoked, t),
            (a.key_id.as_str(), EventKind::Deleted, t + 1),
        ]
    );
    let positions: Vec<EventId> = all.iter().map(|e| e.position()).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "ids strictly increase: {positions:?}"
    );
    assert_eq!(store.latest_event_id(part).await.unwrap(), positions[2]);

    // Resuming from any position yields exactly what came after it.
    assert_eq!(
        store
            .read_events(part, positions[0], 100, None)
            .await
            .unwrap(),
        all[1..].to_vec()
    );
    assert_eq!(
        store
            .read_events(part, EventId::START, 2, None)
            .await
            .unwrap(),
        all[..2].to_vec()
    );
    assert!(store
        .read_events(part, positions[2], 100, None)
        .await
        .unwrap()
        .is_empty());
    for p in [EventId::START, positions[0], positions[2]] {
        assert!(
            !store.events_lost_after(part, p).await.unwrap(),
            "nothing lost after {p}"
        );
    }
    // A position the stream never reached: the stream was reset under the reader.
    let beyond = EventId {
        ms: positions[2].ms + 60_000,
        seq: 0,
    };
    assert!(store.events_lost_after(part, beyond).await.unwrap());

    // A blocking read with nothing new returns empty when its block ends (the bound is
    // against a hang only).
    let quiet = tokio::time::timeout(
        support::PATIENCE,
        store.read_events(part, positions[2], 100, Some(Duration::from_millis(200))),
    )
    .await
    .expect("a blocking read with nothing new ends with its block")
    .unwrap();
    assert!(quiet.is_empty());

    // A blocking read returns the event appended while it waits (or just before). Its
    // block is an hour: a read that did not wake on the event could not pass by ending
    // its block instead.
    let c = created_in(&s, part, "c").await;
    let reader = {
        let store = store.clone();
        let after = positions[2];
        tokio::spawn(async move {
            store
                .read_events(part, after, 100, Some(Duration::from_secs(3600)))
                .await
        })
    };
    store
        .revoke(&c.key_id, keygate::store::now_ms())
        .await
        .unwrap()
        .unwrap();
    let woke = tokio::time::timeout(support::PATIENCE, reader)
        .await
        .expect("the blocked read wakes on the new event, long before its block ends")
        .unwrap()
        .unwrap();
    assert_eq!(woke.len(), 1);
    let woke = woke[0].event().expect("an event keygate wrote reads back");
    assert_eq!(woke.key_id, c.key_id);
    assert_eq!(woke.kind, EventKind::Revoked);
}

async fn updating_changes_only_the_named_fields_and_appends_one_event(s: Subject) {
    let record = created(&s, TENANT, "to update").await;
    let other = created(&s, TENANT, "bystander").await;
    let t = keygate::store::now_ms();
    let change = KeyChange {
        name: Some("renamed".into()),
        scopes: Some(vec!["contacts:write".into()]),
        plan: Some(Some("pro".into())),
        expires_at_ms: None,
    };
    let updated = s
        .store
        .update(&record.key_id, &change, t)
        .await
        .unwrap()
        .expect("the key exists");
    let expected = KeyRecord {
        name: "renamed".into(),
        scopes: vec!["contacts:write".into()],
        plan: Some("pro".into()),
        ..record.clone()
    };
    assert_eq!(updated, expected);
    assert_eq!(
        s.store.get(&record.key_id).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(s.store.get(&other.key_id).await.unwrap(), Some(other));
    // Clearing the plan and moving the expiry; the hash, tenant and kind never change.
    let cleared = KeyChange {
        plan: Some(None),
        expires_at_ms: Some(t + 60_000),
        ..KeyChange::default()
    };
    let updated = s
        .store
        .update(&record.key_id, &cleared, t + 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.plan, None);
    assert_eq!(updated.expires_at_ms, t + 60_000);
    assert_eq!(updated.hash, record.hash);
    assert_eq!(updated.tenant_id, record.tenant_id);
    // An update keeps a revocation: it is not a way back.
    s.store
        .revoke(&record.key_id, t + 2)
        .await
        .unwrap()
        .unwrap();
    let after_revoke = s
        .store
        .update(&record.key_id, &change, t + 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after_revoke.revoked_at_ms, Some(t + 2));
    assert_eq!(
        s.store
            .get(&record.key_id)
            .await
            .unwrap()
            .unwrap()
            .status(t + 3),
        KeyStatus::Revoked
    );
    assert_eq!(
        s.events().await,
        vec![
            (record.key_id.clone(), EventKind::Updated, t),
            (record.key_id.clone(), EventKind::Updated, t + 1),
            (record.key_id.clone(), EventKind::Revoked, t + 2),
            (record.key_id.clone(), EventKind::Updated, t + 3),
        ]
    );
    // An unknown key: nothing changes, no event.
    assert_eq!(
        s.store
            .update("ZZZZZZZZZZZZZZZZ", &change, t + 4)
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.events().await.len(), 4);
}

async fn keys_of_partners_and_services_are_listed_under_their_owner_only(s: Subject) {
    let (mut partner_key, _) = new_record("", "partner").await;
    partner_key.kind = KeyKind::Partner;
    partner_key.partner_id = Some("acme".into());
    let (mut runtime_key, _) = new_record("", "runtime").await;
    runtime_key.kind = KeyKind::Runtime;
    runtime_key.service = Some("billing-worker".into());
    s.store.create(&partner_key).await.unwrap();
    s.store.create(&runtime_key).await.unwrap();
    let ids =
        |page: keygate::store::KeyPage| page.keys.into_iter().map(|k| k.key_id).collect::<Vec<_>>();
    let partner = Owner::Partner("acme".into());
    let service = Owner::Service("billing-worker".into());
    assert_eq!(
        ids(s.store.list(&partner, None, 10).await.unwrap()),
        vec![partner_key.key_id.clone()]
    );
    assert_eq!(
        ids(s.store.list(&service, None, 10).await.unwrap()),
        vec![runtime_key.key_id.clone()]
    );
    // Read back whole, owner included.
    assert_eq!(
        s.store.get(&partner_key.key_id).await.unwrap(),
        Some(partner_key.clone())
    );
    assert_eq!(
        ids(s.store.list(&tenant(""), None, 10).await.unwrap()),
        Vec::<String>::new()
    );
    s.store.delete(&partner_key.key_id, 1).await.unwrap();
    assert_eq!(
        ids(s.store.list(&partner, None, 10).await.unwrap()),
        Vec::<String>::new()
    );
}

async fn delegations_are_granted_and_withdrawn_once_each_with_one_event(s: Subject) {
    let d = |p: &str, t: &str| Delegation {
        partner_id: p.into(),
        tenant_id: t.into(),
    };
    assert!(!s.store.is_delegated("acme", TENANT).await.unwrap());
    assert!(s
        .store
        .set_delegation(&d("acme", TENANT), true, 10)
        .await
        .unwrap());
    assert!(
        !s.store
            .set_delegation(&d("acme", TENANT), true, 11)
            .await
            .unwrap(),
        "granted twice: no change"
    );
    assert!(s
        .store
        .set_delegation(&d("acme", OTHER_TENANT), true, 12)
        .await
        .unwrap());
    assert!(s
        .store
        .set_delegation(&d("globex", TENANT), true, 13)
        .await
        .unwrap());
    assert!(s.store.is_delegated("acme", TENANT).await.unwrap());
    assert!(!s.store.is_delegated("globex", OTHER_TENANT).await.unwrap());
    let mut acme_tenants = vec![d("acme", TENANT), d("acme", OTHER_TENANT)];
    acme_tenants.sort();
    assert_eq!(
        s.store
            .delegations(&DelegationsOf::Partner("acme".into()))
            .await
            .unwrap(),
        acme_tenants
    );
    assert_eq!(
        s.store
            .delegations(&DelegationsOf::Tenant(TENANT.into()))
            .await
            .unwrap(),
        vec![d("acme", TENANT), d("globex", TENANT)]
    );
    assert!(s
        .store
        .set_delegation(&d("acme", TENANT), false, 14)
        .await
        .unwrap());
    assert!(!s
        .store
        .set_delegation(&d("acme", TENANT), false, 15)
        .await
        .unwrap());
    assert!(!s.store.is_delegated("acme", TENANT).await.unwrap());
    assert_eq!(
        s.store
            .delegations(&DelegationsOf::Tenant(TENANT.into()))
            .await
            .unwrap(),
        vec![d("globex", TENANT)]
    );
    // In order per partner (a partner's changes share its partition).
    let changes: Vec<(String, String, bool)> = all_entries(s.store.as_ref())
        .await
        .into_iter()
        .map(|e| match e {
            StreamEntry::Delegation(d) => (d.partner_id, d.tenant_id, d.granted),
            other => panic!("not a delegation change: {other:?}"),
        })
        .collect();
    let change = |p: &str, t: &str, g| (p.to_owned(), t.to_owned(), g);
    let of = |partner: &str| -> Vec<(String, String, bool)> {
        changes.iter().filter(|c| c.0 == partner).cloned().collect()
    };
    assert_eq!(changes.len(), 4, "{changes:?}");
    assert_eq!(
        of("acme"),
        vec![
            change("acme", TENANT, true),
            change("acme", OTHER_TENANT, true),
            change("acme", TENANT, false),
        ]
    );
    assert_eq!(of("globex"), vec![change("globex", TENANT, true)]);
}

/// A reservation asked of `s`'s store: `want` under `rule`, named `id`, returning `back`.
fn rate_request(
    rule: keygate::store::RateRule,
    id: &str,
    want: u32,
    back: &[(&str, Option<u32>)],
) -> keygate::store::RateRequest {
    keygate::store::RateRequest {
        rule,
        id: id.into(),
        want,
        spend_ms: 100,
        give_back: back
            .iter()
            .map(|(id, unspent)| keygate::store::GiveBack {
                id: (*id).into(),
                unspent: *unspent,
            })
            .collect(),
    }
}

/// One a minute, a burst of 3: nothing refills while the test runs.
const SLOW_GCRA: keygate::store::RateRule = keygate::store::RateRule::Gcra {
    interval_ms: 60_000,
    burst: 3,
};

/// Three in any minute.
const THREE_A_MINUTE: keygate::store::RateRule = keygate::store::RateRule::Window {
    limit: 3,
    window_ms: 60_000,
};

async fn rate_reservations_follow_gcra_and_leases_their_limit(s: Subject) {
    use keygate::store::LeaseOp;
    let req = |id, want, back| rate_request(SLOW_GCRA, id, want, back);
    let g = s.store.reserve("k1", &req("a", 2, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining), (2, 1));
    let g = s.store.reserve("k1", &req("b", 5, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining), (1, 0));
    let g = s.store.reserve("k1", &req("c", 1, &[])).await.unwrap();
    assert_eq!(g.granted, 0);
    assert!((59_000..=60_000).contains(&g.retry_after_ms), "{g:?}");
    assert!((179_000..=180_000).contains(&g.full_in_ms), "{g:?}");
    // Given back, it can be reserved again; another key is untouched.
    let g = s
        .store
        .reserve("k1", &req("d", 1, &[("b", Some(1))]))
        .await
        .unwrap();
    assert_eq!((g.granted, g.remaining), (1, 0));
    let g = s.store.reserve("k2", &req("a", 3, &[])).await.unwrap();
    assert_eq!(g.granted, 3);

    let acquire = LeaseOp::Acquire {
        ttl_ms: 60_000,
        limit: 2,
    };
    let l = |done, held| keygate::store::LeaseResult { done, held };
    assert_eq!(
        s.store.lease("k1", "k1.a", acquire).await.unwrap(),
        l(true, 1)
    );
    assert_eq!(
        s.store.lease("k1", "k1.b", acquire).await.unwrap(),
        l(true, 2)
    );
    assert_eq!(
        s.store.lease("k1", "k1.c", acquire).await.unwrap(),
        l(false, 2)
    );
    let renew = LeaseOp::Renew { ttl_ms: 60_000 };
    assert_eq!(
        s.store.lease("k1", "k1.a", renew).await.unwrap(),
        l(true, 2)
    );
    assert_eq!(
        s.store.lease("k1", "k1.c", renew).await.unwrap(),
        l(false, 2)
    );
    assert_eq!(
        s.store.lease("k1", "k1.a", LeaseOp::Release).await.unwrap(),
        l(true, 1)
    );
    assert_eq!(
        s.store.lease("k1", "k1.a", LeaseOp::Release).await.unwrap(),
        l(false, 1)
    );
    assert_eq!(
        s.store.lease("k1", "k1.c", acquire).await.unwrap(),
        l(true, 2)
    );
    // A lease of another key does not count here.
    assert_eq!(
        s.store.lease("k2", "k2.a", acquire).await.unwrap(),
        l(true, 1)
    );
}

/// A reply lost to a timeout, or a client that sends a call again, must not change what
/// the store granted: a reservation asked twice (same id) is granted once, and the same
/// give-back applied twice returns its budget once — for both rules.
async fn a_reservation_and_its_give_back_each_apply_once(s: Subject) {
    for (rule, key) in [(SLOW_GCRA, "g1"), (THREE_A_MINUTE, "w1")] {
        let req = |id, want, back| rate_request(rule, id, want, back);
        let g = s.store.reserve(key, &req("a", 3, &[])).await.unwrap();
        assert_eq!((g.granted, g.remaining), (3, 0), "{rule:?}");
        // Sent again (its answer lost): the first answer, nothing more taken.
        let g = s.store.reserve(key, &req("a", 3, &[])).await.unwrap();
        assert_eq!((g.granted, g.remaining), (3, 0), "{rule:?}: asked again");
        // Two of the three were not spent: returned once, however often it is named.
        let g = s
            .store
            .reserve(key, &req("b", 0, &[("a", Some(2))]))
            .await
            .unwrap();
        assert_eq!(g.remaining, 2, "{rule:?}: returned");
        let g = s
            .store
            .reserve(key, &req("c", 0, &[("a", Some(2)), ("a", Some(2))]))
            .await
            .unwrap();
        assert_eq!(
            g.remaining, 2,
            "{rule:?}: the same give-back again adds nothing"
        );
        // A call that carried a give-back, sent again, returns nothing twice either.
        let g = s.store.reserve(key, &req("d", 2, &[])).await.unwrap();
        assert_eq!((g.granted, g.remaining), (2, 0), "{rule:?}");
        for _ in 0..2 {
            let g = s
                .store
                .reserve(key, &req("e", 1, &[("d", None)]))
                .await
                .unwrap();
            assert_eq!((g.granted, g.remaining), (1, 1), "{rule:?}: all of d, once");
        }
        // One the store never granted, or more than it granted, returns nothing more.
        let g = s
            .store
            .reserve(key, &req("f", 0, &[("unknown", None), ("e", Some(100))]))
            .await
            .unwrap();
        assert_eq!(
            g.remaining, 2,
            "{rule:?}: e's one back, nothing else (a's one spent)"
        );
    }
}

/// A rolling window admits its limit in any window, all at once if asked so; each
/// admission counts until a window after the end of the time it may be spent in.
async fn a_rolling_window_admits_its_limit_in_any_window(s: Subject) {
    let req = |id, want, back| rate_request(THREE_A_MINUTE, id, want, back);
    let g = s.store.reserve("w", &req("a", 2, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining, g.retry_after_ms), (2, 1, 0));
    // Counted from the end of its spending time (100 ms, and 1 for the clock's rounding).
    assert!((60_000..=60_101).contains(&g.full_in_ms), "{g:?}");
    let g = s.store.reserve("w", &req("b", 5, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining), (1, 0));
    let g = s.store.reserve("w", &req("c", 1, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining), (0, 0));
    // One fits again when the first reservation's admissions leave the window.
    assert!((55_000..=60_101).contains(&g.retry_after_ms), "{g:?}");
    let g = s
        .store
        .reserve("w", &req("d", 1, &[("b", Some(1))]))
        .await
        .unwrap();
    assert_eq!(
        (g.granted, g.remaining),
        (1, 0),
        "b's unspent one, reserved again"
    );
    let g = s.store.reserve("w2", &req("a", 4, &[])).await.unwrap();
    assert_eq!(g.granted, 3, "another key has its own window");
}

fn tenant(id: &str) -> Owner {
    Owner::Tenant(id.to_owned())
}

fn revoked_subject(before_ms: u64, at_ms: u64, expires_at_ms: u64) -> TokenRevocation {
    TokenRevocation {
        issuer: "idp".into(),
        target: TokenTarget::Subject {
            subject: "alice".into(),
            before_ms,
        },
        at_ms,
        expires_at_ms,
    }
}

fn revoked_jti(jti: &str, at_ms: u64, expires_at_ms: u64) -> TokenRevocation {
    TokenRevocation {
        issuer: "idp".into(),
        target: TokenTarget::Jti { jti: jti.into() },
        at_ms,
        expires_at_ms,
    }
}

async fn token_revocations_merge_and_append_one_event_per_change(s: Subject) {
    let now = now_ms();
    let first = revoked_subject(now - 5_000, now, now + 60_000);
    assert_eq!(s.store.revoke_tokens(&first).await.unwrap(), first);
    // An earlier cut-off with an earlier expiry adds nothing: no change, no event.
    let weaker = revoked_subject(now - 9_000, now + 1, now + 30_000);
    assert_eq!(s.store.revoke_tokens(&weaker).await.unwrap(), first);
    // A later cut-off wins, with its own expiry.
    let later = revoked_subject(now - 1_000, now + 2, now + 90_000);
    assert_eq!(s.store.revoke_tokens(&later).await.unwrap(), later);
    let jti = revoked_jti("t-1", now + 3, now + 60_000);
    assert_eq!(s.store.revoke_tokens(&jti).await.unwrap(), jti);
    // One that no token can match any more is not listed.
    let spent = revoked_jti("t-0", now + 4, now - 1);
    s.store.revoke_tokens(&spent).await.unwrap();

    let mut listed = s.store.token_revocations(now + 5).await.unwrap();
    listed.sort_by_key(TokenRevocation::rule_key);
    assert_eq!(listed, vec![jti.clone(), later.clone()]);

    // One event per change, in order per rule (a rule's events share its partition).
    let entries = all_entries(s.store.as_ref()).await;
    let carried: Vec<TokenRevocation> = entries
        .iter()
        .map(|e| match e {
            StreamEntry::Tokens(t) => t.revocation.clone(),
            other => panic!("not a token revocation: {other:?}"),
        })
        .collect();
    assert_eq!(carried.len(), 4, "{carried:?}");
    let of = |rule: &TokenRevocation| -> Vec<TokenRevocation> {
        carried
            .iter()
            .filter(|c| c.rule_key() == rule.rule_key())
            .cloned()
            .collect()
    };
    assert_eq!(of(&first), vec![first.clone(), later]);
    assert_eq!(of(&jti), vec![jti.clone()]);
    assert_eq!(of(&spent), vec![spent.clone()]);
    for p in 0..s.store.partitions() {
        let mine = s
            .store
            .read_events(p, EventId::START, 100, None)
            .await
            .unwrap();
        let positions: Vec<EventId> = mine.iter().map(StreamEntry::position).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        assert_eq!(
            s.store.latest_event_id(p).await.unwrap(),
            positions.last().copied().unwrap_or(EventId::START)
        );
    }
}

async fn usage_adds_up_per_key_and_never_recreates_a_deleted_key(s: Subject) {
    use keygate::store::{KeyUsage, UsageDelta};
    let a = created(&s, TENANT, "a").await;
    let b = created(&s, TENANT, "b").await;
    let delta = |key: &KeyRecord, allowed, denied, last| UsageDelta {
        key_id: key.key_id.clone(),
        allowed,
        denied,
        last_used_at_ms: last,
    };
    s.store
        .add_usage(&[delta(&a, 3, 1, 2_000), delta(&b, 2, 0, 3_000)])
        .await
        .unwrap();
    // A later batch adds; an older last use does not move it back.
    s.store.add_usage(&[delta(&a, 1, 1, 1_000)]).await.unwrap();
    let usage = |r: Option<KeyRecord>| r.expect("the key exists").usage;
    assert_eq!(
        usage(s.store.get(&a.key_id).await.unwrap()),
        KeyUsage {
            allowed: 4,
            denied: 2,
            last_used_at_ms: Some(2_000)
        }
    );
    // Revoking keeps the counts, and counting keeps the revocation.
    let revoked = s.store.revoke(&a.key_id, 5_000).await.unwrap().unwrap();
    assert_eq!(
        (revoked.revoked_at_ms, revoked.usage.allowed),
        (Some(5_000), 4)
    );
    s.store.add_usage(&[delta(&a, 1, 0, 6_000)]).await.unwrap();
    let after = s.store.get(&a.key_id).await.unwrap().unwrap();
    assert_eq!(after.revoked_at_ms, Some(5_000));
    assert_eq!(
        (after.usage.allowed, after.usage.last_used_at_ms),
        (5, Some(6_000))
    );
    // An update changes the record, not its counts.
    let renamed = s
        .store
        .update(
            &a.key_id,
            &KeyChange {
                name: Some("renamed".into()),
                ..Default::default()
            },
            7_000,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.usage.allowed),
        ("renamed", 5)
    );
    assert_eq!(
        s.store.get(&a.key_id).await.unwrap().unwrap().usage.allowed,
        5
    );
    // Usage of a key deleted meanwhile is dropped, not a new record.
    s.store.delete(&b.key_id, 8_000).await.unwrap().unwrap();
    s.store.add_usage(&[delta(&b, 9, 9, 9_000)]).await.unwrap();
    assert_eq!(s.store.get(&b.key_id).await.unwrap(), None);
    assert!(s
        .store
        .list(&tenant(TENANT), None, 10)
        .await
        .unwrap()
        .keys
        .iter()
        .all(|k| k.key_id != b.key_id));
}

/// A batch of more keys than one Redis script call takes: `n` keys, and what each is
/// counted, `(allowed, denied, last used)`.
async fn many_usage_deltas(s: &Subject, n: usize) -> Vec<keygate::store::UsageDelta> {
    let mut deltas = Vec::with_capacity(n);
    for i in 0..n {
        let key = created(s, TENANT, &format!("many-{i}")).await;
        deltas.push(keygate::store::UsageDelta {
            key_id: key.key_id,
            allowed: i as u64 % 7 + 1,
            denied: i as u64 % 3,
            last_used_at_ms: 1_000 + i as u64,
        });
    }
    deltas
}

/// Every key of `deltas` holds exactly its delta.
async fn usage_is_exactly(s: &Subject, deltas: &[keygate::store::UsageDelta]) {
    for d in deltas {
        let usage = s.store.get(&d.key_id).await.unwrap().unwrap().usage;
        assert_eq!(
            usage,
            keygate::store::KeyUsage {
                allowed: d.allowed,
                denied: d.denied,
                last_used_at_ms: Some(d.last_used_at_ms),
            },
            "key {}",
            d.key_id
        );
    }
}

async fn usage_of_more_keys_than_one_script_call_takes_adds_up(s: Subject) {
    let n = 2 * keygate::store::redis::USAGE_KEYS_PER_CALL + 100;
    let deltas = many_usage_deltas(&s, n).await;
    s.store.add_usage(&deltas).await.unwrap();
    usage_is_exactly(&s, &deltas).await;
}

macro_rules! conformance {
    ($($case:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Subject::memory().await).await;
                }
            )+
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Subject::redis().await).await;
                }
            )+
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Subject::cluster().await).await;
                }
            )+
        }
    };
}

conformance!(
    created_key_reads_back_with_its_hash_and_never_its_secret,
    creating_an_existing_key_id_is_a_conflict_that_changes_nothing,
    listing_pages_through_one_tenant_without_gaps_or_duplicates,
    revoking_marks_the_key_once_and_appends_one_event,
    revoking_or_deleting_an_unknown_key_finds_nothing,
    deleting_removes_the_key_and_its_index_entry,
    revocation_events_read_back_in_order_from_any_position,
    updating_changes_only_the_named_fields_and_appends_one_event,
    token_revocations_merge_and_append_one_event_per_change,
    keys_of_partners_and_services_are_listed_under_their_owner_only,
    delegations_are_granted_and_withdrawn_once_each_with_one_event,
    rate_reservations_follow_gcra_and_leases_their_limit,
    a_reservation_and_its_give_back_each_apply_once,
    a_rolling_window_admits_its_limit_in_any_window,
    usage_adds_up_per_key_and_never_recreates_a_deleted_key,
    usage_of_more_keys_than_one_script_call_takes_adds_up,
);

/// Redis runs nothing else while a script runs: a batch of more keys than
/// `USAGE_KEYS_PER_CALL` is written in several script calls, each of at most that many
/// keys, and every count adds up.
#[tokio::test]
async fn a_usage_batch_larger_than_one_script_call_is_written_in_several() {
    let s = Subject::redis().await;
    let per_call = keygate::store::redis::USAGE_KEYS_PER_CALL;
    let deltas = many_usage_deltas(&s, 2 * per_call + 100).await;
    let EventSource::Redis(_, Raw::Single(raw), _) = &s.events else {
        unreachable!("a single Redis")
    };
    let mut raw = raw.clone();
    // Loads the script, so that what is counted below is only the batch's calls.
    s.store.add_usage(&deltas[..1]).await.unwrap();
    let () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut raw)
        .await
        .unwrap();
    s.store.add_usage(&deltas[1..]).await.unwrap();
    let stats: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut raw)
        .await
        .unwrap();
    let calls_of = |command: &str| -> usize {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .map_or(0, |rest| {
                rest.split(',').next().unwrap().parse().expect("a number")
            })
    };
    // One partition here: the calls are the batch's size divided by the bound, rounded up.
    assert_eq!(s.store.partitions(), 1);
    let batch = deltas.len() - 1;
    assert_eq!(
        (calls_of("evalsha"), calls_of("eval")),
        (batch.div_ceil(per_call), 0),
        "{stats}"
    );
    // Each key's counters are two increments: every key of the batch, once.
    assert_eq!(calls_of("hincrby"), 2 * batch, "{stats}");
    usage_is_exactly(&s, &deltas).await;
}

/// A token revocation this version cannot read (corrupt, or a newer shape) names no key:
/// a reader must flush everything, which `Unreadable` without a key id tells it to do.
#[tokio::test]
async fn an_unreadable_token_revocation_on_the_stream_is_unreadable_without_a_key() {
    let s = Subject::redis().await;
    let EventSource::Redis(store, Raw::Single(conn), _) = &s.events else {
        unreachable!()
    };
    let mut conn = conn.clone();
    let _: String = ::redis::cmd("XADD")
        .arg(store.events_key(0))
        .arg("*")
        .arg("kind")
        .arg(keygate::store::TOKENS_REVOKED)
        .arg("rule")
        .arg("{\"issuer\": \"idp\"")
        .query_async(&mut conn)
        .await
        .unwrap();
    let entries = s
        .store
        .read_events(0, EventId::START, 10, None)
        .await
        .unwrap();
    assert!(
        matches!(
            entries.as_slice(),
            [StreamEntry::Unreadable { key_id: None, .. }]
        ),
        "{entries:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Redis only
// ---------------------------------------------------------------------------------------

/// At rest, a Redis dump alone must not let anyone use a key. Keys are made
/// through the real admin path, used, guessed at and revoked before the dump is read.
#[tokio::test]
async fn redis_dump_holds_neither_token_nor_secret() {
    let redis = RedisServer::start().await;
    let secrets = support::secrets();
    let app = App::build(support::config(Backend::Redis(&redis)), secrets.clone()).unwrap();
    let envoy = app.envoy_service();

    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(app.admin.create(support::reader_key()).await.unwrap());
    }
    let used = &tokens[0];
    assert_eq!(
        support::outcome(&envoy.decide(support::read_with(&used.token)).await),
        support::Outcome::Allowed
    );
    let guess = support::wrong_secret_for(&used.token);
    assert_eq!(
        support::outcome(&envoy.decide(support::read_with(&guess)).await),
        support::Outcome::denied("invalid_api_key", 401)
    );
    app.admin.revoke(&tokens[1].record.key_id).await.unwrap();
    app.admin.delete(&tokens[2].record.key_id).await.unwrap();

    let dump = support::dump(&mut redis.connection().await).await;
    // The dump is real: it holds the live keys and their hashes.
    for t in &tokens[..2] {
        assert!(dump.contains(&t.record.key_id), "{dump}");
        assert!(dump.contains(&t.record.hash), "{dump}");
    }
    assert!(dump.contains("$argon2id$"));
    for t in &tokens {
        let secret = support::secret_of(&t.token);
        assert!(!dump.contains(&t.token), "a full token in Redis:\n{dump}");
        assert!(!dump.contains(secret), "a key secret in Redis:\n{dump}");
    }
    assert!(!dump.contains(support::secret_of(&guess)));
    assert!(
        !dump.contains(secrets.pepper.expose()),
        "the pepper in Redis"
    );
    assert!(!dump.contains(secrets.admin_token.expose()));
}

/// The stream carries what replicas need to act on, for keys revoked through the admin
/// path: one `revoked` and one `deleted` event, in order, naming the key id.
#[tokio::test]
async fn admin_revoke_and_delete_each_append_one_stream_event() {
    let redis = RedisServer::start().await;
    let app = App::build(support::config(Backend::Redis(&redis)), support::secrets()).unwrap();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let key_id = key.record.key_id.clone();
    app.admin.revoke(&key_id).await.unwrap();
    app.admin.revoke(&key_id).await.unwrap();
    app.admin.delete(&key_id).await.unwrap();

    let store = RedisStore::new(&redis.url(), None, "kgtest", Duration::from_secs(2)).unwrap();
    let entries =
        support::stream_entries(&mut redis.connection().await, &store.events_key(0)).await;
    let summary: Vec<(String, String)> = entries
        .iter()
        .map(|(_, fields)| {
            let get = |n: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            (get("key_id"), get("kind"))
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (key_id.clone(), "revoked".to_owned()),
            (key_id, "deleted".to_owned()),
        ]
    );
}

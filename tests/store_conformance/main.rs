//! One suite of store behaviours, run against every backend (the Limitador habit): the
//! in-process `MemoryStore`, the `RedisStore` against a real `redis-server`, and the same
//! against a real Redis Cluster. A module per store trait (`keygate::store`), so the suite
//! reads like the traits it checks. A backend that passes here can replace the other
//! without a caller noticing.

use keygate::apikey::{self, SecretHasher};
use keygate::config::Argon2Config;
use keygate::principal::{Environment, KeyKind};
use keygate::secret::Secret;
use keygate::server::App;
use keygate::store::memory::MemoryStore;
use keygate::store::redis::RedisStore;
use keygate::store::{
    now_ms, Delegation, DelegationsOf, EventId, EventKind, EventLog, KeyChange, KeyRecord,
    KeyStatus, KeyStore, Owner, StoreError, StreamEntry, TokenRevocation, TokenTarget,
};
use keygate_test_support as support;
use keygate_test_support::{Backend, RedisServer, OTHER_TENANT, TENANT};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

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
                            field_of(&fields, name)
                                .unwrap_or_else(|| panic!("event {id} has no {name}: {fields:?}"))
                        };
                        let kind = match field("kind") {
                            "revoked" => EventKind::Revoked,
                            "deleted" => EventKind::Deleted,
                            "updated" => EventKind::Updated,
                            other => panic!("event {id} has an unknown kind {other}"),
                        };
                        let at_ms = field("at_ms").parse().expect("at_ms is a number");
                        (field("key_id").to_owned(), kind, at_ms)
                    })
                    .collect()
            }
        }
    }
}

/// Reads of the store that must find the key: each fails the test if it is not there.
impl Subject {
    async fn stored(&self, key_id: &str) -> KeyRecord {
        let found = self.store.get(key_id).await.expect("get");
        found.unwrap_or_else(|| panic!("{key_id} is stored"))
    }

    async fn revoked(&self, key_id: &str, at_ms: u64) -> KeyRecord {
        let found = self.store.revoke(key_id, at_ms).await.expect("revoke");
        found.unwrap_or_else(|| panic!("{key_id} is there to revoke"))
    }

    async fn updated(&self, key_id: &str, change: &KeyChange, at_ms: u64) -> KeyRecord {
        let found = self
            .store
            .update(key_id, change, at_ms)
            .await
            .expect("update");
        found.unwrap_or_else(|| panic!("{key_id} is there to update"))
    }

    async fn deleted(&self, key_id: &str, at_ms: u64) -> KeyRecord {
        let found = self.store.delete(key_id, at_ms).await.expect("delete");
        found.unwrap_or_else(|| panic!("{key_id} is there to delete"))
    }

    /// `owner` has no key: an empty first page, and no next one.
    async fn lists_nothing(&self, owner: &Owner) {
        let page = self.store.list(owner, None, 100).await.expect("list");
        assert!(page.keys.is_empty(), "{owner:?} has keys: {:?}", page.keys);
        assert_eq!(page.next_after, None);
    }
}

/// The value of `name` among a stream entry's fields.
fn field_of<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
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

fn tenant(id: &str) -> Owner {
    Owner::Tenant(id.to_owned())
}

/// Runs each named case on every backend: `<module>::memory::<case>`, `…::redis::…`,
/// `…::cluster::…`.
macro_rules! conformance {
    ($($case:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case($crate::Subject::memory().await).await;
                }
            )+
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case($crate::Subject::redis().await).await;
                }
            )+
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case($crate::Subject::cluster().await).await;
                }
            )+
        }
    };
}

mod audit_log;
mod delegations;
mod event_log;
mod key_records;
mod rate_ledger;
mod token_revocations;
mod usage_sink;

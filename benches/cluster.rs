//! keygate on a Redis Cluster beside one Redis, in the same run.
//!
//! 1. Memory: N key records (default 1,000,000; realistic records: an argon2id PHC string
//!    of the production cost, a tenant UUID, one scope, a short name) written through the
//!    store, then Redis's own `used_memory` delta per key (summed over the masters on the
//!    Cluster), and `MEMORY USAGE` of one record and of its tenant-index entry.
//! 2. Cold-key verification: the first check of each of K new keys (argon2 at its
//!    production cost), and the store read alone, single Redis and Cluster.
//! 3. Revocation propagation: R revocations made through replica A, timed until replica B
//!    has applied each (its follower's event), single Redis and Cluster.
//!
//! Run: `scripts/bench cluster` (`cargo bench --bench cluster -- --keys 100000` for fewer).

use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use keygate::revocation::FeedItem;
use keygate::server::App;
use keygate::store::redis::{RedisOptions, RedisStore, CLUSTER_PARTITIONS};
use keygate::store::{KeyRecord, KeyRecords, KeyStore};
use keygate_test_support::*;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn ms(d: u64) -> String {
    format!("{:.2} ms", d as f64 / 1000.0)
}

fn summary(h: &Histogram<u64>) -> String {
    format!(
        "p50 {}, p99 {}, max {}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

/// What the data takes on each of `ports`, summed: Redis's `used_memory` less its
/// buffers for clients and replicas (which a burst of writes fills for a while).
async fn used_memory(ports: &[u16]) -> u64 {
    let mut total = 0;
    for port in ports {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .unwrap();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("INFO memory has {name}"))
        };
        total += field("used_memory")
            - field("mem_clients_slaves")
            - field("mem_clients_normal")
            - field("mem_replication_backlog")
            - field("mem_aof_buffer");
    }
    total
}

/// A record as `keys create` writes it, with a fresh key id, of the `i / per_tenant`-th
/// tenant.
fn record(template: &KeyRecord, i: usize, per_tenant: usize) -> KeyRecord {
    let mut r = template.clone();
    r.key_id = keygate::apikey::token::new_key_id();
    r.token_prefix = format!("sk_live_{}", r.key_id);
    let t = (i / per_tenant) as u128;
    r.tenant_id = uuid::Uuid::from_u128(0x9f1c7d4e_2b7a_4c1e_9d55_000000000000 + t)
        .hyphenated()
        .to_string();
    r
}

async fn fill(store: &RedisStore, template: &KeyRecord, n: usize, per_tenant: usize) -> Duration {
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let r = record(template, i, per_tenant);
            async move { store.create(&r).await.expect("create") }
        })
        .buffer_unordered(256)
        .collect::<Vec<()>>()
        .await;
    started.elapsed()
}

/// MEMORY USAGE of a key's record (on whichever node holds it).
async fn memory_usage(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> u64 {
    redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(conn)
        .await
        .unwrap()
}

struct Setup {
    name: &'static str,
    backend: Backend<'static>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let keys = arg("--keys", 1_000_000);
    let per_tenant = arg("--keys-per-tenant", 10);
    let cold = arg("--cold", 100);
    let revocations = arg("--revocations", 200);
    let single: &'static RedisServer = Box::leak(Box::new(RedisServer::start().await));
    let cluster: &'static RedisCluster = Box::leak(Box::new(RedisCluster::start().await));

    // One realistic record: what `keys create` stores, hash of the production cost.
    let secrets = secrets();
    let mut cfg = config(Backend::Memory);
    cfg.api_keys.argon2 = keygate::config::Argon2Config::default();
    let template_app = App::build(cfg, secrets.clone()).unwrap();
    let template = template_app
        .admin
        .create(reader_key())
        .await
        .unwrap()
        .record;
    let json = serde_json::to_string(&template).unwrap();
    println!(
        "record JSON: {} bytes; packed: {} bytes",
        json.len(),
        keygate::store::packed::encode(&template).unwrap().len()
    );

    println!("\n## Memory, {keys} keys, {per_tenant} per tenant");
    let single_store =
        RedisStore::new(&single.url(), None, "kgbench", Duration::from_secs(5)).unwrap();
    let cluster_store = RedisStore::with_options(
        "redis://unused",
        None,
        "kgbench",
        Duration::from_secs(5),
        &RedisOptions {
            cluster_nodes: cluster.urls(),
            partitions: CLUSTER_PARTITIONS,
            ..Default::default()
        },
    )
    .unwrap();
    // The layout marker and empty structures first, so the delta is the keys alone.
    single_store.ping().await.unwrap();
    cluster_store.ping().await.unwrap();
    let masters = cluster.masters().await;
    for (name, store, ports) in [
        ("single Redis", &single_store, vec![single.port()]),
        (
            "Cluster (16 partitions, 3 masters)",
            &cluster_store,
            masters.clone(),
        ),
    ] {
        let before = used_memory(&ports).await;
        let took = fill(store, &template, keys, per_tenant).await;
        let after = used_memory(&ports).await;
        let per_key = (after - before) as f64 / keys as f64;
        println!(
            "{name}: {per_key:.0} bytes per key (used_memory +{} MiB over {keys} keys, written in {:.1} s); at 10,000,000 keys: {:.2} GiB{}",
            (after - before) / (1 << 20),
            took.as_secs_f64(),
            per_key * 1e7 / (1u64 << 30) as f64,
            if ports.len() > 1 { " of masters (replicas hold as much again)" } else { "" },
        );
    }
    {
        let sample = record(&template, 0, 1);
        single_store.create(&sample).await.unwrap();
        let mut conn = single.connection().await;
        let hash = memory_usage(&mut conn, &single_store.key_key(&sample.key_id)).await;
        println!(
            "MEMORY USAGE of one record as the JSON hash of one partition: {hash} bytes (packed records are fields of shared hashes)"
        );
    }

    // Cold keys and propagation: two replicas on each store, argon2 at its production cost.
    for setup in [
        Setup {
            name: "single Redis",
            backend: Backend::Redis(single),
        },
        Setup {
            name: "Cluster",
            backend: Backend::Cluster(cluster, Box::leak(fresh_namespace().into_boxed_str())),
        },
    ] {
        let replicas = replicas_at_production_cost(setup.backend, &secrets, 2).await;
        let (a, b) = (&replicas[0].0, &replicas[1].0);

        let mut check = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut get = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut tokens = Vec::new();
        for _ in 0..cold {
            let created = a.admin.create(reader_key()).await.unwrap();
            let started = Instant::now();
            b.store.get(&created.record.key_id).await.unwrap().unwrap();
            get.record(started.elapsed().as_micros().max(1) as u64)
                .unwrap();
            tokens.push(created);
        }
        for created in &tokens {
            let started = Instant::now();
            let answer = outcome(&b.envoy_service().decide(read_with(&created.token)).await);
            check
                .record(started.elapsed().as_micros().max(1) as u64)
                .unwrap();
            assert_eq!(answer, Outcome::Allowed);
        }
        println!(
            "\n## {} ({cold} cold keys, {revocations} revocations)",
            setup.name
        );
        println!("store read of a key record: {}", summary(&get));
        println!(
            "cold check (store read + argon2 defaults): {}",
            summary(&check)
        );

        let mut propagation = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut feed = b.bus.subscribe();
        for i in 0..revocations {
            let created = &tokens[i % tokens.len()];
            let key = if i < tokens.len() {
                created.record.key_id.clone()
            } else {
                a.admin.create(reader_key()).await.unwrap().record.key_id
            };
            let started = Instant::now();
            a.admin.revoke(&key).await.unwrap();
            loop {
                let entry = tokio::time::timeout(PATIENCE, feed.recv())
                    .await
                    .expect("applied in time")
                    .unwrap();
                if matches!(&entry.item, FeedItem::Event(e) if e.key_id == key) {
                    break;
                }
            }
            propagation
                .record(started.elapsed().as_micros().max(1) as u64)
                .unwrap();
        }
        println!(
            "revocation, admin call made → applied on the other replica: {}",
            summary(&propagation)
        );
        for (_, running) in replicas {
            running.shutdown().await.unwrap();
        }
    }
}

//! `UsageSink`: batched usage counts, exact however they are split.

use super::*;

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
    let revoked = s.revoked(&a.key_id, 5_000).await;
    assert_eq!(
        (revoked.revoked_at_ms, revoked.usage.allowed),
        (Some(5_000), 4)
    );
    s.store.add_usage(&[delta(&a, 1, 0, 6_000)]).await.unwrap();
    let after = s.stored(&a.key_id).await;
    assert_eq!(after.revoked_at_ms, Some(5_000));
    assert_eq!(
        (after.usage.allowed, after.usage.last_used_at_ms),
        (5, Some(6_000))
    );
    // An update changes the record, not its counts.
    let renamed = s
        .updated(
            &a.key_id,
            &KeyChange {
                name: Some("renamed".into()),
                ..Default::default()
            },
            7_000,
        )
        .await;
    assert_eq!(
        (renamed.name.as_str(), renamed.usage.allowed),
        ("renamed", 5)
    );
    assert_eq!(s.stored(&a.key_id).await.usage.allowed, 5);
    // Usage of a key deleted meanwhile is dropped, not a new record.
    s.deleted(&b.key_id, 8_000).await;
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
        let usage = s.stored(&d.key_id).await.usage;
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

conformance!(
    usage_adds_up_per_key_and_never_recreates_a_deleted_key,
    usage_of_more_keys_than_one_script_call_takes_adds_up,
);

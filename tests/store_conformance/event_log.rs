//! `EventLog`: the revocation stream read back from any position, partition by partition.

use super::*;

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

conformance!(revocation_events_read_back_in_order_from_any_position,);

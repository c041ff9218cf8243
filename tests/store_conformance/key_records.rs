//! `KeyRecords`: create, read, list, update, revoke and delete a key, each change with its event.

use super::*;

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
    s.lists_nothing(&tenant(OTHER_TENANT)).await;
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
    s.deleted(&deleted.key_id, keygate::store::now_ms()).await;
    let revoked_at = keygate::store::now_ms();
    let revoked = s.revoked(&mine[1].key_id, revoked_at).await;
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
    s.lists_nothing(&tenant("5d1b8a9c-0000-4000-8000-000000000000"))
        .await;
}

async fn revoking_marks_the_key_once_and_appends_one_event(s: Subject) {
    let record = created(&s, TENANT, "to revoke").await;
    let other = created(&s, TENANT, "bystander").await;
    let t1 = keygate::store::now_ms();

    let revoked = s.revoked(&record.key_id, t1).await;
    assert_eq!(revoked.revoked_at_ms, Some(t1));
    assert_eq!(
        KeyRecord {
            revoked_at_ms: None,
            ..revoked.clone()
        },
        record,
        "revocation changes nothing else"
    );
    let stored = s.stored(&record.key_id).await;
    assert_eq!(stored.revoked_at_ms, Some(t1));
    assert_eq!(stored.status(t1), KeyStatus::Revoked);

    let again = s.revoked(&record.key_id, t1 + 5_000).await;
    assert_eq!(
        again.revoked_at_ms,
        Some(t1),
        "a second revoke changes nothing"
    );
    assert_eq!(s.stored(&record.key_id).await.revoked_at_ms, Some(t1));
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

    let removed = s.deleted(&doomed.key_id, t_delete).await;
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
    s.deleted(&kept.key_id, t_delete + 3).await;
    s.lists_nothing(&tenant(TENANT)).await;
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
    let updated = s.updated(&record.key_id, &change, t).await;
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
    let updated = s.updated(&record.key_id, &cleared, t + 1).await;
    assert_eq!(updated.plan, None);
    assert_eq!(updated.expires_at_ms, t + 60_000);
    assert_eq!(updated.hash, record.hash);
    assert_eq!(updated.tenant_id, record.tenant_id);
    // An update keeps a revocation: it is not a way back.
    s.revoked(&record.key_id, t + 2).await;
    let after_revoke = s.updated(&record.key_id, &change, t + 3).await;
    assert_eq!(after_revoke.revoked_at_ms, Some(t + 2));
    assert_eq!(
        s.stored(&record.key_id).await.status(t + 3),
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
            let get = |n: &str| field_of(fields, n).unwrap_or_default().to_owned();
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

/// The verifier left beside `key_id`'s record; the record must be there.
async fn verifier_of(s: &Subject, key_id: &str) -> Option<String> {
    let (record, verifier) = s
        .store
        .get_verifiable(key_id)
        .await
        .unwrap()
        .expect("the record");
    assert_eq!(record.key_id, key_id);
    verifier
}

/// What a replica leaves after verifying a key's token (`KeyRecords::set_verifier`) is
/// read with the record, kept by an update (the secret did not change), and goes with a
/// revocation or deletion, after which none can be left again.
async fn a_verifier_lives_with_its_record_until_the_key_is_revoked_or_deleted(s: Subject) {
    const LEFT: &str = "00112233445566778899aabbccddeeff";
    let a = created(&s, TENANT, "verified").await;
    assert_eq!(
        verifier_of(&s, &a.key_id).await,
        None,
        "none until a replica leaves one"
    );
    assert!(s.store.set_verifier(&a.key_id, LEFT).await.unwrap());
    assert_eq!(verifier_of(&s, &a.key_id).await.as_deref(), Some(LEFT));

    let renamed = KeyChange {
        name: Some("renamed".into()),
        ..Default::default()
    };
    let updated = s.store.update(&a.key_id, &renamed, now_ms()).await.unwrap();
    assert!(updated.is_some());
    assert_eq!(
        verifier_of(&s, &a.key_id).await.as_deref(),
        Some(LEFT),
        "an update keeps the verifier"
    );

    assert!(s.store.revoke(&a.key_id, now_ms()).await.unwrap().is_some());
    assert_eq!(
        verifier_of(&s, &a.key_id).await,
        None,
        "revoking removes it"
    );
    assert!(!s.store.set_verifier(&a.key_id, LEFT).await.unwrap());
    assert_eq!(
        verifier_of(&s, &a.key_id).await,
        None,
        "none is left beside a revoked key"
    );

    let b = created(&s, TENANT, "deleted").await;
    assert!(s.store.set_verifier(&b.key_id, LEFT).await.unwrap());
    assert!(s.store.delete(&b.key_id, now_ms()).await.unwrap().is_some());
    assert!(!s.store.set_verifier(&b.key_id, LEFT).await.unwrap());
    assert!(
        s.store.get_verifiable(&b.key_id).await.unwrap().is_none(),
        "leaving a verifier never brings a deleted key back"
    );
    assert!(!s
        .store
        .set_verifier("NoSuchKey0000000000000", LEFT)
        .await
        .unwrap());
}

conformance!(
    a_verifier_lives_with_its_record_until_the_key_is_revoked_or_deleted,
    created_key_reads_back_with_its_hash_and_never_its_secret,
    creating_an_existing_key_id_is_a_conflict_that_changes_nothing,
    listing_pages_through_one_tenant_without_gaps_or_duplicates,
    revoking_marks_the_key_once_and_appends_one_event,
    revoking_or_deleting_an_unknown_key_finds_nothing,
    deleting_removes_the_key_and_its_index_entry,
    updating_changes_only_the_named_fields_and_appends_one_event,
    keys_of_partners_and_services_are_listed_under_their_owner_only,
);

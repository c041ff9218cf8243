//! The verified-credential cache (docs/architecture.md): argon2 never runs per request.
//! One verification per new token however many requests wait for it, no store access on
//! a hit, and a revocation or an expiry wins over whatever the cache remembers.

use std::sync::Arc;
use std::time::Duration;

use keygate::config::{Argon2Config, Config};
use keygate::keys::NewKey;
use keygate::server::App;
use keygate::store::now_ms;
use keygate_test_support as support;
use keygate_test_support::{
    check_request, outcome, read_with, Backend, CountingStore, Outcome, PATIENCE,
};

fn app_on(store: Arc<CountingStore>, config: Config) -> App {
    App::with_store(config, support::secrets(), store).unwrap()
}

/// A check of `token` on its own task, to be held in flight by the store.
fn check_in_background(app: &Arc<App>, token: &str) -> tokio::task::JoinHandle<Outcome> {
    let (app, token) = (app.clone(), token.to_owned());
    tokio::spawn(async move { outcome(&app.envoy_service().decide(read_with(&token)).await) })
}

/// A new key's first check, held by the store after it read the (active) record: the
/// store, the app, the key, and the check's handle.
async fn a_check_held_in_flight() -> (
    Arc<CountingStore>,
    Arc<App>,
    keygate::keys::CreatedKey,
    tokio::task::JoinHandle<Outcome>,
) {
    let store = CountingStore::new();
    let app = Arc::new(app_on(store.clone(), support::config(Backend::Memory)));
    let key = app.admin.create(support::reader_key()).await.unwrap();
    store.hold_gets();
    let in_flight = check_in_background(&app, &key.token);
    store.a_get_is_held().await;
    (store, app, key, in_flight)
}

/// The outcome of a check started with `check_in_background`.
async fn finished(check: tokio::task::JoinHandle<Outcome>) -> Outcome {
    tokio::time::timeout(PATIENCE, check)
        .await
        .expect("the in-flight check finishes")
        .expect("the check does not panic")
}

/// argon2 at its real cost: the verification must take long enough for the concurrent
/// checks to pile up behind it.
fn production_argon2() -> Config {
    let mut config = support::config(Backend::Memory);
    config.api_keys.argon2 = Argon2Config::default();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_checked_a_thousand_times_at_once_is_verified_once() {
    let store = CountingStore::new();
    let app = Arc::new(app_on(store.clone(), production_argon2()));
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let token = Arc::new(key.token);
    let start = Arc::new(tokio::sync::Barrier::new(1000));

    let checks: Vec<_> = (0..1000)
        .map(|_| {
            let (app, token, start) = (app.clone(), token.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                outcome(&app.envoy_service().decide(read_with(&token)).await)
            })
        })
        .collect();
    let answers = tokio::time::timeout(PATIENCE * 3, futures::future::join_all(checks))
        .await
        .expect("a thousand checks answered in time");
    for answer in answers {
        assert_eq!(answer.expect("no check panicked"), Outcome::Allowed);
    }
    assert_eq!(app.hasher.verifications(), 1, "one argon2 for 1,000 checks");
    assert_eq!(store.gets(), 1, "one store lookup for 1,000 checks");
}

#[tokio::test]
async fn a_cache_hit_touches_no_store_and_runs_no_argon2() {
    let store = CountingStore::new();
    let app = app_on(store.clone(), support::config(Backend::Memory));
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();

    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
    assert_eq!(store.gets(), 1);
    assert_eq!(app.hasher.verifications(), 1);

    // The same token again, also in another credential header and on another route.
    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
    let other_header = check_request("HEAD", "/v1/contacts", &[("x-api-key", &key.token)]);
    assert_eq!(outcome(&envoy.decide(other_header).await), Outcome::Allowed);
    let not_permitted = check_request(
        "DELETE",
        "/v1/contacts/1",
        &[
            ("authorization", &support::bearer(&key.token)),
            ("x-tenant-id", support::TENANT),
        ],
    );
    assert_eq!(
        outcome(&envoy.decide(not_permitted).await),
        Outcome::denied("insufficient_permissions", 403)
    );
    assert_eq!(store.gets(), 1, "a cache hit asks no store");
    assert_eq!(app.hasher.verifications(), 1, "a cache hit runs no argon2");
}

#[tokio::test]
async fn a_key_revoked_through_the_admin_api_is_denied_on_the_next_check() {
    let store = CountingStore::new();
    let app = app_on(store.clone(), support::config(Backend::Memory));
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let bystander = app.admin.create(support::reader_key()).await.unwrap();
    for k in [&key, &bystander] {
        assert_eq!(
            outcome(&envoy.decide(read_with(&k.token)).await),
            Outcome::Allowed
        );
    }

    app.admin.revoke(&key.record.key_id).await.unwrap();

    for _ in 0..3 {
        assert_eq!(
            outcome(&envoy.decide(read_with(&key.token)).await),
            Outcome::revoked_key()
        );
    }
    assert_eq!(
        outcome(&envoy.decide(read_with(&bystander.token)).await),
        Outcome::Allowed,
        "revoking one key leaves the others cached"
    );
    let gets = store.gets();

    app.admin.delete(&bystander.record.key_id).await.unwrap();
    assert_eq!(
        outcome(&envoy.decide(read_with(&bystander.token)).await),
        Outcome::denied("invalid_api_key", 401),
        "a deleted key is unknown"
    );
    assert_eq!(
        store.gets(),
        gets,
        "the deleted key's tombstone answers without the store"
    );
}

/// A verification that read the key just before a revocation must not put the stale
/// "valid" back into the cache after the revocation dropped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_during_an_in_flight_verification_still_wins() {
    // The check has read the still-active record and is waiting for its answer.
    let (store, app, key, in_flight) = a_check_held_in_flight().await;
    app.admin.revoke(&key.record.key_id).await.unwrap();
    store.resume();

    // The revocation came after the verification started: it wins, for this very check
    // and for the next.
    assert_eq!(finished(in_flight).await, Outcome::revoked_key());
    assert_eq!(
        outcome(&app.envoy_service().decide(read_with(&key.token)).await),
        Outcome::revoked_key(),
        "the stale verification was not cached"
    );
}

/// A flush (the revocation stream lost events) while a verification is in flight: what
/// that verification read may predate a revocation among the lost events, so it must
/// not be cached, nor answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_during_an_in_flight_verification_wins_over_it() {
    let (store, app, key, in_flight) = a_check_held_in_flight().await;
    // Revoked on another replica, and its event is among those lost: this replica only
    // learns of a flush.
    keygate::store::KeyRecords::revoke(&*store, &key.record.key_id, now_ms())
        .await
        .unwrap()
        .unwrap();
    app.cache.invalidate_all();
    store.resume();
    let first = finished(in_flight).await;
    assert_eq!(first, Outcome::revoked_key());
    assert_eq!(
        outcome(&app.envoy_service().decide(read_with(&key.token)).await),
        Outcome::revoked_key()
    );
}

/// Two invalidations during one verification: the first makes it read the store again,
/// and the second, arriving while that second read is in flight, must win as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalidation_during_a_verification_wins_not_only_the_first() {
    use keygate::store::EventKind;
    let store = CountingStore::new();
    let app = Arc::new(app_on(store.clone(), support::config(Backend::Memory)));
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let key_id = key.record.key_id.clone();

    store.hold_gets();
    let in_flight = check_in_background(&app, &key.token);
    store.a_get_is_held().await;
    // First: the key's scopes changed (say). The verification reads again…
    app.cache.invalidate_key(&key_id, Some(EventKind::Updated));
    let reads = store.gets();
    store.release_one();
    store.a_get_is_held().await;
    assert_eq!(
        store.gets(),
        reads + 1,
        "the verification read the key again"
    );
    // …and while that read is in flight, the key is revoked. The second read saw the
    // record before the revocation: it must not be answered either.
    app.admin.revoke(&key_id).await.unwrap();
    store.resume();
    let first = finished(in_flight).await;
    assert_eq!(first, Outcome::revoked_key());
}

/// Anyone who knows a key id can mint well-formed guesses; past
/// `failures_per_key` wrong secrets in the window, guesses cost no argon2, while the
/// key's real token, verified before, is never slowed. Once a key's token has been
/// verified, its verifier answers every guess without argon2.
#[tokio::test]
async fn guesses_at_one_key_id_stop_costing_argon2_past_the_bound() {
    let store = CountingStore::new();
    let mut config = support::config(Backend::Memory);
    config.api_keys.argon2.failures_per_key = 3;
    let app = app_on(store.clone(), config);
    let envoy = app.envoy_service();
    // A key never used: no verifier yet, so guesses go to argon2, within the bound.
    let unused = app.admin.create(support::reader_key()).await.unwrap();
    let before = app.hasher.verifications();
    for pos in 0..10 {
        assert_eq!(
            outcome(
                &envoy
                    .decide(read_with(&support::wrong_secret_at(&unused.token, pos)))
                    .await
            ),
            Outcome::denied("invalid_api_key", 401)
        );
    }
    assert_eq!(
        app.hasher.verifications(),
        before + 3,
        "argon2 ran for three guesses only"
    );
    let key = app.admin.create(support::reader_key()).await.unwrap();
    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
    let before = app.hasher.verifications();
    for pos in 0..10 {
        assert_eq!(
            outcome(
                &envoy
                    .decide(read_with(&support::wrong_secret_at(&key.token, pos)))
                    .await
            ),
            Outcome::denied("invalid_api_key", 401)
        );
    }
    assert_eq!(
        app.hasher.verifications(),
        before,
        "the verified key's verifier refused every guess"
    );
    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed,
        "the real token still passes"
    );
    // Its entry gone (say, at the end of its TTL), the real token is read again and not
    // refused: this replica knows it verified before.
    app.cache
        .invalidate_key(&key.record.key_id, Some(keygate::store::EventKind::Updated));
    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
    // Another key id's guesses are not affected.
    let other = app.admin.create(support::reader_key()).await.unwrap();
    let before = app.hasher.verifications();
    assert_eq!(
        outcome(
            &envoy
                .decide(read_with(&support::wrong_secret_for(&other.token)))
                .await
        ),
        Outcome::denied("invalid_api_key", 401)
    );
    assert_eq!(app.hasher.verifications(), before + 1);
}

/// With argon2's queue full, a cold key is answered UNAVAILABLE at once: never allowed,
/// never denied. One argon2 thread, one queue slot, verifications that take a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_keys_beyond_argon2s_queue_are_unavailable_never_denied() {
    let store = CountingStore::new();
    let mut config = support::config(Backend::Memory);
    config.api_keys.argon2 = Argon2Config {
        memory_kib: 32 * 1024,
        iterations: 4,
        verify_concurrency: 1,
        queue_depth: 1,
        ..Argon2Config::default()
    };
    let app = Arc::new(app_on(store.clone(), config));
    let mut tokens = Vec::new();
    for _ in 0..12 {
        tokens.push(app.admin.create(support::reader_key()).await.unwrap().token);
    }
    let outcomes = futures::future::join_all(tokens.iter().map(|t| {
        let app = app.clone();
        async move { outcome(&app.envoy_service().decide(read_with(t)).await) }
    }))
    .await;
    let unavailable = outcomes
        .iter()
        .filter(|o| **o == Outcome::Error(tonic::Code::Unavailable))
        .count();
    for o in &outcomes {
        assert!(
            *o == Outcome::Allowed || *o == Outcome::Error(tonic::Code::Unavailable),
            "{o:?}"
        );
    }
    assert!(unavailable >= 1, "{outcomes:?}");
    // Nothing of the refusal was remembered: each key passes once argon2 is free.
    for t in &tokens {
        assert_eq!(
            outcome(&app.envoy_service().decide(read_with(t)).await),
            Outcome::Allowed
        );
    }
}

#[tokio::test]
async fn an_expired_key_is_denied_as_expired_whether_cached_or_not() {
    let store = CountingStore::new();
    let app = app_on(store.clone(), support::config(Backend::Memory));
    let envoy = app.envoy_service();
    let short = NewKey {
        expires_in: Some(Duration::from_secs(1)),
        ..support::reader_key()
    };
    let cached = app.admin.create(short.clone()).await.unwrap();
    let uncached = app.admin.create(short).await.unwrap();
    assert_eq!(
        outcome(&envoy.decide(read_with(&cached.token)).await),
        Outcome::Allowed
    );

    // The cached key: allowed until its expiry, never after it.
    let expires_at = cached.record.expires_at_ms;
    let denial = support::eventually(PATIENCE, "the key expires", || async {
        let asked_at = now_ms();
        match outcome(&envoy.decide(read_with(&cached.token)).await) {
            Outcome::Allowed => {
                assert!(
                    asked_at < expires_at,
                    "allowed {} ms after the key expired",
                    asked_at - expires_at
                );
                None
            }
            other => Some(other),
        }
    })
    .await;
    assert_eq!(denial, Outcome::denied("expired_api_key", 401));
    assert!(now_ms() >= expires_at);
    assert_eq!(
        outcome(&envoy.decide(read_with(&cached.token)).await),
        Outcome::denied("expired_api_key", 401)
    );

    // The other key was never checked: its first check is after its expiry, through the
    // store and argon2.
    let left = uncached.record.expires_at_ms.saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(left + 1)).await;
    let gets = store.gets();
    assert_eq!(
        outcome(&envoy.decide(read_with(&uncached.token)).await),
        Outcome::denied("expired_api_key", 401)
    );
    assert_eq!(store.gets(), gets + 1);
}

/// The TTL bounds how stale a key's state may be, not its secret: when an entry expires
/// the record is read again, but a token already verified against that very hash is not
/// put through argon2 again — otherwise every active key would cost one argon2 per TTL.
#[tokio::test]
async fn an_expired_entry_is_read_again_but_not_verified_again() {
    let store = CountingStore::new();
    let mut config = support::config(Backend::Memory);
    config.cache.ttl = Duration::from_millis(100);
    let app = app_on(store.clone(), config);
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let check = || async { outcome(&envoy.decide(read_with(&key.token)).await) };

    assert_eq!(check().await, Outcome::Allowed);
    assert_eq!((store.gets(), app.hasher.verifications()), (1, 1));
    support::eventually(
        PATIENCE,
        "the entry expires and the record is read again",
        || async {
            assert_eq!(check().await, Outcome::Allowed);
            (store.gets() >= 2).then_some(())
        },
    )
    .await;
    assert_eq!(
        app.hasher.verifications(),
        1,
        "no argon2 for a known token and hash"
    );

    // Another secret for the same key id is refused, by the verifier the first
    // verification left beside the record: no argon2 for it either.
    let wrong = support::wrong_secret_for(&key.token);
    assert_eq!(
        outcome(&envoy.decide(read_with(&wrong)).await),
        Outcome::denied("invalid_api_key", 401)
    );
    assert_eq!(app.hasher.verifications(), 1);

    // A stored hash that changed (the secret hashed again) is verified again.
    let secret = support::secret_of(&key.token);
    store.replace_hash(app.hasher.hash(secret).await.unwrap());
    let gets = store.gets();
    support::eventually(PATIENCE, "the record with the new hash is read", || async {
        assert_eq!(check().await, Outcome::Allowed);
        (store.gets() > gets).then_some(())
    })
    .await;
    assert_eq!(app.hasher.verifications(), 2, "argon2 against the new hash");
}

/// A revocation leaves a tombstone: the token's digest was known, so the next check of
/// the revoked key answers `revoked_api_key` at once, with no argon2 and no store read.
#[tokio::test]
async fn a_revoked_keys_next_check_costs_no_argon2_and_no_store_read() {
    let store = CountingStore::new();
    let app = app_on(store.clone(), support::config(Backend::Memory));
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let key_id = key.record.key_id.clone();

    assert_eq!(
        outcome(&envoy.decide(read_with(&key.token)).await),
        Outcome::Allowed
    );
    app.admin.revoke(&key_id).await.unwrap();
    // What the revocation follower does when the event arrives (again, on this replica).
    app.cache
        .invalidate_key(&key_id, Some(keygate::store::EventKind::Revoked));
    let (gets, verifications) = (store.gets(), app.hasher.verifications());
    for _ in 0..3 {
        assert_eq!(
            outcome(&envoy.decide(read_with(&key.token)).await),
            Outcome::revoked_key()
        );
    }
    assert_eq!(store.gets(), gets, "no store read after the revocation");
    assert_eq!(app.hasher.verifications(), verifications, "no argon2");
    // A wrong secret for the revoked key id is still just an invalid key: the tombstone
    // is the verified token's, not the key id's.
    assert_eq!(
        outcome(
            &envoy
                .decide(read_with(&support::wrong_secret_for(&key.token)))
                .await
        ),
        Outcome::denied("invalid_api_key", 401)
    );
}

//! argon2 once per key per deployment: the replica that first verifies a token leaves a
//! verifier beside its key's record (an HMAC under a key derived from the pepper), and
//! every other replica, and every later start, accepts that token, and refuses any other
//! secret for that key id, without argon2. On one Redis in both record formats (the hash
//! of one partition, the packed record of several).

use keygate::config::{Config, Secrets};
use keygate::server::App;
use keygate_test_support as support;
use keygate_test_support::{read_with, secrets, Backend, Outcome, RedisServer};

fn on(redis: &RedisServer, partitions: usize) -> Config {
    let mut cfg = support::config(Backend::Redis(redis));
    cfg.store.stream_partitions = Some(partitions);
    cfg
}

/// Replicas (apps, not serving) of one deployment on a Redis of their own, its store in
/// `partitions` stream partitions: one record format or the other.
struct Deployment {
    redis: RedisServer,
    secrets: Secrets,
    partitions: usize,
}

impl Deployment {
    async fn start(partitions: usize) -> Deployment {
        let redis = RedisServer::start().await;
        Deployment {
            redis,
            secrets: secrets(),
            partitions,
        }
    }

    fn app_with(&self, secrets: Secrets) -> App {
        App::build(on(&self.redis, self.partitions), secrets).expect("the app builds")
    }

    /// Another replica.
    fn app(&self) -> App {
        self.app_with(self.secrets.clone())
    }
}

async fn check(app: &App, token: &str) -> Outcome {
    support::outcome_of(&app.envoy_service(), read_with(token)).await
}

#[tokio::test]
async fn a_token_verified_by_one_replica_costs_no_argon2_on_another() {
    for partitions in [1, 4] {
        let deployment = Deployment::start(partitions).await;
        let first = deployment.app();
        let key = first.admin.create(support::reader_key()).await.unwrap();
        let id = &key.record.key_id;
        assert_eq!(check(&first, &key.token).await, Outcome::Allowed);
        assert_eq!(first.hasher.verifications(), 1, "{partitions}: argon2 once");
        let (_, verifier) = first.store.get_verifiable(id).await.unwrap().unwrap();
        let verifier = verifier.expect("the first verification leaves a verifier");
        assert!(
            !verifier.contains(support::secret_of(&key.token)),
            "a verifier is not the secret"
        );

        // Another replica, and a restart: the verifier answers, right or wrong.
        let second = deployment.app();
        assert_eq!(check(&second, &key.token).await, Outcome::Allowed);
        let wrong = support::wrong_secret_for(&key.token);
        assert_eq!(
            check(&second, &wrong).await,
            Outcome::denied("invalid_api_key", 401)
        );
        assert_eq!(
            second.hasher.verifications(),
            0,
            "{partitions}: no argon2 on the second replica"
        );

        // Without the pepper the verifier checks nothing: a keygate with another pepper
        // refuses the token.
        let foreign = deployment.app_with(Secrets {
            pepper: keygate::secret::Secret::random(43),
            ..deployment.secrets.clone()
        });
        assert_eq!(
            check(&foreign, &key.token).await,
            Outcome::denied("invalid_api_key", 401)
        );

        // Revoked, the verifier goes with the record's state; deleted, with the record.
        first.admin.revoke(id).await.unwrap();
        let (_, verifier) = first.store.get_verifiable(id).await.unwrap().unwrap();
        assert_eq!(
            verifier, None,
            "{partitions}: a revoked key keeps no verifier"
        );
        let late = deployment.app();
        assert_eq!(check(&late, &key.token).await, Outcome::revoked_key());
        assert!(
            !first
                .store
                .set_verifier(id, &verifier_of(&first, &key.token, id))
                .await
                .unwrap(),
            "no verifier is written beside a revoked key"
        );
        let deleted = first.admin.create(support::reader_key()).await.unwrap();
        let deleted_id = &deleted.record.key_id;
        assert_eq!(check(&first, &deleted.token).await, Outcome::Allowed);
        let left = verifier_of(&first, &deleted.token, deleted_id);
        let (_, stored) = first
            .store
            .get_verifiable(deleted_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.as_ref(), Some(&left));
        first.admin.delete(deleted_id).await.unwrap();
        assert!(first
            .store
            .get_verifiable(deleted_id)
            .await
            .unwrap()
            .is_none());
        assert!(
            !first.store.set_verifier(deleted_id, &left).await.unwrap(),
            "no verifier is written for a deleted key"
        );
        assert!(
            !hash_values(&deployment.redis)
                .await
                .iter()
                .any(|v| v == left.as_bytes()),
            "{partitions}: the deleted key's verifier went with it"
        );
    }
}

/// Every field and value of every hash in the Redis, as bytes (packed records are binary).
async fn hash_values(redis: &RedisServer) -> Vec<Vec<u8>> {
    let mut conn = redis.connection().await;
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        let kind: String = ::redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if kind == "hash" {
            let all: Vec<Vec<u8>> = ::redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            out.extend(all);
        }
    }
    out
}

fn verifier_of(app: &App, token: &str, key_id: &str) -> String {
    app.hasher.verifier(key_id, support::secret_of(token))
}

/// A key created before verifiers existed has none: its first verification runs argon2
/// and leaves one, and nothing else is needed.
#[tokio::test]
async fn a_key_without_a_verifier_gets_one_on_its_first_verification() {
    let deployment = Deployment::start(1).await;
    let first = deployment.app();
    let key = first.admin.create(support::reader_key()).await.unwrap();
    let id = &key.record.key_id;
    let (_, before) = first.store.get_verifiable(id).await.unwrap().unwrap();
    assert_eq!(
        before, None,
        "created, never verified: as a key from before"
    );
    assert_eq!(check(&first, &key.token).await, Outcome::Allowed);
    assert_eq!(first.hasher.verifications(), 1);
    let (_, after) = first.store.get_verifiable(id).await.unwrap().unwrap();
    assert_eq!(after, Some(verifier_of(&first, &key.token, id)));
}

/// A rotated key's old token ends with its grace, whatever its verifier says.
#[tokio::test]
async fn a_rotated_keys_old_token_ends_with_its_grace() {
    let deployment = Deployment::start(4).await;
    let first = deployment.app();
    let key = first.admin.create(support::reader_key()).await.unwrap();
    assert_eq!(check(&first, &key.token).await, Outcome::Allowed);
    let rotated = first
        .admin
        .rotate(&key.record.key_id, std::time::Duration::ZERO)
        .await
        .unwrap();
    let second = deployment.app();
    assert_eq!(
        check(&second, &key.token).await,
        Outcome::denied("expired_api_key", 401)
    );
    assert_eq!(
        check(&second, &rotated.successor.token).await,
        Outcome::Allowed
    );
}

//! The verified-credential cache: what argon2 (and the store) said about a token,
//! remembered so that a request with a known token costs one HMAC and one map lookup.
//!
//! - Keyed by HMAC-SHA-256(pepper-derived key, token): the cache never holds a token, and
//!   a memory dump does not give one away.
//! - Single flight: concurrent misses for one token share one verification (moka's
//!   `try_get_with` runs one init future per key and hands its result to every waiter).
//! - Failed verifications are remembered for a short `negative_ttl`, so repeating a bad
//!   guess costs no argon2. Backend failures are never cached.
//! - `invalidate_key` is the entry point for revocation: it drops the entry of a key id at
//!   once, and an epoch counter stops a verification that was already in flight from
//!   putting back what was just invalidated.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use moka::future::Cache;
use sha2::Sha256;

use crate::config::CacheConfig;
use crate::decision::DenyReason;
use crate::principal::Principal;
use crate::secret::Secret;
use crate::store::now_ms;

pub type Digest = [u8; 32];

/// What is known about one token.
#[derive(Debug, Clone)]
pub enum Verified {
    Valid(Arc<Principal>),
    Invalid(DenyReason),
}

struct EntryExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl moka::Expiry<Digest, Verified> for EntryExpiry {
    fn expire_after_create(&self, _: &Digest, value: &Verified, _: Instant) -> Option<Duration> {
        Some(match value {
            Verified::Valid(p) => {
                // Never trust an entry past the key's own expiry.
                let left = p
                    .expires_at
                    .map(|exp| Duration::from_millis(exp.saturating_sub(now_ms())))
                    .unwrap_or(self.ttl);
                left.min(self.ttl)
            }
            // A revoked key stays revoked; remembering that longer is safe.
            Verified::Invalid(DenyReason::RevokedApiKey) => self.ttl,
            Verified::Invalid(_) => self.negative_ttl,
        })
    }
}

pub struct CredentialCache {
    entries: Cache<Digest, Verified>,
    /// key id → digest of its positive entry, to invalidate by key id.
    by_key: moka::sync::Cache<Arc<str>, Digest>,
    /// key id → epoch at which it was last invalidated.
    invalidated: moka::sync::Cache<Arc<str>, u64>,
    epoch: AtomicU64,
    mac: Hmac<Sha256>,
}

/// The result of a lookup: the value and whether it came from the cache.
pub struct Lookup<E> {
    pub value: Result<Verified, Arc<E>>,
    pub hit: bool,
}

impl CredentialCache {
    pub fn new(cfg: &CacheConfig, pepper: &Secret) -> Self {
        // A key of its own, derived from the pepper, so cache digests and argon2 inputs
        // never share key material directly.
        let mut derive = <Hmac<Sha256> as Mac>::new_from_slice(pepper.expose().as_bytes())
            .expect("HMAC takes any key length");
        derive.update(b"keygate credential cache v1");
        let key = derive.finalize().into_bytes();
        CredentialCache {
            entries: Cache::builder()
                .max_capacity(cfg.max_entries)
                .expire_after(EntryExpiry {
                    ttl: cfg.ttl,
                    negative_ttl: cfg.negative_ttl,
                })
                .build(),
            by_key: moka::sync::Cache::builder()
                .max_capacity(cfg.max_entries)
                .time_to_live(cfg.ttl)
                .build(),
            invalidated: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cfg.ttl + Duration::from_secs(1))
                .build(),
            epoch: AtomicU64::new(0),
            mac: <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length"),
        }
    }

    pub fn digest(&self, token: &str) -> Digest {
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The cached answer for `digest`, or the answer of `verify` (shared with every
    /// concurrent caller for the same digest), cached unless it is an error.
    pub async fn get_or_verify<E, F, Fut>(
        &self,
        digest: Digest,
        key_id: &str,
        verify: F,
    ) -> Lookup<E>
    where
        E: Send + Sync + 'static,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Verified, E>>,
    {
        if let Some(v) = self.entries.get(&digest).await {
            return Lookup {
                value: Ok(v),
                hit: true,
            };
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let started = self.epoch.load(Ordering::Acquire);
            let value = self
                .entries
                .try_get_with(digest, async {
                    let v = verify().await?;
                    if let Verified::Valid(_) = v {
                        self.by_key.insert(Arc::from(key_id), digest);
                    }
                    Ok(v)
                })
                .await;
            // A revocation that raced the verification may have been applied before the
            // result was cached: drop it and verify once more against the store.
            if attempts == 1 && value.is_ok() && self.invalidated_since(key_id, started) {
                self.entries.invalidate(&digest).await;
                continue;
            }
            return Lookup { value, hit: false };
        }
    }

    fn invalidated_since(&self, key_id: &str, epoch: u64) -> bool {
        self.invalidated.get(key_id).is_some_and(|at| at > epoch)
    }

    /// Drops what is cached for this key id, at once.
    pub async fn invalidate_key(&self, key_id: &str) {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let key: Arc<str> = Arc::from(key_id);
        self.invalidated.insert(key.clone(), epoch);
        if let Some(digest) = self.by_key.remove(&key) {
            self.entries.invalidate(&digest).await;
        }
    }

    /// Drops everything (the revocation stream was lost past what can be replayed).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
        self.by_key.invalidate_all();
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Applies pending maintenance (for tests and memory measurements).
    pub async fn sync(&self) {
        self.entries.run_pending_tasks().await;
    }
}

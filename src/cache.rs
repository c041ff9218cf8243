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
//! - When a valid entry's TTL runs out, the key's record is read again (its state may
//!   have changed) but argon2 does not run again if the stored hash is the one this
//!   token was verified against (`verified_before`): a key id's secret never changes,
//!   and without this every active key would cost one argon2 per TTL, more than a
//!   replica can pay beyond ~1,500 active keys.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use moka::future::Cache;
use sha2::Sha256;
use subtle::ConstantTimeEq;

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

/// Key id → the digest of the token verified for it, and a fingerprint of the stored
/// hash it was verified against.
///
/// Two uses: a revocation, which names a key id, finds the entry of a token it never
/// sees; and a record read again after its entry expired skips argon2 when its hash is
/// unchanged. A plain map, not a second cache: a moka entry costs ~420 bytes, a slot here
/// about half of that (BENCHMARKS.md, memory). A key id has one valid token, so one
/// digest. A mapping is kept for `keep` (longer than any entry can live) after it was
/// last set, then swept; so it never goes missing while its entry is cached, and the map
/// holds at most the keys verified within `keep` beyond those cached.
struct KeyIndex {
    inner: Mutex<IndexInner>,
    keep_secs: u32,
    origin: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verification {
    digest: Digest,
    /// Keyed hash of the PHC string the token was verified against.
    hash_fingerprint: u64,
}

struct IndexInner {
    map: HashMap<Box<str>, (Verification, u32)>,
    next_sweep: u32,
}

impl KeyIndex {
    fn new(keep: Duration) -> Self {
        let keep_secs = u32::try_from(keep.as_secs().max(1)).unwrap_or(u32::MAX);
        KeyIndex {
            inner: Mutex::new(IndexInner {
                map: HashMap::new(),
                next_sweep: keep_secs,
            }),
            keep_secs,
            origin: Instant::now(),
        }
    }

    fn now_secs(&self) -> u32 {
        u32::try_from(self.origin.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IndexInner> {
        // The map holds no invariant a panicking holder could break halfway.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, key_id: &str, verification: Verification) {
        self.set_at(key_id, verification, self.now_secs());
    }

    /// `set` at `now` seconds after the index was made.
    fn set_at(&self, key_id: &str, verification: Verification, now: u32) {
        let mut inner = self.lock();
        if now >= inner.next_sweep {
            let keep = self.keep_secs;
            inner
                .map
                .retain(|_, (_, at)| now.saturating_sub(*at) <= keep);
            inner.next_sweep = now.saturating_add(keep);
        }
        match inner.map.get_mut(key_id) {
            Some(slot) => *slot = (verification, now),
            None => {
                inner.map.insert(key_id.into(), (verification, now));
            }
        }
    }

    fn get(&self, key_id: &str) -> Option<Verification> {
        self.lock().map.get(key_id).map(|(v, _)| *v)
    }

    fn take(&self, key_id: &str) -> Option<Verification> {
        self.lock().map.remove(key_id).map(|(v, _)| v)
    }

    fn clear(&self) {
        self.lock().map.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

pub struct CredentialCache {
    entries: Cache<Digest, Verified>,
    by_key: KeyIndex,
    /// Keys the stored-hash fingerprints, so that nobody can choose two hashes that match.
    fingerprints: RandomState,
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
            // Entries live at most `ttl`. The margin covers the moment between the
            // mapping being set and the entry being stored, and lets a key used again
            // within a minute of its entry's expiry skip argon2.
            by_key: KeyIndex::new(cfg.ttl + Duration::from_secs(60)),
            fingerprints: RandomState::new(),
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
            let value = self.entries.try_get_with(digest, verify()).await;
            // A revocation that raced the verification may have been applied before the
            // result was cached: drop it and verify once more against the store.
            if attempts == 1 && value.is_ok() && self.invalidated_since(key_id, started) {
                self.entries.invalidate(&digest).await;
                continue;
            }
            return Lookup { value, hit: false };
        }
    }

    /// Whether this token (`digest`) was verified for `key_id` against this stored hash
    /// recently (within the index's `keep`), so argon2 would only say it again.
    pub fn verified_before(&self, key_id: &str, digest: &Digest, stored_hash: &str) -> bool {
        self.by_key.get(key_id).is_some_and(|v| {
            bool::from(v.digest.ct_eq(digest))
                && v.hash_fingerprint == self.fingerprints.hash_one(stored_hash)
        })
    }

    /// Records that this token verified against this stored hash. Must be called, inside
    /// `get_or_verify`'s `verify`, before a valid answer is returned: it is also how
    /// `invalidate_key` finds the entry.
    pub fn note_verified(&self, key_id: &str, digest: Digest, stored_hash: &str) {
        self.by_key.set(
            key_id,
            Verification {
                digest,
                hash_fingerprint: self.fingerprints.hash_one(stored_hash),
            },
        );
    }

    fn invalidated_since(&self, key_id: &str, epoch: u64) -> bool {
        self.invalidated.get(key_id).is_some_and(|at| at > epoch)
    }

    /// Drops what is cached for this key id, at once.
    pub async fn invalidate_key(&self, key_id: &str) {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.invalidated.insert(Arc::from(key_id), epoch);
        if let Some(v) = self.by_key.take(key_id) {
            self.entries.invalidate(&v.digest).await;
        }
    }

    /// Drops everything (the revocation stream was lost past what can be replayed).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
        self.by_key.clear();
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Applies pending maintenance (for tests and memory measurements).
    pub async fn sync(&self) {
        self.entries.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u8) -> Verification {
        Verification {
            digest: [n; 32],
            hash_fingerprint: n.into(),
        }
    }

    #[test]
    fn key_index_keeps_a_mapping_for_its_whole_keep_then_sweeps_it() {
        let index = KeyIndex::new(Duration::from_secs(10));
        index.set_at("old", v(1), 0);
        index.set_at("refreshed", v(2), 0);
        index.set_at("refreshed", v(2), 8);
        // At 10 s nothing is older than `keep` yet: the sweep must not drop anything.
        index.set_at("new", v(3), 10);
        assert_eq!(index.len(), 3);
        // At 20 s "old" (set at 0) and "refreshed" (last set at 8) are past `keep`;
        // "new" (set at 10) is not.
        index.set_at("newer", v(4), 20);
        assert_eq!(index.take("old"), None);
        assert_eq!(index.take("refreshed"), None);
        assert_eq!(index.take("new"), Some(v(3)));
        assert_eq!(index.take("newer"), Some(v(4)));
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn key_index_sweeps_at_most_once_per_keep() {
        let index = KeyIndex::new(Duration::from_secs(10));
        index.set_at("a", v(1), 0);
        index.set_at("b", v(2), 10); // sweep at 10: "a" is exactly `keep` old, kept
        index.set_at("c", v(3), 15); // next sweep not before 20: "a" stays for now
        assert_eq!(index.len(), 3);
        index.set_at("d", v(4), 20); // sweep: "a" (20 s old) goes, "b" (10 s) stays
        assert_eq!(index.take("a"), None);
        assert_eq!(index.get("b"), Some(v(2)));
    }

    #[test]
    fn a_verification_is_remembered_only_for_the_same_token_and_the_same_hash() {
        let cache = CredentialCache::new(&CacheConfig::default(), &Secret::random(43));
        let token = cache.digest("sk_live_token");
        let other = cache.digest("sk_live_other");
        assert!(!cache.verified_before("k1", &token, "$argon2id$a"));
        cache.note_verified("k1", token, "$argon2id$a");
        assert!(cache.verified_before("k1", &token, "$argon2id$a"));
        assert!(
            !cache.verified_before("k1", &other, "$argon2id$a"),
            "another token"
        );
        assert!(
            !cache.verified_before("k1", &token, "$argon2id$b"),
            "another hash"
        );
        assert!(
            !cache.verified_before("k2", &token, "$argon2id$a"),
            "another key id"
        );
        cache.invalidate_all();
        assert!(
            !cache.verified_before("k1", &token, "$argon2id$a"),
            "after a flush"
        );
    }
}

//! The verified-credential cache: what argon2 (and the store) said about a token,
//! remembered so that a request with a known token costs one HMAC and one map lookup.
//!
//! - Keyed by HMAC-SHA-256(pepper-derived key, token): the cache never holds a token, and
//!   a memory dump does not give one away.
//! - Single flight: concurrent misses for one token share one verification. The first
//!   caller leads it; the others wait for its answer. If the leader is cancelled (its
//!   request timed out), a waiter takes over.
//! - Failed verifications are remembered for a short `negative_ttl`, so repeating a bad
//!   guess costs no argon2. Backend failures and `Verified::Refused` are never cached.
//! - Invalidation (`invalidate_key`, `invalidate_all`) and the caching of a finished
//!   verification take one lock, and a verification is cached only if no invalidation of
//!   its key (and no flush) happened after it started; otherwise it runs again against the
//!   store. So an invalidation that happened after a verification started always wins,
//!   however the two interleave.
//! - A revocation leaves a tombstone: the token's digest is known, so its entry becomes
//!   `revoked_api_key` at once, and the next check answers without argon2 or the store.
//! - When a valid entry's TTL runs out, the key's record is read again (its state may
//!   have changed) but argon2 does not run again if the stored hash is the one this
//!   token was verified against (`verified_before`): a key id's secret never changes,
//!   and without this every active key would cost one argon2 per TTL, more than a
//!   replica can pay beyond ~1,500 active keys.
//!
//! Its setting (`cache`: TTLs, size) is its own, in `config.rs`.
//!
//! One file over 500 lines because the entries, the single flight and the invalidation
//! epochs share one lock discipline that is only checkable in one place.

mod config;

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use moka::sync::Cache;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::decision::DenyReason;
use crate::principal::Principal;
use crate::secret::Secret;
use crate::store::{now_ms, EventKind, StoreError};

pub use config::CacheConfig;

pub type Digest = [u8; 32];

/// What is known about one token.
#[derive(Debug, Clone)]
pub enum Verified {
    Valid(Arc<Principal>),
    Invalid(DenyReason),
    /// A denial that is not remembered: it holds only for now (a key id whose failed
    /// verifications are over their bound).
    Refused(DenyReason),
}

/// Why a verification has no answer: the store (or argon2's queue) could not be asked.
pub type VerifyError = Arc<StoreError>;

struct EntryExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl moka::Expiry<Digest, Verified> for EntryExpiry {
    fn expire_after_create(&self, _: &Digest, value: &Verified, _: Instant) -> Option<Duration> {
        Some(match value {
            Verified::Valid(p) => {
                // Never trust an entry past the key's own expiry.
                p.life_left(now_ms()).unwrap_or(self.ttl).min(self.ttl)
            }
            // A revoked key stays revoked; remembering that longer is safe.
            Verified::Invalid(DenyReason::RevokedApiKey) => self.ttl,
            Verified::Invalid(_) | Verified::Refused(_) => self.negative_ttl,
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

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

/// What invalidations happened, in the order of one counter, so that a verification can
/// tell whether one happened after it started.
#[derive(Default)]
struct Invalidations {
    /// Bumped by every invalidation and by every verification's start.
    epoch: u64,
    /// The epoch of the last `invalidate_all`.
    flushed_at: u64,
    /// Key id → epoch of its last invalidation. Only needed while a verification that
    /// started before it is running: pruned against `running`.
    keys: HashMap<Box<str>, u64>,
    /// The epoch of the last key's invalidation.
    last_key_at: u64,
    /// Start epochs of the verifications running now (epoch → how many).
    running: BTreeMap<u64, usize>,
}

impl Invalidations {
    fn since(&self, key_id: &str, started: u64) -> bool {
        self.flushed_at > started || self.keys.get(key_id).is_some_and(|&at| at > started)
    }

    fn invalidated(&mut self, key_id: &str) {
        self.epoch += 1;
        let epoch = self.epoch;
        match self.running.keys().next() {
            // Nobody can ask about an older invalidation.
            None => self.keys.clear(),
            Some(&oldest) if self.keys.len() >= 1024 => self.keys.retain(|_, at| *at > oldest),
            Some(_) => {}
        }
        self.last_key_at = epoch;
        self.keys.insert(key_id.into(), epoch);
    }
}

/// An answer shared between the leader of a verification and its waiters.
type Shared = Option<Result<Verified, VerifyError>>;

pub struct CredentialCache {
    entries: Cache<Digest, Verified>,
    by_key: KeyIndex,
    /// Keys the stored-hash fingerprints, so that nobody can choose two hashes that match.
    fingerprints: RandomState,
    invalidations: Mutex<Invalidations>,
    /// Verifications in flight, by digest: their waiters' end of the answer.
    flights: Mutex<HashMap<Digest, watch::Receiver<Shared>>>,
    mac: Hmac<Sha256>,
    /// Names the entries that hold a key's state (`state_digest`): a key of its own, so no
    /// token, whatever its bytes, can digest to a key's state entry.
    state_mac: Hmac<Sha256>,
}

/// The result of a lookup: the value and whether it came from the cache.
pub struct Lookup {
    pub value: Result<Verified, VerifyError>,
    pub hit: bool,
}

/// Ends a flight however its leader stops: its waiters see the answer, or (a cancelled
/// leader) the sender dropped, and one of them leads again.
struct Flight<'a> {
    cache: &'a CredentialCache,
    digest: Digest,
    answer: watch::Sender<Shared>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        lock(&self.cache.flights).remove(&self.digest);
    }
}

/// Deregisters a verification's start epoch however it ends.
struct Running<'a> {
    cache: &'a CredentialCache,
    started: u64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut inv = self.cache.invalidations();
        if let Some(n) = inv.running.get_mut(&self.started) {
            *n -= 1;
            if *n == 0 {
                inv.running.remove(&self.started);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks can be left half-changed by a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CredentialCache {
    pub fn new(cfg: &CacheConfig, pepper: &Secret) -> Self {
        // A key of its own, derived from the pepper, so cache digests and argon2 inputs
        // never share key material directly.
        let mut derive = <Hmac<Sha256> as Mac>::new_from_slice(pepper.expose().as_bytes())
            .expect("HMAC takes any key length");
        let mut derive_state = derive.clone();
        derive.update(b"keygate credential cache v1");
        let key = derive.finalize().into_bytes();
        derive_state.update(b"keygate key state cache v1");
        let state_key = derive_state.finalize().into_bytes();
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
            invalidations: Mutex::default(),
            flights: Mutex::default(),
            mac: <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length"),
            state_mac: <Hmac<Sha256> as Mac>::new_from_slice(&state_key)
                .expect("HMAC takes any key length"),
        }
    }

    fn invalidations(&self) -> MutexGuard<'_, Invalidations> {
        lock(&self.invalidations)
    }

    pub fn digest(&self, token: &str) -> Digest {
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The name of the entry that holds what is known of `key_id`'s current state (read
    /// from its record, never from a secret): what a session token minted from that key
    /// is checked against. Invalidated with the key's token entry (`invalidate_key`).
    pub fn state_digest(&self, key_id: &str) -> Digest {
        let mut mac = self.state_mac.clone();
        mac.update(key_id.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The cached answer for `digest`, or the answer of `verify` (shared with every
    /// concurrent caller for the same digest), cached unless it is an error or `Refused`.
    pub async fn get_or_verify<F, Fut>(&self, digest: Digest, key_id: &str, verify: F) -> Lookup
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Verified, StoreError>>,
    {
        let m = crate::telemetry::metrics();
        if let Some(v) = self.entries.get(&digest) {
            m.cache_hits.inc();
            return Lookup {
                value: Ok(v),
                hit: true,
            };
        }
        m.cache_misses.inc();
        loop {
            let joined = {
                let mut flights = lock(&self.flights);
                match flights.get(&digest) {
                    Some(rx) => Err(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        flights.insert(digest, rx);
                        Ok(Flight {
                            cache: self,
                            digest,
                            answer: tx,
                        })
                    }
                }
            };
            match joined {
                Ok(flight) => {
                    // A flight that ended between our miss and taking the lead has
                    // cached its answer already.
                    let value = match self.entries.get(&digest) {
                        Some(v) => Ok(v),
                        None => self.lead(digest, key_id, &verify).await,
                    };
                    flight.answer.send_replace(Some(value.clone()));
                    return Lookup { value, hit: false };
                }
                Err(mut rx) => {
                    if let Ok(answer) = rx.wait_for(Option::is_some).await {
                        let value = answer.clone().expect("waited for an answer");
                        return Lookup { value, hit: false };
                    }
                    // The leader was cancelled before it answered: lead (or join) anew.
                }
            }
        }
    }

    /// Verifies until no invalidation of `key_id` overtook the verification, then caches
    /// the answer, under the lock that invalidations take.
    async fn lead<F, Fut>(
        &self,
        digest: Digest,
        key_id: &str,
        verify: &F,
    ) -> Result<Verified, VerifyError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Verified, StoreError>>,
    {
        loop {
            let running = {
                let mut inv = self.invalidations();
                inv.epoch += 1;
                let started = inv.epoch;
                *inv.running.entry(started).or_default() += 1;
                Running {
                    cache: self,
                    started,
                }
            };
            let value = verify().await.map_err(Arc::new)?;
            let inv = self.invalidations();
            if inv.since(key_id, running.started) {
                // What was read may predate the invalidation: read again.
                drop(inv);
                continue;
            }
            if !matches!(value, Verified::Refused(_)) {
                self.entries.insert(digest, value.clone());
            }
            drop(inv);
            return Ok(value);
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

    /// Applies what happened to a key, at once. A revoked or deleted key's token (if it
    /// was verified here) is remembered as denied, so its next check costs nothing; any
    /// other change drops the entry, and the next check reads the record again (without
    /// argon2: the secret has not changed). `None`: a change this version cannot read,
    /// which drops the entry too.
    pub fn invalidate_key(&self, key_id: &str, kind: Option<EventKind>) {
        let mut inv = self.invalidations();
        inv.invalidated(key_id);
        // The key's state entry, if a session token had it read here: read again on next
        // use (no tombstone: most keys never had one, and a revoked key is one read away).
        self.entries.invalidate(&self.state_digest(key_id));
        // A deleted id no longer exists: its mapping goes, and its token answers what an
        // unknown id answers.
        let known = match kind {
            Some(EventKind::Deleted) => self.by_key.take(key_id),
            _ => self.by_key.get(key_id),
        };
        let Some(v) = known else {
            return;
        };
        match kind {
            Some(EventKind::Revoked) => {
                let tombstone = Verified::Invalid(DenyReason::RevokedApiKey);
                self.entries.insert(v.digest, tombstone);
            }
            Some(EventKind::Deleted) => {
                let tombstone = Verified::Invalid(DenyReason::InvalidApiKey);
                self.entries.insert(v.digest, tombstone);
            }
            Some(EventKind::Updated) | None => self.entries.invalidate(&v.digest),
        }
        drop(inv);
    }

    /// Drops every entry (the revocation stream was lost past what can be replayed).
    /// What is known of secrets stays: a key id's secret never changes, and every record
    /// is read again from the store before it is trusted.
    pub fn invalidate_all(&self) {
        let mut inv = self.invalidations();
        inv.epoch += 1;
        inv.flushed_at = inv.epoch;
        self.entries.invalidate_all();
        drop(inv);
    }

    /// Drops what was decided about JWTs and session tokens, and keeps what was decided
    /// about API keys: a changed `jwt` or `sessions` section (a live reload) can make a
    /// token's answer wrong (an issuer removed, a claim mapped otherwise, a rejected
    /// issuer added), while an API key's answer depends on its record alone.
    pub fn invalidate_tokens(&self) {
        let mut inv = self.invalidations();
        inv.epoch += 1;
        // A verification running now may have used the old issuers: its answer is not
        // kept (an API key's is just not cached this once).
        inv.flushed_at = inv.epoch;
        for (digest, verified) in self.entries.iter() {
            let token = match &verified {
                Verified::Valid(p) => p.credential != crate::principal::CredentialKind::ApiKey,
                Verified::Invalid(r) | Verified::Refused(r) => *r == DenyReason::InvalidToken,
            };
            if token {
                self.entries.invalidate(&*digest);
            }
        }
        drop(inv);
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// What is cached for this token, without verifying anything on a miss (the module
    /// inside Envoy, which hands a miss to the service).
    pub fn peek(&self, digest: &Digest) -> Option<Verified> {
        self.entries.get(digest)
    }

    /// The invalidations so far: taken before asking the service about a token, and
    /// handed back to `learn` with its answer.
    pub fn epoch(&self) -> u64 {
        self.invalidations().epoch
    }

    /// Caches `principal`, the service's answer for this token (of `key_id`, or any JWT),
    /// asked when `epoch()` was `since` — unless any invalidation happened here since: the answer may predate it (invalidation wins, as for a
    /// verification of this replica's own). An API key is indexed as a verified one is,
    /// so its revocation leaves a tombstone. Whether it was kept.
    pub fn learn(&self, digest: Digest, principal: Arc<Principal>, since: u64) -> bool {
        let key_id = match principal.credential {
            crate::principal::CredentialKind::ApiKey => principal.key_id.as_deref(),
            _ => None,
        };
        let inv = self.invalidations();
        // Any invalidation at all, not only of this key: the module that learns keeps no
        // verification running, so `keys` holds none of its history.
        if inv.last_key_at > since || inv.flushed_at > since {
            return false;
        }
        if let Some(key_id) = key_id {
            // No stored hash is known here: a fingerprint that matches none, so an expired
            // entry is never taken for an argon2 already run.
            self.by_key.set(
                key_id,
                Verification {
                    digest,
                    hash_fingerprint: self.fingerprints.hash_one("learned"),
                },
            );
        }
        self.entries.insert(digest, Verified::Valid(principal));
        drop(inv);
        true
    }

    /// Applies pending maintenance (for tests and memory measurements).
    pub async fn sync(&self) {
        self.entries.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests;

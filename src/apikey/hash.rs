//! argon2id hashing of key secrets, with a server-side pepper.
//!
//! The pepper is passed as argon2's secret input, so a Redis dump alone (hashes, salts,
//! parameters) is not enough to test guesses offline. Verification is deliberately slow,
//! so it runs on threads of its own, `verify_concurrency` of them, fed from one queue: a
//! flood of cold or wrong keys occupies at most those threads and never stalls the async
//! runtime. The threads run `nice` steps below the rest of keygate, so when the cores are
//! contended the scheduler serves cached keys first and argon2 takes what is left.
//!
//! Each thread keeps argon2's working memory (`memory_kib`) from one verification to the
//! next (verifying, or hashing a new key), instead of allocating and zeroing it each
//! time, with the page faults and the flushes of both cores' TLBs that come with the
//! allocator handing it back to the kernel: 6% of a verification's CPU in keygate
//! (BENCHMARKS.md, section 4).

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use argon2::password_hash::{self, Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::{RngCore, TryRngCore};
use subtle::ConstantTimeEq;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Argon2Config;
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2 parameters are invalid: {0}")]
    Params(String),
    #[error("stored key hash is not a valid PHC string")]
    BadStoredHash,
    #[error("argon2 worker failed: {0}")]
    Worker(String),
    /// Every argon2 thread is busy and the queue is full: try again later.
    #[error("every argon2 thread is busy and {0} verifications are waiting")]
    Busy(usize),
}

/// Hashes and verifies secrets. Cheap to clone.
#[derive(Clone)]
pub struct SecretHasher {
    inner: Arc<Inner>,
}

struct Inner {
    pepper: Secret,
    /// Keys the verifiers (`SecretHasher::verifier`): derived from the pepper, never the
    /// pepper itself.
    verifier_mac: Hmac<Sha256>,
    params: Params,
    /// The argon2 threads' queue, bounded. Dropping it (with the hasher) ends the threads.
    jobs: mpsc::SyncSender<Job>,
    queue_depth: usize,
    verifications: AtomicU64,
}

type Job = Box<dyn FnOnce() + Send>;

/// A verifier's length: 128 bits of HMAC-SHA-256.
const VERIFIER_BYTES: usize = 16;

/// The name of the argon2 threads (seen in `top -H`, and by the tests).
pub const THREAD_NAME: &str = "keygate-argon2";

thread_local! {
    /// argon2's working memory, kept by each thread that verifies (see the module doc).
    static KEPT_MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

impl SecretHasher {
    pub fn new(pepper: Secret, cfg: &Argon2Config) -> Result<Self, HashError> {
        let params = Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None)
            .map_err(|e| HashError::Params(e.to_string()))?;
        // Fail now, not on the first request, if the pepper is unusable as argon2 secret.
        Argon2::new_with_secret(
            pepper.expose().as_bytes(),
            Algorithm::Argon2id,
            Version::V0x13,
            params.clone(),
        )
        .map_err(|e| HashError::Params(e.to_string()))?;
        let (jobs, queue) = mpsc::sync_channel::<Job>(cfg.queue_depth.max(1));
        let queue = Arc::new(Mutex::new(queue));
        let threads = cfg.verify_concurrency.max(1);
        let (started, all_started) = mpsc::channel::<()>();
        for _ in 0..threads {
            let (queue, nice, started) = (queue.clone(), cfg.nice, started.clone());
            std::thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn(move || {
                    lower_priority(nice);
                    let _ = started.send(());
                    // One thread waits on the queue while the others wait for the lock.
                    while let Ok(job) = queue
                        .lock()
                        .map_err(drop)
                        .and_then(|q| q.recv().map_err(drop))
                    {
                        job();
                    }
                })
                .map_err(|e| HashError::Worker(format!("cannot start an argon2 thread: {e}")))?;
        }
        // Every thread is at its priority before the hasher is used (nothing before the
        // send can fail: lower_priority only logs).
        drop(started);
        for _ in 0..threads {
            all_started
                .recv()
                .map_err(|_| HashError::Worker("an argon2 thread ended at start".into()))?;
        }
        let mut derive = <Hmac<Sha256> as Mac>::new_from_slice(pepper.expose().as_bytes())
            .expect("HMAC takes any key length");
        derive.update(b"keygate key verifier v1");
        let verifier_mac = <Hmac<Sha256> as Mac>::new_from_slice(&derive.finalize().into_bytes())
            .expect("HMAC takes any key length");
        Ok(SecretHasher {
            inner: Arc::new(Inner {
                pepper,
                verifier_mac,
                params,
                jobs,
                queue_depth: cfg.queue_depth.max(1),
                verifications: AtomicU64::new(0),
            }),
        })
    }

    fn argon2(&self) -> Argon2<'_> {
        Argon2::new_with_secret(
            self.inner.pepper.expose().as_bytes(),
            Algorithm::Argon2id,
            Version::V0x13,
            self.inner.params.clone(),
        )
        .expect("checked in SecretHasher::new")
    }

    /// The PHC string for a new secret.
    pub async fn hash(&self, secret: &str) -> Result<String, HashError> {
        let this = self.clone();
        let secret = Secret::new(secret.to_owned());
        self.run(move || {
            let invalid = |e: password_hash::Error| HashError::Params(e.to_string());
            // What `SaltString::generate` draws, from the rand keygate uses (argon2's
            // takes an older rand_core).
            let mut salt_bytes = [0u8; password_hash::Salt::RECOMMENDED_LENGTH];
            rand::rngs::OsRng.unwrap_err().fill_bytes(&mut salt_bytes);
            let salt = SaltString::encode_b64(&salt_bytes).map_err(invalid)?;
            let argon2 = this.argon2();
            let output = Output::init_with(Params::DEFAULT_OUTPUT_LEN, |out| {
                Ok(this.compute(&argon2, secret.expose().as_bytes(), &salt_bytes, out)?)
            })
            .map_err(invalid)?;
            // The PHC string argon2's own `hash_password` writes.
            let phc = PasswordHash {
                algorithm: argon2::ARGON2ID_IDENT,
                version: Some(Version::V0x13.into()),
                params: ParamsString::try_from(argon2.params()).map_err(invalid)?,
                salt: Some(salt.as_salt()),
                hash: Some(output),
            };
            Ok(phc.to_string())
        })
        .await
    }

    /// argon2 of `password` and `salt` into `out`: in the calling thread's kept memory
    /// when `argon2`'s parameters need no more than this hasher's own (see the module
    /// doc), so that a stored hash with bigger ones (written under an older setting, or
    /// tampered with) does not make the thread keep more than it was configured for.
    fn compute(
        &self,
        argon2: &Argon2<'_>,
        password: &[u8],
        salt: &[u8],
        out: &mut [u8],
    ) -> Result<(), argon2::Error> {
        let configured = self.inner.params.block_count();
        if argon2.params().block_count() > configured {
            return argon2.hash_password_into(password, salt, out);
        }
        KEPT_MEMORY.with_borrow_mut(|kept| {
            if kept.len() < configured {
                kept.resize(configured, Block::default());
            }
            argon2.hash_password_into_with_memory(password, salt, out, &mut kept[..])
        })
    }

    /// What a replica leaves beside a key's record once argon2 has accepted `secret` for
    /// `key_id`, so that every other replica and every later start accepts the same token
    /// with one HMAC instead of argon2: HMAC-SHA-256, under a key derived from the pepper,
    /// of the key id and the secret, its first 128 bits in hex. Useless without the
    /// pepper; with it, no easier to turn into a secret than the argon2 hash (a secret is
    /// 160 random bits or more). See docs/security.md.
    pub fn verifier(&self, key_id: &str, secret: &str) -> String {
        let mut mac = self.inner.verifier_mac.clone();
        mac.update(key_id.as_bytes());
        mac.update(b"\0");
        mac.update(secret.as_bytes());
        let tag = mac.finalize().into_bytes();
        tag[..VERIFIER_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `stored` is the verifier of `secret` for `key_id` (constant time).
    pub fn verifier_matches(&self, key_id: &str, secret: &str, stored: &str) -> bool {
        self.verifier(key_id, secret)
            .as_bytes()
            .ct_eq(stored.as_bytes())
            .into()
    }

    /// Whether `secret` matches the stored PHC string. Counts every verification.
    pub async fn verify(&self, secret: &str, phc: &str) -> Result<bool, HashError> {
        let this = self.clone();
        let secret = Secret::new(secret.to_owned());
        let phc = phc.to_owned();
        self.run(move || {
            this.inner.verifications.fetch_add(1, Ordering::Relaxed);
            crate::telemetry::metrics().argon2_verifications.inc();
            let parsed = PasswordHash::new(&phc).map_err(|_| HashError::BadStoredHash)?;
            this.matches(secret.expose().as_bytes(), &parsed)
        })
        .await
    }

    /// Whether `password`, with the pepper, hashes to `stored`'s output under `stored`'s
    /// own algorithm, version, parameters and salt (what argon2's `verify_password`
    /// computes), in the calling thread's kept memory. The output is compared in constant
    /// time. A stored hash argon2 cannot compute with is `BadStoredHash`.
    fn matches(&self, password: &[u8], stored: &PasswordHash<'_>) -> Result<bool, HashError> {
        fn bad<E>(_: E) -> HashError {
            HashError::BadStoredHash
        }
        let (Some(salt), Some(expected)) = (stored.salt, stored.hash) else {
            return Err(HashError::BadStoredHash);
        };
        let algorithm = Algorithm::try_from(stored.algorithm).map_err(bad)?;
        let version = stored
            .version
            .map(Version::try_from)
            .transpose()
            .map_err(bad)?
            .unwrap_or_default();
        let params = Params::try_from(stored).map_err(bad)?;
        // A stored hash sets its own cost; one written by someone with write access to
        // Redis could ask for any. Within 4× of this hasher's settings (room for an older,
        // costlier setting), else refused rather than computed.
        let own = &self.inner.params;
        if params.m_cost() > own.m_cost().saturating_mul(4)
            || params.t_cost() > own.t_cost().saturating_mul(4)
            || params.p_cost() > own.p_cost().saturating_mul(4)
        {
            return Err(HashError::BadStoredHash);
        }
        let mut salt_buf = [0u8; 64];
        let salt = salt.decode_b64(&mut salt_buf).map_err(bad)?;
        let argon2 = Argon2::new_with_secret(
            self.inner.pepper.expose().as_bytes(),
            algorithm,
            version,
            params,
        )
        .map_err(bad)?;
        let mut out = [0u8; 64];
        let out = out
            .get_mut(..expected.len())
            .ok_or(HashError::BadStoredHash)?;
        self.compute(&argon2, password, salt, out).map_err(bad)?;
        Ok(bool::from(expected.as_bytes().ct_eq(out)))
    }

    /// Runs `job` on an argon2 thread, after the jobs queued before it; `Busy` at once if
    /// `queue_depth` jobs are already waiting.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.inner
            .jobs
            .try_send(Box::new(move || {
                // The caller stopped waiting while this was queued (its request was
                // cancelled or timed out): a flood of abandoned requests costs no argon2.
                if done.is_closed() {
                    return;
                }
                // A panic fails this job (its sender is dropped), not the thread.
                if let Ok(r) = catch_unwind(AssertUnwindSafe(job)) {
                    let _ = done.send(r);
                }
            }))
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => {
                    crate::telemetry::metrics().argon2_queue_full.inc();
                    HashError::Busy(self.inner.queue_depth)
                }
                mpsc::TrySendError::Disconnected(_) => {
                    HashError::Worker("the argon2 threads have stopped".into())
                }
            })?;
        result
            .await
            .map_err(|_| HashError::Worker("an argon2 job panicked".into()))?
    }

    /// How many argon2 verifications this hasher has run.
    pub fn verifications(&self) -> u64 {
        self.inner.verifications.load(Ordering::Relaxed)
    }
}

/// Makes the calling thread `nice` steps nicer (Linux keeps a nice value per thread).
/// Lowering a priority needs no privilege; if it fails anyway, argon2 runs at keygate's.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    if let Err(e) = rustix::process::nice(nice) {
        tracing::warn!(event = "argon2.priority_unchanged",
            error = %e,
            nice,
            "cannot lower the priority of an argon2 thread; it runs at keygate's"
        );
    }
}

#[cfg(test)]
mod tests;

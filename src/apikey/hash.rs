//! argon2id hashing of key secrets, with a server-side pepper.
//!
//! The pepper is passed as argon2's secret input, so a Redis dump alone (hashes, salts,
//! parameters) is not enough to test guesses offline. Verification is deliberately slow,
//! so it runs on the blocking pool behind a semaphore: a flood of cold or wrong keys can
//! occupy at most `concurrency` threads and never stalls the async runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::config::Argon2Config;
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2 parameters are invalid: {0}")]
    Params(String),
    #[error("stored key hash is not a valid PHC string")]
    BadStoredHash,
    #[error("argon2 worker failed: {0}")]
    Worker(String),
}

/// Hashes and verifies secrets. Cheap to clone.
#[derive(Clone)]
pub struct SecretHasher {
    inner: Arc<Inner>,
}

struct Inner {
    pepper: Secret,
    params: Params,
    permits: Semaphore,
    verifications: AtomicU64,
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
        Ok(SecretHasher {
            inner: Arc::new(Inner {
                pepper,
                params,
                permits: Semaphore::new(cfg.verify_concurrency.max(1)),
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
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            this.argon2()
                .hash_password(secret.expose().as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| HashError::Params(e.to_string()))
        })
        .await
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
            Ok(this
                .argon2()
                .verify_password(secret.expose().as_bytes(), &parsed)
                .is_ok())
        })
        .await
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|e| HashError::Worker(e.to_string()))?;
        tokio::task::spawn_blocking(job)
            .await
            .map_err(|e| HashError::Worker(e.to_string()))?
    }

    /// How many argon2 verifications this hasher has run.
    pub fn verifications(&self) -> u64 {
        self.inner.verifications.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> Argon2Config {
        Argon2Config {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
            verify_concurrency: 2,
        }
    }

    #[tokio::test]
    async fn hash_verifies_only_with_the_same_secret_and_pepper() {
        let pepper = Secret::new("p".repeat(32));
        let h = SecretHasher::new(pepper, &fast()).unwrap();
        let phc = h.hash("s3cret").await.unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(!phc.contains("s3cret"));
        assert!(h.verify("s3cret", &phc).await.unwrap());
        assert!(!h.verify("s3creT", &phc).await.unwrap());
        let other = SecretHasher::new(Secret::new("q".repeat(32)), &fast()).unwrap();
        assert!(!other.verify("s3cret", &phc).await.unwrap());
        assert_eq!(h.verifications(), 2);
    }

    #[tokio::test]
    async fn a_corrupt_stored_hash_is_an_error_not_a_mismatch() {
        let h = SecretHasher::new(Secret::new("p".repeat(32)), &fast()).unwrap();
        assert!(matches!(
            h.verify("x", "not-a-phc").await,
            Err(HashError::BadStoredHash)
        ));
    }
}

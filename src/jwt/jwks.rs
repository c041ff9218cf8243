//! Where an issuer's keys come from: a shared secret, keygate's own session keys, a JWKS
//! file (re-read when it changes) or a JWKS URL (refreshed in the background and on an
//! unknown `kid`, single flight, rate-limited, the last good set kept when it fails); and
//! which keys of a JWKS keygate can use.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::DecodingKey;
use serde_json::Value;

use crate::file_watch::FileWatch;

pub(super) enum Keys {
    Shared(DecodingKey),
    /// keygate's own session keys: fixed for the life of the process.
    Own(Arc<KeySet>),
    File(Arc<FileJwks>),
    Remote(Arc<RemoteJwks>),
}

/// A JWKS file, re-read when it changes (checked every `FILE_CHECK`).
pub(super) struct FileJwks {
    pub(super) issuer: Arc<str>,
    pub(super) path: String,
    pub(super) set: RwLock<Arc<KeySet>>,
    /// The file, as it was when `set` was first read from it.
    pub(super) changes: FileWatch,
}

/// How often JWKS files are checked for a change.
pub(super) const FILE_CHECK: Duration = Duration::from_secs(2);

impl FileJwks {
    pub(super) fn current(&self) -> Arc<KeySet> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the file (it changed). A file that no longer reads as a JWKS keeps the
    /// last good set (and says so in the log).
    pub(super) fn reload(&self) {
        match std::fs::read_to_string(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|t| KeySet::from_jwks(&self.issuer, &t))
        {
            Ok(set) => {
                *self.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                tracing::info!(event = "jwks.file_reloaded", issuer = %self.issuer, path = %self.path, "JWKS file re-read");
            }
            Err(e) => {
                tracing::warn!(event = "jwks.file_unreadable", issuer = %self.issuer, path = %self.path, error = %e, "JWKS file changed but cannot be read; keeping the last good set")
            }
        }
    }
}

/// By `kid`; a set of one key also serves tokens without a `kid`.
#[derive(Default)]
pub(super) struct KeySet {
    pub(super) by_kid: HashMap<String, DecodingKey>,
    pub(super) only: Option<DecodingKey>,
}

impl KeySet {
    pub(super) fn get(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.only.as_ref(),
        }
    }
}

/// The most a JWKS response may hold; a longer one is refused (and the last good set kept).
pub const JWKS_MAX_BYTES: usize = 1 << 20;

/// An issuer's JWKS URL and the last set it served.
pub(super) struct RemoteJwks {
    pub(super) issuer: Arc<str>,
    pub(super) url: String,
    /// Follows no redirect: the configured URL must answer itself.
    pub(super) client: reqwest::Client,
    pub(super) set: RwLock<Arc<KeySet>>,
    /// When the last fetch was started and whether one is under way. Held only to look
    /// and decide, never across the fetch.
    pub(super) fetching: std::sync::Mutex<Fetching>,
    /// Counts finished fetches: callers wait on it for the fetch under way (single flight).
    pub(super) fetched: tokio::sync::watch::Sender<u64>,
    pub(super) refetch_min: Duration,
    pub(super) refresh: Duration,
}

#[derive(Default)]
pub(super) struct Fetching {
    pub(super) last_try: Option<Instant>,
    pub(super) in_flight: bool,
}

/// Ends a fetch however its task ends (done, panicked, or dropped with the runtime), so
/// no caller waits for a fetch that will never finish.
pub(super) struct FetchDone(Arc<RemoteJwks>);

impl Drop for FetchDone {
    fn drop(&mut self) {
        let mut f = self.0.fetching.lock().unwrap_or_else(|e| e.into_inner());
        f.in_flight = false;
        // Under the lock: whoever saw `in_flight` subscribed before this.
        self.0.fetched.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl RemoteJwks {
    pub(super) fn current(&self) -> Arc<KeySet> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches the set unless one was started within `min` (then the caller uses what is
    /// there), and returns when the fetch has ended. Concurrent callers share the fetch
    /// under way: it runs in a task of its own, so a caller that gives up (its request
    /// cancelled) does not end it for the others. A failure keeps the last good set.
    pub(super) async fn refetch(self: &Arc<Self>, min: Duration) {
        let mut done = {
            let mut f = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            let done = self.fetched.subscribe();
            if !f.in_flight {
                if f.last_try.is_some_and(|at| at.elapsed() < min) {
                    return;
                }
                f.last_try = Some(Instant::now());
                f.in_flight = true;
                let guard = FetchDone(self.clone());
                tokio::spawn(async move {
                    guard.0.fetch_and_keep().await;
                    drop(guard);
                });
            }
            done
        };
        // The fetch ends within the client's timeout; the sender lives as long as `self`.
        let _ = done.changed().await;
    }

    pub(super) async fn fetch_and_keep(&self) {
        let m = crate::telemetry::metrics();
        match self.fetch().await {
            Ok(set) => {
                *self.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                m.jwks_fetches
                    .with_label_values(&[&self.issuer, "ok"])
                    .inc();
                m.jwks_fetched_at
                    .with_label_values(&[&self.issuer])
                    .set((crate::store::now_ms() / 1000) as i64);
                tracing::debug!(event = "jwks.fetched", issuer = %self.issuer, "JWKS fetched");
            }
            Err(e) => {
                m.jwks_fetches
                    .with_label_values(&[&self.issuer, "error"])
                    .inc();
                tracing::warn!(event = "jwks.fetch_failed", issuer = %self.issuer, url = %self.url, error = %e, "JWKS fetch failed; keeping the last good set");
            }
        }
    }

    pub(super) async fn fetch(&self) -> Result<KeySet, String> {
        let mut resp = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(format!(
                "HTTP {status}: redirects are not followed (configure the URL that answers)"
            ));
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let too_large = || format!("response is larger than {JWKS_MAX_BYTES} bytes");
        if resp
            .content_length()
            .is_some_and(|n| n > JWKS_MAX_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > JWKS_MAX_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(body).map_err(|_| "response is not UTF-8".to_owned())?;
        KeySet::from_jwks(&self.issuer, &text)
    }
}

impl KeySet {
    /// Reads a JWKS document. A key that cannot be used (a shape or type this version
    /// does not read, bad parameters, no `kid` in a set of several) is skipped, logged by
    /// its index and `kid` (never its material) and counted in
    /// `keygate_jwks_keys_skipped_total`; the others are kept. A document with no usable
    /// key is an error.
    pub(super) fn from_jwks(issuer: &str, text: &str) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<Value>,
        }
        let doc: Document = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
        if doc.keys.is_empty() {
            return Err("holds no key".into());
        }
        let several = doc.keys.len() > 1;
        let mut by_kid = HashMap::new();
        let mut only = None;
        let mut skipped = 0usize;
        for (n, raw) in doc.keys.into_iter().enumerate() {
            let kid: Option<String> = raw
                .get("kid")
                .and_then(Value::as_str)
                .map(|k| k.chars().take(128).collect());
            match usable_key(raw, several) {
                Ok((kid, key)) => {
                    if !several {
                        only = Some(key.clone());
                    }
                    if let Some(kid) = kid {
                        by_kid.insert(kid, key);
                    }
                }
                Err(why) => {
                    skipped += 1;
                    crate::telemetry::metrics()
                        .jwks_keys_skipped
                        .with_label_values(&[issuer])
                        .inc();
                    tracing::warn!(
                        event = "jwks.key_skipped",
                        issuer,
                        key = n,
                        kid = kid.as_deref().unwrap_or(""),
                        why,
                        "JWKS key skipped; the others are kept"
                    );
                }
            }
        }
        if by_kid.is_empty() && only.is_none() {
            return Err(format!("holds no usable key ({skipped} skipped)"));
        }
        Ok(KeySet { by_kid, only })
    }
}

/// One JWKS entry as a key and its `kid`, or why it cannot be used. The reason names no
/// part of the key: an `oct` key's material is a secret.
pub(super) fn usable_key(
    raw: Value,
    several: bool,
) -> Result<(Option<String>, DecodingKey), &'static str> {
    let jwk: Jwk = serde_json::from_value(raw)
        .map_err(|_| "not a JWK this version reads (kty, alg, use or a parameter)")?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::UnsupportedAlgorithm => "unsupported key type",
        _ => "malformed key parameters",
    })?;
    if jwk.common.public_key_use == Some(jsonwebtoken::jwk::PublicKeyUse::Encryption) {
        return Err("an encryption key (use: enc)");
    }
    if several && jwk.common.key_id.is_none() {
        return Err("no kid (needed in a set of several keys)");
    }
    Ok((jwk.common.key_id, key))
}

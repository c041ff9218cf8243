//! TLS for keygate's gRPC and admin listeners (rustls): the certificate and key from
//! files, and, with a client CA, client certificates required and verified (mTLS).
//!
//! Owns only the handshake's configuration; `transport` runs the handshakes. All three
//! files are re-read when one of them changes — by a background task (`ListenerTls::watch`)
//! that looks at them every second (`file_watch`) and swaps in a whole new rustls
//! configuration. A handshake only clones the current configuration's `Arc`: it does no
//! file I/O and waits on no reload. A file that no longer reads after a change keeps the
//! last good configuration (logged, and counted in `keygate_tls_reloads_total`), so a
//! half-written renewal never takes the listener down; it is tried again at each check
//! until the files read.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsConfig};
use crate::file_watch::FileWatch;

/// How often the files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// A listener's TLS configuration, kept current with its files (cheap to clone).
#[derive(Clone)]
pub struct ListenerTls {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where the listener's TLS is configured (`listen.grpc_tls`), for errors and metrics.
    field: String,
    files: TlsConfig,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// The files, as they were when `current` was first read from them.
    changes: FileWatch,
    reloads: watch::Sender<Reloads>,
}

/// How many times the files were re-read after a change, and how many of those failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloads {
    pub ok: u64,
    pub failed: u64,
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("field", &self.inner.field)
            .field("cert_file", &self.inner.files.cert_file)
            .field("client_ca_file", &self.inner.files.client_ca_file)
            .finish_non_exhaustive()
    }
}

impl ListenerTls {
    /// Reads the files of a listener's TLS (`field`: where it is configured, for errors).
    pub fn load(cfg: &TlsConfig, field: &str) -> Result<ListenerTls, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Before reading, so that a change made while reading is seen by the next check.
        let files = [&cfg.cert_file, &cfg.key_file].into_iter();
        let changes = FileWatch::new(files.chain(&cfg.client_ca_file), RELOAD_CHECK);
        let config = server_config(cfg, field, &provider)?;
        Ok(ListenerTls {
            inner: Arc::new(Inner {
                field: field.to_owned(),
                files: cfg.clone(),
                provider,
                current: RwLock::new(Arc::new(config)),
                changes,
                reloads: watch::Sender::new(Reloads::default()),
            }),
        })
    }

    /// The acceptor for a handshake starting now: the configuration last read.
    pub fn acceptor(&self) -> TlsAcceptor {
        let current = self
            .inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        TlsAcceptor::from(current)
    }

    /// Follows the reloads (for tests and anything that must wait for one).
    pub fn reloads(&self) -> watch::Receiver<Reloads> {
        self.inner.reloads.subscribe()
    }

    /// Re-reads the files whenever they change, until `stop` turns true, and at each check
    /// while they do not read. The reading runs on the blocking pool, away from the
    /// handshakes and the request path.
    pub async fn watch(self, mut stop: watch::Receiver<bool>) {
        let mut changes = self.inner.changes.clone();
        let mut failing = false;
        loop {
            let changed = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                changed = changes.check() => changed,
            };
            if !changed && !failing {
                continue;
            }
            let inner = self.inner.clone();
            match tokio::task::spawn_blocking(move || inner.reload(changed)).await {
                Ok(read) => failing = !read,
                Err(_) => {
                    tracing::error!(event = "tls.reload_task_failed", listener = %self.inner.field, "TLS reload task failed")
                }
            }
        }
    }
}

impl Inner {
    /// Reads the files anew; whether they read. A failure is said (and counted) once per
    /// version of the files: when they `changed`, not when the same ones are tried again.
    fn reload(&self, changed: bool) -> bool {
        let metric = |result: &str| {
            crate::telemetry::metrics()
                .tls_reloads
                .with_label_values(&[&self.field, result])
                .inc();
        };
        match server_config(&self.files, &self.field, &self.provider) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                metric("ok");
                self.reloads.send_modify(|r| r.ok += 1);
                tracing::info!(
                    event = "tls.reloaded",
                    listener = %self.field,
                    cert_file = %self.files.cert_file,
                    client_ca_file = ?self.files.client_ca_file,
                    "TLS files re-read"
                );
                true
            }
            Err(e) => {
                if !changed {
                    return false;
                }
                metric("error");
                self.reloads.send_modify(|r| r.failed += 1);
                tracing::warn!(
                    event = "tls.unreadable",
                    listener = %self.field,
                    error = %e,
                    "TLS files changed but do not read; keeping the last good ones"
                );
                false
            }
        }
    }
}

/// The whole handshake configuration, read from the files.
fn server_config(
    cfg: &TlsConfig,
    field: &str,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ServerConfig, ConfigError> {
    let certified = certified(&cfg.cert_file, &cfg.key_file, field, provider)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(field, e.to_string()))?;
    let builder = match &cfg.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca_field = format!("{field}.client_ca_file");
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path, &ca_field)? {
                roots
                    .add(cert)
                    .map_err(|e| ConfigError::new(&ca_field, format!("{path}: {e}")))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| ConfigError::new(&ca_field, format!("{path}: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    // gRPC is HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read_certs(path: &str, field: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| ConfigError::new(field, format!("cannot read {path}: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError::new(field, format!("{path}: {e}")))?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            field,
            format!("{path} holds no PEM certificate"),
        ));
    }
    Ok(certs)
}

fn certified(
    cert_file: &str,
    key_file: &str,
    field: &str,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, ConfigError> {
    let certs = read_certs(cert_file, &format!("{field}.cert_file"))?;
    let key_field = format!("{field}.key_file");
    // The key's bytes never reach an error message.
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|_| {
        ConfigError::new(
            &key_field,
            format!("{key_file} holds no readable PEM private key"),
        )
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| ConfigError::new(&key_field, e.to_string()))?;
    let certified = CertifiedKey::new(certs, key);
    certified.keys_match().map_err(|e| {
        ConfigError::new(&key_field, format!("does not match the certificate: {e}"))
    })?;
    Ok(certified)
}

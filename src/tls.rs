//! TLS for keygate's gRPC and admin listeners (rustls): the certificate and key from
//! files, and, with a client CA, client certificates required and verified (mTLS).
//!
//! Owns only the handshake's configuration; `transport` runs the handshakes. All three
//! files are re-read when one of them changes — by a background task (`ListenerTls::watch`)
//! that looks at their modification times every second and swaps in a whole new rustls
//! configuration. A handshake only clones the current configuration's `Arc`: it does no
//! file I/O and waits on no reload. A file that no longer reads after a change keeps the
//! last good configuration (logged, and counted in `keygate_tls_reloads_total`), so a
//! half-written renewal never takes the listener down; it is tried again at each check
//! until the files read.

use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsConfig};

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
    /// Only the reloading task touches it, never a handshake.
    reload: Mutex<ReloadState>,
    reloads: watch::Sender<Reloads>,
}

struct ReloadState {
    /// The files as they were when `current` was read from them.
    loaded: Stamps,
    /// The files as they were when they last failed to read (logged once per change).
    failed: Option<Stamps>,
}

/// How many times the files were re-read after a change, and how many of those failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloads {
    pub ok: u64,
    pub failed: u64,
}

/// What tells one version of a file from the next: its modification time and length
/// (a rewrite within the file system's timestamp granularity mostly changes the length).
type Stamps = Vec<Option<(SystemTime, u64)>>;

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
        // Stamped before reading, so a change made while reading is seen by the next check.
        let loaded = stamps(cfg);
        let config = server_config(cfg, field, &provider)?;
        Ok(ListenerTls {
            inner: Arc::new(Inner {
                field: field.to_owned(),
                files: cfg.clone(),
                provider,
                current: RwLock::new(Arc::new(config)),
                reload: Mutex::new(ReloadState {
                    loaded,
                    failed: None,
                }),
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

    /// Re-reads the files whenever they change, until `stop` turns true. The reading runs
    /// on the blocking pool, away from the handshakes and the request path.
    pub async fn watch(self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(RELOAD_CHECK) => {}
            }
            let inner = self.inner.clone();
            if tokio::task::spawn_blocking(move || inner.reload_if_changed())
                .await
                .is_err()
            {
                tracing::error!(listener = %self.inner.field, "TLS reload task failed");
            }
        }
    }
}

impl Inner {
    fn reload_if_changed(&self) {
        let mut state = self.reload.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamps(&self.files);
        if now == state.loaded {
            return;
        }
        let metric = |result: &str| {
            crate::telemetry::metrics()
                .tls_reloads
                .with_label_values(&[&self.field, result])
                .inc();
        };
        match server_config(&self.files, &self.field, &self.provider) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                state.loaded = now;
                state.failed = None;
                metric("ok");
                self.reloads.send_modify(|r| r.ok += 1);
                tracing::info!(
                    listener = %self.field,
                    cert_file = %self.files.cert_file,
                    client_ca_file = ?self.files.client_ca_file,
                    "TLS files re-read"
                );
            }
            // Tried again at the next check; said (and counted) once per version of the files.
            Err(e) if state.failed.as_ref() != Some(&now) => {
                state.failed = Some(now);
                metric("error");
                self.reloads.send_modify(|r| r.failed += 1);
                tracing::warn!(
                    listener = %self.field,
                    error = %e,
                    "TLS files changed but do not read; keeping the last good ones"
                );
            }
            Err(_) => {}
        }
    }
}

fn stamps(cfg: &TlsConfig) -> Stamps {
    [
        Some(&cfg.cert_file),
        Some(&cfg.key_file),
        cfg.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        std::fs::metadata(path)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .ok()
    })
    .collect()
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

//! TLS for keygate's gRPC and admin listeners (rustls): the certificate and key from
//! files, re-read when either file changes (checked at most once a second, at a
//! handshake), and, with a client CA, client certificates required and verified (mTLS).
//!
//! Owns only the handshake's configuration; `transport` runs the handshakes. A file that
//! no longer reads after a change keeps the last good certificate (and says so in the
//! log), so a half-written renewal never takes the listener down.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsConfig};

/// How often, at most, the certificate files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The acceptor for a listener with `cfg` (`field`: where it is configured, for errors).
pub fn acceptor(cfg: &TlsConfig, field: &str) -> Result<TlsAcceptor, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = ReloadingCert::load(cfg, field, provider.clone())?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(field, e.to_string()))?;
    let builder = match &cfg.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path, &format!("{field}.client_ca_file"))? {
                roots.add(cert).map_err(|e| {
                    ConfigError::new(format!("{field}.client_ca_file"), e.to_string())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ConfigError::new(format!("{field}.client_ca_file"), e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(certs));
    // gRPC is HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
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

/// The listener's certificate, re-read when its files change.
struct ReloadingCert {
    cert_file: String,
    key_file: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    state: Mutex<State>,
}

struct State {
    checked: Instant,
    modified: (Option<SystemTime>, Option<SystemTime>),
    current: Arc<CertifiedKey>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

fn modified(path: &str) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    fn load(
        cfg: &TlsConfig,
        field: &str,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<ReloadingCert, ConfigError> {
        let current = certified(&cfg.cert_file, &cfg.key_file, field, &provider)?;
        Ok(ReloadingCert {
            state: Mutex::new(State {
                checked: Instant::now(),
                modified: (modified(&cfg.cert_file), modified(&cfg.key_file)),
                current: Arc::new(current),
            }),
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            provider,
        })
    }
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

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let now = (modified(&self.cert_file), modified(&self.key_file));
            if now != state.modified {
                state.modified = now;
                match certified(&self.cert_file, &self.key_file, "tls", &self.provider) {
                    Ok(c) => {
                        state.current = Arc::new(c);
                        tracing::info!(cert_file = %self.cert_file, "TLS certificate re-read");
                    }
                    Err(e) => tracing::warn!(
                        cert_file = %self.cert_file,
                        error = %e,
                        "TLS certificate files changed but do not read; keeping the last good one"
                    ),
                }
            }
        }
        Some(state.current.clone())
    }
}

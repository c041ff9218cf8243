//! Live reload: the rules a replica answers with, swapped whole when the configuration
//! file changes (or on SIGHUP). The new file is loaded and checked in full first: one
//! that does not load, or that changes a setting only a restart can take
//! (`Config::restart_only_changes`), changes nothing and is reported (log event, metric,
//! `/readyz` body). A request runs to its end on the rules it started with; the
//! gRPC services and the HTTP adapter load the current rules once per call.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::rules::{Rules, Shared};
use crate::api::envoy::{CurrentEnvoy, EnvoyAuthorization};
use crate::api::envoy_answer::CheckAnswer;
use crate::api::envoy_wire::{Authorization, CheckRequestView};
use crate::api::proto::{self, authorizer_server::Authorizer as AuthorizerApi, keys_server::Keys};
use crate::config::Config;
use crate::file_watch::FileWatch;

/// The running rules and what builds the next ones.
pub struct Live {
    rules: ArcSwap<Rules>,
    shared: Shared,
    /// The file the rules come from (`serve --config`, the module's `file:`); unset:
    /// nothing to reload.
    file: OnceLock<Source>,
    /// Why the last reload was not applied, until one is: `/readyz` shows it.
    last_failure: Mutex<Option<String>>,
    /// Serialises reloads: a file event and a SIGHUP at once build one after the other.
    reloading: Mutex<()>,
}

/// Where reloads read the rules from.
struct Source {
    path: PathBuf,
    /// Made before the file was first read.
    changes: FileWatch,
    /// The environment the file was first loaded with: its `KEYGATE_…` overrides apply
    /// to every reload as they did at startup.
    env: Vec<(String, String)>,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Applied,
    /// The file says what the running rules already say.
    Unchanged,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the configuration file was not reloaded: {0}")]
    Invalid(String),
    #[error("the configuration file was not reloaded: {} needs a restart", .0.join(", "))]
    NeedsRestart(Vec<String>),
}

impl Live {
    pub fn new(rules: Rules, shared: Shared) -> Live {
        Live {
            rules: ArcSwap::from_pointee(rules),
            shared,
            file: OnceLock::new(),
            last_failure: Mutex::new(None),
            reloading: Mutex::new(()),
        }
    }

    /// Takes the rules from `path` from now on (once; the file the server started with),
    /// reloading when `changes` sees it change, with the overrides of `env` (the
    /// environment it was first loaded with). Made before the file was first read,
    /// `changes` also sees a change made between that read and this call (a ConfigMap
    /// updated while the replica was starting), which would otherwise wait for the next.
    pub fn reload_from(
        &self,
        path: PathBuf,
        changes: FileWatch,
        env: impl IntoIterator<Item = (String, String)>,
    ) {
        let env = env.into_iter().collect();
        let _ = self.file.set(Source { path, changes, env });
    }

    /// The file reloads read, if any.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.file.get().map(|source| source.path.as_path())
    }

    /// The rules to answer one request with.
    pub fn current(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// Why the last reload failed, if no reload has succeeded since.
    pub fn last_failure(&self) -> Option<String> {
        self.last_failure.lock().expect("not poisoned").clone()
    }

    /// Reads the file again (the environment over it, as at startup) and swaps the
    /// rules it describes in; counted and logged either way.
    /// Blocking (it reads the file and compiles the rules): `follow_file` runs it off the
    /// request path, on tokio's blocking pool.
    pub fn reload(&self, stop: &watch::Receiver<bool>) -> Result<Reloaded, ReloadError> {
        let Some(Source { path, env, .. }) = self.file.get() else {
            return Ok(Reloaded::Unchanged);
        };
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.current();
        let outcome = std::fs::read_to_string(path)
            .map_err(|e| ReloadError::Invalid(format!("cannot read {}: {e}", path.display())))
            .and_then(|text| {
                Config::load(Some(&text), env.iter().cloned())
                    .map_err(|e| ReloadError::Invalid(e.to_string()))
            })
            .and_then(|config| self.apply(config, stop));
        // The rules replaced are freed here, once the requests that started on them have
        // ended (bounded), not by whichever request worker happens to end last: a
        // listener's holds the rules, a request of the module inside Envoy their Envoy
        // adapter (`CurrentEnvoy`), on Envoy's worker.
        let freed_by = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let replaced = matches!(outcome, Ok(Reloaded::Applied));
        let in_use = |rules: &Arc<Rules>| {
            Arc::strong_count(rules) > 1 || Arc::strong_count(&rules.envoy) > 1
        };
        while replaced && in_use(&before) && std::time::Instant::now() < freed_by {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(before);
        let result = match &outcome {
            Ok(Reloaded::Applied) => "applied",
            Ok(Reloaded::Unchanged) => "unchanged",
            Err(ReloadError::Invalid(_)) => "invalid",
            Err(ReloadError::NeedsRestart(_)) => "refused",
        };
        crate::telemetry::metrics()
            .config_reloads
            .with_label_values(&[result])
            .inc();
        match &outcome {
            Ok(Reloaded::Applied) => {
                tracing::info!(event = "config.reloaded", path = %path.display(), "configuration reloaded: new requests are decided by it")
            }
            Ok(Reloaded::Unchanged) => {}
            Err(e) => {
                tracing::warn!(event = "config.reload_failed", path = %path.display(), error = %e, "the running configuration is kept")
            }
        }
        *self.last_failure.lock().expect("not poisoned") =
            outcome.as_ref().err().map(|e| e.to_string());
        outcome
    }

    /// Swaps in the rules `config` describes, if a running keygate can take them.
    pub fn apply(
        &self,
        config: Config,
        stop: &watch::Receiver<bool>,
    ) -> Result<Reloaded, ReloadError> {
        let running = self.current();
        if running.config.source == config.source {
            return Ok(Reloaded::Unchanged);
        }
        let restart = running.config.restart_only_changes(&config);
        if !restart.is_empty() {
            return Err(ReloadError::NeedsRestart(restart));
        }
        let tokens_changed = running.config.changed(&config, &["jwt"])
            || running.config.changed(&config, &["sessions"]);
        let rules = Rules::build(config, &self.shared, Some(&running))
            .map_err(|e| ReloadError::Invalid(format!("{e:#}")))?;
        if !Arc::ptr_eq(&rules.issuers, &running.issuers) {
            rules.issuers.spawn_refresh(stop.clone());
        }
        self.rules.store(Arc::new(rules));
        if tokens_changed {
            // What was decided under the old issuers; API keys' answers stay.
            self.shared.cache.invalidate_tokens();
        }
        Ok(Reloaded::Applied)
    }
}

/// The HTTP authorization listener and keygate's module inside Envoy answer by the
/// current rules.
impl CurrentEnvoy for Live {
    fn envoy(&self) -> Arc<EnvoyAuthorization> {
        Arc::clone(&self.rules.load().envoy)
    }
}

/// The gRPC services over whatever rules are current.
#[derive(Clone)]
pub struct LiveRules(pub Arc<Live>);

#[tonic::async_trait]
impl Authorization for LiveRules {
    async fn check(
        &self,
        request: Request<CheckRequestView>,
    ) -> Result<Response<CheckAnswer>, Status> {
        self.0.current().envoy.check(request).await
    }
}

/// `impl $api for LiveRules`: each call handed to the current rules' `$service`.
macro_rules! delegate_to_current {
    ($api:ident, $service:ident, $($call:ident($request:ty) -> $response:ty;)*) => {
        #[tonic::async_trait]
        impl $api for LiveRules {
            $(async fn $call(&self, r: Request<$request>) -> Result<Response<$response>, Status> {
                self.0.current().$service.$call(r).await
            })*
        }
    };
}

delegate_to_current!(AuthorizerApi, checks,
    check(proto::CheckRequest) -> proto::CheckResponse;
    acquire_lease(proto::AcquireLeaseRequest) -> proto::AcquireLeaseResponse;
    renew_lease(proto::RenewLeaseRequest) -> proto::LeaseResponse;
    release_lease(proto::ReleaseLeaseRequest) -> proto::LeaseResponse;
    mint_session_token(proto::MintSessionTokenRequest) -> proto::MintSessionTokenResponse;
);

delegate_to_current!(Keys, keys,
    create_key(proto::CreateKeyRequest) -> proto::CreateKeyResponse;
    get_key(proto::GetKeyRequest) -> proto::Key;
    list_keys(proto::ListKeysRequest) -> proto::ListKeysResponse;
    revoke_key(proto::RevokeKeyRequest) -> proto::Key;
    update_key(proto::UpdateKeyRequest) -> proto::Key;
    delete_key(proto::DeleteKeyRequest) -> proto::DeleteKeyResponse;
    rotate_key(proto::RotateKeyRequest) -> proto::RotateKeyResponse;
    list_audit(proto::ListAuditRequest) -> proto::ListAuditResponse;
    revoke_tokens(proto::RevokeTokensRequest) -> proto::TokenRevocation;
);

/// How often the configuration file's metadata is looked at. A change is taken within
/// this (plus the reload itself); SIGHUP takes it at once.
pub const FILE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether SIGHUP reloads the file (`follow_file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hangup {
    /// `keygate serve`: SIGHUP reloads at once.
    Reloads,
    /// keygate's module inside Envoy: the process's signals are Envoy's.
    Left,
}

/// Reloads whenever the file changes (`FileWatch`: a Kubernetes ConfigMap update, which
/// swaps a symlink, included), and on SIGHUP if `hangup` says so, until `stop`.
pub async fn follow_file(live: Arc<Live>, mut stop: watch::Receiver<bool>, hangup: Hangup) {
    let Some(mut file) = live.file.get().map(|source| source.changes.clone()) else {
        return;
    };
    let mut hangup = match hangup {
        Hangup::Left => None,
        Hangup::Reloads => {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(signal) => Some(signal),
                Err(e) => {
                    tracing::warn!(event = "config.sighup_unavailable", error = %e, "SIGHUP cannot be followed; the file still is");
                    None
                }
            }
        }
    };
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = async {
                match hangup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending().await,
                }
            } => {}
            _ = file.changed() => {}
        }
        // Compiling the rules takes a core for a moment: not one of the request workers.
        let (reloading, watching) = (live.clone(), stop.clone());
        let _ = tokio::task::spawn_blocking(move || reloading.reload(&watching)).await;
    }
}

//! Wiring for keygate's module inside Envoy: the decider (`api::envoy_module`) built
//! from keygate's own configuration, and the thread that follows the service's `Watch`
//! stream for it. The module's crate (`envoy-module/`) calls `ModuleRuntime::start` when
//! Envoy creates the filter's configuration and drops it when Envoy destroys it.
//!
//! The configuration is keygate's (`Config::load`, `KEYGATE_…` overrides from Envoy's
//! environment), given inline or as a file. A file is followed as `keygate serve`
//! follows its own: a change is reloaded within `FILE_CHECK` (the same sections live,
//! the same refusals), so the module decides by the rules the service decides by once
//! both have read the change. The module takes from it what decides (`policy`, `errors`,
//! `api_keys`, `cache`, `jwt`, `sessions`, `rate_limits`) and `revocation.watch_url`,
//! the keygate it follows whatever `revocation.source` says (a file the replicas run
//! with `source: store` serves the module as it is). It never opens the `store`: its
//! own is an empty in-process one that nothing it decides reads. The usage it counts
//! goes to that keygate (`Revocations/ReportUsage`) every
//! `api_keys.usage_flush_interval`.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::envoy_module::ModuleDecider;
use crate::api::revocations::UsageReporter;
use crate::config::{Config, ConfigError, Secrets};
use crate::file_watch::FileWatch;
use crate::server::{follow_file, App, Hangup, FILE_CHECK};
use crate::store::memory::MemoryStore;
use crate::store::UsageSink;

/// How long a module being stopped waits for its last usage report.
const LAST_FLUSH: Duration = Duration::from_secs(1);

/// The module's decider and the thread its follower runs on; stops that thread when
/// dropped.
pub struct ModuleRuntime {
    pub decider: Arc<ModuleDecider>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl ModuleRuntime {
    /// Builds the decider from `config` with `env`'s `KEYGATE_…` overrides, and starts
    /// following `revocation.watch_url`. `config` is keygate's configuration (YAML), or
    /// `file:` and the path of keygate's configuration file, then followed for changes.
    /// An invalid configuration is an error naming the field; nothing is started then.
    pub fn start(
        config: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ModuleRuntime, ConfigError> {
        let file = config
            .strip_prefix("file:")
            .map(|p| PathBuf::from(p.trim()));
        // Before the file is read: a change made from here on is reloaded.
        let changes = file.as_ref().map(|p| FileWatch::new([p], FILE_CHECK));
        let text;
        let config = match &file {
            None => config,
            Some(path) => {
                text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(
                        "filter_config",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                &text
            }
        };
        let env: Vec<(String, String)> = env
            .into_iter()
            .chain([
                // The module always follows a keygate's Watch stream: loaded as
                // `source: watch`, so `revocation.watch_url` is checked as for a
                // replica that does.
                ("KEYGATE_REVOCATION__SOURCE".to_owned(), "watch".to_owned()),
                // It never runs argon2 (a credential it has not learned goes to the
                // service): one idle thread in Envoy's process, not one per core.
                (
                    "KEYGATE_API_KEYS__ARGON2__VERIFY_CONCURRENCY".to_owned(),
                    "1".to_owned(),
                ),
            ])
            .collect();
        let config = Config::load(Some(config), env.iter().cloned())?;
        let secrets = Secrets::for_module()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("keygate-module")
            .build()
            .map_err(|e| ConfigError::new("module", format!("cannot start its thread: {e}")))?;
        let store = Arc::new(MemoryStore::new());
        // What the module decides is counted as the service counts it, and reported to
        // the keygate it follows, which writes it with its own.
        let usage: Arc<dyn UsageSink> = match &secrets.watch_token {
            Some(token) => Arc::new(UsageReporter::new(
                config.revocation.watch_url.clone(),
                token.clone(),
            )),
            // `App` refuses to start without it, naming the variable.
            None => store.clone(),
        };
        let flush_every = config.api_keys.usage_flush_interval;
        // Built on the runtime: building the rules may start a JWKS refresh.
        let app = runtime
            .block_on(async { App::with_usage_sink(config, secrets, store, usage) })
            .map_err(|e| ConfigError::new("module", format!("{e:#}")))?;
        if let Some((path, changes)) = file.zip(changes) {
            app.live.reload_from(path, changes, env);
        }
        let decider = Arc::new(ModuleDecider::new(
            app.live.clone(),
            Arc::clone(&app.bus),
            Arc::clone(&app.cache),
            Arc::clone(&app.delegations),
        ));
        let (stop, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("keygate-module".into())
            .spawn(move || {
                let feed = app.revocation_feed();
                runtime.block_on(async {
                    let flush =
                        tokio::spawn(Arc::clone(&app.usage).run(flush_every, stop_rx.clone()));
                    // Envoy's signals are Envoy's: the file alone is followed.
                    tokio::spawn(follow_file(app.live.clone(), stop_rx.clone(), Hangup::Left));
                    Arc::clone(&app.bus).follow(feed, stop_rx).await;
                    // The last flush, as a replica's at shutdown; bounded, for Envoy waits
                    // on this when it destroys the filter's configuration. Usage it could
                    // not report in that time is lost.
                    let _ = tokio::time::timeout(LAST_FLUSH, flush).await;
                });
            })
            .map_err(|e| ConfigError::new("module", format!("cannot start its thread: {e}")))?;
        Ok(ModuleRuntime {
            decider,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ModuleRuntime {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
